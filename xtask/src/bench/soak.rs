//! `cargo xtask bench soak`: a bounded soak on loopback. A seed and N peers share a store
//! budget far below what they fetch (`gc.capacity_bytes`, collected every 5 s), and for
//! `--minutes` they run gets without pause: every node, two at a time, of files from 1 to
//! 64 MiB on an nginx origin, each output checked against its SHA-256 and removed. Every
//! minute a peer other than the seed and peer 1 is killed with SIGKILL and comes back 5 s
//! later (peers leaving and joining). Every 10 s each daemon's RSS and open descriptors are
//! sampled. It fails when a get fails while its daemon is up (an evicted task in use would
//! fail it), when an output is wrong, or when the GC never ran; it prints RSS and descriptors
//! over time for the nodes that never restart, so a leak shows as a trend.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use starling::daemon::api::ApiEvent;
use starling_tests::{sha256_file, Cluster, Nginx};

use super::{make_file, release_build, MIB};
use crate::root;

/// `cargo xtask bench soak` (bench/README.md).
#[derive(clap::Args)]
pub struct Args {
    /// How long the gets run.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Peers beside the seed.
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Each node's store budget (`gc.capacity_bytes`), MiB.
    #[arg(long, default_value_t = 192)]
    gc_mib: u64,
}

/// File sizes in MiB, cycled over the files.
const SIZES: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];
const FILES: usize = 21;

struct Sample {
    at: f64,
    /// Per node: (RSS KiB, open descriptors); None while it is down.
    nodes: Vec<Option<(u64, usize)>>,
    /// Per node: bytes of stored content.
    stored: Vec<u64>,
}

pub fn run(a: Args) -> Result<()> {
    release_build(false)?;
    let dir = root().join("target/bench-soak");
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    let mut files = Vec::new();
    for i in 0..FILES {
        let name = format!("f{i}.bin");
        make_file(&www.join(&name), SIZES[i % SIZES.len()] * MIB + i as u64)?;
        files.push((name.clone(), sha256_file(&www.join(&name))));
    }
    let nginx = Nginx::start(&www);
    let mut cluster = Cluster::new(a.peers, "", "");
    for n in &cluster.nodes {
        let path = n.scratch.config_path();
        let text = std::fs::read_to_string(&path)?;
        // The harness writes each node's [daemon] table; the GC keys join it.
        let text = text.replacen("[daemon]\n", "[daemon]\ngc_interval_seconds = 5\n", 1);
        std::fs::write(
            &path,
            format!("{text}\n[gc]\ncapacity_bytes = {}\n", a.gc_mib * MIB),
        )?;
    }
    cluster.start_all();
    let nodes = cluster.nodes.len();
    println!(
        "bench soak: 1 seed + {} peers on loopback, {FILES} files of 1-64 MiB, store budget {} MiB each, {} min",
        a.peers, a.gc_mib, a.minutes
    );
    let sockets: Vec<PathBuf> = cluster
        .nodes
        .iter()
        .map(|n| n.scratch.data_dir().join("starling.sock"))
        .collect();
    let outs: Vec<PathBuf> = cluster.nodes.iter().map(|n| n.scratch.out_dir()).collect();
    let down: Vec<AtomicBool> = (0..nodes).map(|_| AtomicBool::new(false)).collect();
    let (ok, bytes, interrupted) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let until = start + Duration::from_secs(a.minutes * 60);
    let mut samples: Vec<Sample> = Vec::new();
    let mut churns = 0;
    let urls: Vec<String> = files.iter().map(|(f, _)| nginx.url(f)).collect();
    std::thread::scope(|sc| {
        for w in 0..nodes * 2 {
            let node = w % nodes;
            let (socket, out, down) = (&sockets[node], &outs[node], &down[node]);
            let (files, urls) = (&files, &urls);
            let (ok, bytes, interrupted, failures, stop) =
                (&ok, &bytes, &interrupted, &failures, &stop);
            sc.spawn(move || {
                let mut k = w as u64 * 7919;
                while !stop.load(Ordering::SeqCst) {
                    k = k
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let i = (k >> 33) as usize % files.len();
                    if down.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                    let path = out.join(format!("w{w}-{i}.bin"));
                    match get(socket, &urls[i], &path) {
                        Ok(n) if sha256_file(&path) == files[i].1 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(_) => lock(failures).push(format!("node {node}: {} wrong", files[i].0)),
                        Err(_) if down.load(Ordering::SeqCst) => {
                            interrupted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => lock(failures).push(format!("node {node}: {}: {e}", files[i].0)),
                    }
                    let _ = std::fs::remove_file(&path);
                }
            });
        }
        let mut next_sample = start;
        let mut next_churn = start + Duration::from_secs(60);
        let mut back: Option<(usize, Instant)> = None;
        let mut rng = 0x50a4u64;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
            let now = Instant::now();
            if now >= next_sample {
                next_sample += Duration::from_secs(10);
                samples.push(Sample {
                    at: start.elapsed().as_secs_f64(),
                    nodes: cluster
                        .nodes
                        .iter()
                        .map(|n| n.pid().map(|p| (rss_kib(p), fds(p))))
                        .collect(),
                    stored: cluster.nodes.iter().map(|n| stored(&n.scratch)).collect(),
                });
            }
            if let Some((peer, at)) = back {
                if now >= at {
                    cluster.nodes[peer].start();
                    down[peer].store(false, Ordering::SeqCst);
                    back = None;
                }
            } else if now >= next_churn && a.peers >= 2 {
                next_churn += Duration::from_secs(60);
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                let peer = 2 + (rng >> 33) as usize % (a.peers - 1).max(1);
                down[peer].store(true, Ordering::SeqCst);
                cluster.nodes[peer].kill();
                churns += 1;
                back = Some((peer, now + Duration::from_secs(5)));
            }
        }
        stop.store(true, Ordering::SeqCst);
        if let Some((peer, _)) = back {
            cluster.nodes[peer].start();
            down[peer].store(false, Ordering::SeqCst);
        }
    });
    let evictions: usize = cluster
        .nodes
        .iter()
        .map(|n| {
            n.log()
                .lines()
                .filter(|l| l.contains("garbage collected"))
                .filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("evicted="))
                        .and_then(|v| v.parse::<usize>().ok())
                })
                .sum::<usize>()
        })
        .sum();
    report(&samples, a.peers);
    let budget = a.gc_mib * MIB;
    let late_max = samples
        .iter()
        .filter(|s| s.at >= 120.0)
        .flat_map(|s| s.stored.iter().copied())
        .max()
        .unwrap_or(0);
    println!(
        "store: at most {:.0} MiB on any node after minute 2, against a budget of {} MiB (GC every 5 s, high watermark 0.85)",
        late_max as f64 / MIB as f64,
        a.gc_mib
    );
    let failures = lock(&failures).clone();
    println!(
        "\ngets verified: {} ({:.1} GiB); interrupted by a peer's kill: {}; failed: {}; peers killed and restarted: {churns}; tasks evicted by the GC: {evictions}",
        ok.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) as f64 / (1u64 << 30) as f64,
        interrupted.load(Ordering::Relaxed),
        failures.len()
    );
    for f in failures.iter().take(10) {
        println!("  {f}");
    }
    if !failures.is_empty() {
        bail!("{} gets failed while their daemon was up", failures.len());
    }
    // Tasks in use (downloads, and those served in the last 10 s) may go over the budget for
    // a while; twice the budget means it is not kept.
    if late_max > 2 * budget {
        bail!("a store held {} MiB, over twice its budget", late_max / MIB);
    }
    if evictions == 0 {
        bail!("the GC evicted nothing: no pressure (lower --gc-mib)");
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One get through the daemon's API: the bytes it placed.
fn get(socket: &Path, url: &str, out: &Path) -> Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = starling_tests::api_get_request(url, out);
    match rt.block_on(starling::daemon::client_get(socket, &req, |_, _| {}))? {
        Some(ApiEvent::Done { bytes, .. }) => Ok(bytes),
        Some(ApiEvent::Error { code, message }) => bail!("exit code {code}: {message}"),
        other => bail!("no final answer: {other:?}"),
    }
}

/// Bytes of stored content (every task's `content`) in a node's data directory.
fn stored(s: &starling_tests::Scratch) -> u64 {
    s.tasks()
        .iter()
        .filter_map(|t| std::fs::metadata(t.join("content")).ok())
        .map(|m| m.len())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// RSS and descriptors of the seed and peer 1 (never restarted) once a minute, and their
/// change from the second minute (after the first fills) to the end.
fn report(samples: &[Sample], peers: usize) {
    let watched = [0usize, 1.min(peers)];
    println!("\n minute | seed RSS MiB, fds, store MiB | peer 1 RSS MiB, fds, store MiB");
    for s in samples
        .iter()
        .filter(|s| (s.at as u64).is_multiple_of(60) || s.at < 10.0)
    {
        let cell = |i: usize| match s.nodes.get(i).copied().flatten() {
            Some((r, f)) => format!(
                "{:7.1} {:5} {:6.0}",
                r as f64 / 1024.0,
                f,
                s.stored.get(i).copied().unwrap_or(0) as f64 / MIB as f64
            ),
            None => "   down             ".into(),
        };
        println!(
            " {:6.1} | {} | {}",
            s.at / 60.0,
            cell(watched[0]),
            cell(watched[1])
        );
    }
    let late = |from: f64, to: f64, i: usize| -> Option<(f64, f64)> {
        let v: Vec<(u64, usize)> = samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .filter_map(|s| s.nodes.get(i).copied().flatten())
            .collect();
        (!v.is_empty()).then(|| {
            (
                v.iter().map(|x| x.0 as f64).sum::<f64>() / v.len() as f64 / 1024.0,
                v.iter().map(|x| x.1 as f64).sum::<f64>() / v.len() as f64,
            )
        })
    };
    let end = samples.last().map_or(0.0, |s| s.at);
    for (name, i) in [("seed", watched[0]), ("peer 1", watched[1])] {
        if let (Some(a), Some(b)) = (late(60.0, 180.0, i), late(end - 120.0, end + 1.0, i)) {
            println!(
                "{name}: RSS {:.1} MiB in minutes 1-3, {:.1} MiB in the last two ({:+.1}%); descriptors {:.0} -> {:.0}",
                a.0,
                b.0,
                (b.0 / a.0 - 1.0) * 100.0,
                a.1,
                b.1
            );
        }
    }
}
