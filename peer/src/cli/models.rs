//! `starling get hf://...` and `starling get s3://...`: a listing (a Hub snapshot pinned to
//! its commit, or the objects under an S3 prefix) turned into one task per file, fetched
//! `hf.concurrency` at a time in the same order on every node, with one bar per file and a
//! total. Each file is checked end to end (its SHA-256, or for a small Hub file its git blob
//! ID), and placed only once verified: into a directory, or into the Hugging Face cache.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use starling::config::Config;
use starling::context::NodeContext;
use starling::core::Request;
use starling::fetch::{exit, FetchError, Fetcher, Progress};
use starling::hub::cache::{self, CacheRepo};
use starling::hub::{git_blob_id, Hub, HubError, HubRef};
use starling::s3::{S3Error, S3Ref, S3};

use super::get::{in_process, through_daemon, GetArgs, Got};
use super::{classify, fail, Failure};

/// One file to fetch.
struct Item {
    /// Its path under the output (the repository path, or the key after the prefix).
    path: String,
    size: u64,
    req: Request,
    /// Its blob name in the Hugging Face cache.
    etag: String,
    /// A small Hub file's git blob ID, checked after download.
    git_blob: Option<String>,
    /// Its place in the listing.
    n: usize,
}

/// Where files go.
enum Dest {
    /// `-O DIR`: each at DIR/path.
    Dir(PathBuf),
    /// `-O FILE`: the one object of `s3://BUCKET/KEY`.
    File(PathBuf),
    /// The Hugging Face cache, at this commit.
    Cache(CacheRepo, String),
}

/// How files are fetched: through the daemon, or in this process.
enum Via {
    Daemon(PathBuf),
    Local(Arc<NodeContext>),
}

fn hub_failure(e: HubError) -> Failure {
    let code = match &e {
        HubError::BadRef(_) | HubError::Token { .. } => exit::USAGE,
        HubError::Unreachable { .. } => exit::NETWORK,
        HubError::Client(_) => exit::OTHER,
        _ => exit::ORIGIN_REFUSED,
    };
    Failure(code, e.into())
}

fn s3_failure(e: S3Error) -> Failure {
    let code = match &e {
        S3Error::BadRef(_) | S3Error::Credentials(_) => exit::USAGE,
        S3Error::Unreachable { .. } => exit::NETWORK,
        S3Error::Sign { .. } => exit::OTHER,
        _ => exit::ORIGIN_REFUSED,
    };
    Failure(code, e.into())
}

fn usage(msg: String) -> Failure {
    Failure(exit::USAGE, anyhow::anyhow!(msg))
}

/// An output directory: created if missing, but its parent must exist.
fn output_dir(out: &Path) -> Result<PathBuf, Failure> {
    let abs = std::path::absolute(out).map_err(|e| fail(exit::USAGE)(e.into()))?;
    if abs.is_file() {
        return Err(usage(format!(
            "-O {}: is a file; hf:// and s3:// prefixes need a directory",
            out.display()
        )));
    }
    match abs.parent() {
        Some(p) if !p.is_dir() => Err(usage(format!(
            "-O {}: directory {} does not exist; create it first",
            out.display(),
            p.display()
        ))),
        _ => Ok(abs),
    }
}

pub async fn run(cfg: Config, args: &GetArgs, quiet: bool) -> Result<(), Failure> {
    if args.digest.is_some() || args.piece_length.is_some() || !args.headers.is_empty() {
        return Err(usage(format!(
            "--digest, --piece-length and -H apply to one URL; {} lists its own files and digests",
            args.url
        )));
    }
    if args.output.as_deref().is_some_and(|o| o.as_os_str() == "-") {
        return Err(usage(format!(
            "{} cannot go to standard output; name a directory with -O DIR",
            args.url
        )));
    }
    let mut cfg = cfg;
    cfg.source.ca_certs.extend(args.ca_certs.iter().cloned());
    let started = Instant::now();
    if args.url.starts_with("hf://") {
        hf(cfg, args, quiet, started).await
    } else {
        s3(cfg, args, quiet, started).await
    }
}

async fn hf(cfg: Config, args: &GetArgs, quiet: bool, started: Instant) -> Result<(), Failure> {
    let r: HubRef = args.url.parse().map_err(hub_failure)?;
    let hub = Hub::new(&cfg.hf, &cfg.source).map_err(hub_failure)?;
    let dest_of = |commit: &str| -> Result<Dest, Failure> {
        match (&args.hf_cache, &args.output) {
            (Some(dir), None) => {
                let dir = dir.clone().unwrap_or_else(cache::default_dir);
                let c = CacheRepo::open(&dir, &r).map_err(|e| {
                    fail(exit::LOCAL)(anyhow::anyhow!(
                        "--hf-cache {}: cannot create the repository's folders: {e}",
                        dir.display()
                    ))
                })?;
                Ok(Dest::Cache(c, commit.to_string()))
            }
            (None, Some(out)) => Ok(Dest::Dir(output_dir(out)?)),
            (Some(_), Some(_)) => Err(usage("give -O DIR or --hf-cache, not both".to_string())),
            (None, None) => Err(usage(format!(
                "name where {} goes: -O DIR, or --hf-cache for the Hugging Face cache",
                args.url
            ))),
        }
    };
    let snap = hub.snapshot(&r).await.map_err(hub_failure)?;
    let dest = dest_of(&snap.commit)?;
    let items: Vec<Item> = snap
        .files
        .iter()
        .enumerate()
        .map(|(n, f)| Item {
            n,
            path: f.path.clone(),
            size: f.size,
            req: hub.request(&r, &snap.commit, f),
            etag: f.etag(),
            git_blob: f.sha256.is_none().then(|| f.blob_id.clone()),
        })
        .collect();
    let what = format!("{r} at {}", &snap.commit);
    let res = fetch_all(&cfg, args, quiet, items, &dest, &what, started).await;
    // The files came from the pinned commit; say so if the revision moved meanwhile.
    let now = if r.revision != snap.commit {
        hub.commit_of(&r).await.ok()
    } else {
        None
    };
    let moved = now.filter(|c| *c != snap.commit);
    if let Err(Failure(code, e)) = res {
        return Err(match moved {
            Some(new) => Failure(
                code,
                anyhow::anyhow!(
                    "revision {} of {} moved from {} to {new} during the download, and the old commit's files are no longer all served ({e:#}); run the command again to fetch {new}",
                    r.revision,
                    r.repo,
                    snap.commit
                ),
            ),
            None => Failure(code, e),
        });
    }
    if let Dest::Cache(c, commit) = &dest {
        c.set_ref(&r.revision, commit).map_err(|e| {
            fail(exit::LOCAL)(anyhow::anyhow!(
                "cannot write {}: {e}",
                c.root().join("refs").join(&r.revision).display()
            ))
        })?;
    }
    if let Some(new) = moved {
        eprintln!(
            "starling: warning: revision {} of {} moved from {} to {new} during the download; the files saved are all of commit {}, complete and verified; run the command again for {new}",
            r.revision, r.repo, snap.commit, snap.commit
        );
    }
    if !quiet {
        if let Dest::Cache(c, commit) = &dest {
            eprintln!("starling: snapshot at {}", c.snapshot_dir(commit).display());
        }
    }
    Ok(())
}

async fn s3(cfg: Config, args: &GetArgs, quiet: bool, started: Instant) -> Result<(), Failure> {
    let r: S3Ref = args.url.parse().map_err(s3_failure)?;
    if args.hf_cache.is_some() {
        return Err(usage(format!(
            "--hf-cache is for hf:// references; {} is not one",
            args.url
        )));
    }
    let Some(out) = &args.output else {
        return Err(usage(format!(
            "name where {} goes with -O {}",
            args.url,
            if r.is_prefix() { "DIR" } else { "FILE" }
        )));
    };
    let dest = if r.is_prefix() {
        Dest::Dir(output_dir(out)?)
    } else {
        super::check_output_dir(out).map_err(fail(exit::USAGE))?;
        Dest::File(std::path::absolute(out).map_err(|e| fail(exit::USAGE)(e.into()))?)
    };
    let s3 = S3::new(&cfg.s3, &cfg.source).map_err(s3_failure)?;
    let objects = s3.objects(&r).await.map_err(s3_failure)?;
    let mut items = Vec::with_capacity(objects.len());
    for o in &objects {
        let path = if r.is_prefix() {
            o.key[r.key.len()..].to_string()
        } else {
            o.key.rsplit('/').next().unwrap_or(&o.key).to_string()
        };
        if path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Failure(
                exit::ORIGIN_REFUSED,
                anyhow::anyhow!(
                    "object key {:?} under {r} is not a safe relative path; fetch it alone with -O FILE",
                    o.key
                ),
            ));
        }
        items.push(Item {
            n: items.len(),
            path,
            size: o.size,
            req: s3.request(&r.bucket, o).map_err(s3_failure)?,
            etag: String::new(),
            git_blob: None,
        });
    }
    fetch_all(&cfg, args, quiet, items, &dest, &r.to_string(), started).await
}

/// Per-file and total progress: bars on a terminal, else a line per file (unless quiet).
struct View {
    multi: Option<(indicatif::MultiProgress, indicatif::ProgressBar)>,
    lines: bool,
}

fn style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl View {
    fn new(quiet: bool, total: u64) -> View {
        if quiet || !std::io::stderr().is_terminal() {
            return View {
                multi: None,
                lines: !quiet,
            };
        }
        let multi = indicatif::MultiProgress::new();
        let bar = multi.add(indicatif::ProgressBar::new(total));
        bar.set_style(style(
            "total [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ));
        View {
            multi: Some((multi, bar)),
            lines: false,
        }
    }

    /// A bar for one file, fed from its progress until the returned guard drops.
    fn file(&self, name: &str, size: u64, p: &Arc<Progress>) -> Option<FileBar> {
        let (multi, total) = self.multi.as_ref()?;
        let bar = multi.insert_before(total, indicatif::ProgressBar::new(size));
        bar.set_style(style(
            "{prefix:40!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        ));
        bar.set_prefix(name.to_string());
        let (b, p) = (bar.clone(), p.clone());
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                b.set_position(p.done.load(Ordering::Relaxed));
            }
        });
        Some(FileBar { bar, ticker })
    }

    fn add(&self, n: u64) {
        if let Some((_, total)) = &self.multi {
            total.inc(n);
        }
    }

    fn println(&self, line: String) {
        match &self.multi {
            Some((m, _)) => {
                let _ = m.println(line);
            }
            None if self.lines => eprintln!("{line}"),
            None => {}
        }
    }

    fn finish(&self) {
        if let Some((_, total)) = &self.multi {
            total.finish_and_clear();
        }
    }
}

struct FileBar {
    bar: indicatif::ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Drop for FileBar {
    fn drop(&mut self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// Sums over the files.
#[derive(Default)]
struct Tally {
    files: usize,
    bytes: u64,
    origin: u64,
    parents: u64,
    cached: usize,
}

async fn fetch_all(
    cfg: &Config,
    args: &GetArgs,
    quiet: bool,
    items: Vec<Item>,
    dest: &Dest,
    what: &str,
    started: Instant,
) -> Result<(), Failure> {
    let socket = cfg.socket_path();
    let via = if !args.no_daemon
        && args.ca_certs.is_empty()
        && std::os::unix::net::UnixStream::connect(&socket).is_ok()
    {
        Via::Daemon(socket)
    } else {
        let ctx = NodeContext::open(cfg.clone()).map_err(|e| classify(FetchError::from(e)))?;
        ctx.collect_garbage_async().await;
        Via::Local(ctx)
    };
    let total: u64 = items.iter().map(|i| i.size).sum();
    let count = items.len();
    let view = View::new(quiet, total);
    let (via, view_ref) = (&via, &view);
    let tallies: Vec<Tally> = futures::stream::iter(items)
        .map(|item| async move {
            let t = fetch_one(via, args, item, dest, view_ref).await?;
            Ok::<_, Failure>(t)
        })
        .buffer_unordered(cfg.hf.concurrency)
        .try_collect()
        .await
        .inspect_err(|_| view.finish())?;
    view.finish();
    let mut sum = Tally::default();
    for t in tallies {
        sum.files += t.files;
        sum.bytes += t.bytes;
        sum.origin += t.origin;
        sum.parents += t.parents;
        sum.cached += t.cached;
    }
    if !quiet {
        let into = match dest {
            Dest::Dir(d) | Dest::File(d) => d.display().to_string(),
            Dest::Cache(c, _) => c.root().display().to_string(),
        };
        eprintln!(
            "starling: saved {count} file(s) of {what} ({} bytes) into {into} in {:.2}s: {} bytes from peers, {} from the origin, {} file(s) already there",
            sum.bytes,
            started.elapsed().as_secs_f64(),
            sum.parents,
            sum.origin,
            sum.cached
        );
    }
    Ok(())
}

async fn fetch_one(
    via: &Via,
    args: &GetArgs,
    item: Item,
    dest: &Dest,
    view: &View,
) -> Result<Tally, Failure> {
    let out = match dest {
        Dest::Dir(d) => d.join(&item.path),
        Dest::File(f) => f.clone(),
        Dest::Cache(c, _) => {
            if c.has_blob(&item.etag, item.size) {
                link(c, dest, &item)?;
                view.add(item.size);
                return Ok(Tally {
                    files: 1,
                    bytes: item.size,
                    cached: 1,
                    ..Tally::default()
                });
            }
            c.incomplete_path(&item.etag, item.n)
        }
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            fail(exit::LOCAL)(anyhow::anyhow!("cannot create {}: {e}", dir.display()))
        })?;
    }
    let progress = Arc::new(Progress::default());
    let bar = view.file(&item.path, item.size, &progress);
    let got: Got = match via {
        Via::Daemon(socket) => through_daemon(socket, &item.req, &out, args.no_hardlink, &progress)
            .await?
            .ok_or_else(|| {
                Failure(
                    exit::NETWORK,
                    anyhow::anyhow!(
                        "the daemon at {} stopped answering; run the command again",
                        socket.display()
                    ),
                )
            })?,
        Via::Local(ctx) => {
            in_process(
                &Fetcher::new(ctx.clone()),
                &item.req,
                &out,
                args.no_hardlink,
                &progress,
            )
            .await?
        }
    };
    drop(bar);
    if let Some(want) = &item.git_blob {
        let have = git_blob_id(&out).map_err(|e| {
            fail(exit::LOCAL)(anyhow::anyhow!("cannot read {}: {e}", out.display()))
        })?;
        if have != *want {
            let _ = std::fs::remove_file(&out);
            return Err(Failure(
                exit::INTEGRITY,
                anyhow::anyhow!(
                    "{}: the bytes served have git blob ID {have}, but the Hub lists {want}; nothing was saved",
                    item.path
                ),
            ));
        }
    }
    if let Dest::Cache(c, _) = dest {
        std::fs::rename(&out, c.blob_path(&item.etag)).map_err(|e| {
            fail(exit::LOCAL)(anyhow::anyhow!(
                "cannot rename {} into place: {e}",
                out.display()
            ))
        })?;
        link(c, dest, &item)?;
    }
    view.add(item.size);
    view.println(format!(
        "starling: {} ({} bytes) from {} via {}",
        item.path, got.bytes, got.from, got.placed
    ));
    Ok(Tally {
        files: 1,
        bytes: got.bytes,
        origin: got.origin_bytes,
        parents: got.parent_bytes,
        cached: usize::from(got.from_store),
    })
}

fn link(c: &CacheRepo, dest: &Dest, item: &Item) -> Result<(), Failure> {
    let Dest::Cache(_, commit) = dest else {
        return Ok(());
    };
    c.link(commit, &item.path, &item.etag)
        .map(|_| ())
        .map_err(|e| {
            fail(exit::LOCAL)(anyhow::anyhow!(
                "cannot link {} in {}: {e}",
                item.path,
                c.snapshot_dir(commit).display()
            ))
        })
}
