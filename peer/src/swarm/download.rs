//! The peer-to-peer download driver: the I/O shell around the sans-IO [`Engine`].
//!
//! Per parent, a poller connects (QUIC, mutual TLS) and long-polls the parent's log, which gives
//! the task's plan, the chain values (each piece's end value, as the origin-reading peer
//! computed it) and which pieces the parent holds. The engine decides what to request from
//! whom; each request is one stream; each piece is hashed on arrival from its start value and
//! stored only if it ends at its end value. Pieces go back to source only as the engine's rules
//! allow. The last piece's end value is the content digest (`--digest`, when given, is that
//! value from the start), so when every piece is verified the whole content is too: the
//! in-order chain ([`Chainer`]) only hashes origin pieces whose values were not known, and
//! gives the digest that is checked against the expected one (or the one the parents sealed)
//! before the task is sealed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use super::inventory::ParentView;
use super::jobs::{ask_loop, from_parent, from_source, poll_parent, Event, JobError, Wanted};
use super::policy::{
    engine_config, have_every, CLOSING_PIECES, HAVE_EVERY_FIRST, REDIAL_AFTER, REPLACE_WINDOW,
};
use super::provenance::{Heard, Provenance};
use super::pull::PullError;
use super::serve::Holder;
use super::{SeedOrder, Swarm};
use crate::core::{ChainValue, Digest, Link, PiecePlan, Request, TaskId};
use crate::engine::{Action, Engine, EngineConfig, Failure, ParentId, Peer};
use crate::fetch::{chain_digest, FetchError, Fetched, Missing, Progress, Served};
use crate::scheduler::service::CandidatesReply;
use crate::scheduler::{Advice, LinkReport, PeerId};
use crate::source::{Origin, SourceError};
use crate::storage::{Chainer, Lease, TaskHandle, TaskHeader};
use crate::transport::wire::{HaveReply, Request as Wire, MAX_WIRE_PIECES};
use crate::transport::Parent;

pub(super) enum Outcome {
    Done(Fetched),
    /// Nobody could serve the task: fetch it back to source.
    Source(Missing),
}

struct JobDone {
    from: Peer,
    piece: u32,
    elapsed: Duration,
    res: Result<(), JobError>,
}

struct ParentInfo {
    peer: PeerId,
    /// Its span under the task's (see `telemetry`): from when it was added until dropped.
    span: tracing::Span,
    conn: Option<Parent>,
    have: Vec<bool>,
    in_engine: bool,
    poller: AbortHandle,
    /// Since when every answer it gave was Busy (None: it delivered since, or was not asked).
    busy_since: Option<Instant>,
}

/// A parent that answers nothing but Busy for this long, while nothing arrives from anyone,
/// is dropped and banned for the download: a seed spreading its uploads says Busy for some
/// pieces for a moment, and its other children feed this one meanwhile. Counting Busy as no failure at all let a download whose parents
/// only answered Busy ask again forever, at two thirds of a core, with no stall deadline.
const BUSY_LIMIT: Duration = Duration::from_secs(20);

/// At the end, how long to wait for a parent to report the sealed content digest.
const CONTENT_WAIT: Duration = Duration::from_secs(10);
/// With no way to make progress (no parent, no source), a download fails after this long.
const STALL_LIMIT: Duration = Duration::from_secs(60);

struct Driver<'a> {
    swarm: &'a Arc<Swarm>,
    id: TaskId,
    req: &'a Request,
    progress: &'a Arc<Progress>,
    origin: Origin,
    start: Instant,
    task: Option<Arc<TaskHandle>>,
    lease: Option<Arc<Lease>>,
    engine: Option<Engine>,
    engine_cfg: EngineConfig,
    content: Option<Digest>,
    parents: HashMap<ParentId, ParentInfo>,
    by_peer: HashMap<PeerId, ParentId>,
    down_at: HashMap<PeerId, Instant>,
    banned: HashSet<PeerId>,
    /// Pieces and bytes received and verified per parent (for `starling stat` and the
    /// parents' spans).
    received: HashMap<PeerId, (u32, u64)>,
    ordered: HashSet<PeerId>,
    next_pid: ParentId,
    jobs: JoinSet<JobDone>,
    running: HashMap<(Peer, u32), AbortHandle>,
    tx: mpsc::UnboundedSender<Event>,
    /// When the scheduler first told this peer to fetch from source.
    told_source: Option<Instant>,
    /// The scheduler's last word (within [`SCHEDULER_SILENT`]) was that another peer fetches
    /// the task (`Wait`, or a seed to order): without a plan, this peer waits for it.
    others_fetch: bool,
    /// Held once the scheduler told this peer to fetch from source: its announcements say so.
    fetching: Option<super::announce::Fetching>,
    /// Whether the scheduler's last answer offered a peer that is not a parent (one could
    /// replace a slow parent).
    alternative: bool,
    /// Whether the scheduler made this peer its rack's gateway for the task.
    gateway: bool,
    source_mismatches: u32,
    last_progress: Instant,
    /// How many more parents this download could use, and whom not to offer (the scheduler
    /// loop watches it).
    wanted_parents: tokio::sync::watch::Sender<Wanted>,
    helpers: Vec<AbortHandle>,
    /// Few pieces left: parents' news is wanted at once, not gathered (see `poll_parent`).
    closing: tokio::sync::watch::Sender<bool>,
    /// How long pollers gather a parent's news (`policy::have_every`, from the measured rate).
    have_every: tokio::sync::watch::Sender<Duration>,
    /// The in-order chain: values for origin pieces, and the content digest at the end.
    chainer: Option<Chainer>,
    /// Who named each chain value in use; catches a parent naming false ones.
    provenance: Provenance,
    /// The scheduler's last word on going back to source, and when it came (see
    /// [`Engine::source_by_scheduler`]); after [`SCHEDULER_SILENT`] without an answer the
    /// engine's own timer decides again.
    source_says: Option<bool>,
    lacking: Option<Vec<u32>>,
    advised_at: Instant,
}

/// Without a scheduler answer for this long, a download goes back to its own source timer.
const SCHEDULER_SILENT: Duration = Duration::from_secs(15);

impl Drop for Driver<'_> {
    fn drop(&mut self) {
        self.swarm.downloads.end(&self.id);
        let done = self.engine.as_ref().is_some_and(Engine::is_complete);
        for p in self.parents.values() {
            self.close_span(p, if done { "ok" } else { "stopped" });
        }
        for p in self.parents.values() {
            p.poller.abort();
        }
        for h in &self.helpers {
            h.abort();
        }
    }
}

pub(super) async fn run(
    swarm: &Arc<Swarm>,
    id: TaskId,
    req: &Request,
    missing: Missing,
    progress: &Arc<Progress>,
    first: CandidatesReply,
) -> Result<Outcome, PullError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pc = &swarm.ctx.cfg.peer;
    let wait = Duration::from_millis(pc.source_wait_ms);
    let engine_cfg = engine_config(pc, &swarm.me);
    let mut d = Driver {
        swarm,
        id,
        req,
        progress,
        origin: swarm.ctx.origin.with_headers(req.headers.clone()),
        start: Instant::now(),
        task: None,
        lease: None,
        engine: None,
        engine_cfg,
        content: None,
        parents: HashMap::new(),
        by_peer: HashMap::new(),
        down_at: HashMap::new(),
        banned: HashSet::new(),
        received: HashMap::new(),
        ordered: HashSet::new(),
        next_pid: 0,
        jobs: JoinSet::new(),
        running: HashMap::new(),
        tx: tx.clone(),
        told_source: None,
        others_fetch: false,
        fetching: None,
        alternative: false,
        gateway: false,
        chainer: None,
        provenance: Provenance::new(0),
        source_mismatches: 0,
        last_progress: Instant::now(),
        wanted_parents: tokio::sync::watch::Sender::new(Wanted {
            count: pc.max_parents,
            exclude: Vec::new(),
            banned: Vec::new(),
            holds: 0,
        }),
        helpers: Vec::new(),
        closing: tokio::sync::watch::Sender::new(false),
        have_every: tokio::sync::watch::Sender::new(HAVE_EVERY_FIRST),
        source_says: None,
        lacking: None,
        advised_at: Instant::now(),
    };
    match missing {
        Missing::Partial(t) => {
            tracing::info!(
                verified = t.verified_count(),
                of = t.plan().count(),
                "resuming from peers"
            );
            d.open(t);
        }
        Missing::Absent(lease) => d.lease = Some(lease),
    }
    d.on_advice(first);
    let asker = tokio::spawn(ask_loop(
        swarm.clone(),
        id,
        tx.clone(),
        d.wanted_parents.subscribe(),
    ));
    d.helpers.push(asker.abort_handle());
    // Without a plan after this long (nobody answered with one), go back to source.
    let plan_deadline = wait * 3 + Duration::from_secs(5);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_links = Instant::now();
    loop {
        tokio::select! {
            Some(ev) = rx.recv() => d.on_event(ev)?,
            Some(done) = d.jobs.join_next(), if !d.jobs.is_empty() => d.on_job(done)?,
            _ = tick.tick() => {}
        }
        let Some(engine) = &d.engine else {
            let waited = d.start.elapsed();
            d.scheduler_silence();
            if d.swarm.ctx.cfg.peer.source_fallback && d.plan_overdue(waited, wait, plan_deadline) {
                tracing::info!(
                    waited_ms = waited.as_millis() as u64,
                    "no parent has this task"
                );
                return d.into_missing().map(Outcome::Source);
            }
            if waited >= STALL_LIMIT {
                return Err(stalled(id));
            }
            continue;
        };
        if engine.is_complete() && d.jobs.is_empty() {
            break;
        }
        d.step()?;
        if let Some(e) = &d.engine {
            let closing = e.missing() <= CLOSING_PIECES;
            d.closing
                .send_if_modified(|c| std::mem::replace(c, closing) != closing);
        }
        if last_links.elapsed() >= Duration::from_secs(1) {
            last_links = Instant::now();
            d.scheduler_silence();
            d.measure_links();
            d.shed_busy_parents();
            d.replace_slow_parent();
        }
        if d.last_progress.elapsed() >= STALL_LIMIT && d.jobs.is_empty() {
            return Err(stalled(id));
        }
    }
    d.measure_links();
    d.finish(&mut rx).await.map(Outcome::Done)
}

fn stalled(task: TaskId) -> PullError {
    PullError::PeersStalled {
        task,
        secs: STALL_LIMIT.as_secs(),
    }
}

/// A piece job that could not be joined, or a task handle still shared when the download ends.
fn join_failed(task: TaskId, detail: impl Into<String>) -> PullError {
    PullError::JoinFailed {
        task,
        detail: detail.into(),
    }
}

impl Driver<'_> {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Starts from a stored (partial) task: its plan and verified pieces. A digest the client
    /// named is the last piece's end value from the start.
    fn open(&mut self, t: TaskHandle) {
        let have = t.bitmap();
        self.provenance = Provenance::new(t.plan().count());
        if let (Some(d), Some(last)) = (self.req.digest, t.plan().count().checked_sub(1)) {
            t.learn(last, ChainValue::of_digest(d));
            self.provenance.anchor(last);
        }
        let mut engine = Engine::new(t.plan(), &have, self.engine_cfg.clone());
        engine.source_by_scheduler(self.source_says, self.lacking.as_deref());
        self.engine = Some(engine);
        let stored: u64 = t
            .plan()
            .pieces()
            .filter(|p| have[p.index as usize])
            .map(|p| p.length)
            .sum();
        self.progress
            .total
            .store(t.plan().content_length(), Ordering::Relaxed);
        self.progress.done.store(stored, Ordering::Relaxed);
        self.swarm.register(&t, Holder::Relay);
        self.chainer = t.chainer().ok();
        self.task = Some(Arc::new(t));
    }

    /// Gives the task (or its lease) back for a download from source. Before a plan is
    /// known no piece job exists, so the task is not shared.
    fn into_missing(mut self) -> Result<Missing, PullError> {
        self.jobs.abort_all();
        if let Some(t) = self.task.take().and_then(Arc::into_inner) {
            return Ok(Missing::Partial(t));
        }
        let id = self.id;
        self.lease
            .take()
            .map(Missing::Absent)
            .ok_or_else(|| join_failed(id, "the download lost its task lease"))
    }

    fn on_advice(&mut self, r: CandidatesReply) {
        tracing::debug!(parents = r.parents.len(), advice = ?r.advice, "scheduler advice");
        self.advised_at = Instant::now();
        if r.queued {
            // Waiting for the origin's turn (the scheduler's `max_fetchers`) is not a stall:
            // the deadlines count from the last word that it is still queued.
            self.start = Instant::now();
            self.last_progress = Instant::now();
        }
        if let Some(mbps) = r.source_mbps {
            self.progress.limit_origin(mbps);
        }
        let says = Some(r.advice == Advice::Source);
        if says == Some(true) && self.source_says != says {
            tracing::info!(
                pieces = r.lacking.as_ref().map(Vec::len),
                "the scheduler chose this peer to fetch what no peer holds"
            );
        }
        self.source_says = says;
        self.others_fetch = matches!(r.advice, Advice::Wait | Advice::AskSeed { .. });
        self.lacking = r.lacking.clone();
        if r.gateway {
            self.swarm.spread_for_rack(&self.id);
            if !self.gateway {
                self.gateway = true;
                self.make_room_outside_the_rack();
            }
        }
        if let Some(e) = &mut self.engine {
            e.source_by_scheduler(says, self.lacking.as_deref());
        }
        self.read_known_last();
        match &r.advice {
            Advice::Source => {
                self.told_source.get_or_insert_with(Instant::now);
                if self.fetching.is_none() {
                    self.fetching = Some(self.swarm.announcer.fetching(self.id));
                }
            }
            Advice::AskSeed { peer, addr } => {
                let (peer, addr) = (peer.clone(), *addr);
                if self.ordered.insert(peer.clone()) {
                    self.order(addr);
                }
                self.add_parent(peer, addr);
            }
            Advice::Parents | Advice::Wait => {}
        }
        for c in &r.parents {
            self.add_parent(c.peer.clone(), c.addr);
        }
        self.alternative = r
            .parents
            .iter()
            .any(|c| c.peer != self.swarm.me && !self.by_peer.contains_key(&c.peer));
        self.update_wanted();
    }

    /// Told to read the origin: what another node verified (its values are known) but no
    /// live peer holds is read last (see [`Engine::source_last`]).
    fn read_known_last(&mut self) {
        let (Some(task), Some(e)) = (&self.task, &mut self.engine) else {
            return;
        };
        if self.source_says != Some(true) {
            e.source_last(&[]);
            return;
        }
        let have = task.bitmap();
        let known = |i: &u32| {
            let (start, end) = task.link(*i);
            start.is_some() && end.is_some() && !have.get(*i as usize).copied().unwrap_or(true)
        };
        let last: Vec<u32> = match &self.lacking {
            Some(l) => l.iter().copied().filter(known).collect(),
            None => (0..task.plan().count()).filter(known).collect(),
        };
        if !last.is_empty() {
            tracing::debug!(
                pieces = last.len(),
                "reading last what another node verified and no live peer holds"
            );
        }
        e.source_last(&last);
    }

    /// Made its rack's gateway mid-download (the old one died): every parent was chosen in
    /// the rack, so half the slots are freed for parents outside it. With its slots full of
    /// rack members it asked for no parent, and the rack waited on pieces only other racks
    /// held (the simulator's churn in racks: 13.8 x the bound).
    fn make_room_outside_the_rack(&mut self) {
        let keep = self.swarm.ctx.cfg.peer.max_parents / 2;
        let Some(e) = &mut self.engine else { return };
        let retired = e.retire_all_but(keep);
        if !retired.is_empty() {
            tracing::info!(
                parents = retired.len(),
                "this peer takes the task into its rack now; freeing slots for parents outside it"
            );
            self.update_wanted();
        }
    }

    /// With no scheduler answer for [`SCHEDULER_SILENT`], nobody sees the whole swarm: the
    /// engine's own timer decides when pieces nobody holds go to source again.
    fn scheduler_silence(&mut self) {
        if self.source_says.is_some() && self.advised_at.elapsed() >= SCHEDULER_SILENT {
            tracing::info!(
                "no scheduler answer lately; going back to source by this peer's own timer"
            );
            self.source_says = None;
            self.others_fetch = false;
            if let Some(e) = &mut self.engine {
                e.source_by_scheduler(None, None);
            }
        }
    }

    /// Before any parent answered with the plan: whether to go to source now. When told to
    /// fetch, at once without parents, or after `wait` with parents that have not answered
    /// (only a parent that holds pieces has a plan, and it answers within a round trip).
    /// Otherwise after `deadline`, unless the scheduler's last word is that another peer
    /// fetches it: then the scheduler, which replaces a fetcher that does not deliver, decides.
    /// Each waiting peer's own deadline sent the whole content to the origin from every one
    /// of them once their fetcher was late (the scheduler stopped 7 s: 22 x F).
    fn plan_overdue(&self, waited: Duration, wait: Duration, deadline: Duration) -> bool {
        let told = self
            .told_source
            .is_some_and(|at| self.parents.is_empty() || at.elapsed() >= wait);
        told || (waited >= deadline && !self.others_fetch)
    }

    /// Tells the scheduler loop how many parents are missing (it asks soon while any are).
    fn update_wanted(&self) {
        let max = self.swarm.ctx.cfg.peer.max_parents;
        let count = max.saturating_sub(self.active_parents());
        let exclude = self
            .by_peer
            .keys()
            .chain(&self.banned)
            .chain(
                self.down_at
                    .iter()
                    .filter(|(_, t)| t.elapsed() < REDIAL_AFTER)
                    .map(|(p, _)| p),
            )
            .cloned()
            .collect();
        let banned: Vec<PeerId> = self.banned.iter().cloned().collect();
        let holds = match (&self.task, &self.engine) {
            (Some(t), Some(e)) => t.plan().count().saturating_sub(e.missing()),
            _ => 0,
        };
        self.wanted_parents.send_if_modified(|w| {
            // A new ban also asks at once: what only the banned peer held may need fetching.
            let changed = w.count != count || w.banned.len() != banned.len();
            *w = Wanted {
                count,
                exclude,
                banned,
                holds,
            };
            changed
        });
    }

    /// Orders a seed to fetch the task from source (it serves it to us as it goes).
    fn order(&mut self, addr: std::net::SocketAddr) {
        let order: &SeedOrder = self.req;
        let Ok(body) = serde_json::to_vec(order) else {
            return;
        };
        let (swarm, task) = (self.swarm.clone(), self.id);
        let h = tokio::spawn(async move {
            let res = async {
                let conn = swarm.connect(addr).await?;
                conn.call(|len| Wire::SeedOrder { task, body: len }, &body)
                    .await
            };
            if let Err(e) = tokio::time::timeout(Duration::from_secs(5), res).await {
                tracing::warn!(seed = %addr, error = %e, "seed order not delivered");
            }
        });
        self.helpers.push(h.abort_handle());
    }

    fn add_parent(&mut self, peer: PeerId, addr: std::net::SocketAddr) {
        if peer == self.swarm.me
            || self.banned.contains(&peer)
            || self.by_peer.contains_key(&peer)
            || self.active_parents() >= self.swarm.ctx.cfg.peer.max_parents
            || self
                .down_at
                .get(&peer)
                .is_some_and(|t| t.elapsed() < REDIAL_AFTER)
        {
            return;
        }
        let pid = self.next_pid;
        self.next_pid += 1;
        tracing::debug!(%peer, pid, "adding a parent");
        let poller = tokio::spawn(poll_parent(
            self.swarm.clone(),
            self.id,
            pid,
            addr,
            self.tx.clone(),
            self.closing.subscribe(),
            self.have_every.subscribe(),
        ));
        self.by_peer.insert(peer.clone(), pid);
        let span = tracing::info_span!(
            "parent",
            peer = %peer,
            pieces = tracing::field::Empty,
            bytes = tracing::field::Empty,
            result = tracing::field::Empty,
        );
        self.parents.insert(
            pid,
            ParentInfo {
                span,
                peer,
                conn: None,
                have: Vec::new(),
                in_engine: false,
                poller: poller.abort_handle(),
                busy_since: None,
            },
        );
    }

    /// Drops and bans the parents that answered only Busy for [`BUSY_LIMIT`] while nothing
    /// arrived from anyone (a parent busy with other children while the rest of the swarm
    /// feeds this one is no problem). The scheduler hears of the ban with the next ask, so
    /// what only they hold is fetched elsewhere.
    fn shed_busy_parents(&mut self) {
        if self.last_progress.elapsed() < BUSY_LIMIT {
            return;
        }
        let stuck: Vec<ParentId> = self
            .parents
            .iter()
            .filter(|(_, p)| p.busy_since.is_some_and(|t| t.elapsed() >= BUSY_LIMIT))
            .map(|(pid, _)| *pid)
            .collect();
        if stuck.is_empty() {
            return;
        }
        for pid in stuck {
            if let Some(p) = self.parents.get(&pid) {
                tracing::warn!(parent = %p.peer, secs = BUSY_LIMIT.as_secs(), "banned: it answered only Busy");
            }
            self.swarm.ctx.metrics.blacklisted();
            self.drop_parent(pid, true);
        }
        self.update_wanted();
    }

    /// With a partial mesh (more peers than `max_parents`) the parents first chosen are
    /// those the scheduler knew of at that moment (the first to announce the task), so a few
    /// peers get every child and the rest none. A parent that delivers far less than the others
    /// (overloaded, or behind this peer) makes room, one per window; the scheduler, asked at
    /// once, offers the others by what they hold that this peer lacks and by their load. Only
    /// when its last answer offered a peer that is not a parent: with no one else to take,
    /// dropping one would only leave the slot empty.
    fn replace_slow_parent(&mut self) {
        if self.active_parents() < self.swarm.ctx.cfg.peer.max_parents || !self.alternative {
            return;
        }
        let now = self.now();
        let Some(pid) = self
            .engine
            .as_mut()
            .and_then(|e| e.parent_to_replace(now, REPLACE_WINDOW))
        else {
            return;
        };
        self.alternative = false;
        if let Some(p) = self.parents.get(&pid) {
            tracing::debug!(parent = %p.peer, "replacing the parent that delivered least");
        }
        // It retires: it finishes what it is sending (dropped once drained, in `step`), and
        // its slot is free now.
        self.update_wanted();
    }

    /// Parents holding a slot: all but those retiring (see [`Engine::parent_to_replace`]).
    fn active_parents(&self) -> usize {
        let retiring = self.engine.as_ref().map_or(0, Engine::retiring);
        self.parents.len().saturating_sub(retiring)
    }

    /// Closes a parent's span with what it delivered.
    fn close_span(&self, p: &ParentInfo, result: &str) {
        let (pieces, bytes) = self.received.get(&p.peer).copied().unwrap_or((0, 0));
        p.span.record("pieces", pieces as i64);
        p.span.record("bytes", bytes as i64);
        p.span.record("result", result);
    }

    fn drop_parent(&mut self, pid: ParentId, ban: bool) {
        // Values it named against ours go with it (parent IDs are never reused).
        self.provenance.forget_parent(pid);
        if let Some(p) = self.parents.remove(&pid) {
            self.close_span(&p, if ban { "blacklisted" } else { "dropped" });
            p.poller.abort();
            self.by_peer.remove(&p.peer);
            if ban {
                self.banned.insert(p.peer);
            } else {
                self.down_at.insert(p.peer, Instant::now());
            }
        }
        if let Some(e) = &mut self.engine {
            e.remove_parent(pid);
        }
        let mine: Vec<(Peer, u32)> = self
            .running
            .keys()
            .filter(|(f, _)| *f == Peer::Parent(pid))
            .copied()
            .collect();
        for k in mine {
            if let Some(h) = self.running.remove(&k) {
                h.abort();
            }
        }
        self.update_wanted();
    }

    fn on_event(&mut self, ev: Event) -> Result<(), PullError> {
        match ev {
            Event::Advice(r) => self.on_advice(r),
            Event::Connected { pid, conn } => {
                if let Some(p) = self.parents.get_mut(&pid) {
                    p.conn = Some(conn);
                }
            }
            Event::Down { pid, why } => {
                if let Some(p) = self.parents.get(&pid) {
                    tracing::info!(parent = %p.peer, %why, "parent gone");
                }
                self.drop_parent(pid, false);
            }
            Event::Have { pid, reply } => self.on_have(pid, reply)?,
        }
        Ok(())
    }

    /// The first plan heard decides the task's layout; a parent with another one is dropped.
    fn on_have(&mut self, pid: ParentId, r: HaveReply) -> Result<(), PullError> {
        tracing::debug!(pid, entries = r.entries.len(), end = r.end, "have");
        if !self.parents.contains_key(&pid) {
            return Ok(());
        }
        let plan = match PiecePlan::new(r.content_length, r.piece_length) {
            Ok(p) if p.count() <= MAX_WIRE_PIECES => p,
            _ => {
                tracing::warn!("a parent sent an invalid piece plan; dropping it");
                self.drop_parent(pid, true);
                return Ok(());
            }
        };
        if self.engine.is_none() {
            self.create(plan)?;
        }
        let ours = self.task.as_ref().map(|t| t.plan());
        if ours != Some(plan) {
            tracing::warn!(
                theirs = ?plan,
                "a parent has this task with another piece plan; not using it"
            );
            self.drop_parent(pid, true);
            return Ok(());
        }
        if let (Some(c), Some(want)) = (r.content, self.req.digest) {
            if c != want {
                tracing::warn!(%c, %want, "a parent sealed other content under this digest; not using it");
                self.drop_parent(pid, true);
                return Ok(());
            }
        }
        if r.content.is_some() {
            self.content = r.content;
        }
        let n = plan.count() as usize;
        let Some(p) = self.parents.get_mut(&pid) else {
            return Ok(());
        };
        p.have.resize(n, false);
        let Some(task) = &self.task else {
            return Ok(());
        };
        let mut fresh = Vec::new();
        let mut lied = false;
        for e in r.entries {
            let known = task.value(e.index).is_some();
            let learned = task.learn(e.index, e.value);
            match self
                .provenance
                .heard(pid, e.index, e.value, e.held, learned, known)
            {
                Heard::Fine => {}
                Heard::Conflict => {
                    // Another value is in use (from an earlier parent): keep it, and do not
                    // ask this parent for the piece; its value is kept aside in case ours
                    // proves false.
                    tracing::debug!(
                        piece = e.index,
                        "a parent names another chain value for a piece than the one in use"
                    );
                    continue;
                }
                Heard::Liar => {
                    lied = true;
                    break;
                }
            }
            if e.held && !p.have[e.index as usize] {
                p.have[e.index as usize] = true;
                fresh.push(e.index);
            }
        }
        if lied {
            self.distrust(
                pid,
                "it named a chain value that contradicts the content digest",
            );
            return Ok(());
        }
        let Some(engine) = &mut self.engine else {
            return Ok(());
        };
        if !p.in_engine {
            engine.add_parent(pid, &p.have);
            p.in_engine = true;
        } else {
            for i in fresh {
                engine.parent_has(pid, i);
            }
        }
        Ok(())
    }

    /// `liar` named false chain values: it is banned, the values it alone named are retracted
    /// with the pieces checked against them (fetched again), and what other parents named for
    /// them is used instead (see `provenance`).
    fn distrust(&mut self, liar: ParentId, why: &str) {
        let Some(task) = self.task.clone() else {
            return;
        };
        let who = self
            .parents
            .get(&liar)
            .map_or_else(|| "?".to_string(), |p| p.peer.clone());
        let values = self.provenance.retract_from(liar);
        let lost = task.retract(&values);
        // The retraction starts a new epoch of the task's log, which ends the in-order chain:
        // it starts again, skipping what is still verified.
        if self.chainer.is_some() {
            self.chainer = task.chainer().ok();
        }
        tracing::warn!(
            parent = %who,
            values = values.len(),
            pieces = lost.len(),
            why,
            "a parent named false chain values: banned, and the pieces checked against them are fetched again"
        );
        self.swarm.ctx.metrics.piece_failure("false_values");
        self.swarm.ctx.metrics.blacklisted();
        self.drop_parent(liar, true);
        let plan = task.plan();
        if let Some(engine) = &mut self.engine {
            for &piece in &lost {
                engine.lost(piece);
                let len = plan.piece(piece).map_or(0, |p| p.length);
                let _ =
                    self.progress
                        .done
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                            Some(d.saturating_sub(len))
                        });
            }
        }
        // What the others named for those values, kept aside until now.
        for &j in &values {
            for (q, value, held) in self.provenance.take_claims(j, None) {
                let known = task.value(j).is_some();
                let learned = task.learn(j, value);
                let heard = self.provenance.heard(q, j, value, held, learned, known);
                if heard != Heard::Fine || !held {
                    continue;
                }
                if let Some(p) = self.parents.get_mut(&q) {
                    if let Some(h) = p.have.get_mut(j as usize) {
                        *h = true;
                    }
                    if let Some(engine) = &mut self.engine {
                        engine.parent_has(q, j);
                    }
                }
            }
        }
    }

    /// Piece `index`'s bytes from `pid` reach its anchored end value from `start`, the start
    /// value `pid` named, not from ours: ours is false, and whoever named it lied.
    fn proved(&mut self, pid: ParentId, index: u32, start: ChainValue) {
        let Some(teller) = index.checked_sub(1).and_then(|j| self.provenance.teller(j)) else {
            return;
        };
        if teller == pid {
            return;
        }
        self.distrust(
            teller,
            "another parent's bytes reach the content digest from a different chain value",
        );
        if let Some(t) = &self.task {
            if t.value(index - 1) == Some(start) {
                self.provenance.anchor(index - 1);
            }
        }
    }

    /// Creates the task in the store with the swarm's plan and starts serving it.
    fn create(&mut self, plan: PiecePlan) -> Result<(), PullError> {
        let Some(lease) = self.lease.take() else {
            return Ok(());
        };
        let header = TaskHeader {
            id: self.id,
            plan,
            expected: self.req.digest,
            validator: String::new(),
            url: self.req.url.clone(),
        };
        let task = self.swarm.ctx.store.create(lease, header)?;
        self.open(task);
        Ok(())
    }

    fn step(&mut self) -> Result<(), PullError> {
        let now = self.now();
        let Some(engine) = &mut self.engine else {
            return Ok(());
        };
        let actions = engine.poll(now);
        let drained = engine.drained();
        for (from, piece) in engine.take_timeouts() {
            if let Peer::Parent(pid) = from {
                let who = self.parents.get(&pid).map_or("?", |p| p.peer.as_str());
                tracing::info!(parent = who, piece, "piece timed out");
                self.swarm.ctx.metrics.piece_failure("timeout");
            }
        }
        for a in actions {
            match a {
                Action::Request { from, piece } => {
                    tracing::debug!(?from, piece, "request");
                    self.spawn(from, piece)
                }
                Action::Cancel { from, piece } => {
                    if let Some(h) = self.running.remove(&(from, piece)) {
                        h.abort();
                    }
                }
                Action::Blacklist { parent } => {
                    if let Some(p) = self.parents.get(&parent) {
                        tracing::warn!(parent = %p.peer, "blacklisted: it served corrupt pieces");
                        self.swarm.ctx.metrics.blacklisted();
                        self.banned.insert(p.peer.clone());
                        p.poller.abort();
                    }
                }
            }
        }
        for pid in drained {
            if let Some(p) = self.parents.get(&pid) {
                tracing::debug!(parent = %p.peer, "replaced parent drained");
            }
            self.drop_parent(pid, false);
        }
        Ok(())
    }

    fn spawn(&mut self, from: Peer, index: u32) {
        let Some(task) = self.task.clone() else {
            return;
        };
        let Some(piece) = task.plan().piece(index) else {
            return;
        };
        let link = match task.link(index) {
            (Some(start), Some(end)) => Some(Link { index, start, end }),
            _ => None,
        };
        let alt = match from {
            Peer::Parent(pid) => self.provenance.alt_start(pid, index),
            Peer::Source => None,
        };
        let progress = self.progress.clone();
        let id = self.id;
        let group = self.swarm.group;
        let started = Instant::now();
        let fut: futures::future::BoxFuture<'static, Result<(), JobError>> = match from {
            Peer::Parent(pid) => {
                let conn = self.parents.get(&pid).and_then(|p| p.conn.clone());
                match (conn, link) {
                    (Some(conn), Some(link)) => Box::pin(async move {
                        from_parent(conn, id, group, task, link, alt, progress).await
                    }),
                    // Not connected (yet), or no values to check against: a refusal.
                    _ => Box::pin(async { Err(JobError::Fail(Failure::Refused, "refused")) }),
                }
            }
            Peer::Source => {
                let origin = self.origin.clone();
                let url = self.req.url.clone();
                let feed = self.chainer.as_ref().map(Chainer::feed).unwrap_or_default();
                Box::pin(async move {
                    from_source(origin, url, task, piece, link, feed, progress).await
                })
            }
        };
        // In the task's span, so a source request's span is the task's child.
        let h = self.jobs.spawn(
            async move {
                let res = fut.await;
                JobDone {
                    from,
                    piece: index,
                    elapsed: started.elapsed(),
                    res,
                }
            }
            .in_current_span(),
        );
        self.running.insert((from, index), h);
    }

    fn on_job(&mut self, done: Result<JobDone, tokio::task::JoinError>) -> Result<(), PullError> {
        let done = match done {
            Ok(d) => d,
            Err(e) if e.is_cancelled() => return Ok(()),
            Err(e) => return Err(join_failed(self.id, format!("a piece job failed: {e}"))),
        };
        self.running.remove(&(done.from, done.piece));
        let now = self.now();
        let Some(engine) = &mut self.engine else {
            return Ok(());
        };
        match done.res {
            Ok(()) => {
                let len = self
                    .task
                    .as_ref()
                    .and_then(|t| t.plan().piece(done.piece))
                    .map_or(0, |p| p.length);
                if !engine.has(done.piece) {
                    self.progress.done.fetch_add(len, Ordering::Relaxed);
                    if let Some(p) = match done.from {
                        Peer::Parent(pid) => self.parents.get(&pid),
                        Peer::Source => None,
                    } {
                        let r = self.received.entry(p.peer.clone()).or_default();
                        r.0 += 1;
                        r.1 += len;
                    }
                }
                engine.on_piece(done.from, done.piece, done.elapsed, now);
                self.last_progress = Instant::now();
                if let Peer::Parent(pid) = done.from {
                    if let Some(p) = self.parents.get_mut(&pid) {
                        p.busy_since = None;
                    }
                }
            }
            Err(JobError::Busy(offer)) => {
                // A seed spreading its uploads: not a failure, unless it is all the parent
                // ever says (see `BUSY_LIMIT`). What it offers instead is asked for next.
                if let Peer::Parent(pid) = done.from {
                    if let Some(p) = self.parents.get_mut(&pid) {
                        p.busy_since.get_or_insert_with(Instant::now);
                    }
                    engine.offered(pid, &offer, now);
                }
                engine.on_failure(done.from, done.piece, Failure::Busy, now);
            }
            Err(JobError::Fail(f, cause)) => {
                if let Peer::Parent(pid) = done.from {
                    let who = self.parents.get(&pid).map_or("?", |p| p.peer.as_str());
                    tracing::info!(parent = who, piece = done.piece, cause, "piece failed");
                    self.swarm.ctx.metrics.piece_failure(cause);
                } else if f == Failure::Mismatch {
                    self.source_mismatches += 1;
                    if self.source_mismatches >= 3 {
                        return Err(SourceError::Changed {
                            url: self.req.url.clone(),
                            detail: "the origin's pieces do not match the swarm's hashes".into(),
                        }
                        .into());
                    }
                }
                engine.on_failure(done.from, done.piece, f, now);
            }
            Err(JobError::Proof(start)) => {
                // Not this parent's fault: back to the pool, and no strike.
                engine.on_failure(done.from, done.piece, Failure::Busy, now);
                if let Peer::Parent(pid) = done.from {
                    self.proved(pid, done.piece, start);
                }
            }
            Err(JobError::Fatal(e)) => return Err(e),
        }
        Ok(())
    }

    /// Feeds QUIC's path measurements to the engine and the scheduler's link reports.
    fn measure_links(&mut self) {
        let Some(engine) = &mut self.engine else {
            return;
        };
        let reports = engine.report();
        let rates: HashMap<ParentId, f64> = reports
            .iter()
            .filter_map(|r| Some((r.parent, r.rate?)))
            .collect();
        let mut views = Vec::new();
        if let Some(t) = &self.task {
            let every = have_every(t.plan().piece_length(), rates.values().sum());
            self.have_every
                .send_if_modified(|e| std::mem::replace(e, every) != every);
        }
        for (pid, p) in &self.parents {
            let Some(conn) = &p.conn else { continue };
            let s = conn.stats();
            let loss = s.path.lost_packets as f64 / s.path.sent_packets.max(1) as f64;
            engine.link_quality(*pid, s.path.rtt, loss);
            let r = reports.iter().find(|r| r.parent == *pid);
            views.push(ParentView {
                peer: p.peer.clone(),
                pieces: self.received.get(&p.peer).map_or(0, |r| r.0),
                rate: rates.get(pid).copied(),
                rtt_ms: s.path.rtt.as_secs_f64() * 1e3,
                loss,
                mtu: s.path.current_mtu as u32 + 28,
                strikes: r.map_or(0, |r| r.strikes),
                blacklisted: r.is_some_and(|r| r.blacklisted),
            });
            if let Some(rate) = rates.get(pid) {
                self.swarm.record_link(
                    &p.peer,
                    LinkReport {
                        throughput: *rate,
                        rtt: s.path.rtt,
                        loss,
                        mtu: s.path.current_mtu as u32 + 28,
                    },
                );
                self.swarm.ctx.metrics.parent_rate(&p.peer, *rate);
            }
        }
        self.swarm.downloads.publish(self.id, views);
    }

    /// Every piece is verified: check the whole content and seal the task.
    async fn finish(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Result<Fetched, PullError> {
        let Some(task) = self.task.take() else {
            return Err(stalled(self.id));
        };
        self.jobs.abort_all();
        while self.jobs.join_next().await.is_some() {}
        let task = Arc::into_inner(task)
            .ok_or_else(|| join_failed(self.id, "a piece job outlived its download"))?;
        // Every piece is stored; the chain gives values to those from the origin, and the
        // digest. Without one (the content could not be mapped at the start), one runs now.
        let chainer = match self.chainer.take() {
            Some(c) => c,
            None => task.chainer()?,
        };
        let actual = chain_digest(chainer.finish().await, &self.req.url)?;
        let mut expected = self.req.digest.or(self.content);
        // Only a parent holding the whole task can have sealed it, and a whole parent answers
        // a have request at once: wait for those, each until its first answer. One that
        // answers without a digest is finishing too (with nothing sealed to tell); parents
        // still downloading cannot know it. Waiting for all of them cost every peer of a swarm
        // whose seed died before sealing the full wait, at once.
        let mut whole: HashSet<ParentId> = self
            .parents
            .iter()
            .filter(|(_, p)| !p.have.is_empty() && p.have.iter().all(|h| *h))
            .map(|(pid, _)| *pid)
            .collect();
        let deadline = Instant::now() + CONTENT_WAIT;
        while expected.is_none() && !whole.is_empty() && Instant::now() < deadline {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some(Event::Have { pid, reply })) => {
                    expected = reply.content;
                    whole.remove(&pid);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        match expected {
            Some(e) if e != actual => {
                task.discard()?;
                return Err(PullError::Fetch(FetchError::DigestMismatch {
                    url: self.req.url.clone(),
                    expected: e,
                    actual,
                }));
            }
            Some(_) => {}
            None => tracing::warn!(
                %actual,
                "no parent reported the sealed content digest; every piece matched the swarm's hashes"
            ),
        }
        let manifest = task.complete(actual)?;
        Ok(Fetched {
            task,
            manifest,
            served: Served::Swarm,
        })
    }
}
