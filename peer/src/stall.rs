//! A process's own clock of the time it could not run: a stopped or starved process (a CPU
//! quota's throttling, a paused VM, SIGSTOP) is silent to everyone, and on waking it must not
//! act on what it believed before the silence.
//!
//! A ticker marks the clock every [`TICK`] while the process runs; a gap of more than
//! [`MAX_GAP`] between two marks is a stall. Two users:
//! - the scheduler leaves stalls out of its time, so peers it could not hear meanwhile do not
//!   look gone ([`StallClock::now`]);
//! - a node reading an origin checks in with its schedulers after its own stall, since they
//!   may have chosen another reader meanwhile ([`StallClock::last_stall`], used by
//!   [`crate::fetch::GiveWay::check_in`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the clock is marked while the process runs.
pub const TICK: Duration = Duration::from_millis(200);
/// A longer gap between two marks is time this process could not run.
pub const MAX_GAP: Duration = Duration::from_secs(1);

/// See the module's documentation.
#[derive(Debug)]
pub struct StallClock {
    start: Instant,
    marks: Mutex<Marks>,
}

#[derive(Debug, Default)]
struct Marks {
    /// Wall time since `start` at the last mark.
    last: Duration,
    /// Stalled time left out so far (all of each stall beyond [`MAX_GAP`]).
    stalled: Duration,
    /// The latest stall.
    latest: Option<Stall>,
}

/// One stall: when it ended and how long the process could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    pub ended: Instant,
    /// The whole gap between the marks around it.
    pub length: Duration,
}

impl Default for StallClock {
    fn default() -> StallClock {
        StallClock {
            start: Instant::now(),
            marks: Mutex::default(),
        }
    }
}

impl StallClock {
    /// A clock; inside a tokio runtime its ticker starts too (it ends with the clock). Without
    /// one, every gap between reads longer than [`MAX_GAP`] is taken for a stall.
    pub fn new() -> Arc<StallClock> {
        let clock = Arc::new(StallClock::default());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&clock);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(c) = weak.upgrade() else { return };
                    c.now();
                }
            });
        }
        clock
    }

    /// Marks the clock and reads it: time since the start, less the stalls.
    pub fn now(&self) -> Duration {
        self.at(self.start.elapsed())
    }

    /// [`StallClock::now`] at `wall` time since the start.
    pub fn at(&self, wall: Duration) -> Duration {
        let mut m = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let gap = wall.saturating_sub(m.last);
        if gap > MAX_GAP {
            m.stalled += gap - MAX_GAP;
            m.latest = Some(Stall {
                ended: self.start + wall,
                length: gap,
            });
        }
        m.last = m.last.max(wall);
        wall.saturating_sub(m.stalled)
    }

    /// Marks the clock (so a stall that the ticker has not yet seen ends now) and returns the
    /// latest stall.
    pub fn last_stall(&self) -> Option<Stall> {
        self.now();
        self.marks.lock().unwrap_or_else(|p| p.into_inner()).latest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_clock_counts_a_running_process_quiet_time_and_leaves_out_its_stalls() {
        let c = StallClock::default();
        // Marked every 200 ms for 10 s: a quiet but running process. All of it counts.
        let mut t = Duration::ZERO;
        for _ in 0..50 {
            t += ms(200);
            assert_eq!(c.at(t), t);
        }
        assert_eq!(c.marks.lock().unwrap().latest, None);
        // Stopped 7 s: on waking, only the first second of it counts.
        assert_eq!(c.at(t + ms(7_000)), t + ms(1_000));
        let stall = c.marks.lock().unwrap().latest.expect("a stall");
        assert_eq!(stall.length, ms(7_000));
        assert_eq!(stall.ended, c.start + t + ms(7_000));
        // Then it runs on from there.
        assert_eq!(c.at(t + ms(7_200)), t + ms(1_200));
        // A late mark within the allowed gap is no stall.
        assert_eq!(c.at(t + ms(8_100)), t + ms(2_100));
        assert_eq!(c.marks.lock().unwrap().latest, Some(stall));
        // An earlier wall time (two threads reading) never moves the mark back.
        assert_eq!(c.at(t + ms(8_000)), t + ms(2_000));
        assert_eq!(c.at(t + ms(8_300)), t + ms(2_300));
    }

    #[tokio::test]
    async fn inside_a_runtime_the_ticker_keeps_marking_and_a_blocked_runtime_is_a_stall() {
        let c = StallClock::new();
        let wall = Instant::now();
        // 1.5 quiet seconds: the ticker marked them, so they all count (with no ticker, half
        // a second of it would be taken for a stall).
        tokio::time::sleep(ms(1_500)).await;
        let now = c.now();
        assert!(
            now + ms(50) >= wall.elapsed(),
            "{now:?} of {:?}",
            wall.elapsed()
        );
        assert_eq!(c.last_stall(), None);
        // The runtime's only thread blocked for 1.5 s: the ticker could not run. The stall
        // is seen at once, before the ticker runs again.
        std::thread::sleep(ms(1_500));
        let stall = c.last_stall().expect("the blocked runtime is a stall");
        assert!(stall.length >= ms(1_500), "{stall:?}");
    }
}
