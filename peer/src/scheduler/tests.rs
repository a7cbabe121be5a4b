use std::collections::HashMap;
use std::time::Duration;

use super::ring::Ring;
use super::*;
use crate::core::Digest;

const S: Duration = Duration::from_secs(1);

fn task() -> TaskId {
    TaskId::for_content(Digest::of(b"image layer"))
}

fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + n))
}

fn ann(peer: &str, n: u16, seed: bool, have: Vec<bool>) -> Announce {
    Announce {
        peer: peer.into(),
        addr: addr(n),
        seed,
        upload_capacity: 0.0,
        uploads: 0,
        tasks: vec![(
            task(),
            Holding::Full {
                pieces: have.len() as u32,
                have,
            },
        )],
        links: vec![],
    }
}

fn names(c: &[Candidate]) -> Vec<&str> {
    c.iter().map(|c| c.peer.as_str()).collect()
}

#[test]
fn soft_state_expires_and_rebuilds_from_announcements() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.announce(ann("seed", 0, true, vec![true; 8]), Duration::ZERO);
    s.announce(ann("a", 1, false, vec![false; 8]), Duration::ZERO);
    assert_eq!(
        names(&s.candidates("a", &task(), 5, Duration::ZERO)),
        vec!["seed"]
    );
    // The seed keeps announcing; `a` goes quiet past the TTL.
    s.announce(ann("seed", 0, true, vec![true; 8]), 20 * S);
    s.expire(31 * S);
    assert_eq!(s.peers(), 1);
    assert!(!s.knows("a", &task()));
    // A restarted scheduler (fresh state) learns it all again from the next announcements.
    let mut fresh = Scheduler::new(SchedulerConfig::default());
    fresh.announce(ann("seed", 0, true, vec![true; 8]), 40 * S);
    fresh.announce(ann("a", 1, false, vec![false; 8]), 40 * S);
    assert_eq!(
        names(&fresh.candidates("a", &task(), 5, 40 * S)),
        vec!["seed"]
    );
}

#[test]
fn incremental_announcements_update_bitmaps() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.announce(ann("a", 1, false, vec![false; 4]), Duration::ZERO);
    s.announce(ann("b", 2, false, vec![false; 4]), Duration::ZERO);
    assert!(
        s.candidates("a", &task(), 5, Duration::ZERO).is_empty(),
        "b has nothing useful"
    );
    let mut add = ann("b", 2, false, vec![]);
    add.tasks = vec![(task(), Holding::Added(vec![1, 3, 99]))];
    s.announce(add, S);
    let c = s.candidates("a", &task(), 5, S);
    assert_eq!(names(&c), vec!["b"]);
    assert_eq!(c[0].useful, 2);
    // Added before any full bitmap is ignored until the full one arrives.
    let mut early = ann("c", 3, false, vec![]);
    early.tasks = vec![(task(), Holding::Added(vec![0]))];
    s.announce(early, S);
    assert!(!s.knows("c", &task()));
    let mut gone = ann("b", 2, false, vec![]);
    gone.tasks = vec![(task(), Holding::Gone)];
    s.announce(gone, 2 * S);
    assert!(s.candidates("a", &task(), 5, 2 * S).is_empty());
}

#[test]
fn ranking_prefers_useful_well_connected_parents() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    let mut me = ann("me", 0, false, vec![true, true, false, false, false, false]);
    me.links = vec![
        (
            "fast".into(),
            LinkReport {
                throughput: 100e6,
                rtt: Duration::from_millis(1),
                loss: 0.0,
            },
        ),
        (
            "lossy".into(),
            LinkReport {
                throughput: 100e6,
                rtt: Duration::from_millis(1),
                loss: 0.5,
            },
        ),
    ];
    s.announce(me, Duration::ZERO);
    s.announce(ann("fast", 1, false, vec![true; 6]), Duration::ZERO);
    s.announce(ann("lossy", 2, false, vec![true; 6]), Duration::ZERO);
    s.announce(
        ann(
            "little",
            3,
            false,
            vec![true, true, true, false, false, false],
        ),
        Duration::ZERO,
    );
    s.announce(
        ann(
            "useless",
            4,
            false,
            vec![true, true, false, false, false, false],
        ),
        Duration::ZERO,
    );
    let c = s.candidates("me", &task(), 10, Duration::ZERO);
    assert_eq!(names(&c)[..2], ["fast", "lossy"]);
    assert!(!names(&c).contains(&"useless") && !names(&c).contains(&"me"));
    assert_eq!(
        c.iter().find(|c| c.peer == "little").map(|c| c.useful),
        Some(1)
    );
}

#[test]
fn a_swarm_forms_a_mesh_not_a_star() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    let n = 8;
    s.announce(ann("seed", 0, true, vec![true; 64]), Duration::ZERO);
    for i in 0..n {
        // Each peer holds a different quarter-ish of the pieces.
        let have = (0..64).map(|p| (p * 7 + i * 13) % 4 == 0).collect();
        s.announce(
            ann(&format!("p{i}"), i as u16 + 1, false, have),
            Duration::ZERO,
        );
    }
    let mut indegree: HashMap<String, usize> = HashMap::new();
    let mut seed_everywhere = true;
    for i in 0..n {
        let c = s.candidates(&format!("p{i}"), &task(), 3, Duration::ZERO);
        assert_eq!(c.len(), 3);
        seed_everywhere &= names(&c).contains(&"seed");
        for x in c {
            *indegree.entry(x.peer).or_default() += 1;
        }
    }
    let max = indegree.values().copied().max().unwrap_or(0);
    assert!(!seed_everywhere, "every peer was sent to the seed: a star");
    assert!(
        max <= 6,
        "one parent got {max} of 24 assignments: {indegree:?}"
    );
    assert!(
        indegree.len() >= 6,
        "too few distinct parents: {indegree:?}"
    );
}

#[test]
fn the_ring_balances_and_moves_little() {
    let ring = Ring::new(&["s1", "s2", "s3"]);
    let tasks: Vec<TaskId> = (0..3000u32)
        .map(|i| TaskId::for_content(Digest::of(&i.to_le_bytes())))
        .collect();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for t in &tasks {
        *count.entry(ring.owner(t).unwrap()).or_default() += 1;
    }
    for (s, n) in &count {
        assert!((700..1300).contains(n), "{s} owns {n} of 3000");
    }
    let mut smaller = ring.clone();
    smaller.remove("s3");
    for t in &tasks {
        let before = ring.owner(t).unwrap();
        if before != "s3" {
            assert_eq!(
                smaller.owner(t).unwrap(),
                before,
                "a task moved between surviving schedulers"
            );
        }
    }
    assert!(Ring::default().owner(&tasks[0]).is_none());
}
