//! `starling import`: a local file becomes a task this node seeds. Through the daemon when one
//! answers (it seeds at once), else into the store for the daemon that later serves it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use starling::config::Config;
use starling::context::NodeContext;
use starling::core::Import;
use starling::daemon::{self, api::ApiEvent};
use starling::fetch::{exit, FetchError, Fetcher, Progress, Served};

use super::{classify, fail, mirror, parse_digest, parse_size, Bar, Failure};

#[derive(Args)]
pub struct ImportArgs {
    /// The file to import.
    file: PathBuf,
    /// The digest the content must have (sha256:<64 hex>); a mismatch fails and stores nothing.
    #[arg(long, value_name = "DIGEST")]
    digest: Option<String>,
    /// Piece length, in bytes (suffixes K, M, KiB, MiB). A multiple of 4096 between 16 KiB and
    /// 64 MiB. Default: chosen from the content length, as for a download.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    piece_length: Option<u64>,
    /// Hard-link the file into the store instead of copying it: no second copy on disk, but it
    /// must be on the store's file system, it becomes read-only, and it must not change
    /// afterwards (the store re-verifies it on every use and drops it if it did).
    #[arg(long)]
    link: bool,
    /// Work in this process even when a daemon is running.
    #[arg(long)]
    no_daemon: bool,
}

pub async fn run(cfg: Config, args: ImportArgs, quiet: bool) -> Result<(), Failure> {
    let req = Import {
        path: std::path::absolute(&args.file).map_err(|e| fail(exit::USAGE)(e.into()))?,
        digest: parse_digest(args.digest.as_deref())?,
        piece_length: args.piece_length,
        link: args.link,
    };
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let mut bar = Bar::start(!quiet && std::io::stderr().is_terminal(), &progress);
    let how = if args.link { "hard-linked" } else { "copied" };
    let report = |bytes: u64, digest: &str, stored: bool, via: &str| {
        println!("{digest}");
        if !quiet {
            let what = if stored {
                "already in the store".to_string()
            } else {
                format!("{how} into the store")
            };
            eprintln!(
                "starling: imported {} ({bytes} bytes, {digest}): {what}{via} in {:.2}s",
                args.file.display(),
                started.elapsed().as_secs_f64()
            );
        }
    };
    if !args.no_daemon {
        let answer = daemon::client_import(&cfg.socket_path(), &req, mirror(&progress)).await;
        match answer {
            Ok(Some(ApiEvent::Done {
                bytes,
                digest,
                from_store,
                ..
            })) => {
                bar.finish();
                report(bytes, &digest, from_store, "; the daemon seeds it");
                return Ok(());
            }
            Ok(Some(ApiEvent::Error { code, message })) => {
                return Err(Failure(code, anyhow::anyhow!(message)));
            }
            Ok(Some(other)) => {
                return Err(Failure(
                    exit::OTHER,
                    anyhow::anyhow!("the daemon answered an import with {other:?}"),
                ));
            }
            Ok(None) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Failure(
                    exit::LOCAL,
                    anyhow::anyhow!("the daemon at {} stopped before finishing the import; restart it and run the command again", cfg.socket_path().display()),
                ));
            }
            Err(e) => {
                tracing::warn!(socket = %cfg.socket_path().display(), error = %e, "the daemon did not answer; working in-process");
            }
        }
    }
    let ctx = NodeContext::open(cfg).map_err(|e| classify(FetchError::from(e)))?;
    ctx.collect_garbage_async().await;
    let res = Fetcher::new(ctx).import(&req, &progress).await;
    bar.finish();
    let f = res.map_err(classify)?;
    report(
        f.manifest.plan().content_length(),
        &f.manifest.content_digest().to_string(),
        f.served == Served::Store,
        "; no daemon answered, so it is stored only: a daemon on this data directory serves it once asked for it",
    );
    Ok(())
}
