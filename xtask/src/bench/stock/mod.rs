//! `cargo xtask bench stock`: the same distribution job, in the same netlab topology, for
//! Starling and the systems users run today: plain HTTP (nginx + concurrent curl), aria2c,
//! libtorrent-rasterbar over TCP and over uTP, and rqbit, the BitTorrent ones with 1 MiB and
//! 4 MiB pieces. One seed (host 0, server side) plus N downloaders, every host link shaped by
//! tbf both ways.
//!
//! For every run it records each downloader's completion time, the seed host's bytes sent, the
//! CPU seconds of every process of the system (seed, downloaders, tracker or origin), each
//! downloader's peak RSS, and whether every output matches the file's SHA-256. It writes
//! `bench/results/<date>.md`, `<date>.csv` and PNG plots (completion-time CDF per scenario,
//! time vs peer count), and prints the table.

pub(crate) mod bt;
pub(crate) mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use starling_tests::netlab::{self, Topology};
use starling_tests::{is_root, sha256_file, Lab, Nginx};

use super::procs::{self, tree_cpu_secs, MachineCpu};
use super::run as swarm;
use super::{make_file, MIB};
use crate::{cargo, root, setup, sh};

/// One distribution job.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub topology: Topology,
    /// Random drop rate at the router (`lossy` only).
    pub loss: f64,
    pub peers: usize,
    pub size_mib: u64,
    pub mbit: u32,
}

impl Scenario {
    fn new(name: &str, topology: Topology, peers: usize, size_mib: u64) -> Scenario {
        Scenario {
            name: name.to_string(),
            topology,
            loss: if topology == Topology::Lossy {
                0.01
            } else {
                0.0
            },
            peers,
            size_mib,
            mbit: 100,
        }
    }

    fn describe(&self) -> String {
        let loss = if self.topology == Topology::Lossy {
            format!(" {:.0}% loss", self.loss * 100.0)
        } else {
            String::new()
        };
        format!(
            "{}: 1 seed + {} peers, {} MiB, {} Mbit/s, {}{loss}",
            self.name,
            self.peers,
            self.size_mib,
            self.mbit,
            self.topology.name()
        )
    }

    /// T_min = max(F/U_seed, F/D_peer, N·F/(U_seed + ΣU_peers)), every link at `mbit`.
    pub fn t_min(&self) -> f64 {
        swarm::t_min(self.size_mib * MIB, self.peers, self.mbit)
    }
}

/// The matrix: the default job, then N ∈ {2,4,16}, F ∈ {64 MiB, 1 GiB}, and the netlab
/// variants, each changing one thing from the default.
fn matrix() -> Vec<Scenario> {
    vec![
        Scenario::new("default", Topology::Clean, 8, 256),
        Scenario::new("n2", Topology::Clean, 2, 256),
        Scenario::new("n4", Topology::Clean, 4, 256),
        Scenario::new("n16", Topology::Clean, 16, 256),
        Scenario::new("f64", Topology::Clean, 8, 64),
        Scenario::new("f1024", Topology::Clean, 8, 1024),
        Scenario::new("vxlan", Topology::Vxlan, 8, 256),
        Scenario::new("dind", Topology::Dind, 8, 256),
        Scenario::new("lossy", Topology::Lossy, 8, 256),
        Scenario::new("jumbo", Topology::Jumbo, 8, 256),
    ]
}

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    /// The seed daemon starts with the file imported (`starling import`, before the timer), as
    /// the BitTorrent seeds start with the file and its torrent.
    Starling,
    /// The seed daemon fetches the file from an nginx origin on its host during the run.
    StarlingOrigin,
    Http,
    Bt(bt::Client, u64),
}

impl System {
    fn name(self) -> String {
        match self {
            System::Starling => "starling".into(),
            System::StarlingOrigin => "starling-origin".into(),
            System::Http => "http".into(),
            System::Bt(c, p) => format!("{}-{p}m", c.name()),
        }
    }
}

/// One run's inputs, shared by every system's runner.
pub struct Job<'a> {
    pub lab: &'a Lab,
    pub peers: usize,
    /// The file, on the seed host's disk.
    pub file: &'a Path,
    pub want: &'a str,
    /// A run still going after this is stopped; its unfinished peers count as failed.
    pub limit: Duration,
}

impl Job<'_> {
    pub fn file_name(&self) -> &str {
        self.file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("artifact.bin")
    }
}

/// A downloader's state while a run goes on.
pub enum Status {
    Running,
    /// Complete, this many seconds after the start.
    Done(f64),
    Failed(String),
}

/// What one system did in one scenario.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub system: String,
    /// Per downloader: seconds from the start until it had the whole file.
    pub done: Vec<Option<f64>>,
    /// Why downloaders did not finish, if any did not.
    pub failures: Vec<String>,
    /// CPU seconds of every process of the system (all hosts share this machine's cores).
    pub cpu_secs: f64,
    /// Per downloader: peak resident set, KiB.
    pub rss_kib: Vec<u64>,
    /// Bytes the seed host sent on its link during the run.
    pub seed_sent: u64,
    /// Every finished downloader's file matches the SHA-256.
    pub verified: bool,
    /// What the whole machine spent while the downloaders ran (None: not measured).
    pub machine: Option<MachineCpu>,
}

impl Outcome {
    /// A run that could not be made at all: every downloader failed, with `e` as the reason.
    pub fn failed(system: &str, peers: usize, e: anyhow::Error) -> Outcome {
        Outcome {
            system: system.to_string(),
            done: vec![None; peers],
            failures: vec![format!("{e:#}")],
            cpu_secs: 0.0,
            rss_kib: Vec::new(),
            seed_sent: 0,
            verified: false,
            machine: None,
        }
    }

    pub fn new(
        system: String,
        (status, machine): (Vec<Status>, MachineCpu),
        cpu_secs: f64,
        rss_kib: Vec<u64>,
        seed_sent: u64,
        job: &Job,
        outputs: &[PathBuf],
    ) -> Outcome {
        let mut done = Vec::new();
        let mut failures = Vec::new();
        let mut verified = true;
        for (i, s) in status.into_iter().enumerate() {
            match s {
                Status::Done(t) => {
                    done.push(Some(t));
                    if sha256_file(&outputs[i]) != job.want {
                        verified = false;
                        failures.push(format!("peer {}: output does not match", i + 1));
                    }
                }
                Status::Failed(why) => {
                    done.push(None);
                    failures.push(format!("peer {}: {why}", i + 1));
                }
                Status::Running => done.push(None),
            }
        }
        Outcome {
            system,
            done,
            failures,
            cpu_secs,
            rss_kib,
            seed_sent,
            verified,
            machine: Some(machine),
        }
    }

    /// Until the last downloader was complete; None if any never was.
    pub fn wall(&self) -> Option<f64> {
        self.done
            .iter()
            .try_fold(0.0f64, |m, d| d.map(|t| m.max(t)))
    }

    /// Finished and verified everywhere.
    pub fn ok(&self) -> bool {
        self.verified && self.wall().is_some()
    }
}

/// Polls every downloader (`poll(i)`, i from 0) every 20 ms until none is running or the job's
/// limit passes; those still running then are failed as timed out.
/// Also returns what the whole machine spent from the call until the last downloader ended
/// (the outputs' checks come after).
pub fn collect(
    job: &Job,
    start: Instant,
    mut poll: impl FnMut(usize) -> Result<Status>,
) -> Result<(Vec<Status>, MachineCpu)> {
    let machine0 = MachineCpu::now();
    let mut status: Vec<Status> = (0..job.peers).map(|_| Status::Running).collect();
    loop {
        for (i, s) in status.iter_mut().enumerate() {
            if matches!(s, Status::Running) {
                *s = poll(i)?;
            }
        }
        if !status.iter().any(|s| matches!(s, Status::Running)) {
            return Ok((status, MachineCpu::now().since(&machine0)));
        }
        if start.elapsed() > job.limit {
            let why = format!("not complete after {:.0} s", job.limit.as_secs_f64());
            for s in &mut status {
                if matches!(s, Status::Running) {
                    *s = Status::Failed(why.clone());
                }
            }
            return Ok((status, MachineCpu::now().since(&machine0)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Plain HTTP: nginx on the seed host, every downloader running curl at once.
pub fn http(job: &Job, work: &Path) -> Result<Outcome> {
    let lab = job.lab;
    std::fs::create_dir_all(work)?;
    let www = job.file.parent().context("the file has no directory")?;
    let nginx = Nginx::start_in(www, None, Some(&lab.hosts[0].ns), &lab.hosts[0].addr);
    let url = nginx.url(job.file_name());
    let outs: Vec<PathBuf> = (1..=job.peers)
        .map(|i| work.join(format!("curl-{i}.bin")))
        .collect();
    let nginx_cpu0 = tree_cpu_secs(nginx.pid());
    let sent0 = lab.host_sent_bytes(0);
    let start = Instant::now();
    let mut curls = (1..=job.peers)
        .map(|i| {
            lab.command(i, "curl")
                .args(["-sS", "--fail", "-o"])
                .arg(&outs[i - 1])
                .arg(&url)
                .spawn()
                .map(procs::Tracked::new)
                .context("cannot start curl")
        })
        .collect::<Result<Vec<_>>>()?;
    let status = collect(job, start, |i| {
        if !curls[i].poll()? {
            return Ok(Status::Running);
        }
        Ok(match curls[i].usage {
            Some(u) if u.code == 0 => Status::Done(start.elapsed().as_secs_f64()),
            Some(u) => Status::Failed(format!("curl exited with {}", u.code)),
            None => Status::Running,
        })
    })?;
    let seed_sent = lab.host_sent_bytes(0) - sent0;
    let mut cpu = tree_cpu_secs(nginx.pid()) - nginx_cpu0;
    let mut rss = Vec::new();
    for c in &mut curls {
        let u = c.stop()?;
        cpu += u.cpu_secs;
        rss.push(u.max_rss_kib);
    }
    drop(nginx);
    let out = Outcome::new("http".into(), status, cpu, rss, seed_sent, job, &outs);
    for o in &outs {
        let _ = std::fs::remove_file(o);
    }
    Ok(out)
}

/// Whether `--systems` entry `wanted` picks the system `name`: the exact name, or a BitTorrent
/// client's name without its piece size or transport (`aria2`, `libtorrent`).
fn picks(name: &str, wanted: &str) -> bool {
    name == wanted || (!name.starts_with("starling") && name.starts_with(wanted))
}

/// Starling: an nginx origin, the scheduler and the seed daemon on host 0, a daemon on every
/// downloader host, each asked for the file through its local API at once. With `import`
/// the seed has the file imported before the timer starts (its CPU is printed, not counted,
/// like mktorrent's for the BitTorrent systems); without, it reads the origin during the run.
/// Starling on `job`: the seed imports the file first (`import`) or reads the nginx origin;
/// `daemon_toml` holds more keys for every node's `[daemon]` table.
pub fn starling(job: &Job, import: bool, daemon_toml: &str) -> Result<Outcome> {
    let www = job.file.parent().context("the file has no directory")?;
    let o = swarm::run(&swarm::Job {
        lab: Some(job.lab),
        peers: job.peers,
        www,
        file: job.file_name(),
        want: job.want,
        live: false,
        piece_length: None,
        peer_toml: "",
        daemon_toml,
        import,
    })?;
    if let Some(i) = &o.import {
        println!(
            "    (before the timer: the seed imported the file in {:.2} s, {:.2} CPU-s)",
            i.secs, i.cpu_secs
        );
    }
    // swarm::run has checked every output against the digest already.
    let failures = o
        .peers
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.verified)
        .map(|(i, _)| format!("peer {}: output does not match", i + 1))
        .collect::<Vec<_>>();
    Ok(Outcome {
        system: if import {
            System::Starling
        } else {
            System::StarlingOrigin
        }
        .name(),
        done: o.peers.iter().map(|p| Some(p.done_at)).collect(),
        verified: failures.is_empty(),
        failures,
        cpu_secs: o.cpu_secs + o.origin_cpu_secs,
        rss_kib: o.peak_rss_kib[1..].to_vec(),
        seed_sent: o.seed_sent,
        machine: Some(o.machine),
    })
}

struct Options {
    /// Only rewrite today's report from its CSV.
    report_only: bool,
    scenarios: Vec<Scenario>,
    systems: Vec<String>,
    pieces: Vec<u64>,
    /// Rounds per scenario (see [`run`]).
    runs: usize,
}

/// `cargo xtask bench stock` (bench/README.md).
#[derive(clap::Args)]
pub struct Args {
    /// Only rewrite the report from today's CSV.
    #[arg(long)]
    report: bool,
    /// Every scenario of the matrix.
    #[arg(long)]
    matrix: bool,
    /// A scenario of the matrix by name (repeatable): default, n2, n4, n16, f64, f1024, vxlan,
    /// dind, lossy, jumbo.
    #[arg(long)]
    scenario: Vec<String>,
    /// A custom job: downloaders beside the seed.
    #[arg(long)]
    peers: Option<usize>,
    /// A custom job: file size.
    #[arg(long)]
    size_mib: Option<u64>,
    /// A custom job: every link's rate.
    #[arg(long)]
    mbit: Option<u32>,
    /// A custom job: clean, vxlan, dind, lossy, jumbo.
    #[arg(long, value_parser = super::swarm::parse_topology)]
    topology: Option<Topology>,
    /// Systems to run, by name or prefix: starling, starling-origin, http, aria2, libtorrent,
    /// rqbit (default: all).
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// BitTorrent piece sizes in MiB, powers of two.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 4])]
    pieces: Vec<u64>,
    /// Rounds per scenario, in alternating order; medians are reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
}

fn parse(args: Args) -> Result<Options> {
    let mut picked: Vec<Scenario> = if args.matrix { matrix() } else { Vec::new() };
    for name in &args.scenario {
        picked.push(
            matrix()
                .into_iter()
                .find(|s| &s.name == name)
                .with_context(|| {
                    format!(
                        "unknown scenario {name:?}; the scenarios are {}",
                        matrix()
                            .iter()
                            .map(|s| s.name.clone())
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                })?,
        );
    }
    if args.pieces.iter().any(|p| !p.is_power_of_two()) {
        bail!("--pieces takes MiB powers of two, like 1,4");
    }
    let mut custom = Scenario::new("default", Topology::Clean, 8, 256);
    let is_custom = args.peers.is_some()
        || args.size_mib.is_some()
        || args.mbit.is_some()
        || args.topology.is_some();
    custom.peers = args.peers.unwrap_or(custom.peers);
    custom.size_mib = args.size_mib.unwrap_or(custom.size_mib);
    custom.mbit = args.mbit.unwrap_or(custom.mbit);
    if let Some(t) = args.topology {
        custom.loss = if t == Topology::Lossy { 0.01 } else { 0.0 };
        custom.topology = t;
    }
    if is_custom {
        custom.name = format!(
            "n{}-f{}-{}",
            custom.peers,
            custom.size_mib,
            custom.topology.name()
        );
        picked.push(custom);
    } else if picked.is_empty() {
        picked.push(custom);
    }
    Ok(Options {
        report_only: args.report,
        scenarios: picked,
        systems: args.systems,
        pieces: args.pieces,
        runs: args.runs as usize,
    })
}

pub fn run(args: Args) -> Result<()> {
    let opts = parse(args)?;
    if opts.report_only {
        for p in report::write(&root().join("bench/results"), &[])? {
            println!("wrote {}", p.display());
        }
        return Ok(());
    }
    if !is_root() {
        bail!("bench stock builds network namespaces: run it as root");
    }
    let dir = root().join("target/bench-stock");
    let mut systems = vec![System::Starling, System::StarlingOrigin, System::Http];
    for &p in &opts.pieces {
        for c in [
            bt::Client::Aria2,
            bt::Client::Libtorrent { utp: false },
            bt::Client::Libtorrent { utp: true },
            bt::Client::Rqbit,
        ] {
            systems.push(System::Bt(c, p));
        }
    }
    systems.retain(|s| opts.systems.is_empty() || opts.systems.iter().any(|w| picks(&s.name(), w)));
    setup::ensure_stock_peers(
        systems
            .iter()
            .any(|s| matches!(s, System::Bt(bt::Client::Rqbit, _))),
    )?;
    crate::build_ebpf()?;
    sh(cargo().args(["build", "--release", "--package", "starling"]))?;
    crate::use_release_binary();
    let mut results: Vec<(Scenario, Vec<Outcome>)> = Vec::new();
    for (k, sc) in opts.scenarios.iter().enumerate() {
        println!("\n== {}  (T_min {:.1} s)", sc.describe(), sc.t_min());
        let www = dir.join("www");
        std::fs::create_dir_all(&www)?;
        let file = www.join(format!("artifact-{}m.bin", sc.size_mib));
        if std::fs::metadata(&file).map(|m| m.len()).ok() != Some(sc.size_mib * MIB) {
            make_file(&file, sc.size_mib * MIB)?;
        }
        let want = sha256_file(&file);
        let tag = format!("q{}", (b'a' + (k % 26) as u8) as char);
        let lab = netlab::build_with_loss(
            &tag,
            140 + 2 * (k % 50) as u8,
            sc.peers + 1,
            sc.mbit,
            sc.topology,
            sc.loss,
        )
        .map_err(anyhow::Error::msg)?;
        let mut torrents = Vec::new();
        // Every system once per round; odd rounds go in reverse order, so no system always
        // runs first (or right after the same neighbour) on the shared machine.
        let mut runs: Vec<Vec<Outcome>> = vec![Vec::new(); systems.len()];
        for round in 0..opts.runs {
            if opts.runs > 1 {
                println!("  round {} of {}", round + 1, opts.runs);
            }
            let mut order: Vec<usize> = (0..systems.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let out = run_one(&systems[i], sc, &lab, &file, &want, &dir, &mut torrents);
                println!("  {}", report::line(sc, &out));
                runs[i].push(out);
            }
        }
        if opts.runs > 1 {
            println!("  median of {} runs:", opts.runs);
            for r in &runs {
                println!("  {}", report::summary_line(sc, r));
            }
        }
        // Grouped by system, each system's runs in the order they ran.
        results.push((sc.clone(), runs.into_iter().flatten().collect()));
        drop(lab);
    }
    let paths = report::write(&root().join("bench/results"), &results)?;
    println!();
    for p in paths {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// One run of `s` in `sc` on `lab`; a system that could not run is an outcome with every
/// downloader failed, and why.
fn run_one(
    s: &System,
    sc: &Scenario,
    lab: &Lab,
    file: &Path,
    want: &str,
    dir: &Path,
    torrents: &mut Vec<bt::Torrent>,
) -> Outcome {
    // Plain HTTP needs about N·T_min; a swarm that needs 6·T_min has failed anyway.
    let k = if *s == System::Http {
        (sc.peers + 4) as f64 * 1.5
    } else {
        6.0
    };
    let job = Job {
        lab,
        peers: sc.peers,
        file,
        want,
        limit: Duration::from_secs_f64((sc.t_min() * k).max(120.0)),
    };
    let announce = format!("http://{}:{}/announce", lab.hosts[0].addr, bt::TRACKER_PORT);
    let work = dir.join("run").join(s.name());
    let out = match *s {
        System::Starling => starling(&job, true, ""),
        System::StarlingOrigin => starling(&job, false, ""),
        System::Http => http(&job, &work),
        System::Bt(client, piece) => (|| {
            if !torrents.iter().any(|t| t.piece_mib == piece) {
                let path = dir.join(format!("{}-{piece}m.torrent", sc.name));
                torrents.push(bt::make_torrent(file, &announce, piece, &path)?);
            }
            let t = torrents
                .iter()
                .find(|t| t.piece_mib == piece)
                .context("torrent")?;
            bt::run(client, &job, t, &work)
        })(),
    };
    out.unwrap_or_else(|e| Outcome::failed(&s.name(), sc.peers, e))
}
