//! What a benchmarked process cost: CPU time and peak resident memory, read from /proc while it
//! runs and from wait4's rusage when it ends.

use std::collections::HashMap;
use std::process::Child;

use anyhow::{bail, Result};

/// CPU seconds (user + system) a live process has used so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// A live process's CPU seconds so far, (user, system). System time is the kernel's work in
/// the process's context: socket calls and the network stack behind them, page-cache copies,
/// page faults; user time is the process's own code.
pub fn cpu_split(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) / hz, ticks(12) / hz)
}

/// Each live thread's time on a CPU so far, in nanoseconds: the scheduler's own count
/// (`/proc/PID/task/TID/schedstat`).
fn oncpu_threads(pid: u32) -> HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let ns = s.split_whitespace().next()?.parse::<u64>().ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}

/// A process's time on a CPU over a window, to the nanosecond, for a process that is nearly
/// idle: `/proc/PID/stat` counts in 10 ms ticks, and over 5 s one tick is 0.2% of a core.
/// Threads come and go (the runtime's blocking pool), so each is followed by its ID from the
/// first sample it appears in (from 0 when it started inside the window) to the last; call
/// [`OnCpu::sample`] often enough that an exiting thread's tail is small.
pub struct OnCpu {
    pid: u32,
    first: HashMap<String, u64>,
    last: HashMap<String, u64>,
}

impl OnCpu {
    pub fn start(pid: u32) -> OnCpu {
        let first = oncpu_threads(pid);
        OnCpu {
            pid,
            last: first.clone(),
            first,
        }
    }

    pub fn sample(&mut self) {
        self.last.extend(oncpu_threads(self.pid));
    }

    /// Seconds on a CPU since [`OnCpu::start`].
    pub fn secs(&self) -> f64 {
        let ns: u64 = self
            .last
            .iter()
            .map(|(tid, v)| v.saturating_sub(self.first.get(tid).copied().unwrap_or(0)))
            .sum();
        ns as f64 / 1e9
    }
}

/// The whole machine's CPU time so far, from the first line of /proc/stat: every process and
/// the kernel's work for them (softirqs included), in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MachineCpu {
    /// user + nice.
    pub user: f64,
    pub system: f64,
    /// Interrupts and softirqs (the network stack's receive work, tbf, veth).
    pub softirq: f64,
    /// Everything but idle and iowait.
    pub busy: f64,
    /// Everything.
    pub total: f64,
}

impl MachineCpu {
    pub fn now() -> MachineCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        Self::parse(stat.lines().next().unwrap_or(""))
    }

    /// The `cpu` line: user nice system idle iowait irq softirq steal ...
    fn parse(line: &str) -> MachineCpu {
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let total: f64 = v.iter().sum();
        MachineCpu {
            user: (at(0) + at(1)) / hz,
            system: at(2) / hz,
            softirq: (at(5) + at(6)) / hz,
            busy: (total - at(3) - at(4)) / hz,
            total: total / hz,
        }
    }

    /// What was spent between `before` and `self`.
    pub fn since(&self, before: &MachineCpu) -> MachineCpu {
        MachineCpu {
            user: self.user - before.user,
            system: self.system - before.system,
            softirq: self.softirq - before.softirq,
            busy: self.busy - before.busy,
            total: self.total - before.total,
        }
    }
}

/// A live process and its live descendants (nginx's workers, a shell's children).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                all.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    all
}

/// CPU seconds of a process tree so far.
pub fn tree_cpu_secs(pid: u32) -> f64 {
    tree(pid).into_iter().map(cpu_secs).sum()
}

/// The peak resident set of a live process (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What an ended child used.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Exit code; -1 when killed by a signal.
    pub code: i32,
    pub cpu_secs: f64,
    pub max_rss_kib: u64,
}

/// Reaps `pid` (our child) with wait4; `None` with `nohang` while it still runs.
pub fn reap(pid: u32, nohang: bool) -> Result<Option<Usage>> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if nohang { libc::WNOHANG } else { 0 };
    // SAFETY: waiting for our own child, with valid pointers.
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, flags, &mut usage) };
    if r < 0 {
        bail!("wait4({pid}): {}", std::io::Error::last_os_error());
    }
    if r == 0 {
        return Ok(None);
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok(Some(Usage {
        code,
        cpu_secs: t(usage.ru_utime) + t(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss.max(0) as u64,
    }))
}

/// A benchmarked child process, reaped exactly once.
pub struct Tracked {
    pub child: Child,
    pub usage: Option<Usage>,
}

impl Tracked {
    pub fn new(child: Child) -> Tracked {
        Tracked { child, usage: None }
    }

    /// Whether it has ended (reaping it if so).
    pub fn poll(&mut self) -> Result<bool> {
        if self.usage.is_none() {
            self.usage = reap(self.child.id(), true)?;
        }
        Ok(self.usage.is_some())
    }

    /// SIGKILL (if still running) and reap; what it used over its whole life.
    pub fn stop(&mut self) -> Result<Usage> {
        if let Some(u) = self.usage {
            return Ok(u);
        }
        // SAFETY: signalling our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let u = reap(self.child.id(), false)?.unwrap_or_default();
        self.usage = Some(u);
        Ok(u)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn machine_cpu_splits_the_stat_line() {
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let m = super::MachineCpu::parse("cpu  100 20 300 4000 50 6 70 0 0 0");
        assert_eq!(m.user, 120.0 / hz);
        assert_eq!(m.system, 300.0 / hz);
        assert_eq!(m.softirq, 76.0 / hz);
        assert_eq!(m.busy, (4546.0 - 4050.0) / hz);
        let later = super::MachineCpu::parse("cpu  200 20 300 4000 50 6 70 0 0 0");
        assert_eq!(later.since(&m).busy, 100.0 / hz);
    }

    use super::cpu_split;

    #[test]
    fn busy_work_shows_as_user_time_of_this_process() {
        let me = std::process::id();
        let (u0, _) = cpu_split(me);
        let t = std::time::Instant::now();
        let mut x = 0u64;
        // Spin until 0.1 s of user time shows (a busy machine only makes it take longer).
        let mut grew = 0.0;
        while grew < 0.1 && t.elapsed() < std::time::Duration::from_secs(20) {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            grew = cpu_split(me).0 - u0;
        }
        assert!(
            grew >= 0.1,
            "user time grew by {grew} s in 20 s of spinning"
        );
        assert!(cpu_split(me).1 >= 0.0);
        assert_eq!(
            cpu_split(u32::MAX),
            (0.0, 0.0),
            "a missing process costs nothing"
        );
    }
}
