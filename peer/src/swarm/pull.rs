//! Pulling one task onto this node, by whatever way serves it: the daemon's own served copy,
//! the store, peers (the [`super::download`] driver), or the origin (the [`crate::fetch`]
//! pipeline), under the task's gate. Also `starling import` through the daemon, and serving
//! the store's recent tasks again after a restart.
//!
//! A task's walk: [`Swarm::pull`] → gate → served copy? → store look-up → scheduler advice →
//! peers ([`super::download::run`]) or source ([`crate::fetch::Fetcher::from_source`]) → sealed
//! and registered for serving.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::Instrument;

use super::serve::Holder;
use super::{download, Swarm};
use crate::core::{Import, PiecePlan, Request, TaskId};
use crate::fetch::{exit, FetchError, Fetched, Missing, Progress, Served, Sourced};
use crate::scheduler::service::CandidatesReply;
use crate::scheduler::Advice;
use crate::source::SourceError;
use crate::storage::{LeaseMode, StoreError, TaskHandle};

/// Why a pull failed. Failures among peers keep their own names; the origin pipeline's and the
/// store's come through as [`PullError::Fetch`].
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("task {task}: no piece arrived for {secs} s, from peers or the origin; check that a seed or another peer holds it and that the scheduler is reachable (with peer.source_fallback = false, nothing goes to the origin)")]
    PeersStalled { task: TaskId, secs: u64 },
    #[error("task {task}: the scheduler {scheduler} is unreachable ({detail}), and going back to source is off (peer.source_fallback = false); check scheduler.addrs and the [tls] CA")]
    SchedulerUnreachable {
        task: TaskId,
        scheduler: String,
        detail: String,
    },
    #[error("task {task}: a piece job could not be joined ({detail}); the verified pieces are kept, run the command again")]
    JoinFailed { task: TaskId, detail: String },
}

impl From<StoreError> for PullError {
    fn from(e: StoreError) -> Self {
        PullError::Fetch(e.into())
    }
}

impl From<SourceError> for PullError {
    fn from(e: SourceError) -> Self {
        PullError::Fetch(e.into())
    }
}

impl PullError {
    /// The exit code this failure maps to (the README's table).
    pub fn exit_code(&self) -> u8 {
        match self {
            PullError::Fetch(e) => e.exit_code(),
            PullError::PeersStalled { .. } | PullError::SchedulerUnreachable { .. } => {
                exit::NETWORK
            }
            PullError::JoinFailed { .. } => exit::OTHER,
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

impl Swarm {
    /// Pulls a task onto this node (from its served copy, the store, peers, or back to source
    /// when the scheduler says so), and keeps serving it.
    pub async fn pull(
        self: &Arc<Self>,
        req: &Request,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, PullError> {
        if let Some(pl) = req.piece_length {
            PiecePlan::new(0, pl).map_err(FetchError::from)?;
        }
        let filtered = &self.ctx.cfg.source.filtered_query_params;
        let id = TaskId::resolve(&req.url, req.digest, filtered).map_err(FetchError::from)?;
        let metrics = &self.ctx.metrics;
        metrics.started();
        progress.count_into(metrics);
        // The task's span (exported over OTLP when tracing is on: `telemetry`).
        let span = tracing::info_span!(
            "task",
            %id,
            bytes = tracing::field::Empty,
            parent_bytes = tracing::field::Empty,
            origin_bytes = tracing::field::Empty,
            result = tracing::field::Empty,
        );
        let res = self
            .gates
            .one_at_a_time(id, self.pull_gated(id, req, progress))
            .instrument(span.clone())
            .await;
        metrics.finished(res.is_ok());
        span.record(
            "parent_bytes",
            progress.parent_bytes.load(Ordering::Relaxed) as i64,
        );
        span.record(
            "origin_bytes",
            progress.origin_bytes.load(Ordering::Relaxed) as i64,
        );
        match &res {
            Ok(f) => {
                span.record("bytes", f.manifest.plan().content_length() as i64);
                span.record("result", "ok");
            }
            Err(e) => {
                span.record("result", e.to_string().as_str());
            }
        }
        match &res {
            Ok(f) => {
                if f.served == Served::Store {
                    metrics.add_bytes("local", f.manifest.plan().content_length());
                }
                share(&f.task);
            }
            Err(_) => self.unregister_partial(&id),
        }
        res
    }

    async fn pull_gated(
        self: &Arc<Self>,
        id: TaskId,
        req: &Request,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, PullError> {
        if let Some(done) = self.served_copy(id, progress).await? {
            return Ok(done);
        }
        let missing = match self.fetcher.lookup(id, progress).await? {
            Ok(done) => {
                self.register(&done.task, holder_of_stored(&done.task));
                return Ok(done);
            }
            Err(missing) => missing,
        };
        // A resumed task tells the scheduler it holds pieces: it is in the swarm already.
        let holds = match &missing {
            Missing::Partial(t) => t.verified_count(),
            Missing::Absent(_) => 0,
        };
        let mut reply = self.first_reply(id, holds).await?;
        let mut missing = missing;
        loop {
            // With source fallback off only a seed goes to source; others wait for parents.
            let pc = &self.ctx.cfg.peer;
            let to_source = reply.advice == Advice::Source && (pc.seed || pc.source_fallback);
            if let Some(mbps) = reply.source_mbps {
                progress.limit_origin(mbps);
            }
            let from_here = if to_source {
                missing
            } else {
                match download::run(self, id, req, missing, progress, reply).await? {
                    download::Outcome::Done(f) => return Ok(f),
                    download::Outcome::Source(m) => m,
                }
            };
            tracing::info!("fetching back to source");
            let fetching = self.announcer.fetching(id);
            let ended = self
                .fetcher
                .from_source(
                    id,
                    from_here,
                    req,
                    progress,
                    &|t| self.register(t, Holder::First),
                    fetching.give_way(),
                )
                .await?;
            drop(fetching);
            match ended {
                Sourced::Done(f) => return Ok(f),
                // Another node reads the origin now (this one was silent, and the scheduler
                // replaced it): the rest comes from the swarm, that node included.
                Sourced::GaveWay(t) => {
                    reply = self.first_reply(id, t.verified_count()).await?;
                    missing = Missing::Partial(t);
                }
            }
        }
    }

    /// The scheduler's first answer for a download holding `holds` pieces, or (source
    /// fallback on) an answer sending it to source when no scheduler answers.
    async fn first_reply(&self, id: TaskId, holds: u32) -> Result<CandidatesReply, PullError> {
        match self
            .first_ask(id, self.ctx.cfg.peer.max_parents, holds)
            .await
        {
            Ok(r) => Ok(r),
            Err(e) if !self.ctx.cfg.peer.source_fallback => Err(PullError::SchedulerUnreachable {
                task: id,
                scheduler: self.scheduler_for(&id),
                detail: e.to_string(),
            }),
            Err(e) => {
                self.ctx.metrics.scheduler_error("candidates");
                tracing::warn!(error = %e, "scheduler unreachable; going back to source");
                Ok(CandidatesReply {
                    parents: Vec::new(),
                    advice: Advice::Source,
                    lacking: None,
                    queued: false,
                    source_mbps: None,
                    gateway: false,
                    holders: None,
                    holdings: Vec::new(),
                    peers: Vec::new(),
                })
            }
        }
    }

    /// A complete task this daemon already serves: its views hold a shared lease, so read it
    /// under another shared lease (re-verified end to end, as every store hit is).
    async fn served_copy(
        &self,
        id: TaskId,
        progress: &Arc<Progress>,
    ) -> Result<Option<Fetched>, PullError> {
        if !self.serves_complete(&id) {
            return Ok(None);
        }
        let store = &self.ctx.store;
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

    /// Imports a local file (`starling import`) and seeds it from now on.
    pub async fn import(
        self: &Arc<Self>,
        req: &Import,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, PullError> {
        let staged = self.fetcher.stage(req, progress).await?;
        let id = staged.id;
        let res = self
            .gates
            .one_at_a_time(id, async {
                // A task this daemon already serves holds a shared lease: read it under another.
                if let Some(done) = self.served_copy(id, progress).await? {
                    return Ok(done);
                }
                let f = self.fetcher.adopt(staged, progress).await?;
                self.register(&f.task, Holder::First);
                Ok(f)
            })
            .instrument(tracing::info_span!("task", %id))
            .await;
        if let Ok(f) = &res {
            share(&f.task);
            // Peers told to fetch it right after the import returns must find it: the
            // scheduler hears of it now, not at the next tick.
            super::announce::now(self).await;
        }
        res
    }

    /// After a restart, serves again the complete tasks the store holds that were used within
    /// `peer.serve_idle_seconds` (what the previous run was still serving: an imported file,
    /// say, whose origin may not exist), most recent first, one at a time in the background.
    /// Each is verified end to end first, as every store hit is; damaged content is discarded,
    /// and partial downloads are left for the next pull. Their last-use time stays as it was,
    /// so a restart does not reorder GC.
    pub(super) async fn resume_serving(self: Arc<Self>) {
        let within = Duration::from_secs(self.ctx.cfg.peer.serve_idle_seconds);
        let recent = match self.ctx.store.used_within(within) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the store; serving only what is fetched from now on");
                return;
            }
        };
        let mut resumed = 0usize;
        for (id, last_use) in recent {
            if self.serve_stored(id, Some(last_use)).await {
                resumed += 1;
            }
        }
        if resumed > 0 {
            tracing::info!(tasks = resumed, "serving the store's complete tasks again");
        }
    }

    /// Serves one complete stored task again, verified end to end first; `last_use` (if given)
    /// is put back afterwards. False when it is served already, not complete, or damaged.
    pub(super) async fn serve_stored(
        self: &Arc<Self>,
        id: TaskId,
        last_use: Option<SystemTime>,
    ) -> bool {
        let progress = Arc::new(Progress::default());
        let res = self
            .gates
            .one_at_a_time(id, async {
                if self.is_served(&id) {
                    return Ok(false);
                }
                let Some(f) = self.fetcher.stored_complete(id, &progress).await? else {
                    return Ok(false);
                };
                if let Some(at) = last_use {
                    f.task.lease().set_last_use(at);
                }
                self.register(&f.task, holder_of_stored(&f.task));
                share(&f.task);
                Ok::<bool, FetchError>(true)
            })
            .instrument(tracing::info_span!("task", %id))
            .await;
        res.unwrap_or_else(|e| {
            tracing::warn!(task = %id, error = %e, "not serving a stored task again");
            false
        })
    }
}

/// A stored task that was imported here entered the swarm here: this node may be its only
/// holder. One downloaded from peers or the origin has (or had) other holders.
fn holder_of_stored(task: &TaskHandle) -> Holder {
    if task.header().url.starts_with("file://") {
        Holder::First
    } else {
        Holder::Relay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Digest;

    #[test]
    fn swarm_failures_have_their_own_names_and_exit_codes() {
        let task = TaskId::for_content(Digest::of(b"x"));
        let stalled = PullError::PeersStalled { task, secs: 60 };
        assert_eq!(stalled.exit_code(), exit::NETWORK);
        let text = stalled.to_string();
        assert!(text.contains("no piece arrived for 60 s"), "{text}");
        assert!(
            !text.contains("url") && !text.contains("\"peers\""),
            "{text}"
        );
        let unreachable = PullError::SchedulerUnreachable {
            task,
            scheduler: "10.0.0.1:7960".into(),
            detail: "timed out".into(),
        };
        assert_eq!(unreachable.exit_code(), exit::NETWORK);
        assert!(unreachable
            .to_string()
            .contains("the scheduler 10.0.0.1:7960 is unreachable (timed out)"));
        let join = PullError::JoinFailed {
            task,
            detail: "a piece job failed: panicked".into(),
        };
        assert_eq!(join.exit_code(), exit::OTHER);
        assert!(!join.to_string().contains("io_uring"));
        // The pipeline's own failures keep their codes.
        let store = PullError::from(StoreError::Uring(std::io::Error::other("disk")));
        assert_eq!(store.exit_code(), exit::LOCAL);
    }
}
