//! The chaos swarm (`starling_tests::chaos`): 16 peers, a seed and a scheduler in shaped
//! namespaces, with peers killed and restarted, the seed killed half-way, the scheduler
//! restarted twice, one peer's stored copy corrupted and 2% loss on a third of the links, all
//! during one download. `cargo xtask bench chaos` runs the same at 512 MiB against a clean run.

use std::time::Duration;

use starling_tests::chaos::{self, Plan, Report};
use starling_tests::is_root;

fn print(name: &str, r: &Report) {
    eprintln!("{name}: last survivor done at {:.1} s", r.wall);
    for (t, e) in &r.events {
        eprintln!("  {t:6.1} s  {e}");
    }
    let reads = |m: &std::collections::BTreeMap<u64, u32>| {
        let max = m.values().max().copied().unwrap_or(0);
        let over = m.values().filter(|n| **n > 1).count();
        format!(
            "{} pieces, at most {max} reads of one, {over} read more than once",
            m.len()
        )
    };
    eprintln!(
        "  origin {:.3} x F (bound {:.3} x F), after the seed died {:.3} x F; reads after: {}; \
         over the run: {}",
        r.origin_bytes as f64 / r.size as f64,
        r.origin_bound() / r.size as f64,
        r.origin_bytes_after_seed as f64 / r.size as f64,
        reads(&r.origin_reads_after_seed),
        reads(&r.origin_reads),
    );
    for (i, p) in r.peers.iter().enumerate() {
        eprintln!("  peer {:2}: {p:?}", i + 1);
    }
    eprintln!(
        "  refetched after restarts: {} B; piece failures {:?}; blacklisted {}",
        r.refetched_after_restart(),
        r.piece_failures,
        r.blacklisted
    );
}

#[test]
fn a_swarm_under_kills_a_dead_seed_scheduler_restarts_a_bad_disk_and_loss_delivers_every_byte_right(
) {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let _cpus = starling_tests::cpus_to_itself();
    let plan = Plan {
        peers: 16,
        size_mib: 64,
        mbit: 100,
        subnet: 217,
        rng: 34,
        faults: true,
        loss: 0.02,
        limit: Duration::from_secs(240),
    };
    let r = chaos::run(&plan).expect("the chaos swarm");
    print("chaos", &r);
    assert_eq!(r.bad_outputs(), 0, "a wrong output was delivered");
    for (i, p) in r.peers.iter().enumerate() {
        if p.killed && !p.restarted {
            continue;
        }
        assert!(p.error.is_none(), "peer {}: {:?}", i + 1, p.error);
        assert!(p.done_at.is_some() && p.verified, "peer {}: {p:?}", i + 1);
    }
    assert!(r.seed_killed_at.is_some() && r.scheduler_restarts.len() == 2);
    assert!(
        r.corrupted.is_some(),
        "no peer finished early enough to corrupt"
    );
    assert!(r.peers.iter().any(|p| p.restarted));
    // Restarted peers resumed: only pieces in flight at the kill (not yet verified) are
    // fetched again, a few per parent.
    let slack = 16 * r.piece_length;
    assert!(
        r.refetched_after_restart()
            <= slack * r.peers.iter().filter(|p| p.restarted).count() as u64,
        "restarted peers fetched {} B of verified pieces again",
        r.refetched_after_restart()
    );
    // The bound, plus what was in flight when a fetcher died: each fetcher reads a few pieces
    // at once (`source.concurrency`), and the dead seed's and any killed fetcher's partial
    // reads were served by the origin all the same.
    let in_flight = (16 * r.piece_length) as f64;
    assert!(
        r.origin_bytes as f64 <= r.origin_bound() + in_flight,
        "the origin sent {} B, over (1 + {:.3} + {:.3}) x F",
        r.origin_bytes,
        r.missing_at_seed_death,
        r.lost_to_bad_disk
    );
    // Each missing piece is read from the origin once after the seed's death; twice at most
    // when the bad disk or a killed fetcher took the first copy.
    let most = r
        .origin_reads_after_seed
        .values()
        .max()
        .copied()
        .unwrap_or(0);
    assert!(
        most <= 2,
        "a piece was read {most} times after the seed died"
    );
}
