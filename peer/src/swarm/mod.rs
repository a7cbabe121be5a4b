//! The daemon as a peer: it serves every task it holds over QUIC (verified pieces only, from
//! memory maps), announces what it holds to the scheduler that owns each task, asks that
//! scheduler for parents, and downloads from them (see [`download`]). A seed peer also takes
//! fetch orders: "go back to source for this task", which it then serves.
//!
//! Wiring only: the planning is the engine's, the piece exchange the transport's, the storage
//! the store's, the back-to-source pipeline the fetcher's.

mod announce;
mod download;
mod tasks;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::config::Config;
use crate::core::{Digest, PiecePlan, TaskId};
use crate::fetch::{FetchError, Fetched, Fetcher, Progress, Request, Served};
use crate::scheduler::ring::Ring;
use crate::scheduler::service::{CandidatesCall, CandidatesReply, SchedulerService};
use crate::scheduler::{Advice, LinkReport, PeerId, SchedulerConfig};
use crate::storage::{LeaseMode, TaskHandle, UploadView};
use crate::transport::tls::{ClusterCa, TlsError};
use crate::transport::wire::{self, HaveReply, Request as Wire, Status};
use crate::transport::{Node, Parent, PathPolicy, PieceSource, TransportError};

/// How QUIC sizes packets: adapted to the interfaces, or quinn's defaults.
fn path_policy(cfg: &Config) -> PathPolicy {
    if cfg.netprobe.adapt {
        PathPolicy {
            upper_bound: crate::netprobe::udp_upper_bound(),
            ..PathPolicy::default()
        }
    } else {
        PathPolicy::quinn_defaults()
    }
}

/// Attaches the probes to interfaces that come up later, and expires idle flows.
async fn probe_upkeep(swarm: std::sync::Weak<Swarm>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    let mut gather = crate::netprobe::policy::Gather::default();
    loop {
        tick.tick().await;
        let Some(s) = swarm.upgrade() else { return };
        // Keeps each connection's last statistics fresh for after it closes.
        let conns = s.node.connections();
        if s.cfg.netprobe.adapt {
            let report = s.node.tune_buffers();
            *s.socket.lock().unwrap_or_else(|p| p.into_inner()) = report;
            let live: Vec<_> = conns.into_iter().filter(|c| c.live).collect();
            let c = crate::netprobe::policy::congestion(s.node.congestion(), &live);
            s.node.set_congestion(c);
            s.node.gather_reads(gather.decide(&live));
        }
        n += 1;
        if n % 10 == 0 {
            s.probe.attach_new();
            s.probe.expire(Duration::from_secs(300));
        }
    }
}

/// Other local readers and uploads share `task` from here on: its exclusive lease becomes a
/// shared one.
fn share(task: &TaskHandle) {
    if let Err(e) = task.lease().downgrade() {
        tracing::warn!(error = %e, "cannot downgrade the task lease");
    }
}

/// How long a have request is held open while the parent has no news.
const HAVE_WAIT: Duration = Duration::from_millis(1000);
/// A scheduler call that takes longer than this has failed.
const SCHEDULER_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("cluster TLS")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A seed's order to go back to source for a task (wire kind 4, JSON body).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FetchOrder {
    pub url: String,
    pub digest: Option<String>,
    pub headers: Vec<(String, String)>,
    pub piece_length: Option<u64>,
}

/// Where the schedulers are.
enum Schedulers {
    /// This daemon answers scheduler calls itself.
    Embedded(Arc<SchedulerService>),
    /// Remote schedulers, tasks split by consistent hashing.
    Remote {
        ring: Ring,
        conns: tokio::sync::Mutex<HashMap<String, Parent>>,
    },
}

/// A task this peer serves.
struct ServedTask {
    view: Arc<UploadView>,
    last_used: Instant,
    spread: Spread,
}

/// How long a seed declines to send a piece again after it was delivered (see [`Spread`]):
/// long enough for its receiver to pass it on, short enough that a receiver that died does
/// not starve anyone.
const SPREAD_HOLD: Duration = Duration::from_secs(5);

/// How long a send still in flight keeps others waiting at most. A send ends on its own
/// (delivered, or failed when the receiver resets it, times out or goes away); this bounds a
/// send whose end the transport never reports.
const SPREAD_IN_FLIGHT_MAX: Duration = Duration::from_secs(60);

/// A seed's record of what it has sent: it sends each piece to one peer at a time, and not
/// again to another peer until [`SPREAD_HOLD`] after that send was delivered; another peer
/// asking sooner is declined (`Busy`) and gets it from the receiver. (The same peer asking
/// again, after a failure or a restart, is served; a send that failed frees the piece at
/// once.) Otherwise children that pick the same rare pieces would spend the seed's upload,
/// which bounds the whole swarm, on duplicates. The hold runs from delivery, not from the
/// start of the send: in a large swarm a seed's link is shared by dozens of sends, and one
/// piece can take longer than the hold to leave (24 peers at 25 Mbit/s: the seed sent
/// 1.44-1.58 x F when the hold ran from the start).
struct Spread {
    last_sent: Vec<Option<Sent>>,
}

#[derive(Clone, Copy, Debug)]
struct Sent {
    to: SocketAddr,
    since: Instant,
    /// When the receiver acknowledged the whole piece; None while in flight.
    delivered: Option<Instant>,
}

impl Spread {
    fn new(pieces: u32) -> Spread {
        Spread {
            last_sent: vec![None; pieces as usize],
        }
    }

    /// Whether to send `index` to `to` now (and record it).
    fn admit(&mut self, index: u32, to: SocketAddr, now: Instant) -> bool {
        let Some(last) = self.last_sent.get_mut(index as usize) else {
            return true;
        };
        let held = last.is_some_and(|s| {
            s.to != to
                && match s.delivered {
                    Some(d) => now.saturating_duration_since(d) < SPREAD_HOLD,
                    None => now.saturating_duration_since(s.since) < SPREAD_IN_FLIGHT_MAX,
                }
        });
        if held {
            return false;
        }
        *last = Some(Sent {
            to,
            since: now,
            delivered: None,
        });
        true
    }

    /// The send of `index` to `to` ended: delivered (the hold starts), or failed (anyone may
    /// have it at once).
    fn ended(&mut self, index: u32, to: SocketAddr, delivered: bool, now: Instant) {
        let Some(last) = self.last_sent.get_mut(index as usize) else {
            return;
        };
        if let Some(s) = last.filter(|s| s.to == to && s.delivered.is_none()) {
            *last = delivered.then_some(Sent {
                delivered: Some(now),
                ..s
            });
        }
    }
}

pub struct Swarm {
    fetcher: Arc<Fetcher>,
    node: Node,
    me: PeerId,
    addr: SocketAddr,
    cfg: Config,
    schedulers: Schedulers,
    served: Mutex<HashMap<TaskId, ServedTask>>,
    /// Bumped whenever a task's view is registered (the proxy waits on it).
    views: tokio::sync::watch::Sender<u64>,
    /// Seed fetch orders in progress.
    ordered: Mutex<HashSet<TaskId>>,
    /// One download per task at a time in this daemon; later requests wait, then find it
    /// served. (The store's lease cannot do this here: our own upload views hold it.)
    gates: Mutex<HashMap<TaskId, Arc<tokio::sync::Mutex<()>>>>,
    /// Link quality measured per parent, reported with announcements.
    links: Mutex<HashMap<PeerId, LinkReport>>,
    /// Pieces served since the last announcement (the load reported to the scheduler).
    served_pieces: AtomicU32,
    announcer: announce::State,
    /// The eBPF path probes (or their absence).
    probe: crate::netprobe::NetProbe,
    /// The peer socket's receive side as last tuned.
    socket: Mutex<crate::transport::SocketReport>,
    /// Upload rate limit: when the next piece may start (None: unlimited).
    pacer: Option<Pacer>,
}

/// A rate limit on piece uploads: each piece reserves its share of time in order.
struct Pacer {
    bytes_per_second: f64,
    next: Mutex<Instant>,
}

impl Pacer {
    fn reserve(&self, bytes: u64) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(Instant::now());
        *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second);
        start
    }
}

impl Swarm {
    /// Binds the peer's QUIC endpoint under the cluster CA and starts serving and announcing.
    pub async fn start(fetcher: Arc<Fetcher>) -> Result<Arc<Swarm>, SwarmError> {
        let cfg = fetcher.config().clone();
        let ca = cluster_ca(&cfg)?;
        let listen: SocketAddr =
            cfg.peer.listen.parse().map_err(|_| {
                TransportError::Stream(format!("peer.listen {:?}", cfg.peer.listen))
            })?;
        let remote: Vec<SocketAddr> = cfg
            .scheduler
            .addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        // Peers are authenticated by the CA's signature; the certificate's common name is
        // informational (the peer ID is the advertised address, known only after binding).
        let identity = ca.issue("starling-peer")?;
        let probe = crate::netprobe::NetProbe::start(&cfg.netprobe);
        let node = Node::bind_with(listen, &identity, path_policy(&cfg))?;
        if let Some(cookie) = node.socket_cookie() {
            probe.watch_socket(cookie);
        }
        let bound = node.local_addr()?;
        let addr = advertise(&cfg, bound, remote.first().copied());
        let schedulers = if remote.is_empty() {
            Schedulers::Embedded(SchedulerService::new(scheduler_config(&cfg)))
        } else {
            Schedulers::Remote {
                ring: Ring::new(&cfg.scheduler.addrs),
                conns: tokio::sync::Mutex::new(HashMap::new()),
            }
        };
        let cfg_limit = cfg.peer.upload_limit_mbps;
        let swarm = Arc::new(Swarm {
            me: addr.to_string(),
            addr,
            fetcher,
            node,
            cfg,
            schedulers,
            served: Mutex::new(HashMap::new()),
            views: tokio::sync::watch::Sender::new(0),
            ordered: Mutex::new(HashSet::new()),
            gates: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            served_pieces: AtomicU32::new(0),
            announcer: announce::State::default(),
            probe,
            socket: Mutex::default(),
            pacer: (cfg_limit > 0.0).then(|| Pacer {
                bytes_per_second: cfg_limit * 125_000.0,
                next: Mutex::new(Instant::now()),
            }),
        });
        swarm.node.serve(swarm.clone());
        let weak = Arc::downgrade(&swarm);
        if swarm.cfg.netprobe.adapt {
            swarm.fetcher.on_stall(Arc::new(move |url: &str| {
                let (weak, url) = (weak.clone(), url.to_string());
                tokio::task::spawn_blocking(move || {
                    if let Some(s) = weak.upgrade() {
                        s.origin_stalled(&url);
                    }
                });
            }));
        }
        tokio::spawn(announce::run(swarm.clone()));
        tokio::spawn(probe_upkeep(Arc::downgrade(&swarm)));
        tokio::spawn(swarm.clone().resume_serving());
        tracing::info!(peer = %swarm.me, seed = swarm.cfg.peer.seed, embedded_scheduler = matches!(swarm.schedulers, Schedulers::Embedded(_)), "peer listening (QUIC, mutual TLS)");
        Ok(swarm)
    }

    /// Connects to a peer, starting at the packet size already validated toward its host.
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<Parent, TransportError> {
        let hint = if self.cfg.netprobe.adapt {
            crate::netprobe::view::known_udp_mtu(&self.node.connections(), addr.ip())
        } else {
            None
        };
        self.node.connect_with(addr, hint).await
    }

    /// An origin transfer stalled: if the probes show an MTU black hole toward it, clamp the
    /// MSS of new connections to it (to what QUIC validated toward that host, if anything).
    fn origin_stalled(&self, url: &str) {
        use std::net::ToSocketAddrs;
        let Ok(u) = url::Url::parse(url) else { return };
        let Some(host) = u.host_str() else { return };
        let port = u.port_or_known_default().unwrap_or(80);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(addrs) = (host, port).to_socket_addrs() else {
            return;
        };
        let conns = self.node.connections();
        for a in addrs {
            let mss = crate::netprobe::view::known_udp_mtu(&conns, a.ip())
                .map(|udp| u32::from(udp) + 28 - 40);
            self.probe.stalled(a.ip(), mss);
        }
    }

    /// The per-connection path view (`starling probe`).
    pub fn probe_report(&self) -> crate::netprobe::ProbeReport {
        let conns = self.node.connections();
        let local_port = self.node.local_addr().map(|a| a.port()).unwrap_or(0);
        let (ebpf, detail) = match self.probe.status() {
            Ok(ifaces) => (true, format!("attached to {}", ifaces.join(", "))),
            Err(why) => (false, why),
        };
        crate::netprobe::ProbeReport {
            ebpf,
            detail,
            udp_upper_bound: self.node.path_policy().upper_bound,
            adapt: self.cfg.netprobe.adapt,
            socket: *self.socket.lock().unwrap_or_else(|p| p.into_inner()),
            congestion: self.node.congestion(),
            paths: crate::netprobe::join(
                &conns,
                local_port,
                &self.probe.flows(),
                &self.probe.icmp_mtus(),
            ),
            tcp: crate::netprobe::view::tcp_views(&self.probe.tcp(), &self.probe.clamps()),
            kernel_drops: self.probe.kernel_drops(),
        }
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    pub fn id(&self) -> &str {
        &self.me
    }

    /// Downloads a task through the swarm (or from the store, or back to source when the
    /// scheduler says so), and keeps serving it.
    pub async fn fetch(
        self: &Arc<Self>,
        req: &Request,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, FetchError> {
        if let Some(pl) = req.piece_length {
            PiecePlan::new(0, pl)?;
        }
        let cfg = self.fetcher.config();
        let id = TaskId::resolve(&req.url, req.digest, &cfg.source.filtered_query_params)?;
        let metrics = self.fetcher.metrics().clone();
        metrics.started();
        let res = self
            .fetch_task(id, req, progress)
            .instrument(tracing::info_span!("task", %id))
            .await;
        metrics.finished(res.is_ok());
        metrics.add_bytes("origin", progress.origin_bytes.load(Ordering::Relaxed));
        metrics.add_bytes("parent", progress.parent_bytes.load(Ordering::Relaxed));
        if let Ok(f) = &res {
            if f.served == Served::Store {
                metrics.add_bytes("local", f.manifest.plan().content_length());
            }
            share(&f.task);
        }
        res
    }

    async fn fetch_task(
        self: &Arc<Self>,
        id: TaskId,
        req: &Request,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, FetchError> {
        let res = self
            .one_at_a_time(id, self.fetch_gated(id, req, progress))
            .await;
        if res.is_err() {
            // A failed download's view would hold the task's lease against the next attempt.
            let partial = self
                .served
                .lock()
                .map(|s| s.get(&id).is_some_and(|t| !t.view.is_complete()))
                .unwrap_or(false);
            if partial {
                self.unregister(&id);
            }
        }
        res
    }

    /// Runs `work` for task `id` once no other fetch or import of that task in this daemon runs.
    async fn one_at_a_time<T>(&self, id: TaskId, work: impl std::future::Future<Output = T>) -> T {
        let gate = match self.gates.lock() {
            Ok(mut g) => g.entry(id).or_default().clone(),
            Err(_) => Arc::default(),
        };
        let res = {
            let _one_at_a_time = gate.lock().await;
            work.await
        };
        if let Ok(mut g) = self.gates.lock() {
            // Ours and the map's: nobody else waits on it.
            if Arc::strong_count(&gate) == 2 {
                g.remove(&id);
            }
        }
        res
    }

    /// After a restart, serves again the complete tasks the store holds that were used within
    /// `peer.serve_idle_seconds` (what the previous run was still serving: an imported file,
    /// say, whose origin may not exist), most recent first, one at a time in the background.
    /// Each is verified end to end first, as every store hit is; damaged content is discarded,
    /// and partial downloads are left for the next fetch. Their last-use time stays as it was,
    /// so a restart does not reorder GC.
    async fn resume_serving(self: Arc<Self>) {
        let within = Duration::from_secs(self.cfg.peer.serve_idle_seconds);
        let recent = match self.fetcher.store().used_within(within) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the store; serving only what is fetched from now on");
                return;
            }
        };
        let mut resumed = 0usize;
        for (id, last_use) in recent {
            let progress = Arc::new(Progress::default());
            let res = self
                .one_at_a_time(id, async {
                    if self.is_served(&id) {
                        return Ok(false);
                    }
                    let Some(f) = self.fetcher.stored_complete(id, &progress).await? else {
                        return Ok(false);
                    };
                    f.task.lease().set_last_use(last_use);
                    self.register(&f.task);
                    share(&f.task);
                    Ok::<bool, FetchError>(true)
                })
                .instrument(tracing::info_span!("task", %id))
                .await;
            match res {
                Ok(true) => resumed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(task = %id, error = %e, "not serving a stored task again"),
            }
        }
        if resumed > 0 {
            tracing::info!(tasks = resumed, "serving the store's complete tasks again");
        }
    }

    fn is_served(&self, id: &TaskId) -> bool {
        self.served.lock().is_ok_and(|s| s.contains_key(id))
    }

    /// Imports a local file (`starling import`) and seeds it from now on.
    pub async fn import(
        self: &Arc<Self>,
        req: &crate::fetch::Import,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, FetchError> {
        let staged = self.fetcher.stage(req, progress).await?;
        let id = staged.id;
        let res = self
            .one_at_a_time(id, async {
                // A task this daemon already serves holds a shared lease: read it under another.
                if let Some(done) = self.served_copy(id, progress).await? {
                    return Ok(done);
                }
                let f = self.fetcher.adopt(staged, progress).await?;
                self.register(&f.task);
                Ok(f)
            })
            .instrument(tracing::info_span!("task", %id))
            .await;
        if let Ok(f) = &res {
            share(&f.task);
        }
        res
    }

    async fn fetch_gated(
        self: &Arc<Self>,
        id: TaskId,
        req: &Request,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, FetchError> {
        if let Some(done) = self.served_copy(id, progress).await? {
            return Ok(done);
        }
        let missing = match self.fetcher.lookup(id, progress).await? {
            Ok(done) => {
                self.register(&done.task);
                return Ok(done);
            }
            Err(missing) => missing,
        };
        let reply = match self.ask(id, self.cfg.peer.max_parents, Vec::new()).await {
            Ok(r) => r,
            Err(e) if !self.cfg.peer.source_fallback => {
                return Err(FetchError::Source(crate::source::SourceError::Transfer {
                    url: req.url.clone(),
                    detail: format!("the scheduler is unreachable ({e}) and peer.source_fallback is off; check scheduler.addrs and the [tls] CA"),
                }));
            }
            Err(e) => {
                tracing::warn!(error = %e, "scheduler unreachable; going back to source");
                CandidatesReply {
                    parents: Vec::new(),
                    advice: Advice::Source,
                }
            }
        };
        // With source fallback off only a seed goes to source; others wait for parents.
        let to_source =
            reply.advice == Advice::Source && (self.cfg.peer.seed || self.cfg.peer.source_fallback);
        let missing = if to_source {
            missing
        } else {
            match download::run(self, id, req, missing, progress, reply).await? {
                download::Outcome::Done(f) => return Ok(f),
                download::Outcome::Source(m) => m,
            }
        };
        tracing::info!("fetching back to source");
        self.fetcher
            .from_source(id, missing, req, progress, &|t| self.register(t))
            .await
    }

    /// A complete task this daemon already serves: its views hold a shared lease, so read it
    /// under another shared lease (re-verified end to end, as every store hit is).
    async fn served_copy(
        &self,
        id: TaskId,
        progress: &Arc<Progress>,
    ) -> Result<Option<Fetched>, FetchError> {
        let complete = self
            .served
            .lock()
            .ok()
            .and_then(|s| s.get(&id).map(|t| t.view.is_complete()))
            .unwrap_or(false);
        if !complete {
            return Ok(None);
        }
        let store = self.fetcher.store();
        let lease = store.acquire(&id, LeaseMode::Shared).await?;
        let Ok(task) = store.load(lease)? else {
            return Ok(None);
        };
        let Some(manifest) = task.manifest() else {
            return Ok(None);
        };
        if task.verify_sealed().await? != Some(true) {
            tracing::warn!("a served task's stored content is damaged; it will be fetched again");
            self.unregister(&id);
            return Ok(None);
        }
        let len = manifest.plan().content_length();
        progress.total.store(len, Ordering::Relaxed);
        progress.done.store(len, Ordering::Relaxed);
        Ok(Some(Fetched {
            task,
            manifest,
            served: Served::Store,
        }))
    }

    /// Serves `task` to peers from now on (replacing an older view of it).
    fn register(&self, task: &TaskHandle) {
        match task.upload_view() {
            Ok(v) => {
                if let Ok(mut s) = self.served.lock() {
                    s.insert(
                        task.header().id,
                        ServedTask {
                            view: Arc::new(v),
                            last_used: Instant::now(),
                            spread: Spread::new(task.plan().count()),
                        },
                    );
                    self.fetcher.metrics().set_serving(s.len());
                }
                self.views.send_modify(|n| *n += 1);
            }
            Err(e) => tracing::warn!(error = %e, "cannot serve this task to peers"),
        }
    }

    /// Changes whenever a task's view is registered.
    pub(crate) fn view_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.views.subscribe()
    }

    fn unregister(&self, id: &TaskId) {
        if let Ok(mut s) = self.served.lock() {
            s.remove(id);
            self.fetcher.metrics().set_serving(s.len());
        }
    }

    /// Stops serving complete tasks nobody fetched for `peer.serve_idle_seconds`, so GC may
    /// evict them.
    pub fn expire_served(&self) {
        let idle = Duration::from_secs(self.cfg.peer.serve_idle_seconds);
        if let Ok(mut s) = self.served.lock() {
            s.retain(|_, t| !t.view.is_complete() || t.last_used.elapsed() < idle);
            self.fetcher.metrics().set_serving(s.len());
        }
    }

    pub(crate) fn view(&self, task: &TaskId) -> Option<Arc<UploadView>> {
        let mut s = self.served.lock().ok()?;
        let t = s.get_mut(task)?;
        t.last_used = Instant::now();
        Some(t.view.clone())
    }

    /// Candidates and advice from the scheduler that owns `task`: `want` new parents at most
    /// (at least one is always asked for, so the advice comes with one), none of `exclude`.
    async fn ask(
        &self,
        task: TaskId,
        want: usize,
        exclude: Vec<PeerId>,
    ) -> Result<CandidatesReply, TransportError> {
        let call = CandidatesCall {
            peer: self.me.clone(),
            max: want.max(1) as u32,
            exclude,
        };
        match &self.schedulers {
            Schedulers::Embedded(s) => Ok(s.candidates(&task, &call)),
            Schedulers::Remote { ring, .. } => {
                let owner = ring.owner(&task).unwrap_or_default().to_string();
                let body =
                    serde_json::to_vec(&call).map_err(|e| TransportError::Stream(e.to_string()))?;
                let reply = self
                    .remote(&owner, |len| Wire::Candidates { task, body: len }, &body)
                    .await?;
                serde_json::from_slice(&reply)
                    .map_err(|e| TransportError::Stream(format!("scheduler reply: {e}")))
            }
        }
    }

    /// One call to a remote scheduler, reconnecting once if the connection went away.
    async fn remote(
        &self,
        addr: &str,
        make: impl Fn(u32) -> Wire,
        body: &[u8],
    ) -> Result<Bytes, TransportError> {
        let Schedulers::Remote { conns, .. } = &self.schedulers else {
            return Err(TransportError::Stream("no remote scheduler".into()));
        };
        let sock: SocketAddr = addr
            .parse()
            .map_err(|_| TransportError::Stream(format!("scheduler address {addr:?}")))?;
        let mut last = None;
        for _ in 0..2 {
            let conn = {
                let mut c = conns.lock().await;
                match c.get(addr).filter(|p| !p.is_closed()) {
                    Some(p) => p.clone(),
                    None => {
                        let p = tokio::time::timeout(SCHEDULER_TIMEOUT, self.node.connect(sock))
                            .await
                            .map_err(|_| TransportError::Connect {
                                addr: sock,
                                detail: "timed out".into(),
                            })??;
                        c.insert(addr.to_string(), p.clone());
                        p
                    }
                }
            };
            match tokio::time::timeout(SCHEDULER_TIMEOUT, conn.call(&make, body)).await {
                Ok(Ok(b)) => return Ok(b),
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(TransportError::Stream("scheduler call timed out".into())),
            }
            conns.lock().await.remove(addr);
        }
        Err(last.unwrap_or_else(|| TransportError::Stream("scheduler call failed".into())))
    }

    /// Records the measured link from a parent, for the next announcement.
    fn record_link(&self, parent: &str, link: LinkReport) {
        if let Ok(mut l) = self.links.lock() {
            l.insert(parent.to_string(), link);
        }
    }

    /// A fetch order from another peer: only a seed takes them.
    fn take_order(self: Arc<Self>, task: TaskId, body: &[u8]) -> Result<Bytes, Status> {
        if !self.cfg.peer.seed {
            return Err(Status::BadRequest);
        }
        let order: FetchOrder = serde_json::from_slice(body).map_err(|_| Status::BadRequest)?;
        let digest = match order
            .digest
            .as_deref()
            .map(str::parse::<Digest>)
            .transpose()
        {
            Ok(d) => d,
            Err(_) => return Err(Status::BadRequest),
        };
        let filtered = &self.cfg.source.filtered_query_params;
        if TaskId::resolve(&order.url, digest, filtered).ok() != Some(task) {
            return Err(Status::BadRequest);
        }
        let mut headers = http::HeaderMap::new();
        for (k, v) in &order.headers {
            let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) else {
                return Err(Status::BadRequest);
            };
            headers.append(k, v);
        }
        let fresh = self
            .ordered
            .lock()
            .map(|mut o| o.insert(task))
            .unwrap_or(false);
        let have = self
            .served
            .lock()
            .map(|s| s.contains_key(&task))
            .unwrap_or(false);
        if fresh && !have {
            let req = Request {
                url: order.url,
                digest,
                piece_length: order.piece_length,
                headers,
            };
            let me = self.clone();
            tokio::spawn(async move {
                let progress = Arc::new(Progress::default());
                match me.fetch(&req, &progress).await {
                    Ok(_) => tracing::info!(%task, "seeded on order"),
                    Err(e) => tracing::warn!(%task, error = %e, "fetch order failed"),
                }
                if let Ok(mut o) = me.ordered.lock() {
                    o.remove(&task);
                }
            });
        } else if let Ok(mut o) = self.ordered.lock() {
            if have {
                o.remove(&task);
            }
        }
        Ok(Bytes::from_static(b"{}"))
    }

    async fn have(self: Arc<Self>, task: TaskId, epoch: u32, since: u32) -> Option<Bytes> {
        let view = self.view(&task)?;
        let mut changes = view.subscribe();
        let mut slice = view.log_since(epoch, since);
        if slice.entries.is_empty() && slice.epoch == epoch && !view.is_complete() {
            let _ = tokio::time::timeout(HAVE_WAIT, changes.changed()).await;
            slice = view.log_since(epoch, since);
        }
        let plan = view.plan();
        self.fetcher.metrics().have_answered();
        Some(Bytes::from(
            HaveReply {
                content_length: plan.content_length(),
                piece_length: plan.piece_length(),
                content: view.content_digest(),
                epoch: slice.epoch,
                end: slice.end,
                entries: slice.entries,
            }
            .encode(),
        ))
    }
}

impl PieceSource for Swarm {
    fn manifest(&self, task: &TaskId) -> Option<Bytes> {
        self.view(task)?.manifest()
    }

    fn piece(&self, task: &TaskId, index: u32) -> Option<Bytes> {
        self.piece_status(task, index, SocketAddr::from(([0, 0, 0, 0], 0)))
            .ok()
    }

    fn piece_status(&self, task: &TaskId, index: u32, to: SocketAddr) -> Result<Bytes, Status> {
        let mut s = self.served.lock().map_err(|_| Status::NotFound)?;
        let t = s.get_mut(task).ok_or(Status::NotFound)?;
        t.last_used = Instant::now();
        let p = t.view.piece(index).ok_or(Status::NotFound)?;
        if self.cfg.peer.seed && !t.spread.admit(index, to, Instant::now()) {
            return Err(Status::Busy);
        }
        self.served_pieces.fetch_add(1, Ordering::Relaxed);
        Ok(p)
    }

    fn piece_ended(&self, task: &TaskId, index: u32, to: SocketAddr, delivered: bool) {
        if !self.cfg.peer.seed {
            return;
        }
        if let Ok(mut s) = self.served.lock() {
            if let Some(t) = s.get_mut(task) {
                t.spread.ended(index, to, delivered, Instant::now());
            }
        }
    }

    fn have(
        self: Arc<Self>,
        task: TaskId,
        epoch: u32,
        since: u32,
    ) -> BoxFuture<'static, Option<Bytes>> {
        Box::pin(Swarm::have(self, task, epoch, since))
    }

    fn call(self: Arc<Self>, req: Wire, body: Bytes) -> BoxFuture<'static, Result<Bytes, Status>> {
        let r = match (&self.schedulers, req) {
            (_, Wire::Fetch { task, .. }) => self.clone().take_order(task, &body),
            (Schedulers::Embedded(s), _) => s.call(req, &body),
            _ => Err(Status::BadRequest),
        };
        Box::pin(async move { r })
    }

    fn uploaded(&self, bytes: u64) {
        self.fetcher.metrics().uploaded(bytes);
    }

    fn pace(&self, bytes: u64) -> BoxFuture<'static, ()> {
        match &self.pacer {
            Some(p) => {
                let at = p.reserve(bytes);
                Box::pin(tokio::time::sleep_until(at.into()))
            }
            None => Box::pin(async {}),
        }
    }
}

/// The cluster CA from `[tls]`, else the one in `<data_dir>/tls/` (created on first use).
fn cluster_ca(cfg: &Config) -> Result<ClusterCa, SwarmError> {
    match (&cfg.tls.ca_cert, &cfg.tls.ca_key) {
        (Some(c), Some(k)) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|source| SwarmError::Read {
                    path: p.to_path_buf(),
                    source,
                })
            };
            Ok(ClusterCa::from_pem(&read(c)?, &read(k)?)?)
        }
        _ => Ok(ClusterCa::load_or_create(&cfg.data_dir.join("tls"))?),
    }
}

fn scheduler_config(cfg: &Config) -> SchedulerConfig {
    SchedulerConfig {
        ttl: Duration::from_secs(cfg.scheduler.peer_ttl_seconds),
        fanout: cfg.scheduler.fanout,
        ..SchedulerConfig::default()
    }
}

/// Runs `starling scheduler`: scheduler calls only, over QUIC with mutual TLS.
pub async fn run_scheduler(cfg: Config) -> Result<(), SwarmError> {
    let ca = cluster_ca(&cfg)?;
    let listen: SocketAddr = cfg.scheduler.listen.parse().map_err(|_| {
        TransportError::Stream(format!("scheduler.listen {:?}", cfg.scheduler.listen))
    })?;
    let node = Node::bind_with(listen, &ca.issue("starling-scheduler")?, path_policy(&cfg))?;
    let service = SchedulerService::new(scheduler_config(&cfg));
    let served = node.serve(Arc::new(crate::scheduler::service::StandaloneScheduler(
        service,
    )));
    tracing::info!(addr = %node.local_addr()?, "scheduler listening (QUIC, mutual TLS)");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| SwarmError::Read {
            path: "signal".into(),
            source,
        })?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = served => {}
    }
    node.close();
    tracing::info!("scheduler stopped");
    Ok(())
}

/// The address other peers dial: `peer.advertise`, else the bound port on the local address
/// that routes to the scheduler (loopback with the embedded scheduler).
fn advertise(cfg: &Config, bound: SocketAddr, scheduler: Option<SocketAddr>) -> SocketAddr {
    if let Ok(a) = cfg.peer.advertise.parse::<SocketAddr>() {
        return a;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = scheduler
        .and_then(|s| {
            let u = std::net::UdpSocket::bind(("0.0.0.0", 0)).ok()?;
            u.connect(s).ok()?;
            u.local_addr().ok().map(|a| a.ip())
        })
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, bound.port())
}

/// Wire limit on pieces, re-exported for the downloader.
const MAX_PIECES: u32 = wire::MAX_WIRE_PIECES;

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn a_seed_sends_a_piece_to_one_peer_until_the_hold_after_delivery() {
        use std::time::{Duration, Instant};
        let (a, b) = (
            std::net::SocketAddr::from(([10, 0, 0, 1], 1)),
            std::net::SocketAddr::from(([10, 0, 0, 2], 1)),
        );
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut s = Spread::new(3);
        assert!(s.admit(0, a, at(0)));
        assert!(!s.admit(0, b, at(0)), "0 to another peer at once");
        assert!(s.admit(0, a, at(0)), "the same peer asking again is served");
        assert!(s.admit(1, b, at(0)) && s.admit(2, b, at(0)));
        assert!(!s.admit(1, a, at(0)) && !s.admit(2, a, at(0)));
        // Still in flight long after the hold: nobody else gets it.
        assert!(!s.admit(0, b, at(30)), "in flight");
        // Delivered at 30 s: held until 35 s, then it may go again (its receiver may have
        // died without passing it on).
        s.ended(0, a, true, at(30));
        assert!(!s.admit(0, b, at(34)));
        assert!(s.admit(0, b, at(36)));
        // A failed send frees the piece at once.
        s.ended(1, b, false, at(1));
        assert!(s.admit(1, a, at(1)));
        // An end reported for someone else's send changes nothing.
        s.ended(1, b, false, at(2));
        assert!(!s.admit(1, b, at(2)));
        // A send whose end never comes stops blocking others after the in-flight bound.
        assert!(!s.admit(2, a, at(59)));
        assert!(s.admit(2, a, at(61)));
        assert!(s.admit(7, a, at(0)), "out of range is not ours to police");
    }
}
