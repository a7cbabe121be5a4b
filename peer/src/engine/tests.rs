//! Deterministic tests of the planner: targeted rules, then a discrete-event simulation of
//! random swarms (proptest) that checks invariants at every step.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const PL: u64 = 64 * 1024;
const MS: Duration = Duration::from_millis(1);

fn plan(pieces: u32) -> PiecePlan {
    PiecePlan::new(pieces as u64 * PL, PL).unwrap()
}

fn all(n: u32) -> Vec<bool> {
    vec![true; n as usize]
}

fn requests(actions: &[Action]) -> Vec<(Peer, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Request { from, piece } => Some((*from, *piece)),
            _ => None,
        })
        .collect()
}

fn no_source() -> EngineConfig {
    EngineConfig {
        source_allowed: false,
        ..Default::default()
    }
}

#[test]
fn rarest_first_and_no_duplicates_before_endgame() {
    let mut e = Engine::new(
        plan(6),
        &[],
        EngineConfig {
            initial_window: 10,
            ..no_source()
        },
    );
    // Piece 4 is held by one parent, 0..4 by two, 5 by three.
    e.add_parent(1, &[true, true, true, true, false, true]);
    e.add_parent(2, &[true, true, true, true, true, true]);
    e.add_parent(3, &[false, false, false, false, false, true]);
    let r = requests(&e.poll(Duration::ZERO));
    let pieces: Vec<u32> = r.iter().map(|x| x.1).collect();
    assert_eq!(
        pieces.len(),
        6,
        "each missing piece requested exactly once: {r:?}"
    );
    let mut sorted = pieces.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 6);
    // Parent 1 fills first (ids order before any measurement): it takes the rarest it holds
    // (0..4, rarity 2), parent 2 gets piece 4 (rarity 1) and parent 3 piece 5.
    assert!(r.contains(&(Peer::Parent(2), 4)), "{r:?}");
    assert!(
        r.contains(&(Peer::Parent(3), 5)) || r.contains(&(Peer::Parent(1), 5)),
        "{r:?}"
    );
    for (from, piece) in &r {
        if let Peer::Parent(3) = from {
            assert_eq!(*piece, 5, "parent 3 only has piece 5");
        }
    }
}

#[test]
fn streaming_is_sequential_from_the_cursor() {
    let mut e = Engine::new(
        plan(8),
        &[],
        EngineConfig {
            initial_window: 3,
            ..no_source()
        },
    );
    e.add_parent(1, &all(8));
    e.set_streaming(Some(2));
    let r = requests(&e.poll(Duration::ZERO));
    assert_eq!(
        r,
        vec![
            (Peer::Parent(1), 2),
            (Peer::Parent(1), 3),
            (Peer::Parent(1), 4)
        ]
    );
}

#[test]
fn window_follows_the_bandwidth_delay_product() {
    let mut e = Engine::new(plan(100), &[], no_source());
    e.add_parent(1, &all(100));
    let first = requests(&e.poll(Duration::ZERO));
    assert_eq!(first.len(), 2, "initial window");
    // 64 KiB in 10 ms = 6.5 MB/s; RTT 100 ms: BDP = 10 pieces, +1.
    e.link_quality(1, Duration::from_millis(100), 0.0);
    e.on_piece(Peer::Parent(1), first[0].1, 10 * MS, 10 * MS);
    let more = requests(&e.poll(10 * MS));
    assert_eq!(
        more.len() + 1,
        11,
        "window = ceil(rate*rtt/piece)+1 = 11: {more:?}"
    );
    // Loss shrinks it.
    let r = e.report();
    assert_eq!(r[0].window, 11);
    e.link_quality(1, Duration::from_millis(100), 0.5);
    assert_eq!(e.report()[0].window, 6);
}

#[test]
fn a_timeout_is_a_strike_and_the_piece_moves_on() {
    let cfg = EngineConfig {
        initial_window: 1,
        piece_timeout: Duration::from_secs(2),
        endgame_pieces: 0,
        ..no_source()
    };
    let mut e = Engine::new(plan(1), &[], cfg);
    e.add_parent(1, &all(1));
    e.add_parent(2, &all(1));
    assert_eq!(
        requests(&e.poll(Duration::ZERO)),
        vec![(Peer::Parent(1), 0)]
    );
    // Nothing before the timeout...
    assert!(e.poll(Duration::from_secs(2)).is_empty());
    // ...then cancel at parent 1 and ask parent 2.
    let a = e.poll(Duration::from_secs(3));
    assert!(
        a.contains(&Action::Cancel {
            from: Peer::Parent(1),
            piece: 0
        }),
        "{a:?}"
    );
    assert!(
        a.contains(&Action::Request {
            from: Peer::Parent(2),
            piece: 0
        }),
        "{a:?}"
    );
    assert!(
        !a.contains(&Action::Request {
            from: Peer::Parent(1),
            piece: 0
        }),
        "{a:?}"
    );
    assert_eq!(e.report()[0].strikes, 1);
}

#[test]
fn repeated_strikes_rest_a_parent() {
    let cfg = EngineConfig {
        initial_window: 1,
        strike_limit: 2,
        cooldown: Duration::from_secs(30),
        ..no_source()
    };
    let mut e = Engine::new(plan(4), &[], cfg);
    e.add_parent(1, &all(4));
    let t = Duration::ZERO;
    let r = requests(&e.poll(t));
    e.on_failure(r[0].0, r[0].1, Failure::Reset, t);
    let r = requests(&e.poll(t));
    assert_eq!(r.len(), 1);
    e.on_failure(r[0].0, r[0].1, Failure::Refused, t);
    assert!(
        requests(&e.poll(t + Duration::from_secs(29))).is_empty(),
        "resting"
    );
    assert_eq!(
        requests(&e.poll(t + Duration::from_secs(31))).len(),
        1,
        "back after the cooldown"
    );
}

#[test]
fn mismatches_refetch_elsewhere_then_blacklist() {
    let cfg = EngineConfig {
        initial_window: 3,
        ..no_source()
    };
    let mut e = Engine::new(plan(4), &[], cfg);
    e.add_parent(1, &all(4));
    e.add_parent(2, &all(4));
    let t = Duration::ZERO;
    let r = requests(&e.poll(t));
    let from1: Vec<u32> = r
        .iter()
        .filter(|x| x.0 == Peer::Parent(1))
        .map(|x| x.1)
        .collect();
    e.on_failure(Peer::Parent(1), from1[0], Failure::Mismatch, t);
    let a = e.poll(t);
    assert!(
        requests(&a).contains(&(Peer::Parent(2), from1[0])),
        "refetched elsewhere: {a:?}"
    );
    e.on_failure(Peer::Parent(1), from1[1], Failure::Mismatch, t);
    let a = e.poll(t);
    assert!(a.contains(&Action::Blacklist { parent: 1 }) || e.report()[0].blacklisted);
    for _ in 0..10 {
        assert!(
            requests(&e.poll(t)).iter().all(|x| x.0 != Peer::Parent(1)),
            "never again"
        );
    }
}

#[test]
fn source_only_for_pieces_no_parent_has() {
    let mut e = Engine::new(plan(4), &[], EngineConfig::default());
    e.add_parent(1, &[true, true, false, true]);
    let r = requests(&e.poll(Duration::ZERO));
    let from_source: Vec<u32> = r
        .iter()
        .filter(|x| x.0 == Peer::Source)
        .map(|x| x.1)
        .collect();
    assert_eq!(from_source, vec![2], "{r:?}");
    // With every piece held by parents, never source.
    let mut e = Engine::new(plan(4), &[], EngineConfig::default());
    e.add_parent(1, &all(4));
    // (Before any timeout: a parent that never answers is struck, rested, and then it no
    // longer counts as holding anything.)
    for t in 0..10 {
        assert!(requests(&e.poll(Duration::from_secs(t)))
            .iter()
            .all(|x| x.0 != Peer::Source));
    }
    // Not allowed: never, even when nobody has a piece.
    let mut e = Engine::new(plan(4), &[], no_source());
    assert!(requests(&e.poll(Duration::ZERO)).is_empty());
}

/// Told to fetch, a reader leaves the pieces another node verified (`source_last`) until
/// nothing else is left to read from source; then it takes them in index order.
#[test]
fn pieces_read_last_wait_for_every_other_source_read() {
    let mut e = Engine::new(
        plan(8),
        &[],
        EngineConfig {
            source_window: 2,
            ..EngineConfig::default()
        },
    );
    e.source_by_scheduler(Some(true), None);
    e.source_last(&[1, 0, 2]);
    let from_source = |a: &[Action]| -> Vec<u32> {
        requests(a)
            .iter()
            .filter(|x| x.0 == Peer::Source)
            .map(|x| x.1)
            .collect()
    };
    let mut asked = Vec::new();
    let mut t = Duration::ZERO;
    for _ in 0..4 {
        let got = from_source(&e.poll(t));
        assert_eq!(got.len(), 2, "{got:?}");
        for &p in &got {
            e.on_piece(Peer::Source, p, t, t);
        }
        asked.extend(got);
        t += MS;
    }
    // In the order asked (a poll's requests in the engine's order).
    assert!(asked[..5].iter().all(|p| *p > 2), "{asked:?}");
    assert_eq!(asked[5..], [0, 1, 2], "last, in order: {asked:?}");
}

#[test]
fn pieces_nobody_has_wait_while_parents_keep_gaining_pieces() {
    let cfg = EngineConfig {
        source_wait: Duration::from_secs(3),
        ..EngineConfig::default()
    };
    // A seed that has verified nothing yet, and keeps announcing new pieces every second.
    let mut e = Engine::new(plan(8), &[], cfg);
    e.add_parent(1, &[false; 8]);
    let from_source = |a: &[Action]| requests(a).iter().filter(|x| x.0 == Peer::Source).count();
    for t in 0..6u32 {
        e.parent_has(1, t);
        let a = e.poll(Duration::from_secs(t as u64));
        assert_eq!(
            from_source(&a),
            0,
            "at {t}s the seed is still producing: {a:?}"
        );
    }
    // The seed stops (killed): after the wait, what nobody has goes to source.
    assert_eq!(from_source(&e.poll(Duration::from_millis(7_900))), 0);
    let a = e.poll(Duration::from_millis(8_100));
    assert!(from_source(&a) > 0, "{a:?}");
    assert!(requests(&a)
        .iter()
        .filter(|x| x.0 == Peer::Source)
        .all(|x| x.1 >= 6));
}

#[test]
fn slow_parents_send_us_back_to_source_after_the_grace() {
    let cfg = EngineConfig {
        source_min_rate: 10_000_000,
        source_grace: Duration::from_secs(5),
        piece_timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let mut e = Engine::new(plan(20), &[], cfg);
    e.add_parent(1, &all(20));
    let r = requests(&e.poll(Duration::ZERO));
    // A piece in 1 s: 65 KB/s, far below 10 MB/s.
    e.on_piece(
        r[0].0,
        r[0].1,
        Duration::from_secs(1),
        Duration::from_secs(1),
    );
    assert!(requests(&e.poll(Duration::from_secs(2)))
        .iter()
        .all(|x| x.0 != Peer::Source));
    let late = requests(&e.poll(Duration::from_secs(8)));
    assert!(late.iter().any(|x| x.0 == Peer::Source), "{late:?}");
}

#[test]
fn endgame_duplicates_and_cancels_the_loser() {
    let cfg = EngineConfig {
        initial_window: 2,
        ..no_source()
    };
    let mut e = Engine::new(plan(1), &[], cfg);
    e.add_parent(1, &all(1));
    e.add_parent(2, &all(1));
    let mut r = requests(&e.poll(Duration::ZERO));
    assert_eq!(r.len(), 1, "no duplicate at once: {r:?}");
    assert!(
        requests(&e.poll(400 * MS)).is_empty(),
        "nor before endgame_after"
    );
    r.extend(requests(&e.poll(600 * MS)));
    assert_eq!(r.len(), 2, "the last piece is requested twice: {r:?}");
    let winner = r[1].0;
    let a = {
        e.on_piece(winner, 0, 5 * MS, 605 * MS);
        e.poll(605 * MS)
    };
    assert_eq!(
        a,
        vec![Action::Cancel {
            from: r[0].0,
            piece: 0
        }]
    );
    assert!(e.is_complete());
}

#[test]
fn a_departed_parents_pieces_go_to_others() {
    let mut e = Engine::new(
        plan(2),
        &[],
        EngineConfig {
            initial_window: 2,
            ..no_source()
        },
    );
    e.add_parent(1, &all(2));
    let r = requests(&e.poll(Duration::ZERO));
    assert_eq!(r.len(), 2);
    e.remove_parent(1);
    e.add_parent(2, &all(2));
    let r = requests(&e.poll(MS));
    assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), vec![0, 1]);
    assert!(r.iter().all(|x| x.0 == Peer::Parent(2)));
}

#[test]
fn pieces_already_held_are_never_requested() {
    let mut e = Engine::new(
        plan(4),
        &[true, false, true, false],
        EngineConfig::default(),
    );
    e.add_parent(1, &all(4));
    let r = requests(&e.poll(Duration::ZERO));
    assert_eq!(r.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(e.missing(), 2);
}

// ---- simulation ----

#[derive(Clone, Debug)]
struct SimParent {
    has: Vec<bool>,
    /// Bytes per second.
    rate: u64,
    /// Always serves corrupt data.
    bad: bool,
    /// Drops every n-th request (0: never).
    drop_every: u32,
}

fn sim(pieces: u32, parents: Vec<SimParent>, source_allowed: bool, streaming: bool) -> (bool, u32) {
    let cfg = EngineConfig {
        source_allowed,
        piece_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let max_window = cfg.max_window;
    let mut e = Engine::new(plan(pieces), &[], cfg);
    for (i, p) in parents.iter().enumerate() {
        e.add_parent(i as u64, &p.has);
        e.link_quality(i as u64, Duration::from_millis(20), 0.0);
    }
    if streaming {
        e.set_streaming(Some(0));
    }
    let mut now = Duration::ZERO;
    let mut pending: BTreeMap<(Duration, u64), (Peer, u32, Duration)> = BTreeMap::new();
    let mut seq = 0u64;
    let mut asked: BTreeMap<u64, u32> = BTreeMap::new();
    let mut source_requests = 0;
    let mut blacklisted = std::collections::BTreeSet::new();
    for _ in 0..20_000 {
        for a in e.poll(now) {
            match a {
                Action::Request { from, piece } => {
                    assert!(!e.has(piece), "requested a piece it has");
                    let rate = match from {
                        Peer::Parent(id) => {
                            let p = &parents[id as usize];
                            assert!(
                                p.has[piece as usize],
                                "asked parent {id} for piece {piece} it lacks"
                            );
                            assert!(!blacklisted.contains(&id), "asked a blacklisted parent");
                            let n = asked.entry(id).or_default();
                            *n += 1;
                            if p.drop_every > 0 && (*n).is_multiple_of(p.drop_every) {
                                continue; // never answered: must time out
                            }
                            p.rate
                        }
                        Peer::Source => {
                            assert!(source_allowed, "went to source when not allowed");
                            source_requests += 1;
                            50_000_000
                        }
                    };
                    let took = Duration::from_secs_f64(PL as f64 / rate as f64) + 10 * MS;
                    seq += 1;
                    pending.insert((now + took, seq), (from, piece, took));
                }
                Action::Cancel { from, piece } => {
                    pending.retain(|_, v| !(v.0 == from && v.1 == piece));
                }
                Action::Blacklist { parent } => {
                    blacklisted.insert(parent);
                }
            }
        }
        for r in e.report() {
            assert!(r.in_flight as u32 <= max_window, "window overrun: {r:?}");
        }
        if e.is_complete() {
            return (true, source_requests);
        }
        // Next event, or a tick so timeouts fire.
        let next = pending.keys().next().copied();
        match next {
            Some((t, s)) if t <= now + Duration::from_millis(500) => {
                now = now.max(t);
                let (from, piece, took) = pending.remove(&(t, s)).unwrap();
                let bad = matches!(from, Peer::Parent(id) if parents[id as usize].bad);
                if bad {
                    e.on_failure(from, piece, Failure::Mismatch, now);
                } else {
                    e.on_piece(from, piece, took, now);
                }
            }
            _ => now += Duration::from_millis(500),
        }
    }
    (e.is_complete(), source_requests)
}

fn parent_strategy(pieces: u32) -> impl Strategy<Value = SimParent> {
    (
        proptest::collection::vec(any::<bool>(), pieces as usize),
        1_000_000u64..100_000_000,
        prop::bool::weighted(0.15),
        prop_oneof![Just(0u32), 3u32..10],
    )
        .prop_map(|(has, rate, bad, drop_every)| SimParent {
            has,
            rate,
            bad,
            drop_every,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_swarms_complete_within_the_rules(
        (pieces, parents) in (1u32..48).prop_flat_map(|n| (Just(n), proptest::collection::vec(parent_strategy(n), 0..6))),
        source_allowed in any::<bool>(),
        streaming in any::<bool>(),
    ) {
        let good_cover = (0..pieces as usize).all(|i| parents.iter().any(|p| !p.bad && p.has[i]));
        let (complete, source_requests) = sim(pieces, parents.clone(), source_allowed, streaming);
        if source_allowed || good_cover {
            prop_assert!(complete, "the swarm did not complete");
        }
        // A seed that holds every piece, well: no source traffic is ever needed.
        if parents.iter().any(|p| !p.bad && p.drop_every == 0 && p.has.iter().all(|h| *h)) {
            prop_assert_eq!(source_requests, 0);
        }
    }
}

#[test]
fn peers_with_their_own_tie_seeds_pick_different_pieces_from_one_seed() {
    let picks = |seed: u64| {
        let cfg = EngineConfig {
            tie_seed: Some(seed),
            initial_window: 4,
            ..EngineConfig::default()
        };
        let mut e = Engine::new(plan(64), &[], cfg);
        e.add_parent(1, &all(64));
        let mut r: Vec<u32> = requests(&e.poll(Duration::ZERO))
            .iter()
            .map(|x| x.1)
            .collect();
        r.sort();
        r
    };
    let (a, b, c) = (picks(1), picks(2), picks(3));
    assert_eq!(a.len(), 4);
    assert!(a != b && b != c && a != c, "{a:?} {b:?} {c:?}");
    // The same seed plans the same way (deterministic).
    assert_eq!(a, picks(1));
}

#[test]
fn a_busy_answer_is_no_strike_and_the_piece_waits_a_little_at_that_parent() {
    let cfg = EngineConfig {
        initial_window: 4,
        ..no_source()
    };
    let mut e = Engine::new(plan(4), &[], cfg);
    e.add_parent(1, &all(4));
    let first = requests(&e.poll(Duration::ZERO));
    let (_, p) = first[0];
    e.on_failure(Peer::Parent(1), p, Failure::Busy, Duration::ZERO);
    assert_eq!(e.report()[0].strikes, 0);
    let again = requests(&e.poll(Duration::from_millis(100)));
    assert!(again.is_empty(), "{again:?}");
    let later = requests(&e.poll(Duration::from_millis(600)));
    assert!(later.contains(&(Peer::Parent(1), p)), "{later:?}");
}

#[test]
fn what_a_busy_parent_offers_is_asked_of_it_next_unless_held_or_asked_elsewhere() {
    let cfg = EngineConfig {
        initial_window: 1,
        max_window: 1,
        ..no_source()
    };
    // Twenty pieces, 0..=8 also held by this peer's other parent (2): rarest first asks the
    // seed (1) for 9.. and parent 2 for one of 0..=8.
    let mut e = Engine::new(plan(20), &[], cfg);
    e.add_parent(1, &all(20));
    let mut other = vec![false; 20];
    other[..9].iter_mut().for_each(|h| *h = true);
    e.add_parent(2, &other);
    let first = requests(&e.poll(Duration::ZERO));
    let (_, asked) = *first.iter().find(|r| r.0 == Peer::Parent(1)).unwrap();
    let at_2 = first.iter().find(|r| r.0 == Peer::Parent(2)).map(|r| r.1);
    // The seed declines it and offers 15, the piece parent 2 is fetching, and 17.
    let offer: Vec<u32> = [15].into_iter().chain(at_2).chain([17, 99]).collect();
    e.offered(1, &offer, Duration::ZERO);
    e.on_failure(Peer::Parent(1), asked, Failure::Busy, Duration::ZERO);
    let next = requests(&e.poll(MS));
    assert_eq!(next, vec![(Peer::Parent(1), 15)], "the first offered piece");
    // 15 arrives; the offer's next piece it lacks and has not asked anyone for is 17.
    e.on_piece(Peer::Parent(1), 15, MS, 2 * MS);
    let next = requests(&e.poll(2 * MS));
    assert_eq!(next, vec![(Peer::Parent(1), 17)]);
    // The offer is spent (and would have expired with busy_backoff): rarest-first again.
    e.on_piece(Peer::Parent(1), 17, MS, 3 * MS);
    let next = requests(&e.poll(3 * MS));
    assert_eq!(next.len(), 1);
    assert!(next[0].1 >= 9 && next[0].1 != asked, "{next:?}");
    // An offer past its time is not followed.
    let mut e = Engine::new(
        plan(20),
        &[],
        EngineConfig {
            initial_window: 1,
            ..no_source()
        },
    );
    e.add_parent(1, &all(20));
    let (_, asked) = requests(&e.poll(Duration::ZERO))[0];
    e.offered(1, &[19], Duration::ZERO);
    e.on_failure(Peer::Parent(1), asked, Failure::Busy, Duration::ZERO);
    let late = requests(&e.poll(Duration::from_secs(1)));
    assert_ne!(late, vec![(Peer::Parent(1), 19)], "{late:?}");
}

#[test]
fn a_busy_holder_still_counts_as_holding_so_no_source() {
    let mut e = Engine::new(plan(2), &[], EngineConfig::default());
    e.add_parent(1, &all(2));
    let first = requests(&e.poll(Duration::ZERO));
    for (from, p) in first {
        e.on_failure(from, p, Failure::Busy, Duration::ZERO);
    }
    for t in 1..20 {
        let a = requests(&e.poll(Duration::from_millis(t * 100)));
        assert!(a.iter().all(|x| x.0 != Peer::Source), "{a:?}");
    }
}

#[test]
fn shuffled_picks_stay_in_the_lowest_span_so_the_content_hash_keeps_up() {
    let cfg = EngineConfig {
        tie_seed: Some(7),
        tie_span: 64,
        initial_window: 16,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(plan(256), &[], cfg);
    e.add_parent(1, &all(256));
    let picks: Vec<u32> = requests(&e.poll(Duration::ZERO))
        .iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(picks.len(), 16);
    assert!(picks.iter().all(|p| *p < 64), "{picks:?}");
    // Shuffled within the span, not simply in index order.
    assert_ne!(picks, (0..16).collect::<Vec<u32>>());
}

/// 16 pieces, nothing held, 4 requests per parent at first, no source.
fn window4_engine16() -> Engine {
    Engine::new(
        plan(16),
        &[],
        EngineConfig {
            initial_window: 4,
            ..no_source()
        },
    )
}

#[test]
fn the_parent_that_delivers_far_least_is_the_one_to_replace() {
    let s = Duration::from_secs(1);
    let mut e = window4_engine16();
    e.add_parent(1, &all(16));
    e.add_parent(2, &all(16));
    e.add_parent(3, &all(16));
    assert_eq!(
        e.parent_to_replace(Duration::ZERO, 3 * s),
        None,
        "window starts"
    );
    let r = requests(&e.poll(Duration::ZERO));
    let from = |id| {
        r.iter()
            .filter(move |(p, _)| *p == Peer::Parent(id))
            .map(|x| x.1)
    };
    // 1 and 2 deliver everything asked of them, twice over; 3 delivers one piece.
    for (id, n) in [(1, 4), (2, 4), (3, 1)] {
        for piece in from(id).take(n) {
            e.on_piece(Peer::Parent(id), piece, 10 * MS, s);
        }
    }
    for (p, piece) in requests(&e.poll(s)) {
        if p != Peer::Parent(3) {
            e.on_piece(p, piece, 10 * MS, s);
        }
    }
    assert_eq!(e.parent_to_replace(2 * s, 3 * s), None, "window not over");
    assert_eq!(e.parent_to_replace(3 * s, 3 * s), Some(3));
    // A new window: parents that deliver alike are all kept.
    e.remove_parent(3);
    let r = requests(&e.poll(3 * s));
    for (p, piece) in r {
        e.on_piece(p, piece, 10 * MS, 4 * s);
    }
    assert_eq!(e.parent_to_replace(6 * s, 3 * s), None);
}

#[test]
fn a_parent_that_is_the_only_way_to_some_pieces_is_never_replaced() {
    // A seed early on: it holds everything, the other parents a little, and its link is split
    // among many children, so it delivers the least.
    let s = Duration::from_secs(1);
    let setup = |others_hold: usize| {
        let mut e = window4_engine16();
        e.add_parent(1, &all(16));
        let some: Vec<bool> = (0..16).map(|i| i < others_hold).collect();
        e.add_parent(2, &some);
        e.add_parent(3, &some);
        assert_eq!(e.parent_to_replace(Duration::ZERO, 3 * s), None);
        for (p, piece) in requests(&e.poll(Duration::ZERO)) {
            if p != Peer::Parent(1) {
                e.on_piece(p, piece, 10 * MS, s);
            }
        }
        e
    };
    let mut e = setup(4);
    assert_eq!(
        e.parent_to_replace(3 * s, 3 * s),
        None,
        "12 pieces only 1 holds"
    );
    // Once the others hold everything it has, it may go like any other.
    let mut e2 = setup(16);
    assert_eq!(e2.parent_to_replace(3 * s, 3 * s), Some(1));
}

/// [`window4_engine16`] with parents 1, 2 and 3 holding everything, and the replacement
/// window started at 0 (3 s long in the tests).
fn three_full_parents_window_started() -> Engine {
    let mut e = window4_engine16();
    for id in 1..=3 {
        e.add_parent(id, &all(16));
    }
    assert_eq!(
        e.parent_to_replace(Duration::ZERO, Duration::from_secs(3)),
        None
    );
    e
}

#[test]
fn a_replaced_parent_finishes_what_it_is_sending_and_is_asked_for_nothing_more() {
    let s = Duration::from_secs(1);
    let mut e = three_full_parents_window_started();
    let r = requests(&e.poll(Duration::ZERO));
    // 1 and 2 deliver everything asked of them; 3 delivers one of its four.
    let mut slow: Vec<u32> = r
        .iter()
        .filter(|(p, _)| *p == Peer::Parent(3))
        .map(|x| x.1)
        .collect();
    assert_eq!(slow.len(), 4);
    for (p, piece) in &r {
        if *p != Peer::Parent(3) {
            e.on_piece(*p, *piece, 10 * MS, s);
        }
    }
    e.on_piece(Peer::Parent(3), slow.remove(0), 10 * MS, s);
    assert_eq!(e.parent_to_replace(3 * s, 3 * s), Some(3));
    // Its three pieces in flight are not cancelled, and nothing new goes to it.
    assert!(e.drained().is_empty(), "still sending");
    let actions = e.poll(3 * s);
    assert!(
        actions.iter().all(|a| match a {
            Action::Request { from, .. } | Action::Cancel { from, .. } => *from != Peer::Parent(3),
            Action::Blacklist { .. } => true,
        }),
        "{actions:?}"
    );
    let r = requests(&actions);
    assert!(!r.is_empty(), "the others take the rest");
    for (p, piece) in r {
        e.on_piece(p, piece, 10 * MS, 4 * s);
    }
    for piece in slow {
        e.on_piece(Peer::Parent(3), piece, 10 * MS, 5 * s);
        assert!(e.has(piece));
    }
    assert_eq!(e.drained(), vec![3]);
    e.remove_parent(3);
    assert!(e.drained().is_empty());
}

#[test]
fn a_retiring_parent_does_not_count_as_another_holder() {
    let s = Duration::from_secs(1);
    let mut e = three_full_parents_window_started();
    // 1 and 2 deliver; 3 delivers nothing and is replaced.
    let mut held = vec![false; 16];
    for (p, piece) in requests(&e.poll(Duration::ZERO)) {
        if p != Peer::Parent(3) {
            e.on_piece(p, piece, 10 * MS, s);
            held[piece as usize] = true;
        }
    }
    assert_eq!(e.parent_to_replace(3 * s, 3 * s), Some(3));
    // 1 turns out to hold only what this peer has, and one piece more, which it delivers;
    // 2 delivers nothing. 2 is the least, but the rest only it and the retiring 3 hold.
    let extra = held.iter().position(|h| !h).expect("a missing piece") as u32;
    let mut one = held.clone();
    one[extra as usize] = true;
    e.add_parent(1, &one);
    for (p, piece) in requests(&e.poll(3 * s)) {
        if p == Peer::Parent(1) {
            e.on_piece(p, piece, 10 * MS, 4 * s);
        }
    }
    assert!(e.has(extra));
    assert_eq!(e.parent_to_replace(6 * s, 3 * s), None);
}

#[test]
fn a_new_gateway_keeps_its_best_parents_and_any_sole_holder_and_retires_the_rest() {
    let s = Duration::from_secs(1);
    let mut e = window4_engine16();
    // 1 and 2 hold all but piece 15; 3 holds nothing; 4 alone holds piece 15.
    let mut most = all(16);
    most[15] = false;
    e.add_parent(1, &most);
    e.add_parent(2, &most);
    e.add_parent(3, &[false; 16]);
    let mut last = vec![false; 16];
    last[15] = true;
    e.add_parent(4, &last);
    // 2 delivers the most.
    for (p, piece) in requests(&e.poll(Duration::ZERO)) {
        if p == Peer::Parent(2) {
            e.on_piece(p, piece, 10 * MS, s);
        }
    }
    let mut retired = e.retire_all_but(1);
    retired.sort_unstable();
    assert_eq!(retired, vec![1, 3]);
    assert_eq!(e.retiring(), 2);
    // Retired parents are asked for nothing more.
    for (p, _) in requests(&e.poll(s)) {
        assert!(p == Peer::Parent(2) || p == Peer::Parent(4), "{p:?}");
    }
    assert!(e.retire_all_but(8).is_empty());
}

proptest! {
    /// However many pieces come sorted at once, reading them all gives the full sort.
    #[test]
    fn ranked_pieces_read_in_the_full_sort_order(
        keys in proptest::collection::vec((0u32..4, 0u64..8), 0..200),
        first in 0usize..250,
    ) {
        let keyed: Vec<(u32, u64, u32)> = keys
            .iter()
            .enumerate()
            .map(|(i, &(rank, tie))| (rank, tie, i as u32))
            .collect();
        let mut want = keyed.clone();
        want.sort_unstable();
        let mut ranked = Ranked::new(keyed, first);
        let got: Vec<u32> = (0..want.len()).map_while(|at| ranked.get(at)).collect();
        prop_assert_eq!(got, want.iter().map(|k| k.2).collect::<Vec<_>>());
        prop_assert_eq!(ranked.get(want.len()), None);
    }
}
