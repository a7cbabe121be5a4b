//! The task pipeline for one download, back to source: look the task up in the store, resume
//! it or create it, fetch the missing pieces (ranged and parallel when the origin honours
//! Range, else one in-order stream), verify every piece and the whole content, and seal it.
//!
//! One pipeline, parameterised: fresh, resumed, ranged and sequential downloads differ only in
//! which pieces are missing and where their bytes come from. Ranged downloads are planned by
//! the swarm's own [`crate::engine`] (no parents, the origin as the source), and every download
//! gets its pieces' values and the content's digest from the in-order chain
//! ([`crate::storage::Chainer`]), as swarm downloads do: one planner and one hasher for every
//! download, and each byte hashed once.
//!
//! A ranged download can be told to give way ([`GiveWay`]: the scheduler chose another node to
//! read this origin): it stops asking for pieces, lets those in flight land, and hands the
//! partial task back ([`Sourced::GaveWay`]) for the caller to finish from the swarm.

mod import;
pub mod output;
mod ranged;
mod retry;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tracing::Instrument;

use crate::context::NodeContext;
use crate::core::{Digest, Manifest, PiecePlan, PiecePlanError, Request, TaskId, TaskIdError};
use crate::source::{exact_body, Origin, Reply, SourceError};
use crate::stall::StallClock;
use crate::storage::{ChainEnd, Feed, Lease, LeaseMode, StoreError, TaskHandle, TaskHeader};

pub use import::Staged;
pub use ranged::range_body;
pub use retry::StallHook;

/// Live counters for a progress display and for reports.
#[derive(Debug, Default)]
pub struct Progress {
    /// Content length, once known.
    pub total: AtomicU64,
    /// Bytes verified and stored so far (including pieces found in the store).
    pub done: AtomicU64,
    /// Body bytes received from the origin, failed attempts included.
    pub origin_bytes: AtomicU64,
    /// Piece bytes received from parents, failed (corrupt) ones included.
    pub parent_bytes: AtomicU64,
    /// Where bytes are also counted as they arrive (`starling_bytes_total`), once set.
    live: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
    /// This download's share of the cluster's origin bandwidth, as the scheduler last said.
    origin_pace: std::sync::Mutex<Option<Arc<crate::pace::Pacer>>>,
}

impl Progress {
    /// Counts this download's bytes into `m` as they arrive (not only at the end), so a
    /// scrape during a long download sees them. Set once; later calls change nothing.
    pub fn count_into(&self, m: &Arc<crate::metrics::Metrics>) {
        let _ = self.live.set(m.clone());
    }

    /// Reads from the origin at most `mbps` from now on (a scheduler's share).
    pub fn limit_origin(&self, mbps: f64) {
        if let Ok(mut p) = self.origin_pace.lock() {
            let same = p
                .as_ref()
                .is_some_and(|p| (p.mbps_limit() - mbps).abs() < mbps * 0.05);
            if !same {
                *p = crate::pace::Pacer::mbps(mbps).map(Arc::new);
            }
        }
    }

    /// Waits until `n` origin bytes just read fit this download's share, if it has one.
    pub async fn pace_origin(&self, n: u64) {
        let pacer = self.origin_pace.lock().ok().and_then(|p| p.clone());
        if let Some(p) = pacer {
            p.after(n).await;
        }
    }

    pub fn add_origin(&self, n: u64) {
        self.origin_bytes.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = self.live.get() {
            m.add_bytes("origin", n);
        }
    }

    pub fn add_parent(&self, n: u64) {
        self.parent_bytes.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = self.live.get() {
            m.add_bytes("parent", n);
        }
    }
}

/// Where the content came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Entirely from the local store: no request reached the origin.
    Store,
    /// At least partly from the origin.
    Origin,
    /// From other peers (and the origin only for pieces no parent had).
    Swarm,
    /// From a local file (`starling import`).
    Local,
}

pub struct Fetched {
    pub task: TaskHandle,
    pub manifest: Manifest,
    pub served: Served,
}

/// How a download back to source ended.
pub enum Sourced {
    Done(Fetched),
    /// Told to give way part-way: the task as it stands (its verified pieces kept; pieces
    /// stored but not yet chained are chained by whoever opens it next).
    GaveWay(TaskHandle),
}

/// Asks a ranged download back to source to stop reading the origin (checked between
/// pieces). Clones share the request. With [`Heard`], the download also checks in with the
/// schedulers before reading on after a stall of its process ([`GiveWay::check_in`]).
#[derive(Clone, Debug, Default)]
pub struct GiveWay {
    asked: Arc<AtomicBool>,
    heard: Option<Heard>,
}

impl GiveWay {
    /// A request whose reader checks in after a stall ([`GiveWay::check_in`]).
    pub fn heard_by(heard: &Heard) -> GiveWay {
        GiveWay {
            asked: Arc::default(),
            heard: Some(heard.clone()),
        }
    }

    pub fn ask(&self) {
        self.asked.store(true, Ordering::Relaxed);
    }

    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }

    /// Before asking the origin for more. After a stall of this process at least the
    /// [`Heard`]'s `unheard` long (stopped, starved, a paused VM), its schedulers may have
    /// taken it for gone and chosen another reader, and reading on would read what its
    /// successor reads: after a 7 s stop, the origin served a twentieth of the file twice
    /// while the woken seed's next requests raced its first announcement. So this waits for
    /// the answer to an announcement sent after the stall (which asks it to give way if it
    /// was replaced), for at most the [`Heard`]'s `wait`, and once per stall: `waited` is this
    /// reader's memory of the stall it already waited out. Silent schedulers alone (stalled
    /// or unreachable themselves, with this process running) are no reason to wait.
    pub async fn check_in(&self, waited: &mut Option<Instant>) {
        let Some(heard) = &self.heard else {
            return;
        };
        let Some(stall) = heard.clock.last_stall() else {
            return;
        };
        // Checked before subscribing: this runs before every piece read from the origin.
        if stall.length < heard.unheard || *waited == Some(stall.ended) {
            return;
        }
        let mut rx = heard.tx.subscribe();
        if *rx.borrow_and_update() >= stall.ended {
            return;
        }
        *waited = Some(stall.ended);
        tracing::info!(
            stalled_ms = stall.length.as_millis() as u64,
            "this process could not run for a while and its schedulers may have chosen another reader meanwhile; waiting for their answer before reading more of the origin"
        );
        let answered = tokio::time::timeout(heard.wait, async {
            loop {
                if *rx.borrow_and_update() >= stall.ended {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        if answered.await.is_err() {
            tracing::info!("no answer from the schedulers; reading on");
        }
    }
}

/// When this node's schedulers last answered its announcements (when the last answered one
/// was sent), and this process's [`StallClock`]. Clones share them.
#[derive(Clone, Debug)]
pub struct Heard {
    tx: Arc<tokio::sync::watch::Sender<Instant>>,
    clock: Arc<StallClock>,
    /// A stall at least this long makes a reader check in ...
    unheard: Duration,
    /// ... and wait this long at most for an answer.
    wait: Duration,
}

impl Heard {
    /// Readers check in after a stall of `unheard` or more, and wait up to `wait` for an
    /// answer.
    pub fn new(clock: Arc<StallClock>, unheard: Duration, wait: Duration) -> Heard {
        Heard {
            tx: Arc::new(tokio::sync::watch::channel(Instant::now()).0),
            clock,
            unheard,
            wait,
        }
    }

    /// The schedulers answered the announcement sent at `sent` (after what they said was
    /// applied).
    pub fn answered(&self, sent: Instant) {
        self.tx.send_if_modified(|at| {
            let later = sent > *at;
            *at = (*at).max(sent);
            later
        });
    }
}

impl Fetched {
    /// Places the verified content at `out` (see [`output::place`]) under a shared lease, so
    /// other readers may proceed and GC may not evict it meanwhile.
    pub fn deliver(
        &self,
        out: &std::path::Path,
        allow_hard_link: bool,
    ) -> std::io::Result<output::Placed> {
        self.task.lease().downgrade()?;
        output::place(&self.task.content_path(), out, allow_hard_link)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    TaskId(#[from] TaskIdError),
    #[error("--piece-length: {0}")]
    Plan(#[from] PiecePlanError),
    #[error("cannot import {}: {detail}", path.display())]
    Input {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("digest mismatch for {url}: expected {expected}, the content has {actual}; nothing was saved")]
    DigestMismatch {
        url: String,
        expected: Digest,
        actual: Digest,
    },
}

impl From<crate::context::ContextError> for FetchError {
    fn from(e: crate::context::ContextError) -> Self {
        match e {
            crate::context::ContextError::Store(e) => FetchError::Store(e),
            crate::context::ContextError::Source(e) => FetchError::Source(e),
        }
    }
}

/// Process exit codes, shared by the CLI and the daemon's API (the README documents them).
pub mod exit {
    pub const OTHER: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const ORIGIN_REFUSED: u8 = 3;
    pub const INTEGRITY: u8 = 4;
    pub const NETWORK: u8 = 5;
    pub const LOCAL: u8 = 6;
    /// The command needs a running daemon and none answers on its socket.
    pub const NO_DAEMON: u8 = 7;
}

impl FetchError {
    /// The exit code this failure maps to.
    pub fn exit_code(&self) -> u8 {
        match self {
            FetchError::DigestMismatch { .. } => exit::INTEGRITY,
            FetchError::TaskId(_) | FetchError::Plan(_) | FetchError::Input { .. } => exit::USAGE,
            FetchError::Store(StoreError::PieceMismatch { .. }) => exit::INTEGRITY,
            FetchError::Store(_) => exit::LOCAL,
            FetchError::Source(s) => match s {
                SourceError::NotFound { .. }
                | SourceError::Denied { .. }
                | SourceError::ClientStatus { .. } => exit::ORIGIN_REFUSED,
                SourceError::CaCert { .. } => exit::USAGE,
                SourceError::Changed { .. } => exit::INTEGRITY,
                _ => exit::NETWORK,
            },
        }
    }

    /// A short cause name for metrics.
    pub fn cause(&self) -> &'static str {
        match self {
            FetchError::Source(s) => match s {
                SourceError::ServerStatus { .. } => "server_error",
                SourceError::ClientStatus { .. }
                | SourceError::NotFound { .. }
                | SourceError::Denied { .. } => "client_error",
                SourceError::Transfer { detail, .. } if detail.contains("timed out") => "timeout",
                SourceError::Transfer { .. } => "reset",
                SourceError::Short { .. } | SourceError::Length { .. } => "short_body",
                SourceError::BadRange { .. } | SourceError::RangeIgnored { .. } => "bad_range",
                SourceError::Connect { .. } | SourceError::Dns { .. } => "connect",
                SourceError::Tls { .. } | SourceError::CaCert { .. } => "tls",
                SourceError::Changed { .. } | SourceError::UnknownLength { .. } => "origin_changed",
            },
            FetchError::Store(StoreError::PieceMismatch { .. })
            | FetchError::DigestMismatch { .. } => "digest_mismatch",
            FetchError::Store(_) => "storage",
            FetchError::TaskId(_) | FetchError::Plan(_) | FetchError::Input { .. } => "bad_request",
        }
    }

    fn is_retryable(&self) -> bool {
        match self {
            FetchError::Source(e) => e.is_retryable(),
            FetchError::Store(StoreError::PieceMismatch { .. }) => true,
            _ => false,
        }
    }
}

/// Called with a task's handle as soon as it exists (created or resumed), before any piece is
/// fetched: the swarm starts serving it to peers from there.
pub type OnOpen<'a> = &'a (dyn Fn(&TaskHandle) + Send + Sync);

/// What the store lacks for a task: a partial download, or nothing (with the lease kept).
pub enum Missing {
    Partial(TaskHandle),
    Absent(Arc<Lease>),
}

/// The origin pipeline of one node: downloads back to source, store look-ups and imports,
/// over the node's [`NodeContext`].
pub struct Fetcher {
    ctx: Arc<NodeContext>,
    retry: retry::Retry,
}

impl Fetcher {
    pub fn new(ctx: Arc<NodeContext>) -> Fetcher {
        Fetcher {
            retry: retry::Retry::new(&ctx.cfg.source, ctx.metrics.clone()),
            ctx,
        }
    }

    /// Sets what to call when an origin transfer stalls (once; later calls are ignored).
    pub fn on_stall(&self, hook: retry::StallHook) {
        let _ = self.retry.stall.set(hook);
    }

    pub async fn fetch(
        &self,
        req: &Request,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, FetchError> {
        if let Some(pl) = req.piece_length {
            PiecePlan::new(0, pl)?; // reject a bad length before any I/O
        }
        let id = TaskId::resolve(
            &req.url,
            req.digest,
            &self.ctx.cfg.source.filtered_query_params,
        )?;
        self.ctx.metrics.started();
        progress.count_into(&self.ctx.metrics);
        let res = self
            .fetch_task(id, req, progress)
            .instrument(tracing::info_span!("task", %id))
            .await;
        self.ctx.metrics.finished(res.is_ok());
        if let Ok(f) = &res {
            if f.served == Served::Store {
                self.ctx
                    .metrics
                    .add_bytes("local", f.manifest.plan().content_length());
            }
        }
        res
    }

    async fn fetch_task(
        &self,
        id: TaskId,
        req: &Request,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, FetchError> {
        match self.lookup(id, progress).await? {
            Ok(done) => Ok(done),
            Err(missing) => {
                // Nobody else holds this download's `GiveWay`: it runs to the end.
                match self
                    .from_source(id, missing, req, progress, &|_| {}, &GiveWay::default())
                    .await?
                {
                    Sourced::Done(f) => Ok(f),
                    Sourced::GaveWay(_) => Err(StoreError::Uring(std::io::Error::other(
                        "a download nobody could stop gave way",
                    ))
                    .into()),
                }
            }
        }
    }

    /// Takes the task's exclusive lease and looks it up: complete and verified end to end, or
    /// what is missing.
    pub async fn lookup(
        &self,
        id: TaskId,
        progress: &Arc<Progress>,
    ) -> Result<Result<Fetched, Missing>, FetchError> {
        let lease = self.ctx.store.acquire(&id, LeaseMode::Exclusive).await?;
        Ok(match self.ctx.store.load(lease)? {
            Ok(task) => self.check_stored(task, progress).await?,
            Err(lease) => Err(Missing::Absent(lease)),
        })
    }

    /// The stored task `id` if it is complete, verified end to end (damaged content is
    /// discarded); `None` when the store holds none of it or only part of it (left as it is,
    /// not re-hashed).
    pub async fn stored_complete(
        &self,
        id: TaskId,
        progress: &Arc<Progress>,
    ) -> Result<Option<Fetched>, FetchError> {
        let lease = self.ctx.store.acquire(&id, LeaseMode::Exclusive).await?;
        let Ok(task) = self.ctx.store.load(lease)? else {
            return Ok(None);
        };
        if task.manifest().is_none() {
            return Ok(None);
        }
        Ok(self.check_stored(task, progress).await?.ok())
    }

    /// Downloads what is missing back to source (resuming a partial task whose origin content
    /// has not changed), unless `give_way` is asked first (ranged downloads only: an in-order
    /// stream cannot be taken up by another node at its position).
    pub async fn from_source(
        &self,
        id: TaskId,
        stored: Missing,
        req: &Request,
        progress: &Arc<Progress>,
        on_open: OnOpen<'_>,
        give_way: &GiveWay,
    ) -> Result<Sourced, FetchError> {
        let url = req.url.as_str();
        let origin = self.ctx.origin.with_headers(req.headers.clone());
        let probe = self.retry.run("probe", || origin.probe(url)).await?;
        let len = probe
            .content_length
            .ok_or_else(|| SourceError::UnknownLength { url: url.into() })?;
        // A partial task begun from peers has no validator (it never saw the origin): its
        // pieces were checked against the swarm's chain, and what the origin adds is chained
        // onto them, so it resumes when the length agrees. Discarding it sent every verified
        // piece to the origin again.
        let task = match stored {
            Missing::Partial(t)
                if t.plan().content_length() == len
                    && (t.header().validator.is_empty()
                        || t.header().validator == probe.validator) =>
            {
                tracing::info!(
                    verified = t.verified_count(),
                    of = t.plan().count(),
                    "resuming"
                );
                t
            }
            Missing::Partial(t) => {
                tracing::warn!(
                    stored_length = t.plan().content_length(),
                    length = len,
                    "the origin's content changed since the stored partial download; starting over"
                );
                let lease = t.discard()?;
                self.create(lease, id, req, len, &probe.validator)?
            }
            Missing::Absent(lease) => self.create(lease, id, req, len, &probe.validator)?,
        };

        self.download(
            task,
            req,
            probe.ranged,
            probe.full_body,
            progress,
            on_open,
            give_way,
        )
        .await
    }

    /// Fetches what `task` is missing and seals it. Ranged when the origin honours Range; if
    /// ranged answers stay malformed, or the result fails `--digest` (an origin can lie about
    /// Range with well-formed headers), it starts over once with a single in-order GET.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        mut task: TaskHandle,
        req: &Request,
        ranged: bool,
        full_body: Option<Reply>,
        progress: &Arc<Progress>,
        on_open: OnOpen<'_>,
        give_way: &GiveWay,
    ) -> Result<Sourced, FetchError> {
        let url = req.url.as_str();
        let origin = self.ctx.origin.with_headers(req.headers.clone());
        let (id, validator) = (task.header().id, task.header().validator.clone());
        let mut full_body = full_body;
        let mut ranged = ranged;
        loop {
            on_open(&task);
            let plan = task.plan();
            let have = task.bitmap();
            progress
                .total
                .store(plan.content_length(), Ordering::Relaxed);
            let stored: u64 = plan
                .pieces()
                .filter(|p| have[p.index as usize])
                .map(|p| p.length)
                .sum();
            progress.done.store(stored, Ordering::Relaxed);
            // The chain follows the pieces in order, as in every download: origin pieces get
            // their values from it, and the content its digest.
            let chainer = task.chainer()?;
            let feed = chainer.feed();
            let task_now = Arc::new(task);
            let res = if ranged {
                let res = ranged::fetch(
                    &origin,
                    &self.retry,
                    &task_now,
                    url,
                    self.ctx.cfg.source.concurrency,
                    progress,
                    &feed,
                    give_way,
                )
                .await;
                match res {
                    Err(FetchError::Source(
                        e @ (SourceError::RangeIgnored { .. } | SourceError::BadRange { .. }),
                    )) => {
                        tracing::warn!(error = %e, "ranged requests do not work with this origin; reading the whole body in order");
                        self.sequential(&origin, &task_now, url, None, progress, &feed)
                            .await
                            .map(|()| ranged::Ended::Complete)
                    }
                    other => other,
                }
            } else {
                tracing::info!("the origin does not honour Range; reading the whole body in order");
                self.sequential(&origin, &task_now, url, full_body.take(), progress, &feed)
                    .await
                    .map(|()| ranged::Ended::Complete)
            };
            task = Arc::into_inner(task_now).ok_or_else(|| {
                StoreError::Uring(std::io::Error::other("a piece job outlived its download"))
            })?;
            if res? == ranged::Ended::GaveWay {
                tracing::info!(
                    verified = task.verified_count(),
                    of = plan.count(),
                    "another node reads this origin now; taking the rest from the swarm"
                );
                return Ok(Sourced::GaveWay(task));
            }
            let actual = chain_digest(chainer.finish().await, url)?;
            match req.digest {
                Some(expected) if expected != actual => {
                    let lease = task.discard()?;
                    if !ranged {
                        return Err(FetchError::DigestMismatch {
                            url: url.into(),
                            expected,
                            actual,
                        });
                    }
                    tracing::warn!(%expected, %actual, "digest mismatch after ranged fetches; trying once more with one in-order GET");
                    ranged = false;
                    task = self.create(lease, id, req, plan.content_length(), &validator)?;
                }
                _ => {
                    let manifest = task.complete(actual)?;
                    return Ok(Sourced::Done(Fetched {
                        task,
                        manifest,
                        served: Served::Origin,
                    }));
                }
            }
        }
    }

    /// What the store holds for a task: complete and verified end to end, partial, or nothing.
    async fn check_stored(
        &self,
        task: TaskHandle,
        progress: &Progress,
    ) -> Result<Result<Fetched, Missing>, FetchError> {
        let Some(manifest) = task.manifest() else {
            let dropped = task.verify_journaled().await?;
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    "stored pieces no longer match their journaled chain values (lost in a crash, or damaged on disk); fetching them again"
                );
            }
            return Ok(Err(Missing::Partial(task)));
        };
        // End to end, every time: the stored bytes must still hash to the manifest's digest. A
        // sealed content is never written again (outputs may be hard links to it), so damaged
        // content is discarded whole and fetched anew.
        if task.verify_sealed().await? != Some(true) {
            tracing::warn!(expected = %manifest.content_digest(), "the stored content is damaged; discarding it and fetching again");
            return Ok(Err(Missing::Absent(task.discard()?)));
        }
        let len = task.plan().content_length();
        progress.total.store(len, Ordering::Relaxed);
        progress.done.store(len, Ordering::Relaxed);
        tracing::info!("served from the local store");
        Ok(Ok(Fetched {
            task,
            manifest,
            served: Served::Store,
        }))
    }

    /// Creates a fresh task under `lease` (the plan from `--piece-length` or the default rule).
    pub fn create(
        &self,
        lease: Arc<Lease>,
        id: TaskId,
        req: &Request,
        len: u64,
        validator: &str,
    ) -> Result<TaskHandle, FetchError> {
        let plan = match req.piece_length {
            Some(pl) => PiecePlan::new(len, pl)?,
            None => PiecePlan::with_default(len),
        };
        let header = TaskHeader {
            id,
            plan,
            expected: req.digest,
            validator: validator.into(),
            url: req.url.clone(),
        };
        Ok(self.ctx.store.create(lease, header)?)
    }

    /// Reads the whole body in order (an origin without Range), storing the missing pieces.
    /// Retries start the body over; pieces stored by earlier attempts stay.
    async fn sequential(
        &self,
        origin: &Origin,
        task: &TaskHandle,
        url: &str,
        first: Option<Reply>,
        progress: &Arc<Progress>,
        feed: &Feed,
    ) -> Result<(), FetchError> {
        let mut first = first;
        self.retry
            .run("body", || {
                let resp = first.take();
                async move {
                    let resp = match resp {
                        Some(r) => r,
                        None => origin.full(url).await?,
                    };
                    self.consume_in_order(task, url, resp, progress, feed).await
                }
            })
            .await
    }

    async fn consume_in_order(
        &self,
        task: &TaskHandle,
        url: &str,
        resp: Reply,
        progress: &Progress,
        feed: &Feed,
    ) -> Result<(), FetchError> {
        let plan = task.plan();
        let len = plan.content_length();
        if let Some(cl) = resp.resp.content_length() {
            if cl != len {
                return Err(SourceError::Changed {
                    url: url.into(),
                    detail: format!("length was {len}, now {cl}"),
                }
                .into());
            }
        }
        let have = task.bitmap();
        let mut body = std::pin::pin!(exact_body(url.to_string(), resp, len));
        let mut pieces = plan.pieces();
        let mut piece = pieces.next();
        let (mut cur, mut cur_len) = (Vec::new(), 0u64);
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk?;
            progress.add_origin(chunk.len() as u64);
            progress.pace_origin(chunk.len() as u64).await;
            while !chunk.is_empty() {
                let Some(p) = piece else { break };
                let need = (p.length - cur_len) as usize;
                let part = if chunk.len() > need {
                    chunk.split_to(need)
                } else {
                    std::mem::take(&mut chunk)
                };
                let stored = have[p.index as usize];
                cur_len += part.len() as u64;
                if !stored {
                    cur.push(part);
                }
                if cur_len < p.length {
                    continue;
                }
                if !stored {
                    let chunks = std::mem::take(&mut cur);
                    feed.feed(p.index, &chunks);
                    task.store_unchecked(p, chunks).await?;
                    progress.done.fetch_add(p.length, Ordering::Relaxed);
                }
                cur_len = 0;
                piece = pieces.next();
            }
        }
        match piece {
            None => Ok(()),
            Some(_) => Err(SourceError::Short {
                url: url.into(),
                got: plan.content_length() - cur_len,
                want: len,
            }
            .into()),
        }
    }
}

/// The content's digest from how its chain ended. A conflict means the origin's bytes end at
/// another value than the swarm gave for that piece: the origin's content changed.
pub(crate) fn chain_digest(end: ChainEnd, url: &str) -> Result<Digest, FetchError> {
    match end {
        ChainEnd::Done(d) => Ok(d),
        ChainEnd::Conflict { index } => Err(SourceError::Changed {
            url: url.into(),
            detail: format!("piece {index} from the origin does not match the swarm's chain value"),
        }
        .into()),
        ChainEnd::Reset => Err(StoreError::Uring(std::io::Error::other(
            "the in-order chain over the stored pieces stopped before the end",
        ))
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A short stall (1.1 s, plus up to a tick before it) stays well under `UNHEARD`.
    const UNHEARD: Duration = Duration::from_secs(2);
    const WAIT: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    // A current-thread runtime: blocking its thread is a stall of this "process".
    #[tokio::test]
    async fn a_reader_waits_for_its_schedulers_answer_after_its_own_stall_once() {
        let heard = Heard::new(StallClock::new(), UNHEARD, WAIT);
        let g = GiveWay::heard_by(&heard);
        let mut waited = None;
        // No stall, and the schedulers silent for 2.5 s (this process ran): no wait.
        tokio::time::sleep(ms(2_500)).await;
        let t = Instant::now();
        g.check_in(&mut waited).await;
        assert!(t.elapsed() < ms(500), "waited without a stall");
        assert_eq!(waited, None);

        // A stall shorter than `unheard`: no wait.
        std::thread::sleep(ms(1_100));
        let t = Instant::now();
        g.check_in(&mut waited).await;
        assert!(t.elapsed() < ms(500), "waited after a short stall");

        // A long stall: it waits for an answer to an announcement sent after it, which asks
        // it to give way. An answer to one sent before the stall does not end the wait.
        let before = Instant::now();
        std::thread::sleep(ms(2_500));
        let answer = {
            let (g, heard) = (g.clone(), heard.clone());
            tokio::spawn(async move {
                tokio::time::sleep(ms(100)).await;
                heard.answered(before);
                tokio::time::sleep(ms(200)).await;
                let sent = Instant::now();
                g.ask();
                heard.answered(sent);
            })
        };
        let t = Instant::now();
        g.check_in(&mut waited).await;
        assert!(t.elapsed() >= ms(300), "read on before the answer");
        assert!(g.asked(), "the answer's request was not seen");
        answer.await.expect("answer");

        // Another long stall, and nobody answers: it waits once, at most `wait`, then reads
        // on without waiting again for the same stall.
        std::thread::sleep(ms(2_500));
        let t = Instant::now();
        g.check_in(&mut waited).await;
        assert!(t.elapsed() >= WAIT, "did not wait for an answer");
        let t = Instant::now();
        g.check_in(&mut waited).await;
        assert!(t.elapsed() < ms(500), "waited twice for one stall");
    }

    #[tokio::test]
    async fn a_reader_without_schedulers_never_waits() {
        let g = GiveWay::default();
        let mut waited = None;
        std::thread::sleep(ms(1_500));
        let t = Instant::now();
        g.check_in(&mut waited).await;
        assert!(t.elapsed() < ms(500));
        assert!(!g.asked());
    }
}
