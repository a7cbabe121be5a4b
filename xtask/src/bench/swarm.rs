//! `cargo xtask bench swarm`: one seed plus N downloaders (default 8), each host a network
//! namespace on one bridge with every link shaped by tbf both ways (default 100 Mbit/s), a file
//! of F bytes (default 256 MiB); `--topology` puts the hosts in a netlab topology instead (a
//! router between two bridges, e.g. `lossy`, whose drop rate `--loss` sets). Prints Starling's
//! wall time until all peers finish, T_min, Starling/T_min, and plain HTTP (nginx on the seed
//! host, N concurrent curls) / Starling, all from the same run, plus CPU use (all hosts share
//! this machine's cores).

use std::path::Path;

use anyhow::{bail, Result};
use starling_tests::netlab::{self, Topology};
use starling_tests::{is_root, sha256_file, Lab};

use super::run::{self as swarm, Job};
use super::{make_file, release_build, MIB};
use crate::root;

/// `cargo xtask bench swarm` (bench/README.md).
#[derive(clap::Args)]
pub struct Args {
    /// Downloaders beside the seed.
    #[arg(long, default_value_t = 8)]
    peers: usize,
    /// Size of the file.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Every link's rate, each way (tbf).
    #[arg(long, default_value_t = 100)]
    mbit: u32,
    /// Piece length in KiB (default: the product's rule).
    #[arg(long)]
    piece_kib: Option<u64>,
    /// A netlab topology instead of the one bridge: clean, vxlan, dind, lossy, jumbo.
    #[arg(long, value_parser = parse_topology)]
    topology: Option<Topology>,
    /// The lossy topology's drop rate, from 0 to 1 (default 0.02).
    #[arg(long, value_parser = parse_loss)]
    loss: Option<f64>,
    /// `key = value` added to every node's [peer] section (repeatable).
    #[arg(long)]
    peer_toml: Vec<String>,
    /// The seed starts with the file imported (before the timer); peers name it by digest.
    #[arg(long)]
    import: bool,
    /// Skip the plain-HTTP baseline.
    #[arg(long)]
    no_http: bool,
}

pub fn parse_topology(v: &str) -> Result<Topology, String> {
    Topology::parse(v).ok_or_else(|| {
        format!("unknown topology {v:?}: use one of clean, vxlan, dind, lossy, jumbo")
    })
}

fn parse_loss(v: &str) -> Result<f64, String> {
    v.parse()
        .ok()
        .filter(|p| (0.0..1.0).contains(p))
        .ok_or_else(|| format!("--loss {v:?}: give a drop rate from 0 to 1, e.g. 0.01"))
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        peers,
        size_mib,
        mbit,
        piece_kib,
        topology,
        loss,
        import,
        ..
    } = args;
    let http = !args.no_http;
    let peer_toml: String = args.peer_toml.iter().map(|l| format!("{l}\n")).collect();
    if loss.is_some() && topology != Some(Topology::Lossy) {
        bail!("--loss sets the lossy topology's drop rate: add --topology lossy");
    }
    if !is_root() {
        bail!("bench swarm builds network namespaces: run it as root");
    }
    release_build(false)?;
    let dir = root().join("target/bench-swarm");
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    make_file(&www.join("artifact.bin"), size_mib * MIB)?;
    let want = sha256_file(&www.join("artifact.bin"));
    // The plain bridge unless a netlab topology is asked for (a router between two bridges).
    let lab = match topology {
        None => Lab::new("s", 202, peers + 1, mbit),
        Some(t) => netlab::build_with_loss("s", 202, peers + 1, mbit, t, loss.unwrap_or(t.loss())),
    }
    .map_err(anyhow::Error::msg)?;
    let shape = match topology {
        None => String::new(),
        Some(t @ Topology::Lossy) => {
            format!(
                ", lossy topology ({}% loss)",
                loss.unwrap_or(t.loss()) * 100.0
            )
        }
        Some(t) => format!(", {} topology", t.name()),
    };
    println!(
        "bench swarm: 1 seed + {peers} peers, {size_mib} MiB, {mbit} Mbit/s links (tbf both ways){shape}"
    );
    let job = Job {
        lab: Some(&lab),
        peers,
        www: &www,
        file: "artifact.bin",
        want: &want,
        live: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        piece_length: piece_kib.map(|k| k * 1024),
        peer_toml: &peer_toml,
        daemon_toml: "",
        import,
    };
    let o = swarm::run(&job)?;
    if o.peers.iter().any(|p| !p.verified) {
        bail!("a Starling output did not match the digest");
    }
    let t_min = swarm::t_min(o.size, peers, mbit);
    let delivered_gib = (o.size * peers as u64) as f64 / (1u64 << 30) as f64;
    let mut times: Vec<f64> = o.peers.iter().map(|p| p.secs).collect();
    times.sort_by(f64::total_cmp);
    println!("\nstarling: all {peers} peers done in {:.2} s (per peer min {:.2} / median {:.2} / max {:.2})", o.wall, times[0], times[times.len() / 2], times[times.len() - 1]);
    println!("T_min = max(F/U_seed, F/D_peer, N*F/(U_seed+sum U_peers)) = {t_min:.2} s");
    println!(
        "starling / T_min = {:.2}   (target <= 1.15)",
        o.wall / t_min
    );
    println!(
        "origin served {:.3} x F; starling daemons used {:.1} CPU-s ({:.2} CPU-s per GiB delivered; user {:.1}, system {:.1})",
        o.origin_bytes as f64 / o.size as f64,
        o.cpu_secs,
        o.cpu_secs / delivered_gib,
        o.user_cpu_secs,
        o.cpu_secs - o.user_cpu_secs
    );
    println!(
        "the whole machine (/proc/stat, every process and the kernel, softirq included) spent {:.1} CPU-s ({:.2} per GiB delivered; user {:.1}, system {:.1}, softirq {:.1})",
        o.machine.busy,
        o.machine.busy / delivered_gib,
        o.machine.user,
        o.machine.system,
        o.machine.softirq
    );
    println!("uploaded, in F: {}", swarm::uploads_line(&o));
    if o.seed_shaper.bytes > 0 {
        // Every byte must leave the seed once, headers and all, through its shaper.
        let shaped = o.seed_shaper.bytes as f64 / o.size as f64;
        println!(
            "the seed's link carried {shaped:.3} x F by its shaper's count ({:.3} x F at its bridge port, where a GSO batch's headers count once): at the link's rate that alone takes {:.2} s",
            o.seed_sent as f64 / o.size as f64,
            swarm::link_secs(o.seed_shaper.bytes as f64, mbit),
        );
    }
    let mut down: Vec<f64> = o
        .peers_shaper
        .iter()
        .filter(|c| c.bytes > 0)
        .map(|c| c.bytes as f64 / o.size as f64)
        .collect();
    if !down.is_empty() {
        // Each peer's download link is as scarce as the seed's upload: every byte it carries
        // beyond F (headers, pieces sent twice, lost packets' resends) costs the peer time.
        down.sort_by(f64::total_cmp);
        let mid = down[down.len() / 2];
        println!(
            "the peers' links carried {:.3} / {mid:.3} / {:.3} x F (min / median / max) by their download shapers' count: at the link's rate the median alone takes {:.2} s",
            down[0],
            down[down.len() - 1],
            swarm::link_secs(mid * o.size as f64, mbit),
        );
    }
    if let Some(q) = o.seed_quic {
        println!(
            "the seed's QUIC: {} packets, {:.4} x F of UDP payload; QUIC declared {} packets lost ({:.2}%, {:.4} x F, sent again)",
            q.packets,
            q.bytes as f64 / o.size as f64,
            q.lost_packets,
            100.0 * q.lost_packets as f64 / q.packets.max(1) as f64,
            q.lost_bytes as f64 / o.size as f64,
        );
        println!(
            "the seed's news to its children: {} answers, {:.4} x F before QUIC's framing",
            o.seed_news.0,
            o.seed_news.1 as f64 / o.size as f64,
        );
        println!(
            "the seed declined {} piece requests (Busy): {} held for another peer (offering {} pieces instead), {} with no slot free",
            o.seed_declined.0 + o.seed_declined.1,
            o.seed_declined.0,
            o.seed_declined.2,
            o.seed_declined.1,
        );
    }
    if o.seed_shaper.bytes > 0 {
        // Where losses happen: a packet the seed's own shaper drops never crossed its link
        // (only the connection backs off); one a peer's download shaper drops did, and its
        // resend crosses it again.
        println!(
            "shaper drops (one GSO batch counts once): the seed's upload {}, the peers' downloads {} in all",
            o.seed_shaper.dropped,
            o.peers_shaper.iter().map(|c| c.dropped).sum::<u64>(),
        );
    }
    println!("CPU-s per daemon: {}", swarm::node_cpu_line(&o));
    if let Some(i) = &o.import {
        println!(
            "before the timer, the seed imported the file (starling import): {:.2} s, {:.2} CPU-s",
            i.secs, i.cpu_secs
        );
    }
    println!(
        "peak RSS per daemon: max {} MiB",
        o.peak_rss_kib.iter().max().copied().unwrap_or(0) / 1024
    );
    let mut ready = o.ready_secs.clone();
    ready.sort_by(f64::total_cmp);
    let mut idle = o.idle_cpu_share.clone();
    idle.sort_by(f64::total_cmp);
    let mid = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(0.0);
    println!(
        "{} daemons started at once: ready (socket answering) in median {:.2} s, max {:.2} s; idle after the job: median {:.3}%, max {:.3}% of a core each",
        ready.len(),
        mid(&ready),
        ready.last().copied().unwrap_or(0.0),
        100.0 * mid(&idle),
        100.0 * idle.last().copied().unwrap_or(0.0),
    );
    let failures: Vec<String> = o
        .piece_failures
        .iter()
        .map(|(cause, n)| format!("{cause} {n}"))
        .collect();
    let failures = if failures.is_empty() {
        "none".to_string()
    } else {
        failures.join(", ")
    };
    println!("failed piece requests, all nodes: {failures}");
    if http {
        let (wall, cpu, ok) = http_baseline(
            &lab,
            peers,
            &www.join("artifact.bin"),
            &want,
            &dir.join("out"),
        )?;
        if !ok {
            bail!("a curl output did not verify");
        }
        println!("plain HTTP ({peers} concurrent curls from nginx on the seed host): {wall:.2} s, curl + nginx CPU {cpu:.1} s");
        println!(
            "HTTP / starling = {:.2}   HTTP / T_min = {:.2}",
            wall / o.wall,
            wall / t_min
        );
    }
    Ok(())
}

/// Plain HTTP baseline: every peer host runs curl against nginx on the seed host at once.
/// Returns the wall time, the CPU seconds (curls and nginx), and whether every output verified.
fn http_baseline(
    lab: &Lab,
    peers: usize,
    file: &Path,
    want: &str,
    out: &Path,
) -> Result<(f64, f64, bool)> {
    let job = super::stock::Job {
        lab,
        peers,
        file,
        want,
        limit: std::time::Duration::from_secs(3600),
    };
    let o = super::stock::http(&job, out)?;
    Ok((o.wall().unwrap_or(f64::NAN), o.cpu_secs, o.ok()))
}
