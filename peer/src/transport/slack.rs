//! Timer slack for the runtime's threads while an endpoint gathers its reads.
//!
//! With reads gathered (`socket`), most of a busy node's remaining wakeups are timers: quinn's
//! pacing, loss and ACK timers, and the read tick itself, each due in some millisecond of the
//! runtime's timer wheel, so a node transferring at 100 Mbit/s still slept and woke about 780
//! times a second. While any endpoint in the process gathers, every runtime thread asks the
//! kernel for [`SLACK`] of timer slack (`PR_SET_TIMERSLACK`): a timer may then fire up to a
//! tick late, and timers due close together fire in one wakeup (about 470 a second). It is
//! the same permission as gathering: queues on every path (or long paths) make a millisecond
//! more cost nothing, while on a short-RTT path a loss-limited flow, which runs at a rate
//! proportional to 1/RTT, would slow down (slack everywhere made a plain-Cubic transfer at 1
//! Gbit/s with 2% loss 20% slower).
//!
//! A thread applies the setting itself, just before it parks ([`on_park`], installed as the
//! runtime's `on_thread_park` hook by the binary): timer slack is per thread.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The slack while reads are gathered: one read tick.
pub const SLACK: Duration = super::socket::TICK;

/// Endpoints gathering their reads now.
static GATHERING: AtomicUsize = AtomicUsize::new(0);

/// An endpoint starts (`true`) or stops gathering.
pub(crate) fn gathering(on: bool) {
    if on {
        GATHERING.fetch_add(1, Ordering::Relaxed);
    } else {
        GATHERING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs on a runtime thread before it parks: gives it [`SLACK`] while any endpoint gathers its
/// reads, the thread's default otherwise. One atomic load unless the answer changed.
pub fn on_park() {
    apply(GATHERING.load(Ordering::Relaxed) > 0);
}

fn apply(slack: bool) {
    thread_local! {
        static APPLIED: Cell<bool> = const { Cell::new(false) };
    }
    if APPLIED.get() == slack {
        return;
    }
    APPLIED.set(slack);
    // 0 restores the thread's default (the slack it inherited when created).
    let ns = if slack {
        SLACK.as_nanos() as libc::c_ulong
    } else {
        0
    };
    // SAFETY: PR_SET_TIMERSLACK takes plain integers and touches only this thread's slack.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot set the timer slack");
    }
}

#[cfg(test)]
mod tests {
    use super::{apply, SLACK};

    fn current() -> u64 {
        // SAFETY: PR_GET_TIMERSLACK reads this thread's slack; it returns it.
        unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) as u64 }
    }

    #[test]
    fn a_thread_takes_a_tick_of_slack_and_gives_it_back() {
        // A thread of its own: slack is per thread.
        std::thread::spawn(|| {
            let default = current();
            assert!(default < SLACK.as_nanos() as u64, "default {default} ns");
            apply(true);
            assert_eq!(current(), SLACK.as_nanos() as u64);
            apply(true);
            assert_eq!(current(), SLACK.as_nanos() as u64);
            apply(false);
            assert_eq!(current(), default);
        })
        .join()
        .unwrap();
    }
}
