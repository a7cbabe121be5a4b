//! `starling get`: through the local daemon when one answers, else in this process straight
//! from the origin. The output appears only once the content is verified.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use starling::config::Config;
use starling::context::NodeContext;
use starling::core::{parse_headers, Request};
use starling::daemon::{self, api::ApiEvent, api::GetRequest};
use starling::fetch::{exit, FetchError, Fetched, Fetcher, Progress, Served};

use super::{check_output_dir, classify, fail, mirror, parse_digest, parse_size, Bar, Failure};

#[derive(Args)]
pub struct GetArgs {
    /// http:// or https:// URL of the content.
    url: String,
    /// Output file, or - for standard output. It appears only once the content is verified.
    #[arg(short = 'O', long = "output", value_name = "FILE")]
    output: PathBuf,
    /// Expected digest of the whole content (sha256:<64 hex>). It names the task, so the same
    /// content through any URL is stored once; a mismatch fails and saves nothing.
    #[arg(long, value_name = "DIGEST")]
    digest: Option<String>,
    /// Extra request header for the origin, as 'Name: value'. Repeatable.
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// Piece length for a new task, in bytes (suffixes K, M, KiB, MiB). A multiple of 4096
    /// between 16 KiB and 64 MiB. Default: chosen from the content length.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    piece_length: Option<u64>,
    /// Extra CA certificate (PEM) to trust for an HTTPS origin. Repeatable.
    #[arg(long = "ca-cert", value_name = "FILE")]
    ca_certs: Vec<PathBuf>,
    /// Always write an independent copy: never hard-link the output to the store.
    #[arg(long)]
    no_hardlink: bool,
    /// Work in this process even when a daemon is running.
    #[arg(long)]
    no_daemon: bool,
}

pub async fn run(mut cfg: Config, args: GetArgs, quiet: bool) -> Result<(), Failure> {
    let req = Request {
        url: args.url.clone(),
        digest: parse_digest(args.digest.as_deref())?,
        headers: parse_headers(&args.headers).map_err(|e| fail(exit::USAGE)(e.into()))?,
        piece_length: args.piece_length,
    };
    let to_stdout = args.output.as_os_str() == "-";
    if !to_stdout {
        check_output_dir(&args.output).map_err(fail(exit::USAGE))?;
    }
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let mut bar = Bar::start(!quiet && std::io::stderr().is_terminal(), &progress);

    // A running daemon does the work (shared store, one download per task), unless the
    // request needs this process: stdout output or extra CAs for this request only.
    if !args.no_daemon && !to_stdout && args.ca_certs.is_empty() {
        let output = std::path::absolute(&args.output).map_err(|e| fail(exit::USAGE)(e.into()))?;
        let get = GetRequest {
            request: req.clone(),
            output,
            no_hardlink: args.no_hardlink,
        };
        let answer = daemon::client_get(&cfg.socket_path(), &get, mirror(&progress)).await;
        match answer {
            Ok(Some(ApiEvent::Done {
                bytes,
                digest,
                from_store,
                origin_bytes,
                parent_bytes,
                placed,
            })) => {
                bar.finish();
                if !quiet {
                    let from = if from_store {
                        "local store, 0 bytes from the origin".to_string()
                    } else {
                        format!(
                            "{parent_bytes} bytes from peers and {origin_bytes} from the origin"
                        )
                    };
                    eprintln!(
                        "starling: saved {} ({bytes} bytes, {digest}) from {from} via {placed} (daemon) in {:.2}s",
                        args.output.display(),
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(());
            }
            Ok(Some(ApiEvent::Error { code, message })) => {
                return Err(Failure(code, anyhow::anyhow!(message)));
            }
            Ok(Some(ApiEvent::Probe(_))) => {
                return Err(Failure(
                    exit::OTHER,
                    anyhow::anyhow!("the daemon answered a get with a probe report"),
                ));
            }
            Ok(Some(ApiEvent::Progress { .. })) | Ok(None) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // It took the request and died (killed, crashed): its verified pieces are
                // kept, and retrying resumes; working in-process now would bypass the swarm.
                return Err(Failure(
                    exit::NETWORK,
                    anyhow::anyhow!("the daemon at {} stopped before finishing; its verified pieces are kept: restart it and run the command again", cfg.socket_path().display()),
                ));
            }
            Err(e) => {
                tracing::warn!(socket = %cfg.socket_path().display(), error = %e, "the daemon did not answer; working in-process");
            }
        }
    }

    cfg.source.ca_certs.extend(args.ca_certs.iter().cloned());
    let ctx = NodeContext::open(cfg).map_err(|e| classify(FetchError::from(e)))?;
    // Make room before adding to the store.
    ctx.collect_garbage_async().await;
    let res = Fetcher::new(ctx).fetch(&req, &progress).await;
    bar.finish();
    let fetched = res.map_err(classify)?;
    let placed = place(&fetched, &args)?;
    if !quiet {
        let m = &fetched.manifest;
        let from = match fetched.served {
            Served::Store => "local store, 0 bytes from the origin".to_string(),
            Served::Origin => format!(
                "origin, {} bytes received",
                progress.origin_bytes.load(Ordering::Relaxed)
            ),
            Served::Swarm => format!(
                "peers, {} bytes from parents and {} from the origin",
                progress.parent_bytes.load(Ordering::Relaxed),
                progress.origin_bytes.load(Ordering::Relaxed)
            ),
            Served::Local => "a local file".to_string(),
        };
        eprintln!(
            "starling: saved {} ({} bytes, {}) from {from} via {placed} in {:.2}s",
            args.output.display(),
            m.plan().content_length(),
            m.content_digest(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Writes the verified content to the output: standard output, or a reflink, hard link or copy.
fn place(fetched: &Fetched, args: &GetArgs) -> Result<String, Failure> {
    if args.output.as_os_str() != "-" {
        return Ok(fetched
            .deliver(&args.output, !args.no_hardlink)
            .map_err(|e| {
                fail(exit::LOCAL)(anyhow::anyhow!(
                    "cannot write {}: {e}",
                    args.output.display()
                ))
            })?
            .to_string());
    }
    fetched
        .task
        .lease()
        .downgrade()
        .map_err(|e| fail(exit::LOCAL)(e.into()))?;
    let mut f = std::fs::File::open(fetched.task.content_path())
        .map_err(|e| fail(exit::LOCAL)(e.into()))?;
    std::io::copy(&mut f, &mut std::io::stdout().lock())
        .map_err(|e| fail(exit::LOCAL)(anyhow::anyhow!("cannot write to standard output: {e}")))?;
    Ok("stdout".to_string())
}
