//! Garbage collection. The policy is a pure function (tested below); `Store::gc` gathers the
//! facts and carries it out. Two triggers:
//! - TTL: a task unused for longer than `ttl_seconds` is evicted;
//! - watermarks: above `high_watermark` of capacity, the least recently used tasks are evicted
//!   until usage is under `low_watermark`.
//!
//! A task in use (any lease held, by any process) is never a candidate.

use std::time::{Duration, SystemTime};

use crate::config::GcConfig;

#[derive(Clone, Debug)]
pub struct GcEntry {
    pub name: String,
    pub bytes: u64,
    pub last_used: SystemTime,
    pub in_use: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub used: u64,
    pub capacity: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Expired,
    Watermark,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::Expired => "ttl",
            Reason::Watermark => "watermark",
        })
    }
}

/// Which entries to evict, and why, in eviction order.
pub fn choose_victims(
    entries: &[GcEntry],
    now: SystemTime,
    cfg: &GcConfig,
    usage: Usage,
) -> Vec<(usize, Reason)> {
    let ttl = Duration::from_secs(cfg.ttl_seconds);
    let mut victims = Vec::new();
    let mut used = usage.used;
    let mut lru: Vec<usize> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.in_use {
            continue;
        }
        let idle = now.duration_since(e.last_used).unwrap_or_default();
        if idle > ttl {
            victims.push((i, Reason::Expired));
            used = used.saturating_sub(e.bytes);
        } else {
            lru.push(i);
        }
    }
    let cap = usage.capacity as f64;
    if usage.capacity > 0 && used as f64 > cfg.high_watermark * cap {
        lru.sort_by_key(|&i| (entries[i].last_used, entries[i].name.clone()));
        for i in lru {
            if used as f64 <= cfg.low_watermark * cap {
                break;
            }
            victims.push((i, Reason::Watermark));
            used = used.saturating_sub(entries[i].bytes);
        }
    }
    victims
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, bytes: u64, age_s: u64, in_use: bool, now: SystemTime) -> GcEntry {
        GcEntry {
            name: name.into(),
            bytes,
            last_used: now - Duration::from_secs(age_s),
            in_use,
        }
    }

    fn cfg(ttl: u64) -> GcConfig {
        GcConfig {
            ttl_seconds: ttl,
            capacity_bytes: 0,
            high_watermark: 0.8,
            low_watermark: 0.5,
        }
    }

    fn victims(
        e: &[GcEntry],
        now: SystemTime,
        ttl: u64,
        used: u64,
        capacity: u64,
    ) -> Vec<(usize, Reason)> {
        choose_victims(e, now, &cfg(ttl), Usage { used, capacity })
    }

    #[test]
    fn ttl_evicts_idle_but_never_in_use() {
        let now = SystemTime::now();
        let e = [
            entry("old", 10, 100, false, now),
            entry("busy", 10, 100, true, now),
            entry("new", 10, 1, false, now),
        ];
        let v = victims(&e, now, 50, 30, 1000);
        assert_eq!(v, vec![(0, Reason::Expired)]);
    }

    #[test]
    fn watermark_evicts_lru_down_to_low_mark_skipping_in_use() {
        let now = SystemTime::now();
        let e = [
            entry("c", 30, 10, false, now),
            entry("a", 30, 30, true, now), // oldest, but in use
            entry("b", 30, 20, false, now),
            entry("d", 10, 5, false, now),
        ];
        // 100 used of 100: above 0.8; must get to <= 50.
        let v = victims(&e, now, 3600, 100, 100);
        assert_eq!(v, vec![(2, Reason::Watermark), (0, Reason::Watermark)]);
    }

    #[test]
    fn below_high_mark_nothing_happens() {
        let now = SystemTime::now();
        let e = [entry("a", 70, 10, false, now)];
        assert!(victims(&e, now, 3600, 79, 100).is_empty());
        assert!(victims(&e, now, 3600, 79, 0).is_empty());
    }

    #[test]
    fn expired_bytes_count_toward_the_watermark() {
        let now = SystemTime::now();
        let e = [
            entry("old", 60, 100, false, now),
            entry("x", 30, 1, false, now),
        ];
        let v = victims(&e, now, 50, 90, 100);
        assert_eq!(v, vec![(0, Reason::Expired)]);
    }
}
