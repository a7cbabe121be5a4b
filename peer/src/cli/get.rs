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
    /// What to fetch: an http:// or https:// URL; hf://ORG/REPO[@REVISION][/PATH] (a Hugging
    /// Face repository, or one file or folder of it); or s3://BUCKET/KEY (s3://BUCKET/PREFIX/
    /// for every object under a prefix).
    pub url: String,
    /// Output file, or - for standard output; a directory for hf:// and s3:// prefixes. Files
    /// appear only once verified.
    #[arg(short = 'O', long = "output", value_name = "FILE|DIR")]
    pub output: Option<PathBuf>,
    /// For hf://: write into the Hugging Face cache (blobs, snapshots, refs), where
    /// transformers and vLLM find the files offline. DIR defaults to HF_HUB_CACHE, else
    /// $HF_HOME/hub (~/.cache/huggingface/hub).
    #[arg(long = "hf-cache", value_name = "DIR", num_args = 0..=1)]
    pub hf_cache: Option<Option<PathBuf>>,
    /// Expected digest of the whole content (sha256:<64 hex>). It names the task, so the same
    /// content through any URL is stored once; a mismatch fails and saves nothing.
    #[arg(long, value_name = "DIGEST")]
    pub digest: Option<String>,
    /// Extra request header for the origin, as 'Name: value'. Repeatable.
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    pub headers: Vec<String>,
    /// Piece length for a new task, in bytes (suffixes K, M, KiB, MiB). A multiple of 4096
    /// between 16 KiB and 64 MiB. Default: chosen from the content length.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub piece_length: Option<u64>,
    /// Extra CA certificate (PEM) to trust for an HTTPS origin. Repeatable.
    #[arg(long = "ca-cert", value_name = "FILE")]
    pub ca_certs: Vec<PathBuf>,
    /// Always write an independent copy: never hard-link the output to the store.
    #[arg(long)]
    pub no_hardlink: bool,
    /// Work in this process even when a daemon is running.
    #[arg(long)]
    pub no_daemon: bool,
}

pub async fn run(mut cfg: Config, args: GetArgs, quiet: bool) -> Result<(), Failure> {
    if args.url.starts_with("hf://") || args.url.starts_with("s3://") {
        return super::models::run(cfg, &args, quiet).await;
    }
    if args.hf_cache.is_some() {
        return Err(Failure(
            exit::USAGE,
            anyhow::anyhow!(
                "--hf-cache is for hf:// references; {} is not one",
                args.url
            ),
        ));
    }
    let Some(output) = args.output.clone() else {
        return Err(Failure(
            exit::USAGE,
            anyhow::anyhow!("name the output with -O FILE (or -O - for standard output)"),
        ));
    };
    let req = Request {
        url: args.url.clone(),
        digest: parse_digest(args.digest.as_deref())?,
        headers: parse_headers(&args.headers).map_err(|e| fail(exit::USAGE)(e.into()))?,
        piece_length: args.piece_length,
    };
    let to_stdout = output.as_os_str() == "-";
    if !to_stdout {
        check_output_dir(&output).map_err(fail(exit::USAGE))?;
    }
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let mut bar = Bar::start(!quiet && std::io::stderr().is_terminal(), &progress);

    // A running daemon does the work (shared store, one download per task), unless the
    // request needs this process: stdout output or extra CAs for this request only.
    if !args.no_daemon && !to_stdout && args.ca_certs.is_empty() {
        let abs = std::path::absolute(&output).map_err(|e| fail(exit::USAGE)(e.into()))?;
        if let Some(got) =
            through_daemon(&cfg.socket_path(), &req, &abs, args.no_hardlink, &progress).await?
        {
            bar.finish();
            if !quiet {
                eprintln!(
                    "starling: saved {} ({} bytes, {}) from {} via {} (daemon) in {:.2}s",
                    output.display(),
                    got.bytes,
                    got.digest,
                    got.from,
                    got.placed,
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
    }

    cfg.source.ca_certs.extend(args.ca_certs.iter().cloned());
    let ctx = NodeContext::open(cfg).map_err(|e| classify(FetchError::from(e)))?;
    // Make room before adding to the store.
    ctx.collect_garbage_async().await;
    let res = Fetcher::new(ctx).fetch(&req, &progress).await;
    bar.finish();
    let fetched = res.map_err(classify)?;
    let placed = place(&fetched, &output, args.no_hardlink)?;
    if !quiet {
        let m = &fetched.manifest;
        let from = served_from(&fetched, &progress);
        eprintln!(
            "starling: saved {} ({} bytes, {}) from {from} via {placed} in {:.2}s",
            output.display(),
            m.plan().content_length(),
            m.content_digest(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// What one fetch through the daemon or in this process delivered.
pub struct Got {
    pub bytes: u64,
    pub origin_bytes: u64,
    pub parent_bytes: u64,
    pub from_store: bool,
    pub digest: String,
    /// Where the bytes came from, in words.
    pub from: String,
    /// How the output was placed (reflink, hard link, copy).
    pub placed: String,
}

/// Fetches `req` into `output` (absolute) through the daemon at `socket`. Ok(None) when no
/// daemon answers (the caller works in-process).
pub async fn through_daemon(
    socket: &std::path::Path,
    req: &Request,
    output: &std::path::Path,
    no_hardlink: bool,
    progress: &Arc<Progress>,
) -> Result<Option<Got>, Failure> {
    let get = GetRequest {
        request: req.clone(),
        output: output.to_path_buf(),
        no_hardlink,
    };
    match daemon::client_get(socket, &get, mirror(progress)).await {
        Ok(Some(ApiEvent::Done {
            bytes,
            digest,
            from_store,
            origin_bytes,
            parent_bytes,
            placed,
        })) => {
            let from = if from_store {
                "local store, 0 bytes from the origin".to_string()
            } else {
                format!("{parent_bytes} bytes from peers and {origin_bytes} from the origin")
            };
            Ok(Some(Got {
                bytes,
                origin_bytes,
                parent_bytes,
                from_store,
                digest: digest.to_string(),
                from,
                placed: placed.to_string(),
            }))
        }
        Ok(Some(ApiEvent::Error { code, message })) => Err(Failure(code, anyhow::anyhow!(message))),
        Ok(Some(ApiEvent::Progress { .. })) | Ok(None) => Ok(None),
        Ok(Some(other)) => Err(Failure(
            exit::OTHER,
            anyhow::anyhow!("the daemon answered a get with {other:?}"),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            // It took the request and died (killed, crashed): its verified pieces are
            // kept, and retrying resumes; working in-process now would bypass the swarm.
            Err(Failure(
                exit::NETWORK,
                anyhow::anyhow!("the daemon at {} stopped before finishing; its verified pieces are kept: restart it and run the command again", socket.display()),
            ))
        }
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %e, "the daemon did not answer; working in-process");
            Ok(None)
        }
    }
}

/// Fetches `req` into the file `output` in this process.
pub async fn in_process(
    fetcher: &Fetcher,
    req: &Request,
    output: &std::path::Path,
    no_hardlink: bool,
    progress: &Arc<Progress>,
) -> Result<Got, Failure> {
    let fetched = fetcher.fetch(req, progress).await.map_err(classify)?;
    let placed = fetched.deliver(output, !no_hardlink).map_err(|e| {
        fail(exit::LOCAL)(anyhow::anyhow!("cannot write {}: {e}", output.display()))
    })?;
    Ok(Got {
        bytes: fetched.manifest.plan().content_length(),
        origin_bytes: progress.origin_bytes.load(Ordering::Relaxed),
        parent_bytes: progress.parent_bytes.load(Ordering::Relaxed),
        from_store: fetched.served == Served::Store,
        digest: fetched.manifest.content_digest().to_string(),
        from: served_from(&fetched, progress),
        placed: placed.to_string(),
    })
}

/// Where a fetch in this process got its bytes, in words.
fn served_from(fetched: &Fetched, progress: &Progress) -> String {
    match fetched.served {
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
    }
}

/// Writes the verified content to the output: standard output, or a reflink, hard link or copy.
fn place(
    fetched: &Fetched,
    output: &std::path::Path,
    no_hardlink: bool,
) -> Result<String, Failure> {
    if output.as_os_str() != "-" {
        return Ok(fetched
            .deliver(output, !no_hardlink)
            .map_err(|e| {
                fail(exit::LOCAL)(anyhow::anyhow!("cannot write {}: {e}", output.display()))
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
