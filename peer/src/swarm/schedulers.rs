//! The scheduler client: where this peer's schedulers are (embedded in the daemon, or remote and
//! split by consistent hashing), asking the one that owns a task for parents, one call to a
//! remote scheduler, and `starling scheduler` itself (a node that answers scheduler calls only).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;

use super::{cluster_ca, path_policy, Swarm, SwarmError};
use crate::config::Config;
use crate::core::TaskId;
use crate::scheduler::ring::Ring;
use crate::scheduler::service::{CandidatesCall, CandidatesReply, SchedulerService};
use crate::scheduler::{LinkReport, PeerId, SchedulerConfig};
use crate::transport::wire::{Request as Wire, Status};
use crate::transport::{Node, Parent, TransportError};

/// A scheduler call that takes longer than this has failed.
const SCHEDULER_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a download's first call keeps trying an unreachable scheduler before the download
/// goes to the origin without it. Going at the first failed call sent every peer of a flash
/// crowd to the origin whenever the scheduler missed one 3 s handshake (stopped or starved
/// for a few seconds: 16 x F). Once it has given up, others do not wait again until some call
/// gets through (see [`Schedulers::Remote`]'s `unreachable`).
const FIRST_ASK_PATIENCE: Duration = Duration::from_secs(10);
/// Between two tries of a first call.
const FIRST_ASK_RETRY: Duration = Duration::from_millis(500);
/// What a scheduler call that timed out says (connecting, or waiting for the answer): the
/// failures worth trying again. A refused handshake (a foreign CA) fails the same way again.
const TIMED_OUT: &str = "timed out";

/// Where the schedulers are.
pub(super) enum Schedulers {
    /// This daemon answers scheduler calls itself.
    Embedded(Arc<SchedulerService>),
    /// Remote schedulers, tasks split by consistent hashing.
    Remote {
        ring: Directory,
        conns: tokio::sync::Mutex<HashMap<String, Parent>>,
        /// A first call gave up on the schedulers ([`FIRST_ASK_PATIENCE`]) and no call got
        /// through since: the next downloads go to the origin at their first failed call.
        unreachable: std::sync::atomic::AtomicBool,
    },
}

/// The remote schedulers: the configured `ip:port`s, and every address the configured names
/// resolve to (resolved again every `scheduler.resolve_interval_seconds`), on one ring.
pub(super) struct Directory {
    configured: Vec<String>,
    /// The members (`ip:port`, sorted) and their ring.
    current: RwLock<(Vec<String>, Ring)>,
}

impl Directory {
    fn new(configured: &[String]) -> Directory {
        // Literal addresses are members at once; names once resolved.
        let literal: Vec<String> = configured
            .iter()
            .filter(|a| a.parse::<SocketAddr>().is_ok())
            .cloned()
            .collect();
        Directory {
            configured: configured.to_vec(),
            current: RwLock::new((literal.clone(), Ring::new(&literal))),
        }
    }

    /// The scheduler that owns `task`.
    pub(super) fn owner(&self, task: &TaskId) -> Option<String> {
        let c = self.current.read().unwrap_or_else(|p| p.into_inner());
        c.1.owner(task).map(str::to_string)
    }

    pub(super) fn members(&self) -> Vec<String> {
        let c = self.current.read().unwrap_or_else(|p| p.into_inner());
        c.0.clone()
    }

    /// Resolves the configured names again; a name that does not resolve now keeps the
    /// addresses it had. True when the members changed.
    pub(super) async fn refresh(&self) -> bool {
        let old = self.members();
        let mut members = Vec::new();
        for a in &self.configured {
            if a.parse::<SocketAddr>().is_ok() {
                members.push(a.clone());
                continue;
            }
            match tokio::time::timeout(SCHEDULER_TIMEOUT, tokio::net::lookup_host(a.as_str())).await
            {
                Ok(Ok(addrs)) => members.extend(addrs.map(|s| s.to_string())),
                Ok(Err(e)) => {
                    tracing::warn!(scheduler = %a, error = %e, "cannot resolve a scheduler name; keeping its last addresses");
                    members.extend(old.iter().filter(|m| !self.configured.contains(m)).cloned());
                }
                Err(_) => {
                    tracing::warn!(scheduler = %a, "resolving a scheduler name timed out; keeping its last addresses");
                    members.extend(old.iter().filter(|m| !self.configured.contains(m)).cloned());
                }
            }
        }
        members.sort();
        members.dedup();
        if members == old {
            return false;
        }
        tracing::info!(schedulers = ?members, "scheduler members changed");
        let ring = Ring::new(&members);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (members, ring);
        true
    }

    /// Resolves the names every `every` for as long as the swarm lives.
    pub(super) async fn keep_resolving(swarm: std::sync::Weak<Swarm>, every: Duration) {
        let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(s) = swarm.upgrade() else { return };
            if let Schedulers::Remote { ring, .. } = &s.schedulers {
                ring.refresh().await;
            }
        }
    }
}

impl Schedulers {
    pub(super) fn new(cfg: &Config) -> Schedulers {
        if cfg.scheduler.addrs.is_empty() {
            Schedulers::Embedded(SchedulerService::new(scheduler_config(cfg)))
        } else {
            Schedulers::Remote {
                ring: Directory::new(&cfg.scheduler.addrs),
                conns: tokio::sync::Mutex::new(HashMap::new()),
                unreachable: std::sync::atomic::AtomicBool::new(false),
            }
        }
    }

    /// The remote schedulers' directory (None: embedded).
    pub(super) fn directory(&self) -> Option<&Directory> {
        match self {
            Schedulers::Remote { ring, .. } => Some(ring),
            Schedulers::Embedded(_) => None,
        }
    }

    pub(super) fn is_embedded(&self) -> bool {
        matches!(self, Schedulers::Embedded(_))
    }

    /// Answers another peer's scheduler call: only an embedded scheduler does.
    pub(super) fn answer(&self, req: Wire, body: &Bytes) -> Result<Bytes, Status> {
        match self {
            Schedulers::Embedded(s) => s.call(req, body),
            Schedulers::Remote { .. } => Err(Status::BadRequest),
        }
    }
}

impl Swarm {
    /// Candidates and advice from the scheduler that owns `task`: `want` new parents at most
    /// (at least one is always asked for, so the advice comes with one), none of `exclude`;
    /// `banned` are the peers this download banned.
    pub(super) async fn ask(
        &self,
        task: TaskId,
        want: usize,
        exclude: Vec<PeerId>,
        banned: Vec<PeerId>,
        holds: u32,
    ) -> Result<CandidatesReply, TransportError> {
        let call = CandidatesCall {
            peer: self.me.clone(),
            max: want.max(1) as u32,
            exclude,
            look: false,
            banned,
            holds,
            place: self.place(),
        };
        self.call_candidates(task, &call).await
    }

    /// A download's first call ([`Swarm::ask`]): an unreachable scheduler is tried again for
    /// up to [`FIRST_ASK_PATIENCE`] (unless another download gave up on it lately) before the
    /// error is returned and the download goes to the origin without it.
    pub(super) async fn first_ask(
        &self,
        task: TaskId,
        want: usize,
        holds: u32,
    ) -> Result<CandidatesReply, TransportError> {
        let start = std::time::Instant::now();
        loop {
            let err = match self.ask(task, want, Vec::new(), Vec::new(), holds).await {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            let Schedulers::Remote { unreachable, .. } = &self.schedulers else {
                return Err(err);
            };
            use std::sync::atomic::Ordering::Relaxed;
            let timed_out = match &err {
                TransportError::Connect { detail, .. } => detail == TIMED_OUT,
                TransportError::Stream(detail) => detail.ends_with(TIMED_OUT),
                _ => false,
            };
            if !timed_out
                || unreachable.load(Relaxed)
                || start.elapsed() + FIRST_ASK_RETRY >= FIRST_ASK_PATIENCE
            {
                unreachable.store(true, Relaxed);
                return Err(err);
            }
            tracing::info!(error = %err, "scheduler call failed; trying again");
            tokio::time::sleep(FIRST_ASK_RETRY).await;
        }
    }

    /// How many live peers the owning scheduler knows hold `task`: (complete, partial). Asking
    /// changes nothing there.
    pub(crate) async fn holders(&self, task: TaskId) -> Result<(u32, u32), TransportError> {
        let reply = self.look(task).await?;
        reply.holders.ok_or_else(|| {
            TransportError::Stream("the scheduler runs an older release: no holder counts".into())
        })
    }

    /// The owning scheduler's read-only view of `task`: holder counts, each holder's pieces,
    /// and every live peer.
    pub(crate) async fn look(&self, task: TaskId) -> Result<CandidatesReply, TransportError> {
        let call = CandidatesCall {
            peer: self.me.clone(),
            max: 0,
            exclude: Vec::new(),
            look: true,
            banned: Vec::new(),
            holds: 0,
            place: None,
        };
        self.call_candidates(task, &call).await
    }

    /// This node's place, sent with parent queries when it has a rack label.
    fn place(&self) -> Option<crate::scheduler::Place> {
        let p = &self.ctx.cfg.peer;
        (!p.rack.is_empty()).then(|| crate::scheduler::Place {
            zone: p.zone.clone(),
            rack: p.rack.clone(),
        })
    }

    async fn call_candidates(
        &self,
        task: TaskId,
        call: &CandidatesCall,
    ) -> Result<CandidatesReply, TransportError> {
        match &self.schedulers {
            Schedulers::Embedded(s) => Ok(s.candidates(&task, call)),
            Schedulers::Remote { ring, .. } => {
                let owner = ring.owner(&task).unwrap_or_default();
                let body =
                    serde_json::to_vec(call).map_err(|e| TransportError::Stream(e.to_string()))?;
                let reply = self
                    .remote(&owner, |len| Wire::Candidates { task, body: len }, &body)
                    .await?;
                serde_json::from_slice(&reply)
                    .map_err(|e| TransportError::Stream(format!("scheduler reply: {e}")))
            }
        }
    }

    /// The address of the scheduler that owns `task`, for messages (`embedded` when it is this
    /// daemon).
    pub(super) fn scheduler_for(&self, task: &TaskId) -> String {
        match &self.schedulers {
            Schedulers::Embedded(_) => "embedded".into(),
            Schedulers::Remote { ring, .. } => ring.owner(task).unwrap_or_default(),
        }
    }

    /// One call to a remote scheduler, reconnecting once if the connection went away.
    pub(super) async fn remote(
        &self,
        addr: &str,
        make: impl Fn(u32) -> Wire,
        body: &[u8],
    ) -> Result<Bytes, TransportError> {
        let Schedulers::Remote {
            conns, unreachable, ..
        } = &self.schedulers
        else {
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
                                detail: TIMED_OUT.into(),
                            })??;
                        c.insert(addr.to_string(), p.clone());
                        p
                    }
                }
            };
            match tokio::time::timeout(SCHEDULER_TIMEOUT, conn.call(&make, body)).await {
                Ok(Ok(b)) => {
                    unreachable.store(false, std::sync::atomic::Ordering::Relaxed);
                    return Ok(b);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(TransportError::Stream(format!(
                        "scheduler call {TIMED_OUT}"
                    )))
                }
            }
            conns.lock().await.remove(addr);
        }
        Err(last.unwrap_or_else(|| TransportError::Stream("scheduler call failed".into())))
    }

    /// Records the measured link from a parent, for the next announcement.
    pub(super) fn record_link(&self, parent: &str, link: LinkReport) {
        if let Ok(mut l) = self.links.lock() {
            l.insert(parent.to_string(), link);
        }
    }
}

fn scheduler_config(cfg: &Config) -> SchedulerConfig {
    SchedulerConfig::of(&cfg.scheduler)
}

/// Runs `starling scheduler`: scheduler calls only, over QUIC with mutual TLS.
pub async fn run_scheduler(cfg: Config) -> Result<(), SwarmError> {
    let ca = cluster_ca(&cfg)?;
    let listen: SocketAddr = cfg.scheduler.listen.parse().map_err(|_| {
        TransportError::Stream(format!("scheduler.listen {:?}", cfg.scheduler.listen))
    })?;
    let node = Node::bind_with(listen, &ca.issue("starling-scheduler")?, path_policy(&cfg))?;
    let service = SchedulerService::new(scheduler_config(&cfg));
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let counted = metrics.clone();
    let served = node.serve(
        Arc::new(crate::scheduler::service::StandaloneScheduler(
            service.clone(),
        )),
        Arc::new(move |why| counted.handshake_refused(why)),
    );
    let health = health(&cfg, service, metrics).await?;
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
    if let Some(h) = health {
        h.abort();
    }
    tracing::info!("scheduler stopped");
    Ok(())
}

/// `GET /healthz` (200 while the scheduler runs) and `/metrics` on `scheduler.metrics_addr`.
async fn health(
    cfg: &Config,
    service: Arc<SchedulerService>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<Option<tokio::task::JoinHandle<()>>, SwarmError> {
    use crate::accept::http_reply;
    use hyper::StatusCode;
    let addr = &cfg.scheduler.metrics_addr;
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| SwarmError::Listen {
            key: "scheduler.metrics_addr",
            addr: addr.clone(),
            source,
        })?;
    tracing::info!(%addr, "serving /healthz and /metrics");
    Ok(Some(tokio::spawn(crate::accept::serve_http(
        listener,
        "metrics",
        metrics.clone(),
        move |req, _| {
            let (service, metrics) = (service.clone(), metrics.clone());
            async move {
                match req.uri().path() {
                    "/healthz" => http_reply(StatusCode::OK, "text/plain", "ok\n".into()),
                    "/metrics" => http_reply(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        service
                            .render_metrics(|r| metrics.register_listeners(r))
                            .into(),
                    ),
                    _ => http_reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                }
            }
        },
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scheduler_names_resolve_to_every_address_and_keep_them_when_resolution_fails() {
        let d = Directory::new(&[
            "localhost:7960".to_string(),
            "10.1.2.3:7960".to_string(),
            "starling-no-such-host.invalid:7960".to_string(),
        ]);
        // Literal addresses count at once.
        assert_eq!(d.members(), vec!["10.1.2.3:7960".to_string()]);
        assert!(d.refresh().await);
        let m = d.members();
        assert!(m.contains(&"127.0.0.1:7960".to_string()), "{m:?}");
        assert!(m.contains(&"10.1.2.3:7960".to_string()), "{m:?}");
        let task = TaskId::for_content(crate::core::Digest::of(b"x"));
        assert!(m.contains(&d.owner(&task).expect("an owner")));
        // Nothing changed: no new ring.
        assert!(!d.refresh().await);
        assert_eq!(d.members(), m);
    }
}
