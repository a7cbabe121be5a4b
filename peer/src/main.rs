//! The `starling` command line. Parsing, progress display and exit codes only; the work is
//! done by the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use http::{HeaderMap, HeaderName, HeaderValue};

use starling::config::Config;
use starling::core::Digest;
use starling::daemon::{self, api::ApiEvent, api::GetRequest, api::ImportRequest};
use starling::fetch::{exit, FetchError, Fetcher, Progress, Request, Served};
use starling::storage::Store;

/// Peer-to-peer distribution for container images and large artifacts.
#[derive(Parser)]
#[command(name = "starling", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Configuration file (TOML). Default: /etc/starling/starling.toml when it exists.
    #[arg(long, global = true, env = "STARLING_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory for the piece store; overrides `data_dir` in the config.
    #[arg(long, global = true, env = "STARLING_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// More logging on stderr (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// No progress bar and no summary line; errors are still printed.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Download a URL, verified piece by piece and end to end, into a file.
    Get(GetArgs),
    /// Add a local file to the store, so this node seeds it with no origin behind it. Prints
    /// the content's digest (sha256:...), which peers name with `get --digest`. Through the
    /// daemon when one runs (it seeds the file at once); otherwise into the store, for the
    /// daemon that later serves that data directory.
    Import(ImportArgs),
    /// Run one garbage-collection pass over the store (TTL and disk watermarks).
    Gc,
    /// Run the daemon, a peer (`peer.seed = true`: a seed peer): it owns the store, serves
    /// `starling get` through its local API (a unix socket, `daemon.socket`), downloads from
    /// other peers and serves them over QUIC with mutual TLS. Without `scheduler.addrs` it
    /// embeds a scheduler.
    Daemon,
    /// Run a scheduler (the tracker) for daemons configured with it in `scheduler.addrs`.
    Scheduler,
    /// Create a cluster CA in DIR (ca.pem, and ca.key with mode 0600), or show the one there.
    /// Give every node both files in [tls] ca_cert / ca_key.
    Ca {
        /// Directory for ca.pem and ca.key.
        dir: PathBuf,
    },
    /// The daemon's network paths, per peer connection: path MTU (and where it was measured:
    /// ICMP, eBPF or QUIC), RTT, loss, congestion window.
    Probe {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print (or, with --write, install) a container runtime's configuration that pulls
    /// through this daemon's registry mirror / proxy (`proxy.listen`).
    #[command(subcommand)]
    Init(InitCommand),
}

#[derive(Subcommand)]
enum InitCommand {
    /// containerd `hosts.toml` mirror files (containerd's `config_path`, also `ctr images pull
    /// --hosts-dir`).
    Containerd {
        /// Registry host[:port] to mirror (repeatable); `_default` covers every registry
        /// (containerd 1.7+).
        #[arg(long = "registry", value_name = "HOST", default_value = "docker.io")]
        registries: Vec<String>,
        /// containerd's hosts directory.
        #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
        hosts_dir: PathBuf,
        /// Write the files (an existing one is kept as FILE.bak) instead of printing them.
        #[arg(long)]
        write: bool,
    },
    /// Docker: the mirror in daemon.json `registry-mirrors` (Docker Hub images), and with
    /// --proxy a systemd drop-in that sends every registry through the proxy.
    Docker {
        /// Docker's daemon configuration file; other settings in it are kept.
        #[arg(long, value_name = "FILE", default_value = "/etc/docker/daemon.json")]
        daemon_json: PathBuf,
        /// Also route all registries through the HTTP(S) proxy (systemd drop-in).
        #[arg(long)]
        proxy: bool,
        /// Where the drop-in goes.
        #[arg(
            long,
            value_name = "DIR",
            default_value = "/etc/systemd/system/docker.service.d"
        )]
        systemd_dir: PathBuf,
        /// Write the files (an existing one is kept as FILE.bak) instead of printing them.
        #[arg(long)]
        write: bool,
    },
}

#[derive(Args)]
struct GetArgs {
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

#[derive(Args)]
struct ImportArgs {
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

/// An error with the exit code it maps to.
struct Failure(u8, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(exit::OTHER, e.into())
    }
}

fn fail(code: u8) -> impl FnOnce(anyhow::Error) -> Failure {
    move |e| Failure(code, e)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("starling: error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn run(cli: Cli) -> Result<(), Failure> {
    let mut cfg =
        Config::load(cli.global.config.as_deref()).map_err(|e| fail(exit::USAGE)(e.into()))?;
    if let Some(d) = cli.global.data_dir {
        cfg.data_dir = d;
    }
    let threads = cfg
        .daemon
        .threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut rt = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = rt
        .enable_all()
        .thread_name("starling-net")
        .on_thread_park(starling::transport::slack::on_park)
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Get(args) => rt.block_on(get(cfg, args, cli.global.quiet)),
        Command::Import(args) => rt.block_on(import(cfg, args, cli.global.quiet)),
        Command::Gc => gc(cfg, cli.global.quiet),
        Command::Daemon => rt.block_on(daemon::run(cfg)).map_err(|e| {
            let code = match &e {
                daemon::DaemonError::Fetch(f) => f.exit_code(),
                _ => exit::LOCAL,
            };
            Failure(code, e.into())
        }),
        Command::Ca { dir } => {
            starling::transport::tls::ClusterCa::load_or_create(&dir)
                .map_err(|e| fail(exit::LOCAL)(e.into()))?;
            println!(
                "[tls]\nca_cert = {:?}\nca_key = {:?}",
                dir.join("ca.pem"),
                dir.join("ca.key")
            );
            Ok(())
        }
        Command::Probe { json } => {
            let socket = cfg.socket_path();
            let report = rt
                .block_on(daemon::client_probe(&socket))
                .map_err(|e| Failure(exit::LOCAL, anyhow::anyhow!("daemon at {}: {e}", socket.display())))?
                .ok_or_else(|| {
                    Failure(
                        exit::LOCAL,
                        anyhow::anyhow!(
                            "no daemon answers at {}; start `starling daemon` (probe reports its connections)",
                            socket.display()
                        ),
                    )
                })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report)
                        .map_err(|e| Failure(exit::OTHER, e.into()))?
                );
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Init(what) => init(&cfg, what).map_err(|e| Failure(exit::USAGE, e)),
        Command::Scheduler => rt
            .block_on(starling::swarm::run_scheduler(cfg))
            .map_err(|e| Failure(exit::LOCAL, e.into())),
    }
}

/// `starling init`: prints the planned files, or writes them.
fn init(cfg: &Config, what: InitCommand) -> anyhow::Result<()> {
    use starling::proxy::init;
    let (files, write, notes) = match what {
        InitCommand::Containerd {
            registries,
            hosts_dir,
            write,
        } => {
            let files = init::containerd(&cfg.proxy, &registries, &hosts_dir)?;
            let note = format!(
                "containerd reads these when its CRI registry config_path is {:?} \
                 ([plugins.\"io.containerd.grpc.v1.cri\".registry] config_path); \
                 ctr takes --hosts-dir {:?}.",
                hosts_dir, hosts_dir
            );
            (files, write, note)
        }
        InitCommand::Docker {
            daemon_json,
            proxy,
            systemd_dir,
            write,
        } => {
            let existing = match std::fs::read_to_string(&daemon_json) {
                Ok(t) => Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => anyhow::bail!("cannot read {}: {e}", daemon_json.display()),
            };
            let mut files = vec![init::docker(&cfg.proxy, existing.as_deref(), &daemon_json)?];
            let mut note = "Restart dockerd to apply. Docker uses registry-mirrors for Docker Hub images only.".to_string();
            if proxy {
                files.push(init::docker_proxy(&cfg.proxy, &systemd_dir)?);
                note.push_str(" For intercepted registries, list them in proxy.intercept and install proxy.mitm_ca_cert as /etc/docker/certs.d/<registry>/ca.crt; then systemctl daemon-reload.");
            }
            (files, write, note)
        }
    };
    for f in &files {
        if !write {
            println!("# {}\n{}", f.path.display(), f.contents);
            continue;
        }
        if let Some(dir) = f.path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        match std::fs::read_to_string(&f.path) {
            Ok(old) if old == f.contents => {
                eprintln!("{} is already up to date", f.path.display());
                continue;
            }
            Ok(_) => {
                let bak = f.path.with_extension(format!(
                    "{}.bak",
                    f.path.extension().and_then(|e| e.to_str()).unwrap_or("")
                ));
                std::fs::copy(&f.path, &bak)
                    .with_context(|| format!("cannot back up {}", f.path.display()))?;
                eprintln!(
                    "kept the previous {} as {}",
                    f.path.display(),
                    bak.display()
                );
            }
            Err(_) => {}
        }
        let tmp = f.path.with_extension("starling-tmp");
        std::fs::write(&tmp, &f.contents)
            .and_then(|()| std::fs::rename(&tmp, &f.path))
            .with_context(|| format!("cannot write {}", f.path.display()))?;
        eprintln!("wrote {}", f.path.display());
    }
    eprintln!("{notes}");
    Ok(())
}

async fn get(mut cfg: Config, args: GetArgs, quiet: bool) -> Result<(), Failure> {
    let digest = parse_digest(args.digest.as_deref())?;
    let headers = parse_headers(&args.headers).map_err(fail(exit::USAGE))?;
    let to_stdout = args.output.as_os_str() == "-";
    if !to_stdout {
        check_output_dir(&args.output).map_err(fail(exit::USAGE))?;
    }
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let mut bar =
        (!quiet && std::io::stderr().is_terminal()).then(|| spawn_progress_bar(progress.clone()));

    // A running daemon does the work (shared store, one download per task), unless the
    // request needs this process: stdout output or extra CAs for this request only.
    if !args.no_daemon && !to_stdout && args.ca_certs.is_empty() {
        let output = std::path::absolute(&args.output).map_err(|e| fail(exit::USAGE)(e.into()))?;
        let req = GetRequest {
            url: args.url.clone(),
            digest: args.digest.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            piece_length: args.piece_length,
            output,
            no_hardlink: args.no_hardlink,
        };
        let answer = daemon::client_get(&cfg.socket_path(), &req, mirror(&progress)).await;
        match answer {
            Ok(Some(ApiEvent::Done {
                bytes,
                digest,
                from_store,
                origin_bytes,
                parent_bytes,
                placed,
            })) => {
                finish_bar(bar.take());
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
                finish_bar(bar.take());
                return Err(Failure(code, anyhow::anyhow!(message)));
            }
            Ok(Some(ApiEvent::Probe(_))) => {
                finish_bar(bar.take());
                return Err(Failure(
                    exit::OTHER,
                    anyhow::anyhow!("the daemon answered a get with a probe report"),
                ));
            }
            Ok(Some(ApiEvent::Progress { .. })) | Ok(None) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // It took the request and died (killed, crashed): its verified pieces are
                // kept, and retrying resumes; working in-process now would bypass the swarm.
                finish_bar(bar.take());
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
    let fetcher = Arc::new(Fetcher::new(cfg).map_err(classify)?);
    // Make room before adding to the store.
    let f = fetcher.clone();
    let _ = tokio::task::spawn_blocking(move || f.collect_garbage()).await;
    let req = Request {
        url: args.url.clone(),
        digest,
        piece_length: args.piece_length,
        headers,
    };
    let res = fetcher.fetch(&req, &progress).await;
    finish_bar(bar.take());
    let fetched = res.map_err(classify)?;
    let placed = if to_stdout {
        fetched
            .task
            .lease()
            .downgrade()
            .map_err(|e| fail(exit::LOCAL)(e.into()))?;
        let mut f = std::fs::File::open(fetched.task.content_path())
            .map_err(|e| fail(exit::LOCAL)(e.into()))?;
        std::io::copy(&mut f, &mut std::io::stdout().lock()).map_err(|e| {
            fail(exit::LOCAL)(anyhow::anyhow!("cannot write to standard output: {e}"))
        })?;
        "stdout".to_string()
    } else {
        fetched
            .deliver(&args.output, !args.no_hardlink)
            .map_err(|e| {
                fail(exit::LOCAL)(anyhow::anyhow!(
                    "cannot write {}: {e}",
                    args.output.display()
                ))
            })?
            .to_string()
    };
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

async fn import(cfg: Config, args: ImportArgs, quiet: bool) -> Result<(), Failure> {
    let digest = parse_digest(args.digest.as_deref())?;
    let path = std::path::absolute(&args.file).map_err(|e| fail(exit::USAGE)(e.into()))?;
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let mut bar =
        (!quiet && std::io::stderr().is_terminal()).then(|| spawn_progress_bar(progress.clone()));
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
        let req = ImportRequest {
            path: path.clone(),
            digest: args.digest.clone(),
            piece_length: args.piece_length,
            link: args.link,
        };
        let answer = daemon::client_import(&cfg.socket_path(), &req, mirror(&progress)).await;
        match answer {
            Ok(Some(ApiEvent::Done {
                bytes,
                digest,
                from_store,
                ..
            })) => {
                finish_bar(bar.take());
                report(bytes, &digest, from_store, "; the daemon seeds it");
                return Ok(());
            }
            Ok(Some(ApiEvent::Error { code, message })) => {
                finish_bar(bar.take());
                return Err(Failure(code, anyhow::anyhow!(message)));
            }
            Ok(Some(other)) => {
                finish_bar(bar.take());
                return Err(Failure(
                    exit::OTHER,
                    anyhow::anyhow!("the daemon answered an import with {other:?}"),
                ));
            }
            Ok(None) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                finish_bar(bar.take());
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
    let fetcher = Arc::new(Fetcher::new(cfg).map_err(classify)?);
    let f = fetcher.clone();
    let _ = tokio::task::spawn_blocking(move || f.collect_garbage()).await;
    let req = starling::fetch::Import {
        path,
        digest,
        piece_length: args.piece_length,
        link: args.link,
    };
    let res = fetcher.import(&req, &progress).await;
    finish_bar(bar.take());
    let f = res.map_err(classify)?;
    report(
        f.manifest.plan().content_length(),
        &f.manifest.content_digest().to_string(),
        f.served == Served::Store,
        "; no daemon answered, so it is stored only: a daemon on this data directory serves it once asked for it",
    );
    Ok(())
}

fn gc(cfg: Config, quiet: bool) -> Result<(), Failure> {
    let store = Store::open(
        &cfg.data_dir,
        Duration::from_millis(cfg.storage.commit_interval_ms),
    )
    .map_err(|e| classify(FetchError::Store(e)))?;
    let r = store
        .gc(&cfg.gc, SystemTime::now())
        .map_err(|e| classify(FetchError::Store(e)))?;
    if !quiet {
        for (name, bytes, reason) in &r.evicted {
            println!("evicted {name} {bytes} bytes ({reason})");
        }
        if let (Some(b), Some(a)) = (r.before, r.after) {
            println!(
                "usage {} -> {} of {} bytes; {} evicted, {} in use and kept",
                b.used,
                a.used,
                b.capacity,
                r.evicted.len(),
                r.in_use
            );
        }
    }
    Ok(())
}

/// `--digest`, parsed (a usage error when malformed).
fn parse_digest(arg: Option<&str>) -> Result<Option<Digest>, Failure> {
    arg.map(|d| {
        d.parse::<Digest>()
            .map_err(|e| Failure(exit::USAGE, anyhow::anyhow!("--digest: {e}")))
    })
    .transpose()
}

/// A daemon's progress reports, copied into `progress` (which the bar shows).
fn mirror(progress: &Arc<Progress>) -> impl FnMut(u64, u64) {
    let p = progress.clone();
    move |total, done| {
        p.total.store(total, Ordering::Relaxed);
        p.done.store(done, Ordering::Relaxed);
    }
}

type Bar = (indicatif::ProgressBar, tokio::task::JoinHandle<()>);

fn finish_bar(bar: Option<Bar>) {
    if let Some((bar, ticker)) = bar {
        ticker.abort();
        bar.finish_and_clear();
    }
}

/// Maps a pipeline error to its exit code.
fn classify(e: FetchError) -> Failure {
    Failure(e.exit_code(), e.into())
}

fn parse_headers(raw: &[String]) -> anyhow::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for h in raw {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("header {h:?} must look like 'Name: value'"))?;
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| anyhow::anyhow!("header {h:?} has an invalid name {:?}", k.trim()))?;
        let value = HeaderValue::from_str(v.trim())
            .map_err(|_| anyhow::anyhow!("header {h:?} has an invalid value"))?;
        map.append(name, value);
    }
    Ok(map)
}

fn check_output_dir(out: &Path) -> anyhow::Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "-O {}: directory {} does not exist; create it first",
            out.display(),
            dir.display()
        );
    }
    if out.is_dir() {
        anyhow::bail!("-O {}: is a directory; name the output file", out.display());
    }
    Ok(())
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 4194304, 4M or 4MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        _ => return Err(format!("{s:?} has an unknown unit {unit:?}; use K, M or G")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn spawn_progress_bar(p: Arc<Progress>) -> Bar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let b = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            b.set_length(p.total.load(Ordering::Relaxed));
            b.set_position(p.done.load(Ordering::Relaxed));
        }
    });
    (bar, ticker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("16KiB"), Ok(16 << 10));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn headers() {
        let h = parse_headers(&["Authorization: Bearer x".into(), "X-A:1".into()]).unwrap();
        assert_eq!(h["authorization"], "Bearer x");
        assert!(parse_headers(&["nocolon".into()]).is_err());
        assert!(parse_headers(&["bad name: v".into()]).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
