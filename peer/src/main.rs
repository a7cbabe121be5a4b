//! The `starling` command line: argument parsing, the runtime, and dispatch. Each command's
//! work is in `cli/`; the library does the rest.

mod cli;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use cli::{fail, Failure};
use starling::config::Config;
use starling::fetch::exit;

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
    Get(cli::get::GetArgs),
    /// Add a local file to the store, so this node seeds it with no origin behind it. Prints
    /// the content's digest (sha256:...), which peers name with `get --digest`. Through the
    /// daemon when one runs (it seeds the file at once); otherwise into the store, for the
    /// daemon that later serves that data directory.
    Import(cli::import::ImportArgs),
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
        /// Also store the pair as Kubernetes Secret NAME (keys ca.pem, ca.key) in this pod's
        /// namespace, unless it exists (the chart's pre-install Job; needs `create` on
        /// `secrets`). An existing Secret is kept as it is.
        #[arg(long, value_name = "NAME")]
        kube_secret: Option<String>,
    },
    /// The running daemon's network paths, per peer connection: path MTU (and where it was
    /// measured: ICMP, eBPF or QUIC), RTT, loss, congestion window. Exit code 7 when no daemon
    /// answers.
    Probe {
        /// JSON instead of a table (the README lists its fields).
        #[arg(long)]
        json: bool,
    },
    /// The running daemon's tasks: state, size, verified pieces, holders the scheduler knows,
    /// whether it serves them, last use. Exit code 7 when no daemon answers.
    Tasks {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One task in detail: its verified pieces, the parents of its download, its paths.
    Stat {
        /// The task: its ID or a unique prefix of it (4+ hex digits), its digest, or its URL.
        task: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put images and files on the seeds (and `--share` of the peers) before anyone pulls
    /// them, through the running daemon; follows the job to its end (exit code 5 if it fails).
    Preheat(cli::preheat::PreheatArgs),
    /// Evict one task from the store. Refused (exit code 6) while it downloads, serves a peer,
    /// or a client reads it.
    Rm {
        /// The task: its ID or a unique prefix of it (4+ hex digits), its digest, or its URL.
        task: String,
    },
    /// Print (or, with --write, install) a container runtime's configuration that pulls
    /// through this daemon's registry mirror / proxy (`proxy.listen`).
    #[command(subcommand)]
    Init(cli::init::InitCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("starling: error: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Logs to stderr (`-v`, `RUST_LOG`), and for the daemon and the scheduler the OTLP span
/// exporter when `tracing.otlp_endpoint` is set (call inside the runtime). The returned guard
/// flushes the exporter when dropped.
fn init_logging(
    verbose: u8,
    cfg: &Config,
    long_lived: bool,
) -> Result<Option<starling::telemetry::Telemetry>, Failure> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_filter(filter);
    let instance = if cfg.peer.advertise.is_empty() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    } else {
        cfg.peer.advertise.clone()
    };
    let otel = if long_lived {
        starling::telemetry::layer(&cfg.tracing, &instance)
            .map_err(|e| fail(exit::USAGE)(e.into()))?
    } else {
        None
    };
    match otel {
        Some((layer, guard)) => {
            tracing_subscriber::registry().with(fmt).with(layer).init();
            Ok(Some(guard))
        }
        None => {
            tracing_subscriber::registry().with(fmt).init();
            Ok(None)
        }
    }
}

/// The network runtime: `daemon.runtime_threads` threads (one is a current-thread runtime).
fn runtime(cfg: &Config) -> Result<tokio::runtime::Runtime, Failure> {
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
    Ok(rt
        .enable_all()
        .thread_name("starling-net")
        .on_thread_park(starling::transport::slack::on_park)
        .build()
        .context("cannot start the async runtime")?)
}

fn run(cli: Cli) -> Result<(), Failure> {
    let mut cfg =
        Config::load(cli.global.config.as_deref()).map_err(|e| fail(exit::USAGE)(e.into()))?;
    if let Some(d) = cli.global.data_dir {
        // A flag is relative to where the command runs.
        cfg.data_dir = std::path::absolute(&d).unwrap_or(d);
    }
    cfg.check_data_dir()
        .map_err(|e| fail(exit::USAGE)(e.into()))?;
    let rt = runtime(&cfg)?;
    let long_lived = matches!(cli.command, Command::Daemon | Command::Scheduler);
    let telemetry = {
        let _inside = rt.enter();
        init_logging(cli.global.verbose, &cfg, long_lived)?
    };
    // Daemons hold a descriptor per connection and per open task.
    if matches!(cli.command, Command::Daemon | Command::Scheduler) {
        if let Some((from, to)) = starling::accept::raise_nofile_limit().filter(|(a, b)| a != b) {
            tracing::info!(from, to, "raised the open-file limit");
        }
    }
    let quiet = cli.global.quiet;
    let res = command(cli.command, cfg, quiet, &rt);
    // The last spans go out while the runtime still runs (the gRPC exporter needs it, and a
    // one-thread runtime runs only inside block_on).
    if let Some(t) = telemetry {
        rt.block_on(async {
            let _ = tokio::task::spawn_blocking(move || drop(t)).await;
        });
    }
    res
}

fn command(
    command: Command,
    cfg: Config,
    quiet: bool,
    rt: &tokio::runtime::Runtime,
) -> Result<(), Failure> {
    match command {
        Command::Get(args) => rt.block_on(cli::get::run(cfg, args, quiet)),
        Command::Import(args) => rt.block_on(cli::import::run(cfg, args, quiet)),
        Command::Gc => cli::admin::gc(cfg, quiet),
        Command::Daemon => rt.block_on(cli::admin::daemon(cfg)),
        Command::Scheduler => rt.block_on(cli::admin::scheduler(cfg)),
        Command::Ca { dir, kube_secret } => {
            cli::admin::ca(&dir)?;
            match kube_secret {
                Some(name) => rt.block_on(cli::admin::ca_secret(&dir, &name)),
                None => Ok(()),
            }
        }
        Command::Probe { json } => rt.block_on(cli::admin::probe(&cfg, json)),
        Command::Tasks { json } => rt.block_on(cli::tasks::list(&cfg, json)),
        Command::Stat { task, json } => rt.block_on(cli::tasks::stat(&cfg, task, json)),
        Command::Rm { task } => rt.block_on(cli::tasks::rm(&cfg, task)),
        Command::Preheat(a) => rt.block_on(cli::preheat::run(&cfg, a, quiet)),
        Command::Init(what) => cli::init::run(&cfg, what).map_err(|e| Failure(exit::USAGE, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
