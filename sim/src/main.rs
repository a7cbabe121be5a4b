//! `starling-sim`: runs the named scenarios and prints one line each; `--json FILE` writes
//! every report (with each peer's completion time) as JSON lines. `cargo xtask bench scale`
//! runs it in release and writes the results and plots.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Parser;
use starling_sim::{Scenario, World};

#[derive(Parser)]
#[command(about = "Simulate a Starling swarm over the real engine and scheduler")]
struct Args {
    /// Scenarios to run (default: all). `--list` names them.
    #[arg(long)]
    scenario: Vec<String>,
    /// Leave out the 10,000-peer scenarios.
    #[arg(long)]
    quick: bool,
    /// Print the scenario names and stop.
    #[arg(long)]
    list: bool,
    /// Override every scenario's peer count.
    #[arg(long)]
    peers: Option<usize>,
    /// Override every scenario's content: one task of this many MiB.
    #[arg(long)]
    size_mib: Option<u64>,
    /// Override every scenario's `peer.max_parents`.
    #[arg(long)]
    max_parents: Option<usize>,
    /// Override every scenario's piece length, in KiB.
    #[arg(long)]
    piece_kib: Option<u64>,
    /// Override every scenario's seed number (peer IDs, shuffles, arrival order): runs that
    /// differ only in it show how much of a difference between two builds is chance.
    #[arg(long)]
    seed_number: Option<u64>,
    /// Write each report as a JSON line to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.list {
        for s in Scenario::all(false).iter().chain([&Scenario::ci()]) {
            println!("{}", s.name);
        }
        return Ok(());
    }
    let scenarios: Vec<Scenario> = if args.scenario.is_empty() {
        Scenario::all(args.quick)
    } else {
        args.scenario
            .iter()
            .map(|n| {
                Scenario::by_name(n)
                    .with_context(|| format!("no scenario {n:?}: `starling-sim --list` names them"))
            })
            .collect::<Result<_>>()?
    };
    if scenarios.is_empty() {
        bail!("no scenario to run");
    }
    let mut out = match &args.json {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    println!(
        "{:<22} {:>6} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7}",
        "scenario",
        "peers",
        "bound s",
        "p50/b",
        "p99/b",
        "max/b",
        "origin",
        "seedup",
        "spine",
        "calls/s",
        "peak/s",
        "wall s"
    );
    for mut sc in scenarios {
        if let Some(p) = args.peers {
            sc.peers = p;
        }
        if let Some(m) = args.max_parents {
            sc.max_parents = Some(m);
        }
        if let Some(k) = args.piece_kib {
            sc.piece_length = Some(k << 10);
        }
        if let Some(m) = args.size_mib {
            sc.tasks = vec![m << 20];
        }
        if let Some(n) = args.seed_number {
            sc.seed_number = n;
        }
        let r = World::new(sc).run();
        let b = r.bound_s;
        println!(
            "{:<22} {:>6} {:>8.2} {:>8.2} {:>7.2} {:>7.2} {:>7.3} {:>7.2} {:>7.2} {:>8.0} {:>8.0} {:>7.1}{}",
            r.scenario,
            r.peers,
            b,
            r.p50_s / b,
            r.p99_s / b,
            r.max_s / b,
            r.origin_x_f,
            r.seed_upload_x_f,
            r.spine_in_max_x_f,
            r.sched_calls_mean,
            r.sched_calls_peak,
            r.wall_seconds,
            if r.unfinished > 0 {
                format!("  ({} unfinished)", r.unfinished)
            } else {
                String::new()
            }
        );
        if let Some(f) = &mut out {
            writeln!(f, "{}", serde_json::to_string(&r)?)?;
        }
    }
    Ok(())
}
