//! The integration-test harness. Tests run the real `starling` binary against real origins:
//! nginx and `python3 -m http.server` (which ignores Range), plus a small fault-injecting
//! origin for what real servers do on a bad day. Every process started here is killed by PID
//! when its guard drops.

pub mod chaos;
pub mod chart;
mod cluster;
mod fault;
pub mod garage;
pub mod hub;
pub mod kube;
mod lab;
pub mod netlab;
mod netns;
pub mod registry;
mod servers;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use cluster::{
    free_udp_port, metric_by_label, metric_value, scrape, scrape_at, Cluster, Node, SchedulerProc,
};
pub use fault::{FaultOrigin, Faults};
pub use lab::{Lab, ShaperCount};
pub use netns::Netns;
pub use servers::{Nginx, PyHttp};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The binary under test: $STARLING_BIN, else target/debug/starling (built by `cargo xtask test`).
pub fn starling_bin() -> PathBuf {
    let p = std::env::var_os("STARLING_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/debug/starling"));
    assert!(
        p.exists(),
        "{} does not exist: run the suite with `cargo xtask test`, or `cargo build -p starling` first",
        p.display()
    );
    p
}

/// A scratch area for one test: a data dir, an output dir and a config file with short
/// retry delays. Removed on drop.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    /// The network namespace its daemon runs in (a lab host), if any.
    pub netns: Option<String>,
}

/// The test's own RUST_LOG never reaches `starling` (its output is checked); to debug a run,
/// STARLING_TEST_RUST_LOG (e.g. `starling=debug`) does, as RUST_LOG.
fn pass_log_filter(c: &mut Command) {
    c.env_remove("RUST_LOG");
    if let Some(filter) = std::env::var_os("STARLING_TEST_RUST_LOG") {
        c.env("RUST_LOG", filter);
    }
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("starling-test-")
            .tempdir()
            .expect("create a temp dir");
        let s = Scratch { dir, netns: None };
        std::fs::create_dir_all(s.out_dir()).expect("create out dir");
        s.write_config("");
        s
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    pub fn out_dir(&self) -> PathBuf {
        self.path().join("out")
    }

    pub fn out(&self, name: &str) -> PathBuf {
        self.out_dir().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("starling.toml")
    }

    /// Writes the config: test-friendly source settings plus `extra` TOML (which may add
    /// tables such as [gc]).
    pub fn write_config(&self, extra: &str) {
        // Daemons in parallel tests must not fight over the default metrics port.
        let daemon = if extra.contains("[daemon]") {
            ""
        } else {
            "[daemon]\nmetrics_addr = \"\"\n"
        };
        // Nor over the default peer port.
        let peer = if extra.contains("[peer]") {
            ""
        } else {
            "[peer]\nlisten = \"127.0.0.1:0\"\n"
        };
        // Nor over the default proxy port.
        let proxy = if extra.contains("[proxy]") {
            ""
        } else {
            "[proxy]\nlisten = \"\"\n"
        };
        // And short retry delays, unless the test sets its own [source].
        let source = if extra.contains("[source]") {
            ""
        } else {
            "[source]\nbackoff_ms = 20\nattempts = 6\nidle_timeout_seconds = 5\n"
        };
        let text = format!(
            "data_dir = {:?}\n{extra}\n{daemon}{peer}{proxy}{source}",
            self.data_dir()
        );
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// `starling` with this scratch's config.
    pub fn starling(&self) -> Command {
        let mut c = Command::new(starling_bin());
        c.env("STARLING_CONFIG", self.config_path())
            .env_remove("STARLING_DATA_DIR");
        pass_log_filter(&mut c);
        c
    }

    /// `starling probe --json` of this scratch's daemon, once its eBPF probes have loaded (a
    /// daemon serves first and loads them on a low-priority thread, which on a busy machine
    /// can finish well after its first transfer); after 20 s, whatever it says.
    pub fn probe_report(&self) -> starling::netprobe::ProbeReport {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let out = self
                .starling()
                .args(["probe", "--json"])
                .output()
                .expect("run starling probe");
            assert!(
                out.status.success(),
                "starling probe: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let r: starling::netprobe::ProbeReport =
                serde_json::from_slice(&out.stdout).expect("probe JSON");
            if !r.detail.contains("still loading") || std::time::Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// `starling` in this scratch's namespace (for the daemon), else as [`Scratch::starling`].
    pub fn starling_in_ns(&self) -> Command {
        let Some(ns) = &self.netns else {
            return self.starling();
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(starling_bin())
            .env("STARLING_CONFIG", self.config_path())
            .env_remove("STARLING_DATA_DIR");
        pass_log_filter(&mut c);
        c
    }

    /// Runs `starling get URL -O out/NAME extra...`.
    pub fn get(&self, url: &str, name: &str, extra: &[&str]) -> Run {
        let mut c = self.starling();
        c.arg("get")
            .arg(url)
            .arg("-O")
            .arg(self.out(name))
            .args(extra);
        let mut r = Run::of(&mut c);
        if r.code == TIMED_OUT {
            // A hung download: what its daemon was doing.
            let log = std::fs::read_to_string(self.path().join("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            r.stderr.push_str("the daemon's last log lines:\n");
            for line in tail.iter().rev() {
                r.stderr.push_str(line);
                r.stderr.push('\n');
            }
        }
        r
    }

    /// The task directories in the store.
    pub fn tasks(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.data_dir().join("tasks"))
            .map(|it| it.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// A finished command.
pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// The longest a test's command may run ([`Run::of`]): past it the command is killed and its
/// test fails with what it printed, instead of stalling the whole suite until CI's limit.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(600);

/// [`Run::code`] of a command killed at its time limit.
pub const TIMED_OUT: i32 = -2;

impl Run {
    /// Runs `cmd` to the end, or for [`COMMAND_LIMIT`] at most.
    pub fn of(cmd: &mut Command) -> Run {
        Run::within(cmd, COMMAND_LIMIT)
    }

    /// Runs `cmd` (stdin closed, output captured) for `limit` at most; then kills it (by its
    /// PID) and returns what it printed, with code [`TIMED_OUT`].
    pub fn within(cmd: &mut Command, limit: Duration) -> Run {
        use std::io::Read;
        use std::sync::{Arc, Mutex};
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the command");
        // Read as it comes, so a killed command's output is kept even if a process it started
        // still holds the pipe.
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let into = buf.clone();
            let reader = std::thread::spawn(move || {
                let Some(mut pipe) = pipe else { return };
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    into.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&chunk[..n]);
                }
            });
            (buf, reader)
        };
        let (out, out_reader) = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let (err, err_reader) = drain(child.stderr.take().map(|p| Box::new(p) as _));
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if start.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        if status.is_some() {
            let _ = out_reader.join();
            let _ = err_reader.join();
        }
        let take = |b: &Arc<Mutex<Vec<u8>>>| {
            std::mem::take(&mut *b.lock().unwrap_or_else(|p| p.into_inner()))
        };
        let mut stderr = String::from_utf8_lossy(&take(&err)).into_owned();
        let code = match status {
            Some(s) => s.code().unwrap_or(-1),
            None => {
                stderr.push_str(&format!(
                    "\n[killed: still running after {limit:?}: {cmd:?}]\n"
                ));
                TIMED_OUT
            }
        };
        Run {
            code,
            stdout: take(&out),
            stderr,
        }
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "expected success; stderr:\n{}", self.stderr);
        self
    }

    #[track_caller]
    pub fn fails_with(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit code {code}; stderr:\n{}",
            self.stderr
        );
        self
    }
}

/// Deterministic pseudo-random bytes (splitmix64), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed;
    while out.len() < len {
        x = x.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of a file as `sha256:<hex>`, computed by coreutils' sha256sum (independent of the
/// code under test).
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    let hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    format!("sha256:{hex}")
}

/// SHA-256 of bytes, by sha256sum through a temp file.
pub fn sha256_bytes(data: &[u8]) -> String {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(f.path(), data).expect("write temp file");
    sha256_file(f.path())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    unique_port(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port")
    })
}

/// A port from `pick` that this process has not handed out before: the kernel may give the
/// same ephemeral port to two probes in a row (each probe's socket is closed at once), and two
/// settings of one config (a proxy and a metrics address) must not collide.
pub fn unique_port(pick: impl Fn() -> u16) -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let p = pick();
        if given.insert(p) {
            return p;
        }
    }
}

static CPUS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by every test of a binary whose tests may run side by side, while one of them measures
/// a rate that CPU contention would skew (see [`cpus_to_itself`]).
pub fn sharing_the_cpus() -> std::sync::RwLockReadGuard<'static, ()> {
    CPUS.read().unwrap_or_else(|p| p.into_inner())
}

/// Waits until no other test of this binary holds [`sharing_the_cpus`], and keeps them out:
/// for a test that measures a share of a link, which 2 cores shared with other swarms would
/// decide instead of the code under test.
pub fn cpus_to_itself() -> std::sync::RwLockWriteGuard<'static, ()> {
    CPUS.write().unwrap_or_else(|p| p.into_inner())
}

/// A local API `get` of `url` (a task named by its URL, the default piece length) into `out`,
/// hard-linked from the store where it can be.
pub fn api_get_request(url: &str, out: &Path) -> starling::daemon::api::GetRequest {
    starling::daemon::api::GetRequest {
        request: starling::core::Request {
            url: url.to_string(),
            digest: None,
            headers: Default::default(),
            piece_length: None,
        },
        output: out.to_path_buf(),
        no_hardlink: false,
    }
}

/// Waits until something accepts on 127.0.0.1:port.
pub fn wait_for_port(port: u16, what: &str) {
    wait_for_addr("127.0.0.1", port, what);
}

/// Waits until something accepts on host:port.
pub fn wait_for_addr(host: &str, port: u16, what: &str) {
    wait_until(Duration::from_secs(15), what, || {
        std::net::TcpStream::connect((host, port)).is_ok()
    });
}

/// Polls `cond` every 10 ms until it holds, or panics naming `what` after `limit`.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(limit, cond),
        "timed out after {limit:?} waiting for {what}"
    );
}

/// Checks `cond` every 10 ms until it holds (true) or `limit` passes (false).
pub fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when running as root (the tests that mount file systems need it).
/// A process's user + system CPU seconds so far (from /proc/PID/stat; 0 if it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after its closing ')'.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// Raises this process's soft open-file limit to its hard limit (tests that hold thousands of
/// connections).
pub fn raise_own_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Starts a helper server (`python3 SCRIPT ARGS...`) that prints `ready PORT...` on its first
/// line once it listens; returns it and those ports. `what` says what to install if it fails.
pub fn start_ready(
    script: &str,
    args: &[&std::ffi::OsStr],
    what: &str,
) -> (std::process::Child, Vec<u16>) {
    use std::io::BufRead;
    let mut child = Command::new("python3")
        .arg(root().join(script))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {script}: {e} ({what})"));
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("its first line");
    let ports: Vec<u16> = line
        .strip_prefix("ready ")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if ports.is_empty() {
        kill_pid(child.id(), libc::SIGKILL);
        let _ = child.wait();
        panic!("{script} did not start ({what}): {line:?}");
    }
    (child, ports)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Kills a process by PID (never by name).
pub fn kill_pid(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a PID we started.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// A `starling daemon` for one scratch area, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn start(s: &Scratch) -> Daemon {
        let mut d = Daemon::spawn(s);
        d.wait_ready(s);
        d
    }

    /// Starts the daemon with its open-file limit (soft and hard) at `nofile`, and waits.
    pub fn start_limited(s: &Scratch, nofile: u64) -> Daemon {
        use std::os::unix::process::CommandExt;
        Daemon::start_with(s, |cmd| {
            // SAFETY: only setrlimit between fork and exec, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: nofile,
                        rlim_max: nofile,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }

    /// Starts the daemon with `configure` applied to its command (environment, limits), and
    /// waits.
    pub fn start_with(s: &Scratch, configure: impl FnOnce(&mut Command)) -> Daemon {
        let mut d = Daemon::spawn_with(s, configure);
        d.wait_ready(s);
        d
    }

    /// Starts the daemon without waiting for it (see [`Daemon::wait_ready`]).
    pub fn spawn(s: &Scratch) -> Daemon {
        Daemon::spawn_with(s, |_| {})
    }

    fn spawn_with(s: &Scratch, configure: impl FnOnce(&mut Command)) -> Daemon {
        let socket = s.data_dir().join("starling.sock");
        // Appended to: a restarted daemon's log follows the killed one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.path().join("daemon.log"))
            .expect("daemon log");
        let mut cmd = s.starling_in_ns();
        cmd.args(["-v", "daemon"]).stderr(log);
        configure(&mut cmd);
        let child = cmd.spawn().expect("start the daemon");
        Daemon { child, socket }
    }

    /// Waits until the daemon answers on its socket (it listens for peers before that).
    pub fn wait_ready(&mut self, s: &Scratch) {
        wait_until(Duration::from_secs(15), "the daemon's socket", || {
            if let Some(exited) = self.child.try_wait().ok().flatten() {
                let log = std::fs::read_to_string(s.path().join("daemon.log")).unwrap_or_default();
                panic!("the daemon exited ({exited}) before opening its socket; its log:\n{log}");
            }
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
        });
    }

    /// Stops it with SIGTERM and waits; returns whether it exited cleanly.
    pub fn stop(mut self) -> bool {
        kill_pid(self.child.id(), libc::SIGTERM);
        let ok = self.child.wait().map(|s| s.success()).unwrap_or(false);
        std::mem::forget(self);
        ok
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill_pid(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_gives_its_output_and_a_hung_one_is_killed_at_its_limit() {
        let r = Run::of(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]));
        assert_eq!((r.code, r.stdout.as_slice()), (3, &b"out\n"[..]));
        assert_eq!(r.stderr, "err\n");
        let start = Instant::now();
        let r = Run::within(
            Command::new("sh").args(["-c", "echo started >&2; exec sleep 30"]),
            Duration::from_millis(300),
        );
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(r.code, TIMED_OUT);
        assert!(r.stderr.starts_with("started\n"), "{}", r.stderr);
        assert!(
            r.stderr.contains("killed: still running after"),
            "{}",
            r.stderr
        );
    }
}
