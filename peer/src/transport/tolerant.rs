//! A congestion controller for lossy links: Cubic that tells random loss from congestion.
//!
//! A loss-based controller shrinks its window on every loss. On a link that drops packets at
//! random (a bad radio hop, an overloaded overlay, a flaky NIC), that keeps the window far
//! below the path's capacity. Congestion fills a queue before it drops, so it shows as delay;
//! random loss does not. This controller passes a loss on to Cubic (which backs off) only
//! when it looks like congestion:
//! - the smoothed RTT is more than `max(MIN_QUEUE, min_rtt / 2)` above the path's minimum
//!   (a queue has built), or
//! - the recent loss rate is above [`MAX_RANDOM_LOSS`] (a shallow-buffered bottleneck drops
//!   without building delay; beyond that rate loss is taken as congestion whatever the
//!   delay), or
//! - it is persistent congestion, or an ECN congestion mark.
//!
//! Otherwise the loss is repaired (quinn retransmits) and the window stands. Growth, the
//! back-off itself and everything else are Cubic's.
//!
//! The gate applies only while the node's `tolerate` flag is set: the node sets it when its
//! connections measure sustained loss (`netprobe::policy`), so a clean path keeps Cubic's
//! answer to every loss.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, Cubic, CubicConfig};
use quinn_proto::RttEstimator;

/// Queueing delay that counts as a queue whatever the base RTT (above scheduling jitter).
pub const MIN_QUEUE: Duration = Duration::from_millis(2);
/// Loss rate above which every loss counts as congestion.
pub const MAX_RANDOM_LOSS: f64 = 0.05;
/// The loss rate is measured over about this many bytes (acked plus lost), halved as it goes.
const LOSS_SPAN: u64 = 8 << 20;

/// Builds [`Tolerant`] controllers that consult `tolerate` on each loss.
#[derive(Debug)]
pub struct TolerantConfig {
    cubic: Arc<CubicConfig>,
    tolerate: Arc<AtomicBool>,
}

impl TolerantConfig {
    /// While `tolerate` is false the controllers are plain Cubic.
    pub fn new(tolerate: Arc<AtomicBool>) -> TolerantConfig {
        TolerantConfig {
            cubic: Arc::default(),
            tolerate,
        }
    }
}

impl ControllerFactory for TolerantConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Tolerant {
            cubic: Cubic::new(self.cubic.clone(), now, current_mtu),
            loss: LossGate::default(),
            tolerate: self.tolerate.clone(),
        })
    }
}

/// Cubic behind a [`LossGate`], when the node's `tolerate` is set.
#[derive(Clone)]
pub struct Tolerant {
    cubic: Cubic,
    loss: LossGate,
    tolerate: Arc<AtomicBool>,
}

/// The sans-IO decision: is this loss congestion?
#[derive(Clone, Debug, Default)]
pub struct LossGate {
    min_rtt: Duration,
    srtt: Duration,
    acked: u64,
    lost: u64,
}

impl LossGate {
    pub fn on_ack(&mut self, bytes: u64, srtt: Duration, min_rtt: Duration) {
        self.srtt = srtt;
        self.min_rtt = min_rtt;
        self.acked += bytes;
        self.age();
    }

    /// Records a loss of `lost_bytes` and says whether the window should shrink for it.
    pub fn on_loss(&mut self, lost_bytes: u64, persistent: bool) -> bool {
        self.lost += lost_bytes;
        self.age();
        // An ECN mark (no bytes lost) or persistent congestion is never random.
        persistent || lost_bytes == 0 || self.queued() || self.rate() > MAX_RANDOM_LOSS
    }

    /// Whether the RTT shows a queue.
    fn queued(&self) -> bool {
        self.srtt.saturating_sub(self.min_rtt) > MIN_QUEUE.max(self.min_rtt / 2)
    }

    /// Recent loss rate, by bytes.
    pub fn rate(&self) -> f64 {
        let all = self.acked + self.lost;
        if all == 0 {
            0.0
        } else {
            self.lost as f64 / all as f64
        }
    }

    fn age(&mut self) {
        if self.acked + self.lost > LOSS_SPAN {
            self.acked /= 2;
            self.lost /= 2;
        }
    }
}

impl Controller for Tolerant {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.cubic.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.loss.on_ack(bytes, rtt.get(), rtt.min());
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.cubic
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        let congestion = self.loss.on_loss(lost_bytes, is_persistent_congestion);
        if congestion || !self.tolerate.load(Ordering::Relaxed) {
            self.cubic
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.cubic.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.cubic.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.cubic.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.cubic.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn random_loss_on_an_empty_queue_keeps_the_window() {
        let mut g = LossGate::default();
        // 2% loss, RTT at its floor.
        for _ in 0..50 {
            g.on_ack(49 * 1400, MS / 5, MS / 5);
            assert!(!g.on_loss(1400, false));
        }
        assert!((g.rate() - 0.02).abs() < 0.001);
    }

    #[test]
    fn loss_with_a_queue_is_congestion() {
        let mut g = LossGate::default();
        g.on_ack(100 * 1400, 5 * MS, MS / 5);
        assert!(g.on_loss(1400, false), "4.8 ms of queue");
        // On a long path the queue must exceed half the base RTT.
        g.on_ack(100 * 1400, 60 * MS, 50 * MS);
        assert!(!g.on_loss(1400, false), "10 ms over 50 ms is jitter");
        g.on_ack(100 * 1400, 80 * MS, 50 * MS);
        assert!(g.on_loss(1400, false));
    }

    #[test]
    fn heavy_loss_ecn_and_persistent_congestion_always_count() {
        let mut g = LossGate::default();
        g.on_ack(10 * 1400, MS, MS);
        assert!(g.on_loss(1400, false), "9% loss is too much to be random");
        let mut g = LossGate::default();
        g.on_ack(1000 * 1400, MS, MS);
        assert!(g.on_loss(0, false), "ECN mark");
        assert!(g.on_loss(1400, true), "persistent congestion");
    }

    #[test]
    fn the_loss_rate_follows_recent_traffic() {
        let mut g = LossGate::default();
        g.on_ack(1 << 20, MS, MS);
        g.on_loss(1 << 20, false);
        assert!(g.rate() > 0.4);
        for _ in 0..64 {
            g.on_ack(1 << 20, MS, MS);
        }
        assert!(g.rate() < 0.05, "old loss ages out: {}", g.rate());
    }
}
