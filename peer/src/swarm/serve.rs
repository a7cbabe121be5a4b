//! Serving other peers: the registry of tasks this node serves (an upload view each), the
//! transport's [`PieceSource`] over it, the spread of a sole holder's uploads, and the upload
//! rate limit.
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

use super::Swarm;
use crate::core::TaskId;
use crate::storage::{TaskHandle, UploadView};
use crate::transport::wire::{HaveReply, Request as Wire, Status};
use crate::transport::PieceSource;

/// How long a have request is held open while the parent has no news.
const HAVE_WAIT: Duration = Duration::from_millis(1000);

/// How long a sole holder declines to send a piece again after it was delivered (see
/// [`Spread`]): long enough for its receiver to pass it on, short enough that a receiver that
/// died does not starve anyone.
const SPREAD_HOLD: Duration = Duration::from_secs(5);

/// How long a send still in flight keeps others waiting at most. A send ends on its own
/// (delivered, or failed when the receiver resets it, times out or goes away); this bounds a
/// send whose end the transport never reports.
const SPREAD_IN_FLIGHT_MAX: Duration = Duration::from_secs(60);

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
    pacer: Option<Pacer>,
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
            pacer: (upload_limit_mbps > 0.0).then(|| Pacer {
                bytes_per_second: upload_limit_mbps * 125_000.0,
                next: Mutex::new(Instant::now()),
            }),
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
                let spread = (self.ctx.cfg.peer.seed || holder == Holder::First)
                    .then(|| Spread::new(task.plan().count()));
                if let Ok(mut s) = self.served.tasks.lock() {
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

    pub(crate) fn view(&self, task: &TaskId) -> Option<Arc<UploadView>> {
        let mut s = self.served.tasks.lock().ok()?;
        let t = s.get_mut(task)?;
        t.last_used = Instant::now();
        Some(t.view.clone())
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
        self.ctx.metrics.have_answered();
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
        let mut s = self.served.tasks.lock().map_err(|_| Status::NotFound)?;
        let t = s.get_mut(task).ok_or(Status::NotFound)?;
        t.last_used = Instant::now();
        let p = t.view.piece(index).ok_or(Status::NotFound)?;
        if let Some(spread) = &mut t.spread {
            if !spread.admit(index, to, Instant::now()) {
                return Err(Status::Busy);
            }
        }
        self.served.pieces.fetch_add(1, Ordering::Relaxed);
        Ok(p)
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

/// A sole holder's record of what it has sent: it sends each piece to one peer at a time, and
/// not again to another peer until [`SPREAD_HOLD`] after that send was delivered; another peer
/// asking sooner is declined (`Busy`) and gets it from the receiver. (The same peer asking
/// again, after a failure or a restart, is served; a send that failed frees the piece at
/// once.) Otherwise children that pick the same rare pieces would spend the holder's upload,
/// which bounds the whole swarm, on duplicates. The hold runs from delivery, not from the start
/// of the send: in a large swarm a seed's link is shared by dozens of sends, and one piece can
/// take longer than the hold to leave (24 peers at 25 Mbit/s: the seed sent 1.44-1.58 x F when
/// the hold ran from the start).
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

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn a_sole_holder_sends_a_piece_to_one_peer_until_the_hold_after_delivery() {
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
