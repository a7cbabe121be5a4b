//! A byte-rate limit shared by whoever sends or receives through it: each transfer reserves
//! its share of time in order (uploads to peers, reads from the origin).

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Pacer {
    bytes_per_second: f64,
    next: Mutex<Instant>,
}

impl Pacer {
    /// A limit of `mbps` megabits per second; None for 0 (or less): no limit.
    pub fn mbps(mbps: f64) -> Option<Pacer> {
        (mbps > 0.0).then(|| Pacer {
            bytes_per_second: mbps * 125_000.0,
            next: Mutex::new(Instant::now()),
        })
    }

    /// Reserves `bytes`' time; returns when they may start.
    pub fn reserve(&self, bytes: u64) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(Instant::now());
        *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second);
        start
    }

    /// Waits until `bytes` just moved fit the rate (their time is reserved after any before).
    pub async fn after(&self, bytes: u64) {
        let start = self.reserve(bytes);
        let due = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second);
        tokio::time::sleep_until(due.into()).await;
    }

    pub fn mbps_limit(&self) -> f64 {
        self.bytes_per_second / 125_000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_each_other_at_the_rate() {
        let p = Pacer::mbps(8.0).expect("a limit"); // 1 MB/s
        let a = p.reserve(500_000);
        let b = p.reserve(500_000);
        let gap = b.duration_since(a).as_secs_f64();
        assert!((gap - 0.5).abs() < 0.01, "{gap}");
        assert!(Pacer::mbps(0.0).is_none());
    }
}
