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

/// The smoothed RTT every open connection must have before the endpoint gathers its reads by
/// the tick (`transport::socket`): a read is then up to 2 ms late, a fifth of this.
pub const GATHER_MIN_RTT: Duration = Duration::from_millis(10);

/// Whether the endpoint may gather its reads: while it has open connections and every one's
/// smoothed RTT is at least [`GATHER_MIN_RTT`]. Such RTTs on a busy node are queues on its links
/// (a flow filling a bottleneck's queue loses nothing when its packets wait 2 ms more), or long
/// paths. A short-RTT connection (a loss-limited flow, whose rate is proportional to 1/RTT, or
/// any exchange on a quiet LAN) keeps every read immediate.
pub fn gather_reads(conns: &[ConnInfo]) -> bool {
    !conns.is_empty() && conns.iter().all(|c| c.stats.path.rtt >= GATHER_MIN_RTT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(sent: u64, lost: u64) -> ConnInfo {
        let mut stats = quinn::ConnectionStats::default();
        stats.path.sent_packets = sent;
        stats.path.lost_packets = lost;
        ConnInfo {
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
    fn reads_are_gathered_only_while_every_connection_has_a_long_rtt() {
        let rtt = |ms| {
            let mut c = conn(10_000, 0);
            c.stats.path.rtt = Duration::from_millis(ms);
            c
        };
        assert!(!gather_reads(&[]), "nothing open: nothing to gather");
        assert!(gather_reads(&[rtt(10), rtt(25)]), "queues on every path");
        assert!(
            !gather_reads(&[rtt(25), rtt(1)]),
            "one short path (a loss-limited flow on a LAN) keeps reads immediate"
        );
    }
}
