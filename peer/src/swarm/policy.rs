//! The peer's swarm policy that is not the engine's, sans-IO and in one place, so that the
//! daemon and the simulator (`sim/`, `cargo xtask bench scale`) run the same rules: the
//! engine's settings from the `[peer]` config, the driver's timings (asking the scheduler,
//! hearing a parent's news, replacing a slow parent), and a sole holder's upload spread.
//! Times are `Instant`s; the simulator passes its own clock as an offset from a fixed one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::PeerConfig;
use crate::core::Digest;
use crate::engine::EngineConfig;

/// The engine's settings for a download by peer `me` under `pc`. Each peer shuffles equally
/// rare pieces by its own seed, so peers fetch different pieces from a seed and can trade.
pub fn engine_config(pc: &PeerConfig, me: &str) -> EngineConfig {
    let wait = Duration::from_millis(pc.source_wait_ms);
    EngineConfig {
        piece_timeout: Duration::from_millis(pc.piece_timeout_ms),
        source_allowed: pc.source_fallback,
        source_min_rate: (pc.source_min_mbps * 125_000.0) as u64,
        source_grace: wait,
        source_wait: wait,
        tie_seed: Some(u64::from_le_bytes(
            Digest::of(me.as_bytes()).0[..8]
                .try_into()
                .unwrap_or([0; 8]),
        )),
        ..EngineConfig::default()
    }
}

/// Reconnecting to a parent that went down waits this long.
pub const REDIAL_AFTER: Duration = Duration::from_secs(5);
/// With every parent slot taken, the parent that delivered far least over this long is
/// replaced.
pub const REPLACE_WINDOW: Duration = Duration::from_secs(3);
/// With this few pieces missing, news of any of them is wanted at once.
pub const CLOSING_PIECES: u32 = 16;

/// Asking the scheduler for parents: while short of parents, this long after an ask that
/// changed how many are lacking (at the start, everyone who asked at the same moment becomes
/// visible within a round or two), doubling up to [`ASK_SHORT_AT_MOST`]; once it has enough,
/// every [`ASK_FULL_EVERY`] (at once when one is lost).
pub const ASK_SOON: Duration = Duration::from_millis(100);
pub const ASK_SHORT_AT_MOST: Duration = Duration::from_millis(500);
pub const ASK_FULL_EVERY: Duration = Duration::from_secs(5);

/// A parent's news is asked for at most once per [`have_every`], until the download is
/// closing (few pieces left, each of which it waits for). A parent that verifies a piece every
/// few tens of milliseconds would otherwise answer each long-poll with one piece: on `bench
/// swarm`'s default job each peer took about 3,000 answers, 5 per piece it fetched, each a
/// stream opened and answered; waiting out the rest of the interval after a quick answer lets
/// news gather (1,640 answers, 2.3 pieces each on average). When news is sparse the long-poll
/// itself waited longer than this and the next ask goes at once, so a lone new piece is heard
/// of as soon as before.
pub const HAVE_EVERY: Duration = Duration::from_millis(100);
/// The shortest interval between a parent's news ([`have_every`]).
pub const HAVE_EVERY_MIN: Duration = Duration::from_millis(10);
/// The interval before the download's rate is first measured (a second in): short, so that a
/// fast download is not slowed before it is measured; a slow one gathers more from then on.
pub const HAVE_EVERY_FIRST: Duration = Duration::from_millis(20);

/// How long to gather a parent's news, for a download receiving `rate` bytes/s of
/// `piece_length`-byte pieces: about four pieces' time, within [`HAVE_EVERY_MIN`] and
/// [`HAVE_EVERY`]. On fast links a fixed 100 ms was most of the time a piece takes to cross
/// each hop: `bench scale`'s 300 peers on 1 Gbit/s links took 2.31 x the bound with 100 ms and
/// 1.50 with 20 ms, while 50 peers on 10 Mbit/s links did not move (docs/decisions.md K29).
pub fn have_every(piece_length: u64, rate: f64) -> Duration {
    if rate <= 0.0 {
        return HAVE_EVERY_FIRST;
    }
    Duration::from_secs_f64(4.0 * piece_length as f64 / rate).clamp(HAVE_EVERY_MIN, HAVE_EVERY)
}

/// How long a have request is held open while the parent has no news.
pub const HAVE_WAIT: Duration = Duration::from_millis(1000);

/// How long a sole holder declines to send a piece again after it was delivered (see
/// [`Spread`]): long enough for its receiver to pass it on, short enough that a receiver that
/// died does not starve anyone.
pub const SPREAD_HOLD: Duration = Duration::from_secs(10);

/// How long a send still in flight keeps others waiting at most. A send ends on its own
/// (delivered, or failed when the receiver resets it, times out or goes away); this bounds a
/// send whose end the transport never reports.
pub const SPREAD_IN_FLIGHT_MAX: Duration = Duration::from_secs(60);

/// A sole holder's record of what it has sent: it sends each piece to one peer at a time, and
/// not again to another peer until [`SPREAD_HOLD`] after that send was delivered; another peer
/// asking sooner is declined (`Busy`) and gets it from the receiver. (The same peer asking
/// again, after a failure or a restart, is served; a send that failed frees the piece at
/// once.) Otherwise children that pick the same rare pieces would spend the holder's upload,
/// which bounds the whole swarm, on duplicates. The hold runs from delivery, not from the start
/// of the send: in a large swarm a seed's link is shared by dozens of sends, and one piece can
/// take longer than the hold to leave (24 peers at 25 Mbit/s: the seed sent 1.44-1.58 x F when
/// the hold ran from the start).
///
/// It also sends to at most [`SPREAD_PEERS`] peers at a time (more sends to those peers are
/// fine); a peer asking while that many others are being sent to is declined as well. Each
/// connection has a congestion window of at least two packets, so dozens of children asking a
/// seed at once overflow its link's queue whatever their controllers do: 50 peers on 10 Mbit/s
/// links lost 26-34% of the seed's packets, and its link carried 2.3 x F.
///
/// Neither rule may let one member (with a cluster certificate, and as many identities as it
/// likes) starve the others by asking for everything again and again: a piece is held for at
/// most [`SPREAD_HOLDS`] deliveries, after which it goes to whoever asks; and a peer that has
/// been sent more than a whole copy (a *hog*: an honest child takes each piece once) gets a
/// slot only while two are free, so one is always left for the others.
///
/// A peer declined a piece held for another is offered pieces no one has been sent yet
/// ([`Spread::offer`]), so its next request is one the holder will serve.
///
/// In a labelled rack (`group`, see [`rack_group`]) a piece is held separately for the
/// requesters in the holder's rack and for those outside it: the scheduler keeps a rack's
/// members (all but its gateway) on parents in the rack, so a piece delivered to another
/// rack's gateway is out of their reach, and holding it from them stalled the rack for the
/// whole hold. A rack's gateway holds nothing back once it has delivered every piece into its
/// rack: a member still asking for one could not reach the member it went to (in churn, the
/// rack's last peers waited out the hold).
pub struct Spread<K = SocketAddr> {
    /// The holder's rack group (0: unlabelled, one scope for everyone).
    home: u32,
    /// Only requesters in the holder's rack are held to these rules (a rack's gateway: the
    /// other racks' gateways take from it freely).
    rack_only: bool,
    /// Per piece, the last send outside the holder's rack (or to anyone, unlabelled) and the
    /// last inside it.
    last_sent: Vec<[Option<Sent<K>>; 2]>,
    /// Holds each piece has had per scope (deliveries that started one).
    holds: Vec<[u8; 2]>,
    /// Pieces delivered at least once, per scope: once all are in its rack, a gateway holds
    /// nothing back there.
    out: [u32; 2],
    /// Peers with sends in flight: how many, and when the latest began.
    sending: Vec<(K, u32, Instant)>,
    /// Pieces sent per peer (at most [`SPREAD_TRACKED`] peers; past that, new peers count as
    /// new).
    sent_to: std::collections::HashMap<K, u32>,
    /// Where the next [`Spread::offer`] starts looking, so that requesters declined one after
    /// another are offered different pieces.
    cursor: u32,
}

/// A rack's tag in piece requests (see [`Spread`]): a hash of its zone and rack labels, never
/// 0; 0 for a node without a rack label.
pub fn rack_group(zone: &str, rack: &str) -> u32 {
    if rack.is_empty() {
        return 0;
    }
    let d = crate::core::Digest::of(format!("{zone}\n{rack}").as_bytes());
    u32::from_le_bytes([d.0[0], d.0[1], d.0[2], d.0[3]]).max(1)
}

/// Peers a sole holder sends to at once.
pub const SPREAD_PEERS: usize = 8;

/// Deliveries of one piece that hold it for their receiver; after these it is not held again.
pub const SPREAD_HOLDS: u8 = 2;

/// Peers whose sends are counted (for the hog rule).
const SPREAD_TRACKED: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Sent<K> {
    to: K,
    since: Instant,
    /// When the receiver acknowledged the whole piece; None while in flight.
    delivered: Option<Instant>,
}

impl<K: Copy + Eq + std::hash::Hash> Spread<K> {
    pub fn new(pieces: u32, home: u32) -> Spread<K> {
        Spread {
            home,
            rack_only: false,
            last_sent: vec![[None; 2]; pieces as usize],
            holds: vec![[0; 2]; pieces as usize],
            out: [0; 2],
            sending: Vec::new(),
            sent_to: std::collections::HashMap::new(),
            cursor: 0,
        }
    }

    /// The rules of a rack's gateway: they hold for the members of its rack (`home`, not 0)
    /// only.
    pub fn for_rack(pieces: u32, home: u32) -> Spread<K> {
        Spread {
            rack_only: home != 0,
            ..Spread::new(pieces, home)
        }
    }

    /// Whether to send `index` to `to`, a requester in rack `group` (0: unlabelled), now
    /// (and record it).
    pub fn admit(&mut self, index: u32, to: K, group: u32, now: Instant) -> bool {
        let pieces = self.last_sent.len() as u32;
        let scope = usize::from(self.home != 0 && group == self.home);
        if self.rack_only && scope == 0 {
            return true;
        }
        let Some(lasts) = self.last_sent.get(index as usize) else {
            return true;
        };
        let holds = |s: &Option<Sent<K>>| {
            s.is_some_and(|s| {
                s.to != to
                    && match s.delivered {
                        Some(d) => now.saturating_duration_since(d) < SPREAD_HOLD,
                        None => now.saturating_duration_since(s.since) < SPREAD_IN_FLIGHT_MAX,
                    }
            })
        };
        if !(self.rack_only && self.out[scope] == pieces) && holds(&lasts[scope]) {
            return false;
        }
        // A send whose end never came stops holding a slot after the in-flight bound.
        self.sending
            .retain(|(_, _, at)| now.saturating_duration_since(*at) < SPREAD_IN_FLIGHT_MAX);
        if !self.has_slot(to) {
            return false;
        }
        match self.sending.iter().position(|(k, _, _)| *k == to) {
            Some(i) => {
                self.sending[i].1 += 1;
                self.sending[i].2 = now;
            }
            None => self.sending.push((to, 1, now)),
        }
        if self.sent_to.len() < SPREAD_TRACKED || self.sent_to.contains_key(&to) {
            *self.sent_to.entry(to).or_default() += 1;
        }
        self.last_sent[index as usize][scope] = Some(Sent {
            to,
            since: now,
            delivered: None,
        });
        true
    }

    /// Pieces to offer `to` (rack `group`) when declining its request: up to `max` that the
    /// holder `holds` (a seed reading the origin does not hold them all yet), that
    /// [`Spread::admit`] would send it now and that have never gone out in its scope, from
    /// where the last offer stopped (empty once every piece has gone out). None when it would
    /// get no slot now, every slot being taken by others: nothing is offered then (counted
    /// apart in the metrics). Children told so once went quiet for a while, which cut the
    /// seed's 50-peer requests from 54,000 to 10,000, but the same few children then kept its
    /// slots, and the simulator's 300 peers at 1 Gbit/s took 7-10% longer (D41).
    ///
    /// Without offers, a child the holder was already sending to, declined a piece held for
    /// another, asked for the next rarest at the round trip's pace, and most of those were held
    /// too: with 50 peers at 10 Mbit/s the seed answered 53,900 requests for 512 pieces, and
    /// the answers and their acknowledgements were a tenth of its link. Making the children
    /// ask less (D39) let the seed's link idle: the quick asking was how they found the piece
    /// it would send next. An offer tells them.
    pub fn offer(
        &mut self,
        to: K,
        group: u32,
        now: Instant,
        max: usize,
        holds: impl Fn(u32) -> bool,
    ) -> Option<Vec<u32>> {
        let pieces = self.last_sent.len() as u32;
        let scope = usize::from(self.home != 0 && group == self.home);
        if pieces == 0 || (self.rack_only && scope == 0) {
            return Some(Vec::new());
        }
        self.sending
            .retain(|(_, _, at)| now.saturating_duration_since(*at) < SPREAD_IN_FLIGHT_MAX);
        if !self.has_slot(to) {
            return None;
        }
        if self.out[scope] == pieces {
            return Some(Vec::new());
        }
        // Bounded, so that a task of millions of pieces costs no more per answer than one of
        // a few thousand.
        let scan = pieces.min(4096);
        let start = self.cursor % pieces;
        let mut offer = Vec::with_capacity(max);
        let mut looked = 0;
        while looked < scan && offer.len() < max {
            let i = (start + looked) % pieces;
            looked += 1;
            let fresh = self.holds[i as usize][scope] == 0
                && self.last_sent[i as usize][scope].is_none()
                && holds(i);
            if fresh {
                offer.push(i);
            }
        }
        self.cursor = (start + looked) % pieces;
        Some(offer)
    }

    /// Whether `to` may be sent a piece now as far as slots go: a peer being sent to has one;
    /// a new peer needs a free one (a hog, one of two).
    fn has_slot(&self, to: K) -> bool {
        if self.sending.iter().any(|(k, _, _)| *k == to) {
            return true;
        }
        let pieces = self.last_sent.len() as u32;
        let hog = self.sent_to.get(&to).is_some_and(|n| *n > pieces);
        self.sending.len() < SPREAD_PEERS && !(hog && self.sending.len() + 2 > SPREAD_PEERS)
    }

    /// The send of `index` to `to` ended: delivered (the hold starts), or failed (anyone may
    /// have it at once).
    pub fn ended(&mut self, index: u32, to: K, delivered: bool, now: Instant) {
        if let Some(i) = self.sending.iter().position(|(k, _, _)| *k == to) {
            self.sending[i].1 -= 1;
            if self.sending[i].1 == 0 {
                self.sending.swap_remove(i);
            }
        }
        let Some(lasts) = self.last_sent.get_mut(index as usize) else {
            return;
        };
        for (scope, last) in lasts.iter_mut().enumerate() {
            let Some(s) = last.filter(|s| s.to == to && s.delivered.is_none()) else {
                continue;
            };
            let hold = &mut self.holds[index as usize][scope];
            // Past its holds, a delivered piece is not held again: anyone may have it.
            *last = (delivered && *hold < SPREAD_HOLDS).then_some(Sent {
                delivered: Some(now),
                ..s
            });
            if delivered {
                if *hold == 0 {
                    self.out[scope] += 1;
                }
                *hold = hold.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn a_sole_holder_sends_a_piece_to_one_peer_until_the_hold_after_delivery() {
        use std::time::{Duration, Instant};
        let (a, b) = (
            std::net::SocketAddr::from(([10, 0, 0, 1], 1)),
            std::net::SocketAddr::from(([10, 0, 0, 2], 1)),
        );
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut s: Spread = Spread::new(3, 0);
        assert!(s.admit(0, a, 0, at(0)));
        assert!(!s.admit(0, b, 0, at(0)), "0 to another peer at once");
        assert!(
            s.admit(0, a, 0, at(0)),
            "the same peer asking again is served"
        );
        assert!(s.admit(1, b, 0, at(0)) && s.admit(2, b, 0, at(0)));
        assert!(!s.admit(1, a, 0, at(0)) && !s.admit(2, a, 0, at(0)));
        // Still in flight long after the hold: nobody else gets it.
        assert!(!s.admit(0, b, 0, at(30)), "in flight");
        // Delivered at 30 s: held for SPREAD_HOLD, then it may go again (its receiver may have
        // died without passing it on).
        s.ended(0, a, true, at(30));
        let hold = super::SPREAD_HOLD.as_secs();
        assert!(!s.admit(0, b, 0, at(30 + hold - 1)));
        assert!(s.admit(0, b, 0, at(30 + hold + 1)));
        // A failed send frees the piece at once.
        s.ended(1, b, false, at(1));
        assert!(s.admit(1, a, 0, at(1)));
        // An end reported for someone else's send changes nothing.
        s.ended(1, b, false, at(2));
        assert!(!s.admit(1, b, 0, at(2)));
        // A send whose end never comes stops blocking others after the in-flight bound.
        assert!(!s.admit(2, a, 0, at(59)));
        assert!(s.admit(2, a, 0, at(61)));
        assert!(
            s.admit(7, a, 0, at(0)),
            "out of range is not ours to police"
        );
    }

    #[test]
    fn a_sole_holder_sends_to_a_few_peers_at_a_time() {
        use std::time::Instant;
        let t0 = Instant::now();
        let mut s: Spread<u32> = Spread::new(64, 0);
        for p in 0..super::SPREAD_PEERS as u32 {
            assert!(s.admit(p, p, 0, t0));
        }
        // Another piece to a peer already being sent to is fine; a new peer waits.
        assert!(s.admit(40, 0, 0, t0));
        assert!(!s.admit(41, 99, 0, t0), "a ninth peer at once");
        // One peer's sends all end: a slot frees.
        s.ended(0, 0, true, t0);
        assert!(
            !s.admit(41, 99, 0, t0),
            "peer 0 still has piece 40 in flight"
        );
        s.ended(40, 0, false, t0);
        assert!(s.admit(41, 99, 0, t0));
    }

    #[test]
    fn a_declined_peer_is_offered_pieces_no_one_has_been_sent() {
        use std::time::Instant;
        let t0 = Instant::now();
        let mut s: Spread<u32> = Spread::new(8, 0);
        assert!(s.admit(0, 1, 0, t0) && s.admit(1, 2, 0, t0));
        s.ended(1, 2, true, t0);
        assert!(!s.admit(0, 3, 0, t0), "0 is in flight to 1");
        // Neither 0 (in flight) nor 1 (delivered) is offered; the rest are, in turns.
        assert_eq!(s.offer(3, 0, t0, 4, |_| true), Some(vec![2, 3, 4, 5]));
        assert_eq!(
            s.offer(4, 0, t0, 4, |i| i != 7),
            Some(vec![6, 2, 3, 4]),
            "the next offer goes on, past a piece not held yet"
        );
        for i in 2..8 {
            assert!(s.admit(i, 3, 0, t0), "an offered piece is sent");
        }
        assert_eq!(
            s.offer(4, 0, t0, 4, |_| true),
            Some(Vec::new()),
            "all are out"
        );
        // No slot for a new peer: it is told so.
        let mut s: Spread<u32> = Spread::new(64, 0);
        for p in 0..super::SPREAD_PEERS as u32 {
            assert!(s.admit(p, p, 0, t0));
        }
        assert_eq!(s.offer(99, 0, t0, 4, |_| true), None);
        assert_eq!(
            s.offer(0, 0, t0, 2, |_| true).map(|o| o.len()),
            Some(2),
            "a peer being sent to has a slot"
        );
    }

    #[test]
    fn a_member_asking_again_and_again_cannot_hold_pieces_or_slots_for_long() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let hold = super::SPREAD_HOLD.as_secs();
        // Identities 1..=3 take piece 0 in turn, each as the last hold expires.
        let mut s: Spread<u32> = Spread::new(4, 0);
        for (k, who) in (1..=u64::from(super::SPREAD_HOLDS)).zip(1u32..) {
            let t = (k - 1) * (hold + 1);
            assert!(s.admit(0, who, 0, at(t)), "identity {who} at {t} s");
            s.ended(0, who, true, at(t));
            assert!(!s.admit(0, 99, 0, at(t + 1)), "held for {who}");
        }
        // Its holds spent, piece 0 goes to the honest peer at once after the next delivery.
        let t = u64::from(super::SPREAD_HOLDS) * (hold + 1);
        assert!(s.admit(0, 4, 0, at(t)));
        s.ended(0, 4, true, at(t));
        assert!(s.admit(0, 99, 0, at(t)), "no fourth hold");

        // Hogs (more than a whole copy each) fill at most all slots but one.
        let mut s: Spread<u32> = Spread::new(16, 0);
        for hog in 0..super::SPREAD_PEERS as u32 {
            for _ in 0..5 {
                for piece in 0..4 {
                    assert!(s.admit(piece, 100 + hog, 0, t0));
                    s.ended(piece, 100 + hog, false, t0);
                }
            }
        }
        let mut taken = 0;
        for hog in 0..super::SPREAD_PEERS as u32 {
            taken += u32::from(s.admit(8 + hog, 100 + hog, 0, t0));
        }
        assert_eq!(
            taken as usize,
            super::SPREAD_PEERS - 1,
            "one slot stays free"
        );
        assert!(
            s.admit(0, 7, 0, t0),
            "an honest newcomer gets the last slot"
        );
    }

    #[test]
    fn a_holder_in_a_rack_holds_pieces_apart_for_its_rack_and_for_the_rest() {
        use std::time::Instant;
        let t0 = Instant::now();
        let home = super::rack_group("z", "r1");
        let other = super::rack_group("z", "r2");
        assert_ne!(home, other);
        assert_ne!(home, 0);
        assert_eq!(super::rack_group("z", ""), 0, "no rack label, no group");
        let mut s: Spread<u32> = Spread::new(4, home);
        // Piece 0 to another rack's gateway; a member of the holder's own rack still gets it.
        assert!(s.admit(0, 1, other, t0));
        assert!(s.admit(0, 2, home, t0));
        // Each scope then holds it for its receiver.
        assert!(!s.admit(0, 3, other, t0), "held for the other racks");
        assert!(!s.admit(0, 4, home, t0), "held for this rack");
        assert!(
            !s.admit(0, 5, 0, t0),
            "an unlabelled requester counts as outside"
        );
        s.ended(0, 2, false, t0);
        assert!(
            s.admit(0, 4, home, t0),
            "a failed send frees its own scope only"
        );

        // A gateway's rules hold for its own rack only.
        let mut s: Spread<u32> = Spread::for_rack(4, home);
        assert!(s.admit(0, 1, other, t0) && s.admit(0, 2, other, t0));
        assert!(s.admit(0, 3, home, t0));
        assert!(!s.admit(0, 4, home, t0));
        // Unlabelled, everyone shares one scope.
        let mut s: Spread<u32> = Spread::new(4, 0);
        assert!(s.admit(0, 1, other, t0));
        assert!(!s.admit(0, 2, home, t0));
    }

    #[test]
    fn a_gateway_that_delivered_every_piece_into_its_rack_holds_none_back() {
        use std::time::Instant;
        let t0 = Instant::now();
        let home = super::rack_group("z", "r1");
        for gateway in [true, false] {
            let mut s: Spread<u32> = if gateway {
                Spread::for_rack(3, home)
            } else {
                Spread::new(3, home)
            };
            for i in 0..3 {
                assert!(s.admit(i, 10 + i, home, t0));
            }
            s.ended(0, 10, true, t0);
            s.ended(1, 11, true, t0);
            assert!(!s.admit(0, 20, home, t0), "held while piece 2 is not out");
            s.ended(2, 12, true, t0);
            // Every piece is in the rack: a member still asking the gateway for one could not
            // get it from the member it went to (churn in racks waited out the 10 s hold). A
            // seed keeps its holds: its upload bounds the swarm.
            assert_eq!(s.admit(0, 20, home, t0), gateway, "gateway: {gateway}");
        }
    }
}
