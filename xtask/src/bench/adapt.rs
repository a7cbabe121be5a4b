//! `cargo xtask bench adapt`: transfers adapted to the measured paths (`netprobe.adapt = true`)
//! against quinn's defaults (`false`), in the same run, on the netlab topologies. A seed on the
//! server side already holds the file; one peer on the client side gets it through its daemon
//! (QUIC across the router). Before the timed transfer the peer gets a small file, so the
//! measurements adaptation works from exist (as they would on a running node).
//!
//! Prints per topology and mode: wall time, throughput, CPU-seconds per GiB (both daemons),
//! time to full rate (the first moment the 250 ms rate reaches 80% of the link), and the
//! ratios the targets are about.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use starling_tests::netlab::{self, Topology};
use starling_tests::{is_root, sha256_file, Cluster, Nginx};

use super::procs::cpu_secs;
use super::run::{get_with_progress, Get};
use super::{make_file, release_build, MIB};
use crate::root;

struct Run {
    /// The seed's view of its connection to the peer: packets sent, loss, path MTU.
    path: String,
    secs: f64,
    mbit: f64,
    cpu_per_gib: f64,
    to_full_rate: Option<f64>,
}

/// `cargo xtask bench adapt` (bench/README.md).
#[derive(clap::Args)]
pub struct Args {
    /// Size of the transfer.
    #[arg(long, default_value_t = 128)]
    size_mib: u64,
    /// Every link's rate, each way (tbf); 0 leaves links unshaped.
    #[arg(long, default_value_t = 1000)]
    mbit: u32,
    /// Only these topologies (repeatable): clean, jumbo, dind, vxlan, lossy.
    #[arg(long, value_parser = super::swarm::parse_topology)]
    only: Vec<Topology>,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        size_mib,
        mbit,
        only,
    } = args;
    if !is_root() {
        bail!("bench adapt builds network namespaces and loads eBPF: run it as root");
    }
    release_build(true)?;
    let dir = root().join("target/bench-adapt");
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    make_file(&www.join("big.bin"), size_mib * MIB)?;
    make_file(&www.join("warm.bin"), 8 * MIB)?;
    let want = sha256_file(&www.join("big.bin"));
    println!("bench adapt: {size_mib} MiB, seed -> one peer across the router, {mbit} Mbit/s links (tbf both ways)");
    let topos = [
        Topology::Clean,
        Topology::Jumbo,
        Topology::Dind,
        Topology::Vxlan,
        Topology::Lossy,
    ];
    let mut results = Vec::new();
    for (k, topo) in topos.into_iter().enumerate() {
        if !only.is_empty() && !only.contains(&topo) {
            continue;
        }
        for adapt in [true, false] {
            let r = one(topo, adapt, k, &www, &want, size_mib * MIB, mbit)?;
            println!(
                "  {:6} adapt {:3}: {:7.2} s  {:7.1} Mbit/s  {:6.2} CPU-s/GiB  full rate after {}  (seed->peer: {})",
                topo.name(),
                if adapt { "on" } else { "off" },
                r.secs,
                r.mbit,
                r.cpu_per_gib,
                r.to_full_rate.map_or("never".into(), |t| format!("{t:.2} s")),
                r.path
            );
            results.push((topo, adapt, r));
        }
    }
    let get = |t: Topology, a: bool| {
        results
            .iter()
            .find(|(tt, aa, _)| *tt == t && *aa == a)
            .map(|(_, _, r)| r)
    };
    println!("\n| topology | adapt | time (s) | Mbit/s | CPU-s/GiB | time to full rate (s) |");
    println!("|---|---|---|---|---|---|");
    for (t, a, r) in &results {
        println!(
            "| {} | {} | {:.2} | {:.1} | {:.2} | {} |",
            t.name(),
            if *a { "on" } else { "off" },
            r.secs,
            r.mbit,
            r.cpu_per_gib,
            r.to_full_rate.map_or("never".into(), |t| format!("{t:.2}"))
        );
    }
    println!("\nratios (targets in brackets):");
    if let (Some(off), Some(on)) = (get(Topology::Jumbo, false), get(Topology::Jumbo, true)) {
        println!(
            "  jumbo: CPU-s/GiB off / on = {:.2}  [>= 1.5]; throughput on / off = {:.2}",
            off.cpu_per_gib / on.cpu_per_gib,
            on.mbit / off.mbit
        );
    }
    if let Some(clean) = get(Topology::Clean, true) {
        for t in [Topology::Dind, Topology::Vxlan] {
            if let (Some(on), Some(off)) = (get(t, true), get(t, false)) {
                println!(
                    "  {}: time on / clean = {:.2}  [<= 1.10]; off / clean = {:.2}",
                    t.name(),
                    on.secs / clean.secs,
                    off.secs / clean.secs
                );
            }
        }
        if let (Some(on), Some(off)) = (get(Topology::Lossy, true), get(Topology::Lossy, false)) {
            println!(
                "  lossy (2%): throughput on / clean = {:.2}  [>= 0.80]; off / clean = {:.2}",
                on.mbit / clean.mbit,
                off.mbit / clean.mbit
            );
        }
    }
    Ok(())
}

fn one(
    topo: Topology,
    adapt: bool,
    k: usize,
    www: &std::path::Path,
    want: &str,
    size: u64,
    mbit: u32,
) -> Result<Run> {
    let lab = netlab::build(&format!("a{k}"), 204 + 2 * k as u8, 2, mbit, topo)
        .map_err(anyhow::Error::msg)?;
    let nginx = Nginx::start_in(www, None, Some(&lab.hosts[0].ns), &lab.hosts[0].addr);
    let extra = format!("[netprobe]\nadapt = {adapt}\n");
    let mut cluster = Cluster::new_in(Some(&lab), 1, "", &extra);
    cluster.start_all();
    let socket = |i: usize| cluster.nodes[i].scratch.data_dir().join("starling.sock");
    // The seed holds both files; the peer warms up on the small one.
    for f in ["big.bin", "warm.bin"] {
        let out = cluster.nodes[0].scratch.out(f);
        get_with_progress(&socket(0), &Get::url(&nginx.url(f)), &out, |_, _| {})?;
    }
    let warm = cluster.nodes[1].scratch.out("warm.bin");
    get_with_progress(
        &socket(1),
        &Get::url(&nginx.url("warm.bin")),
        &warm,
        |_, _| {},
    )?;
    let pids: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    let cpu0: f64 = pids.iter().map(|p| cpu_secs(*p)).sum();
    let out = cluster.nodes[1].scratch.out("big.bin");
    let start = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    get_with_progress(
        &socket(1),
        &Get::url(&nginx.url("big.bin")),
        &out,
        |_, done| {
            samples.push((start.elapsed().as_secs_f64(), done));
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    let cpu: f64 = pids.iter().map(|p| cpu_secs(*p)).sum::<f64>() - cpu0;
    if sha256_file(&out) != want {
        bail!("{}: the peer's copy does not match", topo.name());
    }
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(starling::daemon::client_probe(&socket(0)))?
        .context("the seed's probe report")?;
    let path = report
        .paths
        .iter()
        .filter(|p| p.role == "child")
        .max_by_key(|p| p.sent_packets)
        .map_or("no child path".to_string(), |p| {
            format!(
                "{} packets, loss {:.2}%, path MTU {}, RTT {:.2} ms, cwnd {} KiB, {:?}",
                p.sent_packets,
                p.loss * 100.0,
                p.path_mtu,
                p.rtt_ms,
                p.cwnd >> 10,
                report.congestion
            )
        });
    let link = mbit as f64 * 1e6 / 8.0;
    let to_full_rate = samples.iter().enumerate().find_map(|(i, (t, d))| {
        let (t0, d0) = samples[..i].iter().rev().find(|(t0, _)| t - t0 >= 0.25)?;
        ((d - d0) as f64 / (t - t0) >= 0.8 * link).then_some(*t)
    });
    Ok(Run {
        path,
        secs,
        mbit: size as f64 * 8.0 / secs / 1e6,
        cpu_per_gib: cpu / (size as f64 / (1u64 << 30) as f64),
        to_full_rate,
    })
}
