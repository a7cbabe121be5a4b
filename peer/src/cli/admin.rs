//! The small commands: `gc`, `ca`, `probe`, and starting the daemon or the scheduler.

use std::path::Path;
use std::time::{Duration, SystemTime};

use starling::config::Config;
use starling::daemon;
use starling::fetch::{exit, FetchError};
use starling::storage::Store;

use super::{classify, fail, Failure};

/// `starling gc`: one pass, printing what it evicted.
pub fn gc(cfg: Config, quiet: bool) -> Result<(), Failure> {
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

/// `starling ca DIR`: creates the cluster CA there (or loads it) and prints the [tls] lines.
pub fn ca(dir: &Path) -> Result<(), Failure> {
    starling::transport::tls::ClusterCa::load_or_create(dir)
        .map_err(|e| fail(exit::LOCAL)(e.into()))?;
    println!(
        "[tls]\nca_cert = {:?}\nca_key = {:?}",
        dir.join("ca.pem"),
        dir.join("ca.key")
    );
    Ok(())
}

/// `starling ca DIR --kube-secret NAME`: the pair in DIR as a Secret, unless one exists.
pub async fn ca_secret(dir: &Path, name: &str) -> Result<(), Failure> {
    let read = |f: &str| {
        std::fs::read(dir.join(f)).map_err(|e| {
            Failure(
                exit::LOCAL,
                anyhow::anyhow!("{}: {e}", dir.join(f).display()),
            )
        })
    };
    let data = [("ca.pem", read("ca.pem")?), ("ca.key", read("ca.key")?)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let labels = [
        ("app.kubernetes.io/name", "starling"),
        ("app.kubernetes.io/component", "ca"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let kube = starling::kube::InCluster::from_env().map_err(|e| Failure(exit::USAGE, e.into()))?;
    let ns = kube.namespace().to_string();
    match kube
        .create_secret(name, &labels, &data)
        .await
        .map_err(|e| Failure(exit::NETWORK, e.into()))?
    {
        starling::kube::Created::Created => println!("created Secret {ns}/{name}"),
        starling::kube::Created::Exists => {
            println!("Secret {ns}/{name} exists; kept as it is (the cluster keeps its CA)")
        }
    }
    Ok(())
}

/// `starling probe`: the running daemon's path report. Without a daemon: exit code 7.
pub async fn probe(cfg: &Config, json: bool) -> Result<(), Failure> {
    let socket = cfg.socket_path();
    let report = daemon::client_probe(&socket)
        .await
        .map_err(|e| {
            Failure(
                exit::NO_DAEMON,
                anyhow::anyhow!("the daemon at {} did not answer: {e}", socket.display()),
            )
        })?
        .ok_or_else(|| {
            Failure(
                exit::NO_DAEMON,
                anyhow::anyhow!(
                    "no daemon answers at {}; start `starling daemon` (probe reports its connections)",
                    socket.display()
                ),
            )
        })?;
    if json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| Failure(exit::OTHER, e.into()))?;
        println!("{text}");
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// `starling daemon`, until SIGTERM or SIGINT.
pub async fn daemon(mut cfg: Config) -> Result<(), Failure> {
    starling::kube::apply_node_labels(&mut cfg).await;
    daemon::run(cfg).await.map_err(|e| {
        let code = match &e {
            daemon::DaemonError::Fetch(f) => f.exit_code(),
            daemon::DaemonError::Swarm(s) if s.is_config() => exit::USAGE,
            _ => exit::LOCAL,
        };
        Failure(code, e.into())
    })
}

/// `starling scheduler`, until SIGTERM or SIGINT.
pub async fn scheduler(cfg: Config) -> Result<(), Failure> {
    starling::swarm::run_scheduler(cfg).await.map_err(|e| {
        let code = if e.is_config() {
            exit::USAGE
        } else {
            exit::LOCAL
        };
        Failure(code, e.into())
    })
}
