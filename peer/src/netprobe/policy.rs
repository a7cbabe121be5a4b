//! Adaptation rules, sans-IO: what the measured paths ask of new connections.
//!
//! - **Congestion control.** Random loss (a lossy link, not a full queue) makes a loss-based
//!   controller halve its window again and again. When the connections that have carried
//!   enough packets (at least [`MIN_SENT`] each, [`MIN_TOTAL`] together) lose more than
//!   [`TO_TOLERANT`] of them, every connection, open or new, tolerates random loss
//!   (`transport::tolerant`: Cubic that backs off only when the loss comes with a queue, or
//!   above 5%); below [`TO_CUBIC`] they back off on every loss again. Between the two, the
//!   choice stays (hysteresis).
//! - **Packet size** (in `transport::PathPolicy` and `netprobe::udp_upper_bound`): PLPMTUD up
//!   to the interfaces' MTU, converging within 8 bytes, 5 s black-hole cooldown; a new
//!   connection starts at the size already validated toward that host.
//! - **TCP MSS** (`NetProbe::stalled`): a stalled origin transfer with no full-size segment
//!   ever received clamps the MSS of new connections to that host.

use std::time::Duration;

use crate::transport::{Congestion, ConnInfo};

/// A connection counts once it has sent this many packets.
pub const MIN_SENT: u64 = 500;
/// The counted connections must have sent this many together.
pub const MIN_TOTAL: u64 = 2000;
/// Loss above which connections tolerate random loss.
pub const TO_TOLERANT: f64 = 0.005;
/// Loss below which they back off on every loss again.
pub const TO_CUBIC: f64 = 0.002;

pub fn congestion(current: Congestion, conns: &[ConnInfo]) -> Congestion {
    let (sent, lost) = conns
        .iter()
        .map(|c| &c.stats.path)
        .filter(|p| p.sent_packets >= MIN_SENT)
        .fold((0u64, 0u64), |(s, l), p| {
            (s + p.sent_packets, l + p.lost_packets)
        });
    if sent < MIN_TOTAL {
        return current;
    }
    let loss = lost as f64 / sent as f64;
    if loss > TO_TOLERANT {
        Congestion::Tolerant
    } else if loss < TO_CUBIC {
        Congestion::Cubic
    } else {
        current
    }
}

/// The smoothed RTT every busy connection must have before the endpoint gathers its reads by
/// the tick (`transport::socket`): a read is then up to 2 ms late, a fifth of this.
pub const GATHER_MIN_RTT: Duration = Duration::from_millis(10);

/// Datagrams (sent and received) a connection must carry between two of [`Gather::decide`]'s
/// looks (a second apart) to be busy: 100 a second is under 1.2 Mbit/s of full packets. A
/// control connection (the scheduler's, a parent's held-open have request) carries a few.
pub const BUSY_DATAGRAMS: u64 = 100;

/// Whether the endpoint may gather its reads: while at least one open connection is busy and
/// every busy one's smoothed RTT is at least [`GATHER_MIN_RTT`]. Such RTTs on a busy node are
/// queues on its links (a flow filling a bottleneck's queue loses nothing when its packets wait
/// 2 ms more), or long paths. A busy short-RTT connection (a loss-limited flow, whose rate is
/// proportional to 1/RTT, or a transfer on a quiet LAN) keeps every read immediate. An idle one
/// does not count: its RTT was sampled when the queues were empty (the scheduler's connection,
/// next to the seed, kept 0.6 ms while the data connections beside it had 11-16 ms, and held a
/// peer's reads immediate for its whole download), and a few requests read 2 ms later cost
/// nothing.
#[derive(Debug, Default)]
pub struct Gather {
    /// Datagrams each connection had carried at the last look, by id.
    datagrams: std::collections::HashMap<usize, u64>,
}

impl Gather {
    /// Looks at the open connections (once a second) and answers whether reads may be gathered
    /// until the next look.
    pub fn decide(&mut self, conns: &[ConnInfo]) -> bool {
        let before = std::mem::take(&mut self.datagrams);
        let mut busy = false;
        let mut all_long = true;
        for c in conns.iter().filter(|c| c.live) {
            let now = c.stats.udp_tx.datagrams + c.stats.udp_rx.datagrams;
            self.datagrams.insert(c.id, now);
            let then = before.get(&c.id).copied().unwrap_or(0);
            if now.saturating_sub(then) >= BUSY_DATAGRAMS {
                busy = true;
                all_long &= c.stats.path.rtt >= GATHER_MIN_RTT;
            }
        }
        busy && all_long
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(sent: u64, lost: u64) -> ConnInfo {
        let mut stats = quinn::ConnectionStats::default();
        stats.path.sent_packets = sent;
        stats.path.lost_packets = lost;
        ConnInfo {
            id: 0,
            remote: "127.0.0.1:1".parse().unwrap(),
            incoming: true,
            stats,
            live: true,
        }
    }

    #[test]
    fn loss_picks_the_controller_with_hysteresis() {
        use Congestion::*;
        assert_eq!(congestion(Cubic, &[]), Cubic, "no evidence, no change");
        assert_eq!(
            congestion(Cubic, &[conn(1000, 100)]),
            Cubic,
            "too few packets"
        );
        assert_eq!(congestion(Cubic, &[conn(10_000, 200)]), Tolerant, "2% loss");
        assert_eq!(
            congestion(Tolerant, &[conn(10_000, 50)]),
            Tolerant,
            "0.5%: keep"
        );
        assert_eq!(congestion(Cubic, &[conn(10_000, 50)]), Cubic, "0.5%: keep");
        assert_eq!(
            congestion(Tolerant, &[conn(10_000, 1)]),
            Cubic,
            "clean again"
        );
        assert_eq!(
            congestion(Cubic, &[conn(100, 100), conn(3000, 60)]),
            Tolerant,
            "short connections do not count"
        );
    }

    #[test]
    fn reads_are_gathered_only_while_every_busy_connection_has_a_long_rtt() {
        // Connection `id` with an RTT of `ms` that has carried `datagrams` so far.
        let c = |id, ms, datagrams| {
            let mut c = conn(10_000, 0);
            c.id = id;
            c.stats.path.rtt = Duration::from_millis(ms);
            c.stats.udp_rx.datagrams = datagrams;
            c
        };
        let mut g = Gather::default();
        assert!(!g.decide(&[]), "nothing open: nothing to gather");
        assert!(
            g.decide(&[c(1, 10, 5000), c(2, 25, 5000)]),
            "queues on every path"
        );
        assert!(
            !g.decide(&[c(1, 25, 9000), c(2, 1, 9000)]),
            "one busy short path (a loss-limited flow on a LAN) keeps reads immediate"
        );
        assert!(
            g.decide(&[c(1, 25, 14_000), c(2, 1, 9050), c(3, 1, 20)]),
            "short paths that carried little since the last look do not count"
        );
        assert!(
            !g.decide(&[c(1, 25, 14_050), c(2, 1, 9100)]),
            "nothing busy: nothing to gather"
        );
        let mut closed = c(4, 1, 1_000_000);
        closed.live = false;
        assert!(
            g.decide(&[c(1, 25, 20_000), closed]),
            "a closed connection does not count"
        );
    }
}
