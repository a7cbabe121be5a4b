//! A local swarm of real processes: one cluster CA, a `starling scheduler`, and daemons (one
//! data directory, socket, QUIC port and metrics port each), all on loopback.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::{free_port, kill_pid, starling_bin, wait_until, Daemon, Scratch};

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> u16 {
    crate::unique_port(|| {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral UDP port")
    })
}

/// A `starling scheduler` process, killed on drop.
/// Extra TOML a test gives its scheduler (merged over the generated file).
const SCHEDULER_EXTRA: &str = "scheduler-extra.toml";

pub struct SchedulerProc {
    pub child: Child,
    pub port: u16,
    /// Its `/healthz` and `/metrics` (HTTP).
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl SchedulerProc {
    pub fn start(dir: &std::path::Path, ca: &std::path::Path, port: u16) -> SchedulerProc {
        Self::start_in(dir, ca, None, "127.0.0.1", port)
    }

    /// In namespace `ns` (a lab host), listening on `host:port`.
    pub fn start_in(
        dir: &std::path::Path,
        ca: &std::path::Path,
        ns: Option<&str>,
        host: &str,
        port: u16,
    ) -> SchedulerProc {
        let cfg = dir.join("scheduler.toml");
        let metrics_port = crate::free_port();
        // A test's own scheduler settings, if it wrote them (see `Cluster::configure_scheduler`).
        let extra = dir.join(SCHEDULER_EXTRA);
        let include = if extra.exists() {
            format!("include = [{extra:?}]\n")
        } else {
            String::new()
        };
        std::fs::write(
            &cfg,
            format!(
                "{include}data_dir = {:?}\n[tls]\nca_cert = {:?}\nca_key = {:?}\n[scheduler]\nlisten = \"{host}:{port}\"\nmetrics_addr = \"{host}:{metrics_port}\"\n",
                dir.join("sched-data"),
                ca.join("ca.pem"),
                ca.join("ca.key"),
            ),
        )
        .expect("write scheduler config");
        let log = dir.join(format!("scheduler-{}.log", std::process::id()));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("scheduler log");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(starling_bin());
                c
            }
            None => Command::new(starling_bin()),
        };
        let child = cmd
            .env("STARLING_CONFIG", &cfg)
            .env_remove("RUST_LOG")
            .args(["-v", "scheduler"])
            .stderr(logf)
            .spawn()
            .expect("start the scheduler");
        let s = SchedulerProc {
            child,
            port,
            metrics_port,
            log,
        };
        wait_until(Duration::from_secs(15), "the scheduler to listen", || {
            std::fs::read_to_string(&s.log)
                .is_ok_and(|t| t.matches("scheduler listening").count() > 0)
        });
        s
    }

    pub fn kill(mut self) {
        kill_pid(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for SchedulerProc {
    fn drop(&mut self) {
        kill_pid(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// One node: its scratch area and, while running, its daemon.
pub struct Node {
    pub scratch: Scratch,
    pub daemon: Option<Daemon>,
    pub metrics_host: String,
    pub metrics_port: u16,
    pub seed: bool,
}

impl Node {
    pub fn start(&mut self) {
        self.daemon = Some(Daemon::start(&self.scratch));
    }

    /// kill -9 of the daemon.
    pub fn kill(&mut self) {
        if let Some(d) = self.daemon.take() {
            drop(d); // SIGKILL and wait
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.child.id())
    }

    /// The daemon's Prometheus text.
    pub fn metrics(&self) -> String {
        scrape_at(&self.metrics_host, self.metrics_port)
    }

    /// One series' value (0 when absent).
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }

    /// The QUIC address the daemon logged it listens on.
    pub fn quic_addr(&self) -> std::net::SocketAddr {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("peer listening"))
            .expect("the daemon logged its peer address");
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("peer="))
            .expect("peer= in the log line");
        addr.parse().expect("a socket address")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.path().join("daemon.log")).unwrap_or_default()
    }
}

/// The cluster: CA, scheduler, nodes (node 0 is the seed).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub scheduler: Option<SchedulerProc>,
    pub scheduler_port: u16,
    pub scheduler_host: String,
    pub scheduler_ns: Option<String>,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Each node's log lines about going to the origin (who was told to fetch, who went by
    /// its own timer, who found no parent): what a test that bounds the origin's bytes
    /// prints when the bound fails, so a failure says which peers went and why.
    pub fn source_story(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for line in n.log().lines().filter(|l| {
                l.contains("source") || l.contains("no parent has") || l.contains("banned")
            }) {
                out.push_str(&format!("node {i}: {line}\n"));
            }
        }
        if let Some(s) = &self.scheduler {
            let log = std::fs::read_to_string(&s.log).unwrap_or_default();
            for line in log.lines().filter(|l| l.contains("source")) {
                out.push_str(&format!("scheduler: {line}\n"));
            }
        }
        out
    }

    /// A CA, a scheduler, one seed and `peers` peers (not started); `extra` TOML goes into
    /// every node's `[peer]` table.
    pub fn new(peers: usize, extra_peer: &str, extra: &str) -> Cluster {
        Self::new_in(None, peers, extra_peer, extra)
    }

    /// With a lab, node i runs in host i (the seed and the scheduler in host 0), each on its
    /// host's address; else everything is on loopback.
    pub fn new_in(
        lab: Option<&crate::Lab>,
        peers: usize,
        extra_peer: &str,
        extra: &str,
    ) -> Cluster {
        Self::build(lab, 1, peers, &|_| extra_peer.to_string(), &|_| {
            extra.to_string()
        })
        .0
    }

    /// As [`Cluster::new_in`] on loopback, with `extra(i)` TOML for node i (node 0: the seed).
    pub fn new_each(peers: usize, extra_peer: &str, extra: &dyn Fn(usize) -> String) -> Cluster {
        Self::build(None, 1, peers, &|_| extra_peer.to_string(), extra).0
    }

    /// On loopback with `schedulers` standalone schedulers, every daemon configured with all of
    /// them (tasks split by consistent hashing). Returns the extra schedulers beside the cluster.
    pub fn with_schedulers(schedulers: usize, peers: usize) -> (Cluster, Vec<SchedulerProc>) {
        Self::build(None, schedulers, peers, &|_| String::new(), &|_| {
            String::new()
        })
    }

    /// As [`Cluster::new`] on loopback, with `peer(i)` TOML in node i's `[peer]` table.
    pub fn new_each_peer(peers: usize, peer: &dyn Fn(usize) -> String) -> Cluster {
        Self::build(None, 1, peers, peer, &|_| String::new()).0
    }

    fn build(
        lab: Option<&crate::Lab>,
        schedulers: usize,
        peers: usize,
        extra_peer: &dyn Fn(usize) -> String,
        extra: &dyn Fn(usize) -> String,
    ) -> (Cluster, Vec<SchedulerProc>) {
        let dir = tempfile::Builder::new()
            .prefix("starling-cluster-")
            .tempdir()
            .expect("temp dir");
        let ca = dir.path().join("ca");
        let st = Command::new(starling_bin())
            .arg("ca")
            .arg(&ca)
            .output()
            .expect("run starling ca");
        assert!(st.status.success(), "starling ca: {st:?}");
        let host = |i: usize| lab.map_or("127.0.0.1".to_string(), |l| l.hosts[i].addr.clone());
        let ns = |i: usize| lab.map(|l| l.hosts[i].ns.clone());
        let scheduler_port = if lab.is_some() { 7960 } else { free_udp_port() };
        let scheduler = Some(SchedulerProc::start_in(
            dir.path(),
            &ca,
            ns(0).as_deref(),
            &host(0),
            scheduler_port,
        ));
        // Extra schedulers (loopback only), each in its own directory.
        let extra_scheds: Vec<SchedulerProc> = (1..schedulers)
            .map(|k| {
                let d = dir.path().join(format!("sched{k}"));
                std::fs::create_dir_all(&d).expect("scheduler dir");
                SchedulerProc::start(&d, &ca, free_udp_port())
            })
            .collect();
        let addrs: Vec<String> = std::iter::once(format!("\"{}:{scheduler_port}\"", host(0)))
            .chain(
                extra_scheds
                    .iter()
                    .map(|s| format!("\"127.0.0.1:{}\"", s.port)),
            )
            .collect();
        let addrs = addrs.join(", ");
        let nodes = (0..=peers)
            .map(|i| {
                let mut scratch = Scratch::new();
                scratch.netns = ns(i);
                let (metrics_port, listen) = match lab {
                    Some(_) => (9464, format!("{}:7950", host(i))),
                    None => (free_port(), "127.0.0.1:0".to_string()),
                };
                scratch.write_config(&format!(
                    "{extra}\n[daemon]\nmetrics_addr = \"{}:{metrics_port}\"\n\
                     [peer]\nlisten = \"{listen}\"\nseed = {}\n{extra_peer}\n\
                     [tls]\nca_cert = {:?}\nca_key = {:?}\n\
                     [scheduler]\naddrs = [{addrs}]\n",
                    host(i),
                    i == 0,
                    ca.join("ca.pem"),
                    ca.join("ca.key"),
                    extra = extra(i),
                    extra_peer = extra_peer(i),
                ));
                Node {
                    scratch,
                    daemon: None,
                    metrics_host: host(i),
                    metrics_port,
                    seed: i == 0,
                }
            })
            .collect();
        let c = Cluster {
            dir,
            ca,
            scheduler,
            scheduler_port,
            scheduler_host: host(0),
            scheduler_ns: ns(0),
            nodes,
        };
        (c, extra_scheds)
    }

    pub fn start_all(&mut self) {
        for n in &mut self.nodes {
            n.start();
        }
    }

    /// Starts every daemon at once, then waits for each: how long each took to be ready (its
    /// socket answering; it listens for peers before that), in node order.
    pub fn start_all_at_once(&mut self) -> Vec<Duration> {
        let t0 = std::time::Instant::now();
        for n in &mut self.nodes {
            n.daemon = Some(Daemon::spawn(&n.scratch));
        }
        let mut ready = vec![None; self.nodes.len()];
        let deadline = t0 + Duration::from_secs(30);
        while ready.iter().any(Option::is_none) && std::time::Instant::now() < deadline {
            for (i, n) in self.nodes.iter().enumerate() {
                let up = n
                    .daemon
                    .as_ref()
                    .is_some_and(|d| std::os::unix::net::UnixStream::connect(&d.socket).is_ok());
                if ready[i].is_none() && up {
                    ready[i] = Some(t0.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for n in &mut self.nodes {
            if let Some(d) = n.daemon.as_mut() {
                d.wait_ready(&n.scratch);
            }
        }
        ready
            .into_iter()
            .map(|r| r.unwrap_or(Duration::from_secs(30)))
            .collect()
    }

    /// Restarts the scheduler with `toml` merged over its configuration (call before the
    /// daemons start).
    pub fn configure_scheduler(&mut self, toml: &str) {
        std::fs::write(self.dir.path().join(SCHEDULER_EXTRA), toml).expect("scheduler extra");
        self.restart_scheduler();
    }

    pub fn restart_scheduler(&mut self) {
        if let Some(s) = self.scheduler.take() {
            s.kill();
        }
        self.scheduler = Some(SchedulerProc::start_in(
            self.dir.path(),
            &self.ca,
            self.scheduler_ns.as_deref(),
            &self.scheduler_host,
            self.scheduler_port,
        ));
    }
}

/// GET /metrics from 127.0.0.1:port (plain HTTP/1.0).
pub fn scrape(port: u16) -> String {
    scrape_at("127.0.0.1", port)
}

/// GET /metrics from host:port.
pub fn scrape_at(host: &str, port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect((host, port)) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Every sample in Prometheus text: the series (name with labels) and its value.
fn samples(text: &str) -> impl Iterator<Item = (&str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((series, v.trim().parse().ok()?))
        })
}

/// The value of `series` (exact name with labels) in Prometheus text; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    samples(text)
        .find_map(|(s, v)| (s == series).then_some(v))
        .unwrap_or(0.0)
}

/// The series of metric `name` that carry only the label `label`, as (label value, value).
pub fn metric_by_label(text: &str, name: &str, label: &str) -> Vec<(String, f64)> {
    let prefix = format!("{name}{{{label}=\"");
    samples(text)
        .filter_map(|(s, v)| {
            let rest = s.strip_prefix(prefix.as_str())?.strip_suffix("\"}")?;
            Some((rest.to_string(), v))
        })
        .collect()
}

#[cfg(test)]
mod metric_tests {
    use super::*;

    #[test]
    fn series_are_read_by_exact_name_and_by_label() {
        let text = "# TYPE starling_piece_failures_total counter\n\
                    starling_piece_failures_total{cause=\"busy\"} 3\n\
                    starling_piece_failures_total{cause=\"timeout\"} 1.5\n\
                    starling_bytes_uploaded_total 42\n";
        assert_eq!(metric_value(text, "starling_bytes_uploaded_total"), 42.0);
        assert_eq!(
            metric_value(text, "starling_piece_failures_total{cause=\"busy\"}"),
            3.0
        );
        assert_eq!(metric_value(text, "absent"), 0.0);
        assert_eq!(
            metric_by_label(text, "starling_piece_failures_total", "cause"),
            vec![("busy".to_string(), 3.0), ("timeout".to_string(), 1.5)]
        );
    }
}
