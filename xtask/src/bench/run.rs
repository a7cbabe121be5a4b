//! One distribution job, shared by `cargo xtask demo` and `cargo xtask bench swarm`: an nginx
//! origin, a `starling scheduler` and a seed on host 0, N peer daemons on hosts 1..=N (network
//! namespaces with tbf-shaped links when root, else loopback), every peer asking for the file at
//! once through its daemon's local API. It measures per-peer time, bytes from peers and from the
//! origin, the origin's bytes served, and the daemons' CPU time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use starling::daemon::api::{ApiEvent, GetRequest, ImportRequest};
use starling_tests::{metric_by_label, sha256_file, Cluster, Lab, Nginx, ShaperCount};

use super::procs::{cpu_secs, cpu_split, peak_rss_kib, tree_cpu_secs, MachineCpu, OnCpu};

pub struct Job<'a> {
    pub lab: Option<&'a Lab>,
    pub peers: usize,
    /// The file to distribute, already in `www`.
    pub www: &'a Path,
    pub file: &'a str,
    pub want: &'a str,
    /// Show live progress bars.
    pub live: bool,
    /// Piece length for the task (None: Starling's default rule).
    pub piece_length: Option<u64>,
    /// More TOML for every node's `[peer]` table.
    pub peer_toml: &'a str,
    /// More keys for every node's `[daemon]` table (`runtime_threads = 1`, say).
    pub daemon_toml: &'a str,
    /// The seed starts with the file imported (`starling import` through its API, before the
    /// timer) and the peers name it by digest; else the seed reads the origin during the run.
    pub import: bool,
}

/// The seed's import, before the timer.
pub struct Imported {
    pub secs: f64,
    /// The seed daemon's CPU seconds during it.
    pub cpu_secs: f64,
}

pub struct PeerResult {
    pub secs: f64,
    /// When it finished, seconds after all peers started.
    pub done_at: f64,
    pub from_peers: u64,
    pub from_origin: u64,
    pub verified: bool,
    /// The peer's output file.
    pub out: PathBuf,
}

pub struct Outcome {
    pub wall: f64,
    pub peers: Vec<PeerResult>,
    pub origin_bytes: u64,
    /// CPU seconds of the daemons and the scheduler, together.
    pub cpu_secs: f64,
    /// The user-mode part of `cpu_secs`.
    pub user_cpu_secs: f64,
    /// Each daemon's CPU seconds (node 0 is the seed).
    pub node_cpu_secs: Vec<f64>,
    pub size: u64,
    /// Piece bytes each node uploaded (node 0 is the seed).
    pub uploaded: Vec<u64>,
    /// Each daemon's peak resident set, KiB (node 0 is the seed).
    pub peak_rss_kib: Vec<u64>,
    /// The nginx origin's CPU seconds.
    pub origin_cpu_secs: f64,
    /// What the whole machine spent while the peers downloaded (their outputs' checks come
    /// after).
    pub machine: MachineCpu,
    /// Bytes the seed host sent on its link (lab runs; 0 on loopback).
    pub seed_sent: u64,
    /// Each daemon's time from its start (all at once) to answering on its socket.
    pub ready_secs: Vec<f64>,
    /// Each daemon's CPU over a few idle seconds after the job, as a share of one core.
    pub idle_cpu_share: Vec<f64>,
    /// What the seed's upload shaper passed (every packet's headers) and dropped (zeros
    /// unshaped).
    pub seed_shaper: ShaperCount,
    /// The same for each downloading peer's download shaper.
    pub peers_shaper: Vec<ShaperCount>,
    /// Failed piece requests summed over every node, by cause (`piece_failures_total`).
    pub piece_failures: std::collections::BTreeMap<String, f64>,
    pub import: Option<Imported>,
    /// The seed's QUIC sends to its children, summed over its connections (`starling probe`).
    pub seed_quic: Option<QuicSends>,
    /// The seed's answers to its children's news polls: how many, and their bytes.
    pub seed_news: (u64, u64),
    /// Piece requests the seed declined (Busy): a piece held for another, or no slot; and the
    /// pieces it offered in those answers.
    pub seed_declined: (u64, u64, u64),
}

/// What a node's QUIC connections sent, summed over them.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuicSends {
    pub packets: u64,
    pub lost_packets: u64,
    /// UDP payload bytes.
    pub bytes: u64,
    pub lost_bytes: u64,
}

/// The seed's sends to its children, from its probe report (closed connections included).
fn quic_sends(node: &starling_tests::Node) -> Option<QuicSends> {
    let socket = node.scratch.data_dir().join("starling.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let report = rt
        .block_on(starling::daemon::client_probe(&socket))
        .ok()??;
    Some(
        report
            .paths
            .iter()
            .filter(|p| p.role == "child")
            .fold(QuicSends::default(), |s, p| QuicSends {
                packets: s.packets + p.sent_packets,
                lost_packets: s.lost_packets + p.lost_packets,
                bytes: s.bytes + p.sent_bytes,
                lost_bytes: s.lost_bytes + p.lost_bytes,
            }),
    )
}

pub fn run(job: &Job) -> Result<Outcome> {
    let size = std::fs::metadata(job.www.join(job.file))?.len();
    let nginx = match job.lab {
        Some(lab) => Nginx::start_in(job.www, None, Some(&lab.hosts[0].ns), &lab.hosts[0].addr),
        None => Nginx::start(job.www),
    };
    let url = nginx.url(job.file);
    let mut cluster = Cluster::new_in(job.lab, job.peers, job.peer_toml, "");
    if !job.daemon_toml.is_empty() {
        // The harness writes each node's [daemon] table; these keys go into it.
        for n in &cluster.nodes {
            let path = n.scratch.config_path();
            let text = std::fs::read_to_string(&path)?;
            let with = format!("[daemon]\n{}\n", job.daemon_toml.trim_end());
            std::fs::write(&path, text.replacen("[daemon]\n", &with, 1))?;
        }
    }
    // Every daemon starts at the same moment, as on a cluster's nodes booting together.
    let ready = cluster.start_all_at_once();
    let daemons: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    let import = if job.import {
        Some(import_into_seed(
            &cluster.nodes[0],
            &job.www.join(job.file),
            job.want,
            job.piece_length,
        )?)
    } else {
        None
    };
    let digest = job.import.then_some(job.want);
    let pids: Vec<u32> = daemons
        .iter()
        .copied()
        .chain(cluster.scheduler.as_ref().map(|s| s.child.id()))
        .collect();
    let cpu0: Vec<(f64, f64)> = pids.iter().map(|p| cpu_split(*p)).collect();
    let origin0 = nginx.bytes_sent();
    let origin_cpu0 = tree_cpu_secs(nginx.pid());
    let sent0 = job.lab.map_or(0, |l| l.host_sent_bytes(0));
    let seed_shaper = || job.lab.map(|l| l.host_upload_shaper(0)).unwrap_or_default();
    let peers_shaper = || -> Vec<ShaperCount> {
        (1..=job.peers)
            .map(|i| {
                job.lab
                    .map(|l| l.host_download_shaper(i))
                    .unwrap_or_default()
            })
            .collect()
    };
    let (seed_shaper0, peers_shaper0) = (seed_shaper(), peers_shaper());

    let bars = indicatif::MultiProgress::new();
    if !job.live {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>8} [{bar:40}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let start = Instant::now();
    let machine0 = MachineCpu::now();
    // Dropped when every peer is done, which stops the sampler below at once.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let seed = &cluster.nodes[0];
    let results: Vec<Result<PeerResult>> = std::thread::scope(|sc| {
        if std::env::var_os("STARLING_BENCH_TRACE").is_some() {
            let lab = job.lab;
            sc.spawn(move || trace(lab, seed, job.peers, start, done_rx));
        }
        let handles: Vec<_> = (1..=job.peers)
            .map(|i| {
                let bar = bars.add(indicatif::ProgressBar::new(size));
                bar.set_style(style.clone());
                bar.set_prefix(format!("peer {i}"));
                let node = &cluster.nodes[i];
                let url = url.clone();
                sc.spawn(move || -> Result<PeerResult> {
                    let get = Get {
                        url: &url,
                        digest,
                        piece_length: job.piece_length,
                    };
                    let out = node.scratch.out("artifact.bin");
                    let t = Instant::now();
                    let socket = node.scratch.data_dir().join("starling.sock");
                    let ev = get_via_api(&socket, &get, &out, &bar)?;
                    let secs = t.elapsed().as_secs_f64();
                    let done_at = start.elapsed().as_secs_f64();
                    bar.finish();
                    match ev {
                        ApiEvent::Done {
                            parent_bytes,
                            origin_bytes,
                            ..
                        } => Ok(PeerResult {
                            secs,
                            done_at,
                            from_peers: parent_bytes,
                            from_origin: origin_bytes,
                            // Checked below, once every peer is done.
                            verified: false,
                            out,
                        }),
                        ApiEvent::Error { code, message } => {
                            bail!("peer {i}: exit code {code}: {message}")
                        }
                        _ => {
                            bail!("peer {i}: no final answer")
                        }
                    }
                })
            })
            .collect();
        let results = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a peer thread panicked")))
            .collect();
        drop(done_tx);
        results
    });
    let machine = MachineCpu::now().since(&machine0);
    let split: Vec<(f64, f64)> = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, (u0, s0))| {
            let (u, s) = cpu_split(*p);
            (u - u0, s - s0)
        })
        .collect();
    let cpu: Vec<f64> = split.iter().map(|(u, s)| u + s).collect();
    let origin_cpu_secs = tree_cpu_secs(nginx.pid()) - origin_cpu0;
    let seed_sent = job.lab.map_or(0, |l| l.host_sent_bytes(0)) - sent0;
    let seed_shaper = seed_shaper().since(seed_shaper0);
    let peers_shaper = peers_shaper()
        .into_iter()
        .zip(peers_shaper0)
        .map(|(now, before)| now.since(before))
        .collect();
    let peak_rss_kib = cluster
        .nodes
        .iter()
        .map(|n| n.pid().map_or(0, peak_rss_kib))
        .collect();
    let mut peers = results.into_iter().collect::<Result<Vec<_>>>()?;
    // Outputs are checked after the last peer finished and the CPU was read, as for the stock
    // systems: a sha256sum (about 1.8 s per 256 MiB here) started by an early finisher would
    // otherwise take the CPU from the peers still downloading.
    std::thread::scope(|sc| {
        for p in &mut peers {
            sc.spawn(move || p.verified = sha256_file(&p.out) == job.want);
        }
    });
    // Until the last peer had its file (the outputs' own checks come after).
    let wall = peers.iter().map(|p| p.done_at).fold(0.0, f64::max);
    let uploaded = cluster
        .nodes
        .iter()
        .map(|n| n.metric("starling_bytes_uploaded_total") as u64)
        .collect();
    // Idle: every download is over; once the swarm's connections have gone quiet, what each
    // daemon spends over some seconds of nothing to do (announcements, keep-alives, upkeep),
    // counted to the nanosecond.
    std::thread::sleep(std::time::Duration::from_secs(IDLE_SETTLE_SECS));
    let mut idle: Vec<OnCpu> = daemons.iter().map(|p| OnCpu::start(*p)).collect();
    let t_idle = Instant::now();
    while t_idle.elapsed().as_secs() < IDLE_SECS {
        std::thread::sleep(std::time::Duration::from_millis(100));
        idle.iter_mut().for_each(OnCpu::sample);
    }
    let idle_secs = t_idle.elapsed().as_secs_f64();
    let idle_cpu_share = idle.iter().map(|c| c.secs() / idle_secs).collect();
    let seed_quic = quic_sends(&cluster.nodes[0]);
    let seed_news = (
        cluster.nodes[0].metric("starling_have_answers_total") as u64,
        cluster.nodes[0].metric("starling_have_answer_bytes_total") as u64,
    );
    let declined = |reason: &str| {
        metric_by_label(
            &cluster.nodes[0].metrics(),
            "starling_piece_requests_declined_total",
            "reason",
        )
        .into_iter()
        .filter(|(r, _)| r == reason)
        .map(|(_, v)| v as u64)
        .sum::<u64>()
    };
    let seed_declined = (
        declined("held"),
        declined("no_slot"),
        cluster.nodes[0].metric("starling_pieces_offered_total") as u64,
    );
    if let Some(to) = std::env::var_os("STARLING_BENCH_LOGS") {
        keep_logs(&cluster, Path::new(&to))?;
    }
    let mut piece_failures = std::collections::BTreeMap::new();
    for n in &cluster.nodes {
        for (cause, v) in metric_by_label(&n.metrics(), "starling_piece_failures_total", "cause") {
            *piece_failures.entry(cause).or_insert(0.0) += v;
        }
    }
    Ok(Outcome {
        wall,
        peers,
        origin_bytes: nginx.bytes_sent() - origin0,
        cpu_secs: cpu.iter().sum(),
        user_cpu_secs: split.iter().map(|(u, _)| u).sum(),
        node_cpu_secs: cpu[..daemons.len()].to_vec(),
        size,
        uploaded,
        peak_rss_kib,
        origin_cpu_secs,
        machine,
        seed_sent,
        seed_shaper,
        peers_shaper,
        piece_failures,
        import,
        seed_quic,
        seed_news,
        seed_declined,
        ready_secs: ready.iter().map(|d| d.as_secs_f64()).collect(),
        idle_cpu_share,
    })
}

/// How long the idle daemons are watched after the job.
const IDLE_SECS: u64 = 10;
/// After the job, before the idle count: QUIC connections left idle close after 5 s.
const IDLE_SETTLE_SECS: u64 = 6;

/// `starling import` of `file` through the seed daemon's API; the digest must come out `want`.
fn import_into_seed(
    seed: &starling_tests::Node,
    file: &Path,
    want: &str,
    piece_length: Option<u64>,
) -> Result<Imported> {
    let pid = seed.pid().context("the seed daemon is not running")?;
    let cpu0 = cpu_secs(pid);
    let t = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = ImportRequest {
        path: std::path::absolute(file)?,
        digest: Some(want.parse().context("the bench's own digest")?),
        piece_length,
        link: false,
    };
    let socket = seed.scratch.data_dir().join("starling.sock");
    match rt.block_on(starling::daemon::client_import(&socket, &req, |_, _| {}))? {
        Some(ApiEvent::Done { .. }) => Ok(Imported {
            secs: t.elapsed().as_secs_f64(),
            cpu_secs: cpu_secs(pid) - cpu0,
        }),
        Some(ApiEvent::Error { code, message }) => {
            bail!("the seed's import failed (exit code {code}): {message}")
        }
        other => bail!("the seed answered the import with {other:?}"),
    }
}

/// With STARLING_BENCH_LOGS set to a directory: every daemon's log copied there (`node-0.log` is
/// the seed's), and the scheduler's when there is one.
fn keep_logs(cluster: &Cluster, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    for (i, n) in cluster.nodes.iter().enumerate() {
        std::fs::write(to.join(format!("node-{i}.log")), n.log())?;
    }
    if let Some(s) = &cluster.scheduler {
        std::fs::copy(&s.log, to.join("scheduler.log"))?;
    }
    println!("daemon logs kept in {}", to.display());
    Ok(())
}

/// With STARLING_BENCH_TRACE set (to seconds, default 1), every interval until `done` closes:
/// the piece bytes the seed handed to QUIC, the bytes its link carried and each peer's link
/// carried to it (in a lab).
fn trace(
    lab: Option<&Lab>,
    seed: &starling_tests::Node,
    peers: usize,
    start: Instant,
    done: std::sync::mpsc::Receiver<()>,
) {
    let every = std::env::var("STARLING_BENCH_TRACE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s >= 0.01)
        .map_or(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs_f64,
        );
    let wire = || lab.map_or(0, |l| l.host_sent_bytes(0)) as f64;
    let downs = || -> Vec<f64> {
        (1..=peers)
            .map(|i| lab.map_or(0, |l| l.host_received_bytes(i)) as f64)
            .collect()
    };
    let (mut last, mut last_wire, mut last_downs) = (0.0, wire(), downs());
    let mut last_at = Instant::now();
    // Rates in MB/s (10^6 bytes), so that intervals of any length compare; a 100 Mbit/s link
    // carries 12.5 MB/s.
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(every) {
        let (up, w, d) = (
            seed.metric("starling_bytes_uploaded_total"),
            wire(),
            downs(),
        );
        let dt = last_at.elapsed().as_secs_f64().max(1e-3);
        last_at = Instant::now();
        let mut mb: Vec<f64> = d
            .iter()
            .zip(&last_downs)
            .map(|(a, b)| ((a - b) / dt / 1e5).round() / 10.0)
            .collect();
        mb.sort_by(f64::total_cmp);
        eprintln!(
            "t={:6.2}s seed pieces {:6.2} MB/s, link {:6.2} MB/s; peer links in {mb:?} MB/s",
            start.elapsed().as_secs_f64(),
            (up - last) / dt / 1e6,
            (w - last_wire) / dt / 1e6,
        );
        (last, last_wire, last_downs) = (up, w, d);
    }
}

/// A `get` through a daemon's local API, feeding `bar` with its progress.
/// One peer's request.
pub struct Get<'a> {
    pub url: &'a str,
    /// Names the task by content (as registries do); None names it by URL.
    pub digest: Option<&'a str>,
    pub piece_length: Option<u64>,
}

impl<'a> Get<'a> {
    /// The task named by its URL, with Starling's default piece length.
    pub fn url(url: &'a str) -> Get<'a> {
        Get {
            url,
            digest: None,
            piece_length: None,
        }
    }
}

fn get_via_api(
    socket: &Path,
    get: &Get,
    out: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<ApiEvent> {
    get_with_progress(socket, get, out, |total, d| {
        bar.set_length(total.max(1));
        bar.set_position(d);
    })
}

/// A `get` through a daemon's local API, calling `on_progress(total, done)` as it goes.
pub fn get_with_progress(
    socket: &Path,
    get: &Get,
    out: &Path,
    on_progress: impl FnMut(u64, u64),
) -> Result<ApiEvent> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = GetRequest {
        request: starling::core::Request {
            url: get.url.to_string(),
            digest: get.digest.map(str::parse).transpose().context("a digest")?,
            headers: Default::default(),
            piece_length: get.piece_length,
        },
        output: PathBuf::from(out),
        no_hardlink: false,
    };
    let ev = rt.block_on(starling::daemon::client_get(socket, &req, on_progress))?;
    ev.context("no daemon answered on its socket")
}

/// The bytes each node uploaded, in file sizes: "seed X | peers Y Z ...".
pub fn uploads_line(o: &Outcome) -> String {
    let share = |b: &u64| *b as f64 / o.size as f64;
    // The seed's share decides the floor: anything over 1 is a piece it sent twice.
    let seed = o.uploaded.first().map_or(0.0, share);
    let peers: Vec<String> = o
        .uploaded
        .iter()
        .skip(1)
        .map(|b| format!("{:.2}", share(b)))
        .collect();
    format!("seed {seed:.4} | peers {}", peers.join(" "))
}

/// "seed S | peers P1 P2 ...": each daemon's CPU seconds.
pub fn node_cpu_line(o: &Outcome) -> String {
    let cpu: Vec<String> = o.node_cpu_secs.iter().map(|c| format!("{c:.2}")).collect();
    match cpu.split_first() {
        Some((seed, peers)) => format!("seed {seed} | peers {}", peers.join(" ")),
        None => "none".into(),
    }
}

/// Seconds a link at `mbit` takes to carry `bytes`.
pub fn link_secs(bytes: f64, mbit: u32) -> f64 {
    bytes * 8.0 / (mbit as f64 * 1e6)
}

/// T_min = max(F/U_seed, F/D_peer, N·F/(U_seed + ΣU_peers)), with every link at `mbit`.
pub fn t_min(size: u64, peers: usize, mbit: u32) -> f64 {
    let one = link_secs(size as f64, mbit);
    let n = peers as f64;
    one.max(n * one / (n + 1.0))
}
