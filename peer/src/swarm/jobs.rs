//! The driver's I/O tasks: asking the scheduler, long-polling each parent's verification log,
//! and fetching one piece (from a parent or the origin). A piece is checked against its chain
//! values before it is stored; an origin piece whose values the swarm does not know yet is
//! stored unchecked for the in-order chain ([`crate::storage::Chainer`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::policy::{ASK_FULL_EVERY, ASK_SHORT_AT_MOST, ASK_SOON};
use super::pull::PullError;
use super::Swarm;
use crate::core::{ChainValue, Link, Piece, TaskId};
use crate::engine::{Failure, ParentId};
use crate::fetch::{range_body, Progress};
use crate::scheduler::service::CandidatesReply;
use crate::scheduler::PeerId;
use crate::source::{Origin, SourceError};
use crate::storage::{Feed, TaskHandle};
use crate::transport::wire::{HaveReply, Status, WireError};
use crate::transport::{Parent, TransportError};

pub(super) enum Event {
    Connected { pid: ParentId, conn: Parent },
    Have { pid: ParentId, reply: HaveReply },
    Down { pid: ParentId, why: String },
    Advice(CandidatesReply),
}

pub(super) enum JobError {
    Fail(Failure, &'static str),
    /// The parent declined for now (`Failure::Busy`), offering these pieces instead.
    Busy(Vec<u32>),
    /// The bytes fail against the values in use, but reach the piece's anchored end value from
    /// this start value, the one their parent named: ours is false (see `provenance`).
    Proof(ChainValue),
    Fatal(PullError),
}

/// What the download wants of the scheduler: how many more parents, and which peers not to
/// offer (its parents, and those it just left or banned). Only a change of `count` wakes the
/// asking loop.
#[derive(Clone, Debug)]
pub(super) struct Wanted {
    pub count: usize,
    pub exclude: Vec<PeerId>,
    /// The peers it banned (also in `exclude`).
    pub banned: Vec<PeerId>,
    /// Pieces it holds.
    pub holds: u32,
}

/// Asks the scheduler for parents periodically: every 5 s once it has enough (at once when one
/// is lost); while short of parents, 100 ms after an ask that changed how many it lacks (at the
/// start, everyone who asked at the same moment becomes visible within a round or two), backing
/// off to 500 ms.
pub(super) async fn ask_loop(
    swarm: Arc<Swarm>,
    id: TaskId,
    tx: mpsc::UnboundedSender<Event>,
    mut wanted: tokio::sync::watch::Receiver<Wanted>,
) {
    let mut short_every = ASK_SOON;
    loop {
        if wanted.has_changed().unwrap_or(false) {
            short_every = ASK_SOON;
        }
        if wanted.borrow_and_update().count > 0 {
            tokio::time::sleep(short_every).await;
            short_every = (short_every * 2).min(ASK_SHORT_AT_MOST);
        } else {
            let _ = tokio::time::timeout(ASK_FULL_EVERY, wanted.wait_for(|w| w.count > 0)).await;
        }
        let (want, exclude, banned, holds) = {
            let w = wanted.borrow();
            (w.count, w.exclude.clone(), w.banned.clone(), w.holds)
        };
        match swarm.ask(id, want, exclude, banned, holds).await {
            Ok(r) => {
                if tx.send(Event::Advice(r)).is_err() {
                    return;
                }
            }
            Err(e) => {
                swarm.ctx.metrics.scheduler_error("candidates");
                tracing::debug!(error = %e, "scheduler call failed; retrying");
            }
        }
    }
}

/// How long connecting to a parent may take. A handshake's packets share the links with
/// piece data, and a lost one waits out QUIC's probe timeout (about 1 s, then 2 s): 3 s cut
/// short handshakes that were still retrying. Beyond QUIC's idle timeout (5 s) the handshake
/// fails anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(6);

/// Connects to a parent and long-polls its verification log until it goes away.
pub(super) async fn poll_parent(
    swarm: Arc<Swarm>,
    task: TaskId,
    pid: ParentId,
    addr: std::net::SocketAddr,
    tx: mpsc::UnboundedSender<Event>,
    mut closing: tokio::sync::watch::Receiver<bool>,
    have_every: tokio::sync::watch::Receiver<Duration>,
) {
    let down = |why: String| {
        let _ = tx.send(Event::Down { pid, why });
    };
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, swarm.connect(addr)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return down(e.to_string()),
        Err(_) => {
            return down(format!(
                "connecting to {addr} timed out after {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        }
    };
    if tx
        .send(Event::Connected {
            pid,
            conn: conn.clone(),
        })
        .is_err()
    {
        return;
    }
    let (mut epoch, mut since) = (u32::MAX, 0u32);
    // Asking again for a task the parent does not hold yet: soon at first (a seed that was
    // ordered to fetch it a moment ago holds it within milliseconds), then every 200 ms.
    let mut not_yet = Duration::from_millis(5);
    loop {
        let asked = tokio::time::Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), conn.have(task, epoch, since)).await {
            Ok(Ok(r)) => {
                let sealed = r.content.is_some() && r.entries.is_empty() && r.epoch == epoch;
                let empty = r.entries.is_empty();
                epoch = r.epoch;
                since = r.end;
                if tx.send(Event::Have { pid, reply: r }).is_err() {
                    return;
                }
                if sealed {
                    // A complete parent has no more news: just notice when it goes away.
                    let reason = conn.closed().await;
                    return down(reason);
                }
                // Until the interval is over, or at once when the download is closing (a
                // download that is over drops the sender, which ends the wait as well). An
                // answer without news (the first one, from a parent holding nothing yet) is
                // asked again at once: that ask waits at the parent for its first piece.
                if !empty {
                    let every = *have_every.borrow();
                    let _ = tokio::time::timeout_at(asked + every, closing.wait_for(|c| *c)).await;
                }
            }
            Ok(Err(TransportError::Refused(Status::NotFound))) => {
                // Not (yet) holding the task, e.g. a seed that just took our seed order.
                tokio::time::sleep(not_yet).await;
                not_yet = (not_yet * 2).min(Duration::from_millis(200));
            }
            Ok(Err(e)) => {
                if matches!(e, TransportError::Wire(WireError::Version(_))) {
                    tracing::warn!(parent = %addr, error = %e, "cannot use this parent");
                }
                return down(e.to_string());
            }
            Err(_) => return down("have request timed out".into()),
        }
    }
}

pub(super) async fn from_parent(
    conn: Parent,
    task_id: TaskId,
    group: u32,
    task: Arc<TaskHandle>,
    link: Link,
    alt: Option<ChainValue>,
    progress: Arc<Progress>,
) -> Result<(), JobError> {
    let piece = task
        .plan()
        .piece(link.index)
        .ok_or(JobError::Fail(Failure::Refused, "refused"))?;
    let chunks = conn
        .piece(task_id, piece.index, group)
        .await
        .map_err(|e| match e {
            TransportError::Busy(offer) => JobError::Busy(offer),
            TransportError::Refused(_) => JobError::Fail(Failure::Refused, "refused"),
            TransportError::Wire(_) => JobError::Fail(Failure::Mismatch, "malformed"),
            _ => JobError::Fail(Failure::Reset, "reset"),
        })?;
    let n: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    progress.add_parent(n);
    if let Some(start) = alt {
        let last = piece.index + 1 == task.plan().count();
        let theirs = Link { start, ..link };
        if n == piece.length
            && !link.holds(&piece, last, &chunks)
            && theirs.holds(&piece, last, &chunks)
        {
            return Err(JobError::Proof(start));
        }
    }
    verify_and_store(&task, piece, chunks, link).await
}

pub(super) async fn from_source(
    origin: Origin,
    url: String,
    task: Arc<TaskHandle>,
    piece: Piece,
    link: Option<Link>,
    feed: Feed,
    progress: Arc<Progress>,
) -> Result<(), JobError> {
    let total = task.plan().content_length();
    let fail = |e: SourceError| {
        if e.is_retryable() {
            JobError::Fail(Failure::Reset, "origin")
        } else {
            JobError::Fatal(e.into())
        }
    };
    let chunks = range_body(&origin, &url, piece, total, "", &progress)
        .await
        .map_err(fail)?;
    match link {
        Some(link) => verify_and_store(&task, piece, chunks, link).await,
        None => {
            feed.feed(piece.index, &chunks);
            task.store_unchecked(piece, chunks)
                .await
                .map_err(|e| JobError::Fatal(e.into()))
        }
    }
}

/// Stores a piece if it is whole and its bytes hash from `link.start` to `link.end`.
async fn verify_and_store(
    task: &TaskHandle,
    piece: Piece,
    chunks: Vec<Bytes>,
    link: Link,
) -> Result<(), JobError> {
    let n: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let last = piece.index + 1 == task.plan().count();
    if n != piece.length || !link.holds(&piece, last, &chunks) {
        return Err(JobError::Fail(Failure::Mismatch, "digest_mismatch"));
    }
    task.write_piece(piece, chunks, link)
        .await
        .map_err(|e| JobError::Fatal(e.into()))
}
