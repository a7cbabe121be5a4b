//! The chaos swarm: a seed and a scheduler on host 0, N peers on hosts 1..=N and an nginx origin
//! on a host of its own, every link shaped by tbf, all in network namespaces. Every peer asks
//! its daemon for one file at once; meanwhile, with `faults` on:
//! - a quarter of the peers are killed with SIGKILL at random moments, and half of those are
//!   restarted 1–3 s later and asked again (they must resume from their verified pieces);
//! - the seed is killed at about half-way (the mean peer progress) and stays dead;
//! - the scheduler is restarted twice (at a quarter and at seven tenths);
//! - the first peer to finish has every piece of its stored copy corrupted (what a bad disk
//!   does), and keeps serving it;
//! - a third of the peers' links drop `loss` of their packets at random, both ways.
//!
//! Random choices come from `Plan::rng`, so a run can be repeated. [`run`] reports what every
//! peer got (each output is checked against the file's SHA-256 when its get answers), the
//! origin's bytes and how often each piece was read from it (nginx logs each request's Range),
//! the pieces no live peer held when the seed died, and what restarted peers fetched again.
//! The same plan without faults is the baseline for completion times.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use starling::daemon::api::{ApiEvent, ApiRequest};

use crate::{random_bytes, sha256_bytes, sha256_file, Cluster, Lab, Nginx};

/// One run's shape.
#[derive(Clone, Debug)]
pub struct Plan {
    pub peers: usize,
    pub size_mib: u64,
    /// Every link's rate, each way.
    pub mbit: u32,
    /// The lab's subnet (198.18.<subnet>.0/24).
    pub subnet: u8,
    /// Seeds the random choices (victims, moments, delays).
    pub rng: u64,
    /// Inject the faults; false is the clean baseline.
    pub faults: bool,
    /// Drop rate on the lossy third of the peers' links, each way.
    pub loss: f64,
    /// The whole run fails after this long.
    pub limit: Duration,
}

/// What happened to one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerOutcome {
    /// Seconds from the start to its get's final answer (None: killed for good, or failed).
    pub done_at: Option<f64>,
    /// Its output matched the file's SHA-256 when the get answered.
    pub verified: bool,
    /// A get that failed while its daemon was alive: the message.
    pub error: Option<String>,
    pub killed: bool,
    pub restarted: bool,
    /// For a restarted peer: bytes its verified pieces held at the restart, and what its
    /// second get fetched (from peers and the origin).
    pub resumed_bytes: u64,
    pub fetched_after_restart: u64,
    pub lossy: bool,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub size: u64,
    pub piece_length: u64,
    pub peers: Vec<PeerOutcome>,
    /// Seconds until the last surviving peer's get answered.
    pub wall: f64,
    /// Body bytes the origin sent over the run.
    pub origin_bytes: u64,
    /// The same, counted from the seed's death on.
    pub origin_bytes_after_seed: u64,
    /// When the seed was killed (seconds), and the mean peer progress then.
    pub seed_killed_at: Option<(f64, f64)>,
    /// Fraction of the file's pieces no live peer held when the seed died.
    pub missing_at_seed_death: f64,
    /// How many times each piece was read from the origin after the seed died (pieces read at
    /// least once).
    pub origin_reads_after_seed: BTreeMap<u64, u32>,
    /// The same over the whole run.
    pub origin_reads: BTreeMap<u64, u32>,
    /// The scheduler restarts (seconds).
    pub scheduler_restarts: Vec<f64>,
    /// The peer whose stored copy was corrupted, and when.
    pub corrupted: Option<(usize, f64)>,
    /// Fraction of the pieces that no live node but the corrupted peer held then (its bad
    /// disk destroyed the only copies: they must come from the origin again).
    pub lost_to_bad_disk: f64,
    /// Piece failures summed over the live daemons at the end, by cause.
    pub piece_failures: BTreeMap<String, f64>,
    pub blacklisted: f64,
    /// Events in order, for the report: (seconds, what).
    pub events: Vec<(f64, String)>,
}

impl Report {
    /// Peers that ended alive (not killed for good).
    pub fn survivors(&self) -> impl Iterator<Item = &PeerOutcome> {
        self.peers.iter().filter(|p| !p.killed || p.restarted)
    }

    /// Outputs that answered complete but did not match the digest (must be 0).
    pub fn bad_outputs(&self) -> usize {
        self.peers
            .iter()
            .filter(|p| p.done_at.is_some() && !p.verified)
            .count()
    }

    /// Bytes of verified pieces that restarted peers fetched again (must be about 0: at most
    /// the pieces in flight at the kill, which were not yet verified, are fetched again).
    pub fn refetched_after_restart(&self) -> u64 {
        self.peers
            .iter()
            .filter(|p| p.restarted)
            .map(|p| (p.fetched_after_restart + p.resumed_bytes).saturating_sub(self.size))
            .sum()
    }

    /// The bound on origin bytes: (1 + the fraction missing at the seed's death) × F,
    /// plus the pieces the bad disk destroyed the only copies of.
    pub fn origin_bound(&self) -> f64 {
        (1.0 + self.missing_at_seed_death + self.lost_to_bad_disk) * self.size as f64
    }
}

/// A small xorshift generator: the choices are repeatable from `Plan::rng`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [lo, hi).
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (self.next() % 1_000_000) as f64 / 1e6 * (hi - lo)
    }
}

/// Shared between the controller and one peer's worker thread.
#[derive(Default)]
struct PeerState {
    done_bytes: AtomicU64,
    /// Set before the controller kills the daemon; cleared when it has been restarted.
    killed: AtomicBool,
    /// Killed and never to be restarted.
    gone: AtomicBool,
    restarts: AtomicU64,
    finished: AtomicBool,
    outcome: Mutex<PeerOutcome>,
}

/// A planned fault, fired when the mean peer progress reaches `at`.
#[derive(Clone, Debug)]
enum Fault {
    KillPeer {
        peer: usize,
        restart_after: Option<f64>,
    },
    KillSeed,
    RestartScheduler,
}

/// Runs one plan. Needs root (namespaces) and nginx.
pub fn run(plan: &Plan) -> Result<Report, String> {
    if plan.peers < 4 {
        return Err(format!(
            "a chaos swarm needs at least 4 peers, not {}",
            plan.peers
        ));
    }
    let size = plan.size_mib * 1024 * 1024;
    let www = tempfile::Builder::new()
        .prefix("starling-chaos-www-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let data = random_bytes(size as usize, plan.rng ^ 0xc4a05);
    let want = sha256_bytes(&data);
    std::fs::write(www.path().join("artifact.bin"), &data).map_err(|e| format!("write: {e}"))?;
    drop(data);
    let origin_host = plan.peers + 1;
    let lab = Lab::new("ch", plan.subnet, plan.peers + 2, plan.mbit)?;
    let nginx = Nginx::start_in(
        www.path(),
        None,
        Some(&lab.hosts[origin_host].ns),
        &lab.hosts[origin_host].addr,
    );
    let url = nginx.url("artifact.bin");
    let mut cluster = Cluster::new_in(Some(&lab), plan.peers, "", "");
    let mut rng = Rng(plan.rng);
    // A third of the peers drop packets at random.
    let lossy: Vec<bool> = (0..=plan.peers)
        .map(|i| plan.faults && i > 0 && i % 3 == 0)
        .collect();
    for (i, l) in lossy.iter().enumerate() {
        if *l {
            lab.drop_at_random(i, plan.loss)?;
        }
    }
    let mut faults: Vec<(f64, Fault)> = Vec::new();
    if plan.faults {
        let victims = (plan.peers / 4).max(1);
        let mut pool: Vec<usize> = (1..=plan.peers).collect();
        for k in 0..victims {
            let peer = pool.swap_remove((rng.next() % pool.len() as u64) as usize);
            let restart_after = (k % 2 == 0).then(|| rng.between(1.0, 3.0));
            faults.push((
                rng.between(0.05, 0.85),
                Fault::KillPeer {
                    peer,
                    restart_after,
                },
            ));
        }
        faults.push((0.5, Fault::KillSeed));
        faults.push((0.25, Fault::RestartScheduler));
        faults.push((0.7, Fault::RestartScheduler));
        faults.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    cluster.start_all_at_once();
    // A running cluster: the scheduler knows every node (the seed above all) before anyone
    // asks, as when a seed has served for a while.
    if let Some(sched) = &cluster.scheduler {
        let (host, port, want) = (
            cluster.scheduler_host.clone(),
            sched.metrics_port,
            (plan.peers + 1) as f64,
        );
        let known = crate::poll_until(Duration::from_secs(30), || {
            crate::metric_value(&crate::scrape_at(&host, port), "starling_scheduler_peers") >= want
        });
        if !known {
            return Err("the scheduler did not hear from every node within 30 s".into());
        }
    }
    let states: Vec<PeerState> = (0..=plan.peers).map(|_| PeerState::default()).collect();
    for (i, s) in states.iter().enumerate() {
        s.outcome.lock().map_err(|_| "lock")?.lossy = lossy[i];
    }
    let sockets: Vec<PathBuf> = cluster
        .nodes
        .iter()
        .map(|n| n.scratch.data_dir().join("starling.sock"))
        .collect();
    let outs: Vec<PathBuf> = cluster
        .nodes
        .iter()
        .map(|n| n.scratch.out("artifact.bin"))
        .collect();
    let mut report = Report {
        size,
        ..Report::default()
    };
    let start = Instant::now();
    let since = |t: Instant| t.duration_since(start).as_secs_f64();
    let total = size as f64 * plan.peers as f64;
    // The origin's log length and bytes when the seed died.
    let mut seed_mark: Option<(usize, u64)> = None;
    std::thread::scope(|sc| -> Result<(), String> {
        for i in 1..=plan.peers {
            let (st, socket, out, url, want) = (&states[i], &sockets[i], &outs[i], &url, &want);
            sc.spawn(move || worker(st, socket, out, url, want, start));
        }
        let mut pending = faults.clone();
        // (peer, restart at) for killed peers to bring back.
        let mut restarts: Vec<(usize, Instant)> = Vec::new();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let progress = states[1..]
                .iter()
                .map(|s| s.done_bytes.load(Ordering::Relaxed) as f64)
                .sum::<f64>()
                / total;
            let now = Instant::now();
            while pending.first().is_some_and(|(at, _)| progress >= *at) {
                let (_, fault) = pending.remove(0);
                match fault {
                    Fault::KillPeer {
                        peer,
                        restart_after,
                    } => {
                        let s = &states[peer];
                        s.killed.store(true, Ordering::SeqCst);
                        if restart_after.is_none() {
                            s.gone.store(true, Ordering::SeqCst);
                        }
                        if let Ok(mut o) = s.outcome.lock() {
                            o.killed = true;
                        }
                        cluster.nodes[peer].kill();
                        report
                            .events
                            .push((since(now), format!("kill -9 peer {peer}")));
                        if let Some(d) = restart_after {
                            restarts.push((peer, now + Duration::from_secs_f64(d)));
                        }
                    }
                    Fault::KillSeed => {
                        seed_mark = Some((nginx.requests(), nginx.bytes_sent()));
                        cluster.nodes[0].kill();
                        let at = since(Instant::now());
                        // Then what the live peers hold between them: with the seed gone,
                        // that changes only once someone reads the origin again (the
                        // scheduler waits 5 s of silence first), and the few API calls here
                        // take less.
                        let held = live_union(&states, &sockets, &url, None);
                        report.piece_length = held.1;
                        report.missing_at_seed_death = held.0;
                        report.seed_killed_at = Some((at, progress));
                        report.events.push((
                            at,
                            format!(
                                "kill -9 the seed at {:.0}% (pieces held by no live peer: {:.1}%)",
                                progress * 100.0,
                                held.0 * 100.0
                            ),
                        ));
                    }
                    Fault::RestartScheduler => {
                        cluster.restart_scheduler();
                        let at = since(Instant::now());
                        report.scheduler_restarts.push(at);
                        report.events.push((at, "scheduler restarted".to_string()));
                    }
                }
            }
            // Bring back the killed peers that are due.
            let (due, later): (Vec<_>, Vec<_>) =
                restarts.into_iter().partition(|(_, at)| *at <= now);
            restarts = later;
            for (peer, _) in due {
                cluster.nodes[peer].start();
                let (resumed, piece) = verified_bytes(&sockets[peer], &url);
                if report.piece_length == 0 {
                    report.piece_length = piece;
                }
                let s = &states[peer];
                if let Ok(mut o) = s.outcome.lock() {
                    o.restarted = true;
                    o.resumed_bytes = resumed;
                }
                s.restarts.fetch_add(1, Ordering::SeqCst);
                s.killed.store(false, Ordering::SeqCst);
                report.events.push((
                    since(Instant::now()),
                    format!(
                        "peer {peer} restarted, holding {} MiB verified",
                        resumed >> 20
                    ),
                ));
            }
            // The first peer to finish (and not about to be killed) gets a bad disk.
            if plan.faults && report.corrupted.is_none() {
                let victim = (1..=plan.peers).find(|i| {
                    states[*i].finished.load(Ordering::SeqCst)
                        && !states[*i].killed.load(Ordering::SeqCst)
                        && !pending
                            .iter()
                            .any(|(_, f)| matches!(f, Fault::KillPeer { peer, .. } if peer == i))
                });
                if let Some(v) = victim {
                    // While the seed lives it holds every piece; else what only the victim
                    // holds is lost with its disk.
                    if report.seed_killed_at.is_some() {
                        report.lost_to_bad_disk = live_union(&states, &sockets, &url, Some(v)).0;
                    }
                    corrupt_store(&cluster.nodes[v].scratch.tasks(), size);
                    report.corrupted = Some((v, since(now)));
                    report.events.push((
                        since(now),
                        format!(
                            "every piece of peer {v}'s stored copy corrupted (held by no other \
                             live node: {:.1}%)",
                            report.lost_to_bad_disk * 100.0
                        ),
                    ));
                }
            }
            let settled = states[1..]
                .iter()
                .all(|s| s.finished.load(Ordering::SeqCst) || s.gone.load(Ordering::SeqCst));
            if settled && restarts.is_empty() {
                break;
            }
            if start.elapsed() > plan.limit {
                // Unblock the workers: kill every daemon, so every get answers.
                for s in &states {
                    s.gone.store(true, Ordering::SeqCst);
                    s.killed.store(true, Ordering::SeqCst);
                }
                for n in &mut cluster.nodes {
                    n.kill();
                }
                return Err(format!(
                    "the chaos swarm did not settle within {:?}; events so far: {:?}",
                    plan.limit, report.events
                ));
            }
        }
        Ok(())
    })?;
    for s in &states[1..] {
        report
            .peers
            .push(s.outcome.lock().map_err(|_| "lock")?.clone());
    }
    report.wall = report
        .peers
        .iter()
        .filter_map(|p| p.done_at)
        .fold(0.0, f64::max);
    if report.piece_length == 0 {
        report.piece_length = (1..=plan.peers)
            .find_map(|i| {
                cluster.nodes[i].pid()?;
                Some(verified_bytes(&sockets[i], &url).1)
            })
            .unwrap_or(0);
    }
    let reads = nginx.ranges();
    report.origin_bytes = nginx.bytes_sent();
    report.origin_bytes_after_seed = seed_mark.map_or(0, |(_, b)| report.origin_bytes - b);
    let per_piece = |reads: &[(u64, u64)]| {
        let mut m = BTreeMap::new();
        let p = report.piece_length.max(1);
        for (start, len) in reads {
            // Pieces the response covered whole.
            let (first, end) = (start.div_ceil(p), (start + len) / p);
            for piece in first..end.max(first) {
                *m.entry(piece).or_insert(0) += 1;
            }
            // A response shorter than a piece (the file's tail).
            if len < &p && start + len == size {
                *m.entry(start / p).or_insert(0) += 1;
            }
        }
        m
    };
    report.origin_reads = per_piece(&reads);
    report.origin_reads_after_seed = match seed_mark {
        Some((n, _)) => per_piece(&reads[n.min(reads.len())..]),
        None => BTreeMap::new(),
    };
    if let Some(to) = std::env::var_os("STARLING_CHAOS_LOGS") {
        keep_logs(&cluster, std::path::Path::new(&to));
    }
    for n in &cluster.nodes {
        if n.pid().is_none() {
            continue;
        }
        let text = n.metrics();
        for (cause, v) in crate::metric_by_label(&text, "starling_piece_failures_total", "cause") {
            *report.piece_failures.entry(cause).or_insert(0.0) += v;
        }
        report.blacklisted += crate::metric_value(&text, "starling_parents_blacklisted_total");
    }
    Ok(report)
}

/// One peer: asks its daemon for the file; when the daemon is killed under it, waits for the
/// restart and asks again.
fn worker(st: &PeerState, socket: &Path, out: &Path, url: &str, want: &str, start: Instant) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(st, format!("tokio runtime: {e}")),
    };
    // A hard link where it can, as users get: the corruption comes only after this peer's
    // output was checked (a bad disk then reaches a linked output too).
    let req = crate::api_get_request(url, out);
    loop {
        let gen = st.restarts.load(Ordering::SeqCst);
        let answer = rt.block_on(starling::daemon::client_get(socket, &req, |_, d| {
            st.done_bytes.store(d, Ordering::Relaxed)
        }));
        match answer {
            Ok(Some(ApiEvent::Done {
                parent_bytes,
                origin_bytes,
                ..
            })) => {
                let at = start.elapsed().as_secs_f64();
                let verified = sha256_file(out) == want;
                if let Ok(mut o) = st.outcome.lock() {
                    o.done_at = Some(at);
                    o.verified = verified;
                    if o.restarted {
                        o.fetched_after_restart = parent_bytes + origin_bytes;
                    }
                }
                st.finished.store(true, Ordering::SeqCst);
                return;
            }
            other if st.killed.load(Ordering::SeqCst) => {
                // Killed under the get: wait to be restarted, or leave for good.
                let _ = other;
                while st.restarts.load(Ordering::SeqCst) == gen {
                    if st.gone.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(Some(ApiEvent::Error { code, message })) => {
                return fail(st, format!("exit code {code}: {message}"))
            }
            Ok(other) => return fail(st, format!("no final answer: {other:?}")),
            Err(e) => return fail(st, format!("the API call failed: {e}")),
        }
    }
}

fn fail(st: &PeerState, why: String) {
    if let Ok(mut o) = st.outcome.lock() {
        o.error = Some(why);
    }
    st.finished.store(true, Ordering::SeqCst);
}

fn stat(socket: &Path, url: &str) -> Option<starling::swarm::inventory::TaskDetail> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let req = ApiRequest::Stat {
        task: url.to_string(),
    };
    match rt.block_on(starling::daemon::client_ask(socket, &req)) {
        Ok(Some(ApiEvent::Stat(d))) => Some(*d),
        _ => None,
    }
}

/// Bytes of verified pieces a daemon holds of the task, and its piece length.
fn verified_bytes(socket: &Path, url: &str) -> (u64, u64) {
    match stat(socket, url) {
        Some(d) => (
            (d.info.verified as u64 * d.info.piece_length).min(d.info.size),
            d.info.piece_length,
        ),
        None => (0, 0),
    }
}

/// The fraction of pieces no live peer (the seed and `skip` not counted) holds, and the
/// piece length.
fn live_union(
    states: &[PeerState],
    sockets: &[PathBuf],
    url: &str,
    skip: Option<usize>,
) -> (f64, u64) {
    let mut held: Vec<bool> = Vec::new();
    let mut piece_length = 0;
    for (i, socket) in sockets.iter().enumerate().skip(1) {
        if states[i].killed.load(Ordering::SeqCst) || skip == Some(i) {
            continue;
        }
        let Some(d) = stat(socket, url) else { continue };
        piece_length = d.info.piece_length;
        held.resize(d.info.pieces as usize, false);
        for (a, b) in parse_ranges(&d.have) {
            for p in a..=b {
                if let Some(h) = held.get_mut(p as usize) {
                    *h = true;
                }
            }
        }
    }
    if held.is_empty() {
        return (1.0, piece_length);
    }
    let missing = held.iter().filter(|h| !**h).count();
    (missing as f64 / held.len() as f64, piece_length)
}

/// `0-511,514` into inclusive ranges.
fn parse_ranges(s: &str) -> Vec<(u64, u64)> {
    s.split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => part.parse().ok().map(|p| (p, p)),
            }
        })
        .collect()
}

/// Flips bytes in every 64 KiB (so in every piece) of a node's stored copies (they are
/// read-only: needs root).
fn corrupt_store(tasks: &[PathBuf], len: u64) {
    use std::os::unix::fs::FileExt;
    for t in tasks {
        let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .open(t.join("content"))
        else {
            continue;
        };
        let mut off = 100;
        while off < len {
            let _ = f.write_all_at(b"\xff\x00\xff", off);
            off += 64 << 10;
        }
    }
}

/// Every daemon's log (`node-0.log` is the seed's) and the scheduler's, copied into `to`.
fn keep_logs(cluster: &Cluster, to: &std::path::Path) {
    let _ = std::fs::create_dir_all(to);
    for (i, n) in cluster.nodes.iter().enumerate() {
        let _ = std::fs::write(to.join(format!("node-{i}.log")), n.log());
    }
    if let Some(s) = &cluster.scheduler {
        let _ = std::fs::copy(&s.log, to.join("scheduler.log"));
    }
}
