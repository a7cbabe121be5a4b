//! Serving other peers: the registry of tasks this node serves (an upload view each), the
//! transport's [`PieceSource`] over it, the spread of a sole holder's uploads (with the
//! pieces offered to a requester it declines), and the upload rate limit.
//!
//! Only verified pieces are served: a view hands out slices of the content's memory map for
//! the pieces its task's book marks verified, and a discarded task's view stops at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;

use super::policy::{Spread, HAVE_WAIT};
use super::Swarm;
use crate::core::TaskId;
use crate::storage::{TaskHandle, UploadView};
use crate::transport::wire::{self, HaveReply, Request as Wire, Status};
use crate::transport::PieceSource;

/// Over the store's budget, a complete task no peer fetched for this long stops being served
/// (see [`Swarm::shed_served`]).
const SHED_IDLE: Duration = Duration::from_secs(10);

/// Whether this node is where a task entered the swarm, and so spreads its uploads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Holder {
    /// It read the task from the origin, or imported it: at first nobody else holds it.
    First,
    /// It downloaded the task from peers (or found it in its store from such a download).
    Relay,
}

/// The tasks this node serves, and what serving them costs.
pub(super) struct Registry {
    tasks: Mutex<HashMap<TaskId, ServedTask>>,
    /// Bumped whenever a task's view is registered (the proxy waits on it).
    views: tokio::sync::watch::Sender<u64>,
    /// Pieces served since the last announcement (the load reported to the scheduler).
    pieces: AtomicU32,
    /// Upload rate limit: when the next piece may start (None: unlimited).
    pacer: Option<crate::pace::Pacer>,
}

/// A task this peer serves.
struct ServedTask {
    view: Arc<UploadView>,
    last_used: Instant,
    /// Present where this node spreads the task's uploads (see [`Spread`]).
    spread: Option<Spread>,
}

impl Registry {
    pub(super) fn new(upload_limit_mbps: f64) -> Registry {
        Registry {
            tasks: Mutex::new(HashMap::new()),
            views: tokio::sync::watch::Sender::new(0),
            pieces: AtomicU32::new(0),
            pacer: crate::pace::Pacer::mbps(upload_limit_mbps),
        }
    }

    /// Every served task's view (for announcements).
    pub(super) fn views(&self) -> Vec<(TaskId, Arc<UploadView>)> {
        self.tasks
            .lock()
            .map(|s| s.iter().map(|(id, t)| (*id, t.view.clone())).collect())
            .unwrap_or_default()
    }

    /// Pieces served since the last call.
    pub(super) fn take_load(&self) -> u32 {
        self.pieces.swap(0, Ordering::Relaxed)
    }
}

impl Swarm {
    /// Serves `task` to peers from now on (replacing an older view of it). A node where the
    /// task entered the swarm, and every seed, spreads its uploads.
    pub(super) fn register(&self, task: &TaskHandle, holder: Holder) {
        match task.upload_view() {
            Ok(v) => {
                let mut spread = (self.ctx.cfg.peer.seed || holder == Holder::First)
                    .then(|| Spread::new(task.plan().count(), self.group));
                if let Ok(mut s) = self.served.tasks.lock() {
                    // A rack's gateway keeps its rules when its task's view is replaced (at
                    // completion, say).
                    if spread.is_none() {
                        spread = s.remove(&task.header().id).and_then(|t| t.spread);
                    }
                    s.insert(
                        task.header().id,
                        ServedTask {
                            view: Arc::new(v),
                            last_used: Instant::now(),
                            spread,
                        },
                    );
                    self.ctx.metrics.set_serving(s.len());
                }
                self.served.views.send_modify(|n| *n += 1);
            }
            Err(e) => tracing::warn!(error = %e, "cannot serve this task to peers"),
        }
    }

    /// Changes whenever a task's view is registered.
    pub(crate) fn view_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.served.views.subscribe()
    }

    pub(super) fn unregister(&self, id: &TaskId) {
        if let Ok(mut s) = self.served.tasks.lock() {
            s.remove(id);
            self.ctx.metrics.set_serving(s.len());
        }
    }

    /// Stops serving a task whose download failed: its view would hold the task's lease
    /// against the next attempt. A complete task keeps being served.
    pub(super) fn unregister_partial(&self, id: &TaskId) {
        let partial = self
            .served
            .tasks
            .lock()
            .map(|s| s.get(id).is_some_and(|t| !t.view.is_complete()))
            .unwrap_or(false);
        if partial {
            self.unregister(id);
        }
    }

    /// Stops serving complete tasks nobody fetched for `peer.serve_idle_seconds`, so GC may
    /// evict them.
    pub fn expire_served(&self) {
        let idle = Duration::from_secs(self.ctx.cfg.peer.serve_idle_seconds);
        if let Ok(mut s) = self.served.tasks.lock() {
            s.retain(|_, t| !t.view.is_complete() || t.last_used.elapsed() < idle);
            self.ctx.metrics.set_serving(s.len());
        }
    }

    /// With the store over its budget: stops serving the complete tasks no peer fetched for
    /// [`SHED_IDLE`] and nobody reads now, so GC may evict them. Returns how many. (Kept for
    /// `peer.serve_idle_seconds` otherwise, a node over budget kept them all for an hour.)
    pub fn shed_served(&self) -> usize {
        let Ok(mut s) = self.served.tasks.lock() else {
            return 0;
        };
        let before = s.len();
        s.retain(|_, t| {
            !t.view.is_complete()
                || t.last_used.elapsed() < SHED_IDLE
                || Arc::strong_count(&t.view) > 1
        });
        self.ctx.metrics.set_serving(s.len());
        before - s.len()
    }

    pub(crate) fn view(&self, task: &TaskId) -> Option<Arc<UploadView>> {
        let mut s = self.served.tasks.lock().ok()?;
        let t = s.get_mut(task)?;
        t.last_used = Instant::now();
        Some(t.view.clone())
    }

    /// Stops serving `id` for its removal. Refused (nothing changes) while a child downloads
    /// from it. `Ok(true)`: it was served until now.
    pub(super) fn withdraw(&self, id: &TaskId) -> Result<bool, &'static str> {
        let Ok(mut s) = self.served.tasks.lock() else {
            return Err("the served registry is poisoned");
        };
        match s.get(id) {
            None => Ok(false),
            // The registry's own reference is the only one: no upload or poll holds the view.
            Some(t) if Arc::strong_count(&t.view) == 1 => {
                s.remove(id);
                self.ctx.metrics.set_serving(s.len());
                Ok(true)
            }
            Some(_) => Err("this node is serving it to peers right now"),
        }
    }

    pub(super) fn is_served(&self, id: &TaskId) -> bool {
        self.served.tasks.lock().is_ok_and(|s| s.contains_key(id))
    }

    /// Whether `id` is served and complete.
    pub(super) fn serves_complete(&self, id: &TaskId) -> bool {
        self.served
            .tasks
            .lock()
            .ok()
            .and_then(|s| s.get(id).map(|t| t.view.is_complete()))
            .unwrap_or(false)
    }

    /// A child's long-poll of this node's verification log for `task`.
    async fn have(self: Arc<Self>, task: TaskId, epoch: u32, since: u32) -> Option<Bytes> {
        let view = self.view(&task)?;
        let mut changes = view.subscribe();
        let mut slice = view.log_since(epoch, since);
        if slice.entries.is_empty() && slice.epoch == epoch && !view.is_complete() {
            let _ = tokio::time::timeout(HAVE_WAIT, changes.changed()).await;
            slice = view.log_since(epoch, since);
        }
        let plan = view.plan();
        let answer = HaveReply {
            content_length: plan.content_length(),
            piece_length: plan.piece_length(),
            content: view.content_digest(),
            epoch: slice.epoch,
            end: slice.end,
            entries: slice.entries,
        }
        .encode();
        self.ctx.metrics.have_answered(answer.len());
        Some(Bytes::from(answer))
    }
}

impl Swarm {
    /// The scheduler named this node its rack's gateway for `task`: from now on it spreads
    /// what it serves of it to its rack's members, each piece to one at a time (see
    /// [`Spread::for_rack`]), so that they pass pieces among themselves.
    pub(super) fn spread_for_rack(&self, task: &TaskId) {
        if self.group == 0 {
            return;
        }
        if let Ok(mut s) = self.served.tasks.lock() {
            if let Some(t) = s.get_mut(task) {
                if t.spread.is_none() {
                    tracing::debug!(%task, "this node is its rack's gateway for the task");
                    t.spread = Some(Spread::for_rack(t.view.plan().count(), self.group));
                }
            }
        }
    }
}

impl PieceSource for Swarm {
    fn manifest(&self, task: &TaskId) -> Option<Bytes> {
        self.view(task)?.manifest()
    }

    fn piece(&self, task: &TaskId, index: u32) -> Option<Bytes> {
        self.piece_status(task, index, SocketAddr::from(([0, 0, 0, 0], 0)), 0)
            .ok()
    }

    fn piece_status(
        &self,
        task: &TaskId,
        index: u32,
        to: SocketAddr,
        group: u32,
    ) -> Result<Bytes, Status> {
        let mut s = self.served.tasks.lock().map_err(|_| Status::NotFound)?;
        let t = s.get_mut(task).ok_or(Status::NotFound)?;
        t.last_used = Instant::now();
        let p = t.view.piece(index).ok_or(Status::NotFound)?;
        if let Some(spread) = &mut t.spread {
            if !spread.admit(index, to, group, Instant::now()) {
                return Err(Status::Busy);
            }
        }
        self.served.pieces.fetch_add(1, Ordering::Relaxed);
        Ok(p)
    }

    fn offer(&self, task: &TaskId, to: SocketAddr, group: u32) -> Vec<u32> {
        let Ok(mut s) = self.served.tasks.lock() else {
            return Vec::new();
        };
        let offer = s.get_mut(task).and_then(|t| {
            let view = &t.view;
            t.spread.as_mut().map(|spread| {
                spread.offer(to, group, Instant::now(), wire::MAX_OFFER, |i| {
                    view.is_verified(i)
                })
            })
        });
        // Some(None): no slot for this peer now (declined for that, not for the piece).
        let no_slot = matches!(offer, Some(None));
        let offer = offer.flatten().unwrap_or_default();
        self.ctx.metrics.declined(no_slot, offer.len());
        offer
    }

    fn piece_ended(&self, task: &TaskId, index: u32, to: SocketAddr, delivered: bool) {
        if let Ok(mut s) = self.served.tasks.lock() {
            if let Some(spread) = s.get_mut(task).and_then(|t| t.spread.as_mut()) {
                spread.ended(index, to, delivered, Instant::now());
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
        let r = match req {
            Wire::SeedOrder { task, .. } => self.clone().take_order(task, &body),
            _ => self.schedulers.answer(req, &body),
        };
        Box::pin(async move { r })
    }

    fn uploaded(&self, bytes: u64) {
        self.ctx.metrics.uploaded(bytes);
    }

    fn pace(&self, bytes: u64) -> BoxFuture<'static, ()> {
        match &self.served.pacer {
            Some(p) => {
                let at = p.reserve(bytes);
                Box::pin(tokio::time::sleep_until(at.into()))
            }
            None => Box::pin(async {}),
        }
    }
}
