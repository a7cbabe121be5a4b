//! The scheduler on the network: JSON calls over the peers' own QUIC endpoint and mutual TLS
//! (wire kinds 5 announce and 6 candidates), so only cluster members can announce or ask.
//! `starling scheduler` serves only these; a daemon without configured schedulers answers
//! them itself (the embedded scheduler).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Advice, Announce, Candidate, PeerId, Scheduler, SchedulerConfig};
use crate::core::TaskId;
use crate::stall::StallClock;
use crate::transport::wire::{Request, Status};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnnounceReply {
    /// Tasks the scheduler needs the full bitmap of (it restarted, or never saw one).
    pub resend: Vec<TaskId>,
    /// Tasks the peer said it reads from their origins while another live peer was chosen
    /// to: it stops and takes the rest from the swarm. Absent from older schedulers' replies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<TaskId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidatesCall {
    pub peer: PeerId,
    pub max: u32,
    /// Peers not to offer: the requester's parents and those it just left. Absent from older
    /// peers' calls.
    #[serde(default)]
    pub exclude: Vec<PeerId>,
    /// Only count the task's holders (`CandidatesReply::holders`): no parents, no advice
    /// acted on, and the caller is not taken for a joiner.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub look: bool,
    /// Peers the requester banned (wrong bytes, false values): what only they hold is lost to
    /// it. Absent from older peers' calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub banned: Vec<PeerId>,
    /// Pieces the requester holds of the task (0 from older peers).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub holds: u32,
    /// Where the requester sits, for a scheduler that has not had its first announcement yet
    /// (a flash crowd asks before it announces). Absent from older peers' calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<crate::scheduler::Place>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidatesReply {
    pub parents: Vec<Candidate>,
    pub advice: Advice,
    /// With `Source`: the pieces no live peer holds, which are all this peer should fetch
    /// from source (absent: all it lacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lacking: Option<Vec<u32>>,
    /// With `look`: the live peers holding the task, complete and partial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holders: Option<(u32, u32)>,
    /// With `look`: per holder (at most [`MAX_HOLDINGS`]), its pieces held and the pieces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holdings: Vec<(PeerId, u32, u32)>,
    /// The requester is its rack's gateway for the task (see `Scheduler::gateway`): it
    /// spreads what it serves like a seed, each piece to one member at a time, so the members
    /// pass pieces among themselves instead of all taking each from it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
    /// With `Wait`: the task waits for a fetcher slot (the origin is at its limit); keep
    /// asking, and do not go to source on a timer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
    /// With `Source`: the origin rate this fetcher may use, Mbit/s (its share of
    /// `scheduler.max_source_mbps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_mbps: Option<f64>,
    /// With `look`: every live peer (name, address, seed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<(PeerId, std::net::SocketAddr, bool)>,
}

/// Most holders one look lists.
pub const MAX_HOLDINGS: usize = 4096;

impl CandidatesReply {
    /// `advise`'s answer, with the pieces to fetch when it says `Source`.
    pub fn of(
        s: &Scheduler,
        task: &TaskId,
        (parents, advice): (Vec<Candidate>, Advice),
        now: std::time::Duration,
    ) -> Self {
        let source = advice == Advice::Source;
        let lacking = source.then(|| s.lacking(task)).flatten();
        CandidatesReply {
            queued: advice == Advice::Wait && s.is_queued(task),
            source_mbps: source.then(|| s.source_share(now)).flatten(),
            parents,
            advice,
            lacking,
            gateway: false,
            holders: None,
            holdings: Vec::new(),
            peers: Vec::new(),
        }
    }
}

/// Most candidates one call may ask for.
const MAX_CANDIDATES: u32 = 64;
/// Most peers one call may exclude (the rest are ignored).
const MAX_EXCLUDE: usize = 256;

/// A scheduler behind a lock, with its clock.
pub struct SchedulerService {
    state: Mutex<Scheduler>,
    /// The scheduler judges a peer gone when it has not heard from it for a few seconds. A
    /// stopped or starved scheduler process (a CPU quota's throttling, a paused VM, SIGSTOP)
    /// hears nobody, and on waking the announcements sent meanwhile are still queued behind the
    /// calls: by the wall clock every peer looked silent, the seed ordered to fetch looked gone,
    /// and each asker in turn was made the fetcher (32 peers, the scheduler stopped 7 s: the
    /// origin served 22 x F). So its time is a [`StallClock`]'s, which leaves its stalls out; a
    /// quiet but running scheduler keeps marking it, so real silence is still counted in full.
    clock: Arc<StallClock>,
    /// Calls answered: announcements, and parent queries (`look` calls included).
    announces: std::sync::atomic::AtomicU64,
    queries: std::sync::atomic::AtomicU64,
}

impl SchedulerService {
    /// A scheduler; inside a tokio runtime, its clock's ticker starts too (it ends with the
    /// service). Without one (a fuzzer, a bench driving calls by hand) every gap between
    /// calls longer than [`crate::stall::MAX_GAP`] is taken for a stall.
    pub fn new(cfg: SchedulerConfig) -> Arc<SchedulerService> {
        Arc::new(SchedulerService {
            state: Mutex::new(Scheduler::new(cfg)),
            clock: StallClock::new(),
            announces: Default::default(),
            queries: Default::default(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Scheduler) -> T) -> T {
        let now = self.clock.now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.expire(now);
        f(&mut s)
    }

    /// `starling_scheduler_peers`, `starling_scheduler_tasks`, and the calls answered by kind
    /// (`starling_scheduler_calls_total{kind="announce"|"candidates"}`), and whatever `more`
    /// registers under `starling_` (the process's listener series), in the Prometheus text
    /// format.
    pub fn render_metrics(
        &self,
        more: impl FnOnce(&mut prometheus_client::registry::Registry),
    ) -> String {
        use prometheus_client::metrics::gauge::Gauge;
        let (peers, tasks) = self.with(|s| (s.peers(), s.tasks()));
        let mut root = prometheus_client::registry::Registry::default();
        let registry = root.sub_registry_with_prefix("starling_scheduler");
        for (name, help, v) in [
            ("peers", "Peers heard from within the TTL", peers),
            ("tasks", "Tasks some live peer holds", tasks),
        ] {
            let g = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
            g.set(v as i64);
            registry.register(name, help, g);
        }
        let calls = prometheus_client::metrics::family::Family::<
            Vec<(&'static str, &'static str)>,
            prometheus_client::metrics::counter::Counter,
        >::default();
        use std::sync::atomic::Ordering::Relaxed;
        for (kind, n) in [
            ("announce", self.announces.load(Relaxed)),
            ("candidates", self.queries.load(Relaxed)),
        ] {
            calls.get_or_create(&vec![("kind", kind)]).inc_by(n);
        }
        registry.register("calls", "Scheduler calls answered, by kind", calls);
        more(root.sub_registry_with_prefix("starling"));
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &root);
        out
    }

    pub fn announce(&self, a: Announce) -> AnnounceReply {
        self.announces
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = self.clock.now();
        self.with(|s| {
            let peer = a.peer.clone();
            let tasks: Vec<TaskId> = a.tasks.iter().map(|(t, _)| *t).collect();
            let superseded = s.announce(a, now);
            AnnounceReply {
                resend: tasks.into_iter().filter(|t| !s.knows(&peer, t)).collect(),
                superseded,
            }
        })
    }

    pub fn candidates(&self, task: &TaskId, call: &CandidatesCall) -> CandidatesReply {
        self.queries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = self.clock.now();
        if call.look {
            return self.with(|s| CandidatesReply {
                parents: Vec::new(),
                advice: Advice::Wait,
                lacking: None,
                queued: false,
                source_mbps: None,
                gateway: false,
                holders: Some(s.holders(task)),
                holdings: s.holdings(task, MAX_HOLDINGS),
                peers: s.live_peers(),
            });
        }
        let max = call.max.min(MAX_CANDIDATES) as usize;
        let exclude = &call.exclude[..call.exclude.len().min(MAX_EXCLUDE)];
        let banned = &call.banned[..call.banned.len().min(MAX_EXCLUDE)];
        self.with(|s| {
            // (A peer's ID is the address it advertises.)
            if let (Some(place), Ok(addr)) = (&call.place, call.peer.parse()) {
                s.introduce(&call.peer, addr, place, now);
            }
            // Already in the swarm: it holds pieces, or has (or just had) parents.
            let joined = call.holds > 0 || !call.exclude.is_empty();
            let answer = s.advise_banning(&call.peer, task, max, exclude, banned, joined, now);
            let mut reply = CandidatesReply::of(s, task, answer, now);
            reply.gateway = s.is_gateway(&call.peer, task);
            if reply.advice == Advice::Source && !banned.is_empty() {
                reply.lacking = s.lacking_without(task, banned, now);
            }
            reply
        })
    }

    /// Answers a scheduler call from the wire; other kinds are refused.
    pub fn call(&self, req: Request, body: &Bytes) -> Result<Bytes, Status> {
        let reply = match req {
            Request::Announce { .. } => {
                let a: Announce = parse(body)?;
                serde_json::to_vec(&self.announce(a))
            }
            Request::Candidates { task, .. } => {
                let c: CandidatesCall = parse(body)?;
                serde_json::to_vec(&self.candidates(&task, &c))
            }
            _ => return Err(Status::BadRequest),
        };
        reply.map(Bytes::from).map_err(|_| Status::BadRequest)
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Status> {
    serde_json::from_slice(body).map_err(|e| {
        tracing::info!(error = %e, "malformed scheduler call");
        Status::BadRequest
    })
}

/// What `starling scheduler` serves: the scheduler calls, and no pieces.
pub struct StandaloneScheduler(pub Arc<SchedulerService>);

impl crate::transport::PieceSource for StandaloneScheduler {
    fn manifest(&self, _task: &TaskId) -> Option<Bytes> {
        None
    }
    fn piece(&self, _task: &TaskId, _index: u32) -> Option<Bytes> {
        None
    }
    fn call(
        self: Arc<Self>,
        req: Request,
        body: Bytes,
    ) -> futures::future::BoxFuture<'static, Result<Bytes, Status>> {
        let r = self.0.call(req, &body);
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn inside_a_runtime_the_clocks_ticker_keeps_marking_it() {
        let s = SchedulerService::new(SchedulerConfig::default());
        let wall = Instant::now();
        // 1.5 quiet seconds with no call: the ticker marked them, so they all count (with no
        // ticker, half a second of it would be taken for a stall).
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let now = s.clock.now();
        assert!(
            now + ms(50) >= wall.elapsed(),
            "{now:?} of {:?}",
            wall.elapsed()
        );
    }
}
