//! A congestion controller for lossy links: Cubic that tells random loss from congestion.
//!
//! A loss-based controller shrinks its window on every loss. On a link that drops packets at
//! random (a bad radio hop, an overloaded overlay, a flaky NIC), that keeps the window far
//! below the path's capacity. Congestion fills a queue before it drops, so it shows as delay;
//! random loss does not. This controller passes a loss on to Cubic (which backs off) only
//! when it looks like congestion:
//! - the queue behind the latest acknowledged packet (its RTT above the path's minimum) is
//!   more than `max(MIN_QUEUE, min_rtt / 2)` **and** at least [`PEAK_SHARE`] of the largest
//!   queue seen in the last one to two seconds. A tail-drop queue drops when it is full, so a
//!   congestion loss comes with the queue near its peak; a random drop comes at any depth.
//!   (This is the "Spike" loss discrimination of the wireless-TCP literature.) Comparing with
//!   the peak matters where other, lossless flows keep a standing queue on the same
//!   bottleneck: the queue never falls under `MIN_QUEUE`, and judging by depth alone made
//!   every random loss congestion, so the lossy flow got a fraction of its share (a seed
//!   behind a lossy router, whose children's links are full of their other parents' flows).
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
/// A loss is congestion only with the queue at least this share of its recent peak.
pub const PEAK_SHARE: f64 = 0.5;
/// The peak queue is the largest seen over the last one to two of these.
const PEAK_SPAN: Duration = Duration::from_secs(1);
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
    acked: u64,
    lost: u64,
    /// The smallest RTT sample of the ACK being processed: its newest packet's, the others
    /// having waited for the ACK (one per 64 packets, `transport::ACK_EVERY`).
    batch: Option<Duration>,
    /// That sample for the last whole ACK: the RTT behind the latest acknowledged packet.
    latest: Option<Duration>,
    /// The largest `latest` in the current and the previous [`PEAK_SPAN`].
    peak: Duration,
    peak_before: Duration,
    span_start: Option<Instant>,
}

impl LossGate {
    /// One acknowledged packet: `bytes`, its RTT sample (sent to acknowledged), and the path's
    /// minimum RTT.
    pub fn on_ack(&mut self, bytes: u64, sample: Duration, min_rtt: Duration) {
        self.min_rtt = min_rtt;
        self.acked += bytes;
        self.batch = Some(self.batch.map_or(sample, |b| b.min(sample)));
        self.age();
    }

    /// The ACK's packets are all in: its newest sample is the latest RTT.
    pub fn on_end_acks(&mut self, now: Instant) {
        let Some(latest) = self.batch.take() else {
            return;
        };
        self.latest = Some(latest);
        let start = *self.span_start.get_or_insert(now);
        let since = now.saturating_duration_since(start);
        if since >= PEAK_SPAN {
            // After a quiet spell the last span is older than one span: it is forgotten too.
            self.peak_before = if since < 2 * PEAK_SPAN {
                self.peak
            } else {
                Duration::ZERO
            };
            self.peak = Duration::ZERO;
            self.span_start = Some(now);
        }
        self.peak = self.peak.max(latest);
    }

    /// Records a loss of `lost_bytes` and says whether the window should shrink for it.
    pub fn on_loss(&mut self, lost_bytes: u64, persistent: bool) -> bool {
        self.lost += lost_bytes;
        self.age();
        // An ECN mark (no bytes lost) or persistent congestion is never random.
        persistent || lost_bytes == 0 || self.queued() || self.rate() > MAX_RANDOM_LOSS
    }

    /// Whether the queue looks full enough for the loss to be its overflow. Before any RTT
    /// sample there is nothing to tell by, and every loss counts.
    fn queued(&self) -> bool {
        let Some(latest) = self.latest else {
            return true;
        };
        let queue = latest.saturating_sub(self.min_rtt);
        let peak = self.peak.max(self.peak_before).saturating_sub(self.min_rtt);
        queue > MIN_QUEUE.max(self.min_rtt / 2)
            && queue.as_secs_f64() >= PEAK_SHARE * peak.as_secs_f64()
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
        self.loss
            .on_ack(bytes, now.saturating_duration_since(sent), rtt.min());
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.loss.on_end_acks(now);
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

    /// One ACK of `packets` full packets, the newest with RTT `rtt`, at `at` after `t0`.
    fn ack(
        g: &mut LossGate,
        t0: Instant,
        at: Duration,
        packets: u64,
        rtt: Duration,
        min: Duration,
    ) {
        for i in (0..packets).rev() {
            // The older packets waited longer for the ACK.
            g.on_ack(1400, rtt + MS * i as u32 / 4, min);
        }
        g.on_end_acks(t0 + at);
    }

    #[test]
    fn random_loss_on_an_empty_queue_keeps_the_window() {
        let (mut g, t0) = (LossGate::default(), Instant::now());
        // 2% loss, RTT at its floor.
        for i in 0..50 {
            ack(&mut g, t0, MS * i, 49, MS / 5, MS / 5);
            assert!(!g.on_loss(1400, false));
        }
        assert!((g.rate() - 0.02).abs() < 0.001);
    }

    #[test]
    fn before_any_rtt_sample_every_loss_counts() {
        let mut g = LossGate::default();
        assert!(g.on_loss(1400, false));
    }

    #[test]
    fn loss_with_the_queue_at_its_peak_is_congestion() {
        let (mut g, t0) = (LossGate::default(), Instant::now());
        ack(&mut g, t0, MS, 100, 5 * MS, MS / 5);
        assert!(g.on_loss(1400, false), "4.8 ms of queue, its peak");
        // On a long path the queue must exceed half the base RTT.
        let mut g = LossGate::default();
        ack(&mut g, t0, MS, 100, 60 * MS, 50 * MS);
        assert!(!g.on_loss(1400, false), "10 ms over 50 ms is jitter");
        ack(&mut g, t0, 2 * MS, 100, 80 * MS, 50 * MS);
        assert!(g.on_loss(1400, false));
    }

    #[test]
    fn random_loss_well_under_the_recent_peak_queue_keeps_the_window() {
        // Other flows keep a standing queue on the bottleneck, peaking at 20 ms.
        let (mut g, t0) = (LossGate::default(), Instant::now());
        ack(&mut g, t0, 10 * MS, 64, 20 * MS, MS / 5);
        ack(&mut g, t0, 40 * MS, 64, 6 * MS, MS / 5);
        assert!(
            !g.on_loss(1400, false),
            "6 ms of queue, under half its 20 ms peak: not an overflow"
        );
        ack(&mut g, t0, 70 * MS, 64, 16 * MS, MS / 5);
        assert!(g.on_loss(1400, false), "16 ms: near the peak");
    }

    #[test]
    fn an_old_peak_ages_out() {
        let (mut g, t0) = (LossGate::default(), Instant::now());
        ack(&mut g, t0, Duration::ZERO, 64, 20 * MS, MS / 5);
        // The queue stays at 6 ms from then on: within two spans the old 20 ms peak is gone,
        // and 6 ms is the queue's peak again.
        let mut at = 100 * MS;
        while at < PEAK_SPAN * 2 + 100 * MS {
            ack(&mut g, t0, at, 64, 6 * MS, MS / 5);
            at += 100 * MS;
        }
        assert!(g.on_loss(1400, false));
    }

    #[test]
    fn a_peak_from_before_a_quiet_spell_is_forgotten() {
        let (mut g, t0) = (LossGate::default(), Instant::now());
        ack(&mut g, t0, Duration::ZERO, 64, 20 * MS, MS / 5);
        // Idle for 5 s, then 6 ms of queue.
        ack(&mut g, t0, 5 * PEAK_SPAN, 64, 6 * MS, MS / 5);
        assert!(g.on_loss(1400, false));
    }

    #[test]
    fn the_newest_packet_of_an_ack_gives_the_latest_rtt() {
        // An ACK of 64 packets whose oldest waited 16 ms more for it: the queue is the newest
        // packet's 2.8 ms (the oldest's 19 ms would pass for the 20 ms peak), so the loss is
        // random.
        let (mut g, t0) = (LossGate::default(), Instant::now());
        ack(&mut g, t0, Duration::ZERO, 64, 20 * MS, MS / 5);
        ack(&mut g, t0, 30 * MS, 64, 3 * MS, MS / 5);
        assert!(!g.on_loss(1400, false));
    }

    #[test]
    fn heavy_loss_ecn_and_persistent_congestion_always_count() {
        let (mut g, t0) = (LossGate::default(), Instant::now());
        ack(&mut g, t0, MS, 10, MS, MS);
        assert!(g.on_loss(1400, false), "9% loss is too much to be random");
        let mut g = LossGate::default();
        ack(&mut g, t0, MS, 1000, MS, MS);
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
