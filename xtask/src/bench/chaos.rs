//! `cargo xtask bench chaos`: the chaos swarm (`starling_tests::chaos`: peers killed and
//! restarted, the seed killed half-way, two scheduler restarts, one bad disk, 2% loss on a
//! third of the links) against the same job without faults, in alternating order, with the
//! release build. Prints, per run, the completion of the last surviving peer against the clean
//! run and T_min, the origin's bytes against the bound, how often pieces were read
//! from the origin after the seed died, what restarted peers fetched again, and the bad bytes
//! delivered (which must be 0).

use std::time::Duration;

use anyhow::{bail, Result};
use starling_tests::chaos::{self, Plan, Report};
use starling_tests::is_root;

use super::release_build;
use super::run::t_min;

/// `cargo xtask bench chaos` (bench/README.md).
#[derive(clap::Args)]
pub struct Args {
    /// Downloaders beside the seed.
    #[arg(long, default_value_t = 16)]
    peers: usize,
    /// Size of the file.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Every link's rate, each way (tbf).
    #[arg(long, default_value_t = 100)]
    mbit: u32,
    /// Pairs of runs (clean and chaos, alternating which goes first).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seeds the random choices; run k uses rng + k.
    #[arg(long, default_value_t = 34)]
    rng: u64,
    /// Drop rate on the lossy third of the links.
    #[arg(long, default_value_t = 0.02)]
    loss: f64,
}

pub fn run(a: Args) -> Result<()> {
    if !is_root() {
        bail!("bench chaos builds network namespaces: run it as root");
    }
    release_build(false)?;
    let t_min = t_min(a.size_mib << 20, a.peers, a.mbit);
    println!(
        "bench chaos: 1 seed + {} peers, {} MiB, {} Mbit/s links; T_min {t_min:.1} s",
        a.peers, a.size_mib, a.mbit
    );
    let limit = Duration::from_secs_f64((40.0 * t_min).max(300.0));
    let mut ratios = Vec::new();
    for k in 0..a.runs {
        let plan = |faults| Plan {
            peers: a.peers,
            size_mib: a.size_mib,
            mbit: a.mbit,
            subnet: 219,
            rng: a.rng + k as u64,
            faults,
            loss: a.loss,
            limit,
        };
        let order = if k % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let (mut clean, mut wild) = (None, None);
        for faults in order {
            let r = chaos::run(&plan(faults)).map_err(anyhow::Error::msg)?;
            if faults {
                wild = Some(r);
            } else {
                clean = Some(r);
            }
        }
        let (Some(clean), Some(wild)) = (clean, wild) else {
            bail!("a run is missing");
        };
        if clean.bad_outputs() + wild.bad_outputs() > 0 {
            bail!("a wrong output was delivered");
        }
        print(k, &clean, &wild, t_min);
        ratios.push(wild.wall / clean.wall);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "\nmedian chaos / clean completion over {} runs: {:.2}",
        ratios.len(),
        ratios[ratios.len() / 2]
    );
    Ok(())
}

fn print(k: usize, clean: &Report, r: &Report, t_min: f64) {
    let f = r.size as f64;
    println!("\nrun {}:", k + 1);
    for (t, e) in &r.events {
        println!("  {t:6.1} s  {e}");
    }
    let failed: Vec<String> = r
        .peers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.error.is_some())
        .map(|(i, p)| format!("peer {}: {:?}", i + 1, p.error))
        .collect();
    let survivors = r.survivors().count();
    let done = r.survivors().filter(|p| p.verified).count();
    println!(
        "  survivors done and verified: {done} of {survivors}; bad outputs: {}; failed gets: {failed:?}",
        r.bad_outputs()
    );
    println!(
        "  last survivor done: chaos {:.1} s, clean {:.1} s: {:.2} x clean, {:.2} x T_min (clean {:.2} x T_min)",
        r.wall,
        clean.wall,
        r.wall / clean.wall,
        r.wall / t_min,
        clean.wall / t_min
    );
    if let Some((at, p)) = r.seed_killed_at {
        println!(
            "  seed killed at {at:.1} s ({:.0}% progress); pieces no live peer held: {:.1}%; \
             last survivor done {:.1} s later",
            p * 100.0,
            r.missing_at_seed_death * 100.0,
            r.wall - at
        );
    }
    let reads = |m: &std::collections::BTreeMap<u64, u32>| {
        let max = m.values().max().copied().unwrap_or(0);
        let twice = m.values().filter(|n| **n > 1).count();
        format!(
            "{} pieces, most reads of one {max}, read more than once {twice}",
            m.len()
        )
    };
    println!(
        "  origin {:.3} x F (clean {:.3} x F); bound (1 + {:.3} unsent + {:.3} lost to the bad disk) = {:.3} x F",
        r.origin_bytes as f64 / f,
        clean.origin_bytes as f64 / f,
        r.missing_at_seed_death,
        r.lost_to_bad_disk,
        r.origin_bound() / f
    );
    println!(
        "  origin reads after the seed died: {:.3} x F, {}",
        r.origin_bytes_after_seed as f64 / f,
        reads(&r.origin_reads_after_seed)
    );
    let restarted = r.peers.iter().filter(|p| p.restarted).count();
    println!(
        "  restarted peers: {restarted}; verified bytes fetched again after a restart: {}",
        r.refetched_after_restart()
    );
    println!(
        "  piece failures {:?}; parents blacklisted {}",
        r.piece_failures, r.blacklisted
    );
}
