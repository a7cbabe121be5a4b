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

/// A parent's news is asked for at most once per this long, until the download is closing
/// (few pieces left, each of which it waits for). A parent that verifies a piece every few tens
/// of milliseconds would otherwise answer each long-poll with one piece: on `bench swarm`'s
/// default job each peer took about 3,000 answers, 5 per piece it fetched, each a stream
/// opened and answered; waiting out the rest of the interval after a quick answer lets news
/// gather (1,640 answers, 2.3 pieces each on average). When news is sparse the long-poll
/// itself waited longer than this and the next ask goes at once, so a lone new piece is heard
/// of as soon as before.
pub const HAVE_EVERY: Duration = Duration::from_millis(100);

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
pub struct Spread<K = SocketAddr> {
    last_sent: Vec<Option<Sent<K>>>,
}

#[derive(Clone, Copy, Debug)]
struct Sent<K> {
    to: K,
    since: Instant,
    /// When the receiver acknowledged the whole piece; None while in flight.
    delivered: Option<Instant>,
}

impl<K: Copy + Eq> Spread<K> {
    pub fn new(pieces: u32) -> Spread<K> {
        Spread {
            last_sent: vec![None; pieces as usize],
        }
    }

    /// Whether to send `index` to `to` now (and record it).
    pub fn admit(&mut self, index: u32, to: K, now: Instant) -> bool {
        let Some(last) = self.last_sent.get_mut(index as usize) else {
            return true;
        };
        let held = last.is_some_and(|s| {
            s.to != to
                && match s.delivered {
                    Some(d) => now.saturating_duration_since(d) < SPREAD_HOLD,
                    None => now.saturating_duration_since(s.since) < SPREAD_IN_FLIGHT_MAX,
                }
        });
        if held {
            return false;
        }
        *last = Some(Sent {
            to,
            since: now,
            delivered: None,
        });
        true
    }

    /// The send of `index` to `to` ended: delivered (the hold starts), or failed (anyone may
    /// have it at once).
    pub fn ended(&mut self, index: u32, to: K, delivered: bool, now: Instant) {
        let Some(last) = self.last_sent.get_mut(index as usize) else {
            return;
        };
        if let Some(s) = last.filter(|s| s.to == to && s.delivered.is_none()) {
            *last = delivered.then_some(Sent {
                delivered: Some(now),
                ..s
            });
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
        let mut s: Spread = Spread::new(3);
        assert!(s.admit(0, a, at(0)));
        assert!(!s.admit(0, b, at(0)), "0 to another peer at once");
        assert!(s.admit(0, a, at(0)), "the same peer asking again is served");
        assert!(s.admit(1, b, at(0)) && s.admit(2, b, at(0)));
        assert!(!s.admit(1, a, at(0)) && !s.admit(2, a, at(0)));
        // Still in flight long after the hold: nobody else gets it.
        assert!(!s.admit(0, b, at(30)), "in flight");
        // Delivered at 30 s: held for SPREAD_HOLD, then it may go again (its receiver may have
        // died without passing it on).
        s.ended(0, a, true, at(30));
        let hold = super::SPREAD_HOLD.as_secs();
        assert!(!s.admit(0, b, at(30 + hold - 1)));
        assert!(s.admit(0, b, at(30 + hold + 1)));
        // A failed send frees the piece at once.
        s.ended(1, b, false, at(1));
        assert!(s.admit(1, a, at(1)));
        // An end reported for someone else's send changes nothing.
        s.ended(1, b, false, at(2));
        assert!(!s.admit(1, b, at(2)));
        // A send whose end never comes stops blocking others after the in-flight bound.
        assert!(!s.admit(2, a, at(59)));
        assert!(s.admit(2, a, at(61)));
        assert!(s.admit(7, a, at(0)), "out of range is not ours to police");
    }
}
