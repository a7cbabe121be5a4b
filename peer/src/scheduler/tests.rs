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
        place: Place::default(),
        fetching: vec![],
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
        names(&s.candidates("a", &task(), 5, &[], Duration::ZERO)),
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
        names(&fresh.candidates("a", &task(), 5, &[], 40 * S)),
        vec!["seed"]
    );
}

#[test]
fn incremental_announcements_update_bitmaps() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.announce(ann("a", 1, false, vec![false; 4]), Duration::ZERO);
    s.announce(ann("b", 2, false, vec![false; 4]), Duration::ZERO);
    // b has nothing useful yet, but it is downloading: worth watching, with a small score.
    let c = s.candidates("a", &task(), 5, &[], Duration::ZERO);
    assert_eq!((names(&c), c[0].useful), (vec!["b"], 0));
    assert!(c[0].score > 0.0 && c[0].score < 1.0, "{}", c[0].score);
    let mut add = ann("b", 2, false, vec![]);
    add.tasks = vec![(task(), Holding::Added(vec![1, 3, 99]))];
    s.announce(add, S);
    let c = s.candidates("a", &task(), 5, &[], S);
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
    assert!(s.candidates("a", &task(), 5, &[], 2 * S).is_empty());
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
                mtu: 1500,
            },
        ),
        (
            "lossy".into(),
            LinkReport {
                throughput: 100e6,
                rtt: Duration::from_millis(1),
                loss: 0.5,
                mtu: 1500,
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
    let c = s.candidates("me", &task(), 10, &[], Duration::ZERO);
    assert_eq!(names(&c)[..2], ["fast", "lossy"]);
    assert!(!names(&c).contains(&"me"));
    // A downloading holder with nothing useful is still listed (it may get more), last.
    assert_eq!(names(&c).last(), Some(&"useless"));
    assert_eq!(
        c.iter().find(|c| c.peer == "little").map(|c| c.useful),
        Some(1)
    );
}

/// A seed holding `seed_has` and `n` peers `p0`.. holding `peer_has(i)`, all announced at 0.
fn swarm(n: usize, seed_has: Vec<bool>, peer_has: impl Fn(usize) -> Vec<bool>) -> Scheduler {
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.announce(ann("seed", 0, true, seed_has), Duration::ZERO);
    for i in 0..n {
        s.announce(
            ann(&format!("p{i}"), i as u16 + 1, false, peer_has(i)),
            Duration::ZERO,
        );
    }
    s
}

#[test]
fn a_swarm_forms_a_mesh_not_a_star() {
    let n = 8;
    // Each peer holds a different quarter-ish of the pieces.
    let mut s = swarm(n, vec![true; 64], |i| {
        (0..64).map(|p| (p * 7 + i * 13) % 4 == 0).collect()
    });
    let mut indegree: HashMap<String, usize> = HashMap::new();
    let mut seed_everywhere = true;
    for i in 0..n {
        let c = s.candidates(&format!("p{i}"), &task(), 3, &[], Duration::ZERO);
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
fn a_swarm_that_starts_together_spreads_over_every_peer() {
    // Everyone asks before anyone holds a piece (the seed too: it was just ordered to fetch),
    // with fewer parent slots than peers. Every peer must get children, or its upload idles.
    let n = 8;
    let mut s = swarm(n, vec![false; 64], |_| vec![false; 64]);
    let mut indegree: HashMap<String, usize> = HashMap::new();
    for i in 0..n {
        for x in s.candidates(&format!("p{i}"), &task(), 4, &[], Duration::ZERO) {
            *indegree.entry(x.peer).or_default() += 1;
        }
    }
    let (min, max) = (
        indegree.values().copied().min().unwrap_or(0),
        indegree.values().copied().max().unwrap_or(0),
    );
    assert_eq!(
        indegree.len(),
        n + 1,
        "someone got no children: {indegree:?}"
    );
    assert!(min >= 2 && max <= 6, "uneven: {indegree:?}");
}

#[test]
fn peers_that_asked_are_candidates_before_they_announce() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    let idle = |peer: &str, n| Announce {
        tasks: vec![],
        ..ann(peer, n, false, vec![])
    };
    s.announce(ann("seed", 0, true, vec![false; 8]), Duration::ZERO);
    for (i, p) in ["a", "b", "c"].iter().enumerate() {
        s.announce(idle(p, i as u16 + 1), Duration::ZERO);
    }
    s.advise("a", &task(), 4, &[], Duration::ZERO);
    // b is offered a (downloading, nothing yet) as well as the seed.
    let (parents, advice) = s.advise("b", &task(), 4, &[], Duration::ZERO);
    assert_eq!(advice, Advice::Parents);
    assert!(names(&parents).contains(&"a"), "{:?}", names(&parents));
    // Without a holder, a joining peer alone does not stop the seed being asked.
    let mut t = Scheduler::new(SchedulerConfig::default());
    t.announce(
        Announce {
            tasks: vec![],
            ..ann("seed2", 9, true, vec![])
        },
        Duration::ZERO,
    );
    for (i, p) in ["a", "b"].iter().enumerate() {
        t.announce(idle(p, i as u16 + 1), Duration::ZERO);
    }
    t.advise("a", &task(), 4, &[], Duration::ZERO);
    let (parents, advice) = t.advise("b", &task(), 4, &[], Duration::ZERO);
    assert_eq!(names(&parents), vec!["a"]);
    assert!(matches!(advice, Advice::AskSeed { .. }), "{advice:?}");
    // Once it announces, it is an ordinary holder; one that never does is forgotten.
    t.expire(11 * S);
    t.announce(idle("a", 1), 11 * S);
    t.announce(idle("b", 2), 11 * S);
    t.announce(
        Announce {
            tasks: vec![],
            ..ann("seed2", 9, true, vec![])
        },
        11 * S,
    );
    t.expire(11 * S);
    assert!(t.candidates("b", &task(), 4, &[], 11 * S).is_empty());
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

#[test]
fn nobody_holds_it_a_seed_is_asked_once_and_others_wait() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.announce(ann("seed", 0, true, vec![]), Duration::ZERO);
    s.announce(ann("a", 1, false, vec![]), Duration::ZERO);
    s.announce(ann("b", 2, false, vec![]), Duration::ZERO);
    for t in [0, 1, 2] {
        let (parents, advice) = s.advise("a", &task(), 4, &[], t * S);
        assert!(parents.is_empty());
        assert_eq!(
            advice,
            Advice::AskSeed {
                peer: "seed".into(),
                addr: addr(0)
            }
        );
    }
    let (_, advice) = s.advise("b", &task(), 4, &[], 2 * S);
    assert!(matches!(advice, Advice::AskSeed { .. }), "{advice:?}");
    // The seed itself, asked to fetch, goes to source.
    assert_eq!(s.advise("seed", &task(), 4, &[], 2 * S).1, Advice::Source);
    // Once the seed holds the task, it is a parent.
    s.announce(ann("seed", 0, true, vec![true, false]), 3 * S);
    let (parents, advice) = s.advise("a", &task(), 4, &[], 3 * S);
    assert_eq!((names(&parents), advice), (vec!["seed"], Advice::Parents));
}

#[test]
fn without_seeds_the_first_requester_fetches_and_is_replaced_if_it_never_shows() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.announce(ann("a", 1, false, vec![]), Duration::ZERO);
    s.announce(ann("b", 2, false, vec![]), Duration::ZERO);
    assert_eq!(
        s.advise("a", &task(), 4, &[], Duration::ZERO).1,
        Advice::Source
    );
    assert_eq!(s.advise("b", &task(), 4, &[], S).1, Advice::Wait);
    // `a` keeps announcing but never holds the task: after fetch_ttl someone else is told.
    s.announce(ann("a", 1, false, vec![]), 11 * S);
    s.announce(ann("b", 2, false, vec![]), 11 * S);
    s.expire(11 * S);
    assert_eq!(s.advise("b", &task(), 4, &[], 11 * S).1, Advice::Source);
}

#[test]
fn announcements_survive_json_with_packed_bitmaps() {
    let mut have = vec![false; 1000];
    have[0] = true;
    have[999] = true;
    let a = ann("a", 1, false, have);
    let text = serde_json::to_string(&a).unwrap();
    assert!(text.len() < 700, "{}", text.len());
    let back: Announce = serde_json::from_str(&text).unwrap();
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.announce(back, Duration::ZERO);
    s.announce(ann("b", 2, false, vec![false; 1000]), Duration::ZERO);
    assert_eq!(
        s.candidates("b", &task(), 1, &[], Duration::ZERO)[0].useful,
        2
    );
    assert!(
        serde_json::from_str::<Announce>(&text.replace("\"have\":\"01", "\"have\":\"zz")).is_err()
    );
}

#[test]
fn when_the_fetcher_dies_one_peer_is_told_to_fetch_only_what_nobody_holds() {
    // After the scheduler's warm-up, when a partial holder's picture counts.
    const W: Duration = WARM_UP;
    let mut s = Scheduler::new(SchedulerConfig::default());
    s.announce(ann("seed", 0, true, vec![true, true, false, false]), W);
    s.announce(ann("a", 1, false, vec![true, false, false, false]), W);
    s.announce(ann("b", 2, false, vec![false, true, false, false]), W);
    // The seed fetches (it was chosen); everyone else downloads from parents.
    assert!(matches!(
        s.advise("seed", &task(), 4, &[], W).1,
        Advice::Source
    ));
    assert_eq!(s.advise("a", &task(), 4, &[], W).1, Advice::Parents);
    // The seed goes silent; a and b keep announcing. After FETCHER_SILENT the next asker
    // fetches, and only pieces 2 and 3 (a and b hold 0 and 1 between them).
    for t in 1..=6 {
        s.announce(
            ann("a", 1, false, vec![true, false, false, false]),
            W + t * S,
        );
        s.announce(
            ann("b", 2, false, vec![false, true, false, false]),
            W + t * S,
        );
    }
    let answer = s.advise("b", &task(), 4, &["a".into()], W + 6 * S);
    assert_eq!(answer.1, Advice::Source);
    assert_eq!(s.lacking(&task()), Some(vec![2, 3]));
    // Only one fetcher at a time: a, asking next, waits for the swarm.
    assert_eq!(
        s.advise("a", &task(), 4, &["b".into()], W + 6 * S).1,
        Advice::Parents
    );
    // Once the live holders cover every piece, nobody goes to source.
    s.announce(ann("b", 2, false, vec![false, true, true, true]), W + 7 * S);
    s.announce(
        ann("a", 1, false, vec![true, false, false, false]),
        W + 7 * S,
    );
    assert_eq!(
        s.advise("a", &task(), 4, &["b".into()], W + 9 * S).1,
        Advice::Parents
    );
    assert_eq!(
        s.advise("b", &task(), 4, &["a".into()], W + 9 * S).1,
        Advice::Parents
    );
}

#[test]
fn pieces_held_only_by_a_peer_the_requester_banned_are_fetched_by_it_and_only_those() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    // "bad" holds everything (its disk went bad); a and b hold pieces 0 and 1 between them.
    s.announce(ann("bad", 0, false, vec![true; 4]), Duration::ZERO);
    s.announce(
        ann("a", 1, false, vec![true, false, false, false]),
        Duration::ZERO,
    );
    s.announce(
        ann("b", 2, false, vec![false, true, false, false]),
        Duration::ZERO,
    );
    // Without a ban the swarm covers the task: parents.
    assert_eq!(
        s.advise("a", &task(), 4, &["bad".into()], S).1,
        Advice::Parents
    );
    // a banned "bad": pieces 2 and 3 are lost to it, so it fetches them itself...
    let banned = ["bad".to_string()];
    let (_, advice) = s.advise_banning("a", &task(), 4, &["bad".into()], &banned, true, S);
    assert_eq!(advice, Advice::Source);
    assert_eq!(s.lacking_without(&task(), &banned, S), Some(vec![2, 3]));
    // ...while b, which did not ban it, still downloads from parents; and b, having banned
    // it too, waits for a (one rescuer at a time), then takes over if a goes silent.
    assert_eq!(s.advise("b", &task(), 4, &[], S).1, Advice::Parents);
    assert_eq!(
        s.advise_banning("b", &task(), 4, &[], &banned, true, S).1,
        Advice::Parents
    );
    assert_eq!(
        s.advise_banning("a", &task(), 4, &[], &banned, true, S).1,
        Advice::Source
    );
    // Once a holds 2 and 3, another peer that banned "bad" finds them covered.
    s.announce(ann("a", 1, false, vec![true, false, true, true]), 2 * S);
    assert_eq!(
        s.advise_banning("b", &task(), 4, &[], &banned, true, 2 * S)
            .1,
        Advice::Parents
    );
}

#[test]
fn a_restarted_scheduler_sends_no_held_piece_to_the_origin_and_keeps_one_fetcher() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    // Just restarted: one holder has announced again, with part of the task.
    s.announce(
        ann("a", 1, false, vec![true, false, false, false]),
        Duration::ZERO,
    );
    assert_eq!(s.advise("b", &task(), 4, &[], S).1, Advice::Parents);
    // A task nobody has announced yet: a requester already downloading it from peers goes on
    // with them; one that is not (a fresh cluster's first ask) fetches.
    let fresh = TaskId::for_content(Digest::of(b"not announced yet"));
    assert_eq!(
        s.advise_banning("c", &fresh, 4, &[], &[], true, S).1,
        Advice::Wait
    );
    assert_eq!(
        s.advise_banning("d", &fresh, 4, &[], &[], false, S).1,
        Advice::Source
    );
    // After the warm-up the gap is real. The first asker fetches although it has not
    // announced yet; the next askers do not replace it.
    let t = WARM_UP + S;
    s.announce(ann("a", 1, false, vec![true, false, false, false]), t);
    assert_eq!(s.advise("b", &task(), 4, &[], t).1, Advice::Source);
    assert_eq!(s.lacking(&task()), Some(vec![1, 2, 3]));
    assert_eq!(s.advise("c", &task(), 4, &[], t).1, Advice::Parents);
    assert_eq!(s.advise("b", &task(), 4, &[], t + S).1, Advice::Source);
    // Nobody holds another task: its first asker fetches, the others wait for it.
    let other = TaskId::for_content(Digest::of(b"another layer"));
    assert_eq!(s.advise("c", &other, 4, &[], t).1, Advice::Source);
    assert_eq!(s.advise("d", &other, 4, &[], t).1, Advice::Wait);
}

#[test]
fn a_fetcher_that_says_so_stays_the_fetcher_past_its_ttl_and_across_a_restart() {
    // A fresh scheduler (as after a restart): f announces that it reads the origin.
    let mut s = Scheduler::new(SchedulerConfig::default());
    let mut f = ann("f", 1, false, vec![true, false, false, false]);
    f.fetching = vec![task()];
    for t in 0..=30 {
        s.announce(f.clone(), t * S);
        s.announce(ann("b", 2, false, vec![false; 4]), t * S);
        s.expire(t * S);
    }
    // 30 s on, far past `fetch_ttl`: b is not sent to the origin as well.
    assert_eq!(s.advise("b", &task(), 4, &[], 30 * S).1, Advice::Parents);
    // f goes silent: after FETCHER_SILENT the next asker takes over.
    for t in 31..=36 {
        s.announce(ann("b", 2, false, vec![false; 4]), t * S);
    }
    assert_eq!(s.advise("b", &task(), 4, &[], 36 * S).1, Advice::Source);
    // f wakes (a stalled process) and says it still reads the origin: it is told to stop,
    // and b, the fetcher now, is not.
    let mut b = ann("b", 2, false, vec![false, true, false, false]);
    b.fetching = vec![task()];
    assert_eq!(s.announce(f.clone(), 37 * S), vec![task()]);
    assert!(s.announce(b.clone(), 37 * S).is_empty());
    assert_eq!(s.advise("f", &task(), 4, &[], 37 * S).1, Advice::Parents);
    // Once b is silent in turn, f's word makes it the fetcher again.
    assert!(s.announce(f.clone(), 43 * S).is_empty());
    assert_eq!(s.announce(b, 43 * S), vec![task()]);
}

#[test]
fn a_rescuer_fetching_beside_the_fetcher_is_not_told_to_stop() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    // f reads the origin; between them f and liar hold every piece.
    let mut f = ann("f", 1, false, vec![true, true, false, true]);
    f.fetching = vec![task()];
    s.announce(f.clone(), S);
    s.announce(ann("liar", 3, false, vec![false, false, true, false]), S);
    s.announce(ann("r", 2, false, vec![false; 4]), S);
    // r banned the only holder of piece 2: it fetches that piece itself, beside f.
    let (_, advice) = s.advise_banning("r", &task(), 4, &[], &["liar".to_string()], true, 6 * S);
    assert_eq!(advice, Advice::Source);
    let mut r = ann("r", 2, false, vec![false; 4]);
    r.fetching = vec![task()];
    assert!(s.announce(r, 6 * S).is_empty());
    assert!(s.announce(f, 6 * S).is_empty());
}

#[test]
fn at_most_max_fetchers_tasks_read_the_origin_and_the_rest_wait_their_turn() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_fetchers: 2,
        max_source_mbps: 100.0,
        ..SchedulerConfig::default()
    });
    let tasks: Vec<TaskId> = (0..4u8)
        .map(|i| TaskId::for_content(Digest::of(&[i])))
        .collect();
    let peer = |i: u16| format!("p{i}");
    for i in 0..4 {
        let mut a = ann(&peer(i), i, false, vec![false; 4]);
        a.tasks.clear();
        s.announce(a, Duration::ZERO);
    }
    // Four peers, each the first to want its own task: two are told to fetch, two wait.
    let advice: Vec<Advice> = (0..4)
        .map(|i| s.advise(&peer(i as u16), &tasks[i], 4, &[], S).1)
        .collect();
    assert_eq!(advice[..2], [Advice::Source, Advice::Source]);
    assert_eq!(advice[2..], [Advice::Wait, Advice::Wait]);
    assert!(s.is_queued(&tasks[2]) && s.is_queued(&tasks[3]));
    // Two fetchers share the origin's 100 Mbit/s.
    assert_eq!(s.source_share(S), Some(50.0));
    // The first fetcher finishes (holds its task whole): the next waiting task gets its turn.
    let mut done = ann(&peer(0), 0, false, vec![true; 4]);
    done.tasks[0].0 = tasks[0];
    s.announce(done, 2 * S);
    s.covered(&tasks[0], 2 * S);
    assert_eq!(
        s.advise(&peer(2), &tasks[2], 4, &[], 3 * S).1,
        Advice::Source
    );
    assert!(!s.is_queued(&tasks[2]));
    assert_eq!(s.advise(&peer(3), &tasks[3], 4, &[], 3 * S).1, Advice::Wait);
}

fn racked(peer: &str, n: u16, seed: bool, have: Vec<bool>, rack: &str) -> Announce {
    Announce {
        place: Place {
            zone: "z".into(),
            rack: rack.into(),
        },
        ..ann(peer, n, seed, have)
    }
}

#[test]
fn one_member_per_rack_takes_a_task_from_outside_and_the_others_take_it_from_the_rack() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    let t0 = Duration::ZERO;
    // The seed in rack r0; two racks of three peers, nothing held yet.
    s.announce(racked("seed", 0, true, vec![true; 8], "r0"), t0);
    for (i, name) in ["a1", "a2", "a3"].into_iter().enumerate() {
        s.announce(racked(name, 1 + i as u16, false, vec![false; 8], "ra"), t0);
    }
    for (i, name) in ["b1", "b2", "b3"].into_iter().enumerate() {
        s.announce(racked(name, 10 + i as u16, false, vec![false; 8], "rb"), t0);
    }
    // The first of each rack to ask is its gateway: the seed is its parent, and it is told to
    // order the seed as usual. Another rack's gateway ranks below the seed, and the members
    // behind it, holding nothing yet, are not offered.
    let (c, _) = s.advise("b1", &task(), 8, &[], t0);
    assert_eq!(names(&c)[0], "seed");
    let (c, advice) = s.advise("a1", &task(), 8, &[], t0);
    assert_eq!(names(&c), vec!["seed", "b1"]);
    assert!(matches!(advice, Advice::Parents | Advice::AskSeed { .. }));
    // Everyone else gets parents in its rack only (the gateway among them), and is never sent
    // to the seed in another rack.
    for (me, rack) in [("a2", "a"), ("a3", "a"), ("b2", "b"), ("b3", "b")] {
        let (c, advice) = s.advise(me, &task(), 8, &[], t0);
        assert!(!c.is_empty(), "{me} got no parent");
        for p in names(&c) {
            assert!(p.starts_with(rack), "{me} was offered {p}");
        }
        assert!(
            !matches!(advice, Advice::AskSeed { .. }),
            "{me} was sent to the seed"
        );
    }
    // A gateway is not offered its own rack's members while they hold nothing it lacks.
    let (c, _) = s.advise("a1", &task(), 8, &["seed".into()], t0);
    assert!(
        !names(&c).iter().any(|p| p.starts_with('a')),
        "{:?}",
        names(&c)
    );

    // A gateway that goes quiet is replaced by the live member holding the most.
    let mut half = vec![false; 8];
    half[..4].fill(true);
    s.announce(racked("a2", 2, false, half, "ra"), 10 * S);
    s.announce(racked("a3", 3, false, vec![false; 8], "ra"), 10 * S);
    s.announce(racked("seed", 0, true, vec![true; 8], "r0"), 10 * S);
    let (c, _) = s.advise("a3", &task(), 8, &[], 10 * S);
    assert_eq!(names(&c)[0], "a2", "a3 stays in the rack");
    assert!(
        names(&c).iter().all(|p| p.starts_with('a')),
        "{:?}",
        names(&c)
    );
    let (c, _) = s.advise("a2", &task(), 8, &[], 10 * S);
    assert!(names(&c).contains(&"seed"), "{:?}", names(&c));
    // Once every peer is forgotten, so are the task's gateways and the racks.
    s.expire(1000 * S);
    assert_eq!(s.peers(), 0);
    assert!(s.gateways.is_empty() && s.racks.is_empty());
}

#[test]
fn a_seed_in_a_rack_is_its_gateway_and_a_first_call_before_any_announcement_is_placed() {
    let mut s = Scheduler::new(SchedulerConfig::default());
    let t0 = Duration::ZERO;
    s.announce(racked("seed", 0, true, vec![true; 8], "r0"), t0);
    s.announce(racked("a", 1, false, vec![false; 8], "r0"), t0);
    // `b` asks before its first announcement: its call names its rack.
    let place = Place {
        zone: "z".into(),
        rack: "r0".into(),
    };
    s.introduce("127.0.0.1:7002", addr(2), &place, t0);
    let (c, advice) = s.advise("127.0.0.1:7002", &task(), 8, &[], t0);
    assert!(names(&c).contains(&"seed"), "{:?}", names(&c));
    assert!(!matches!(advice, Advice::AskSeed { .. }));
    let (c, _) = s.advise("a", &task(), 8, &[], t0);
    assert!(names(&c).contains(&"seed"), "{:?}", names(&c));
    // No rack label: no introduction (it would only add an empty peer).
    s.introduce("127.0.0.1:7003", addr(3), &Place::default(), t0);
    assert_eq!(s.peers(), 3);
}

#[test]
fn a_fetcher_chosen_as_it_asked_stays_the_fetcher_while_it_asks_though_its_announcements_lag() {
    const W: Duration = WARM_UP;
    let mut s = Scheduler::new(SchedulerConfig::default());
    // Three peers announced once (nothing held), then their announcements ran late.
    for (p, n) in [("a", 1), ("b", 2), ("c", 3)] {
        s.announce(ann(p, n, false, vec![false; 4]), W);
    }
    // Eight seconds on, a asks first: nobody holds the task, so a fetches it.
    let t = W + 8 * S;
    assert_eq!(s.advise("a", &task(), 4, &[], t).1, Advice::Source);
    // b and c ask right after, before any announcement: a was heard from as it asked, so it
    // is still the fetcher, and they take parents (each of them was made the fetcher in turn
    // before).
    assert_eq!(
        s.advise("b", &task(), 4, &[], t + S / 10).1,
        Advice::Parents
    );
    assert_eq!(s.advise("c", &task(), 4, &[], t + S / 5).1, Advice::Parents);
    // a asks again: still its job.
    assert_eq!(s.advise("a", &task(), 4, &[], t + S).1, Advice::Source);
}
