//! Back to source with parallel Range requests, planned by the same sans-IO [`Engine`] that
//! plans swarm downloads: here it has no parents, and the origin is its only source, with
//! `source.concurrency` requests in flight. The engine picks pieces in index order (nobody holds
//! any, so all are equally rare), which keeps the in-order chain ([`crate::storage::Chainer`],
//! which gives origin pieces their values and the content its digest) close behind the last
//! piece.
//!
//! Each request is one checked Range request ([`Origin::range`]), retried with backoff by
//! [`Retry`]; a piece is handed to the chain and stored unchecked until the chain reaches it. A
//! failure that outlasts the retries ends the download with that failure.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::retry::Retry;
use super::{FetchError, GiveWay, Progress};
use crate::core::Piece;
use crate::engine::{Action, Engine, EngineConfig, Peer};
use crate::source::{Origin, SourceError};
use crate::storage::{Feed, StoreError, TaskHandle};

/// How [`fetch`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every piece is stored.
    Complete,
    /// `give_way` was asked: no piece asked for after it, and those in flight landed.
    GaveWay,
}

/// Fetches every piece `task` lacks over `concurrency` parallel Range requests, until
/// `give_way` is asked. Each piece's buffers go to `feed` (the chain) before the piece is
/// stored.
#[allow(clippy::too_many_arguments)]
pub async fn fetch(
    origin: &Origin,
    retry: &Retry,
    task: &Arc<TaskHandle>,
    url: &str,
    concurrency: usize,
    progress: &Arc<Progress>,
    feed: &Feed,
    give_way: &GiveWay,
) -> Result<Ended, FetchError> {
    let plan = task.plan();
    let have = task.bitmap();
    let mut engine = Engine::new(
        plan,
        &have,
        EngineConfig {
            source_allowed: true,
            source_wait: Duration::ZERO,
            source_window: concurrency.max(1) as u32,
            ..EngineConfig::default()
        },
    );
    let validator = task.header().validator.clone();
    let start = Instant::now();
    let mut jobs: JoinSet<(u32, Duration, Result<(), FetchError>)> = JoinSet::new();
    let mut waited = None;
    loop {
        give_way.check_in(&mut waited).await;
        if give_way.asked() {
            // Pieces in flight land (a failed one is simply missing).
            while jobs.join_next().await.is_some() {}
            return Ok(Ended::GaveWay);
        }
        for action in engine.poll(start.elapsed()) {
            // With no parents the engine only ever asks the source.
            let Action::Request {
                from: Peer::Source,
                piece,
            } = action
            else {
                continue;
            };
            let Some(piece) = plan.piece(piece) else {
                continue;
            };
            let job = PieceJob {
                origin: origin.clone(),
                retry: retry.clone(),
                task: task.clone(),
                url: url.to_string(),
                validator: validator.clone(),
                progress: progress.clone(),
                feed: feed.clone(),
            };
            jobs.spawn(
                async move {
                    let t = Instant::now();
                    let res = job.retry.run("piece", || job.piece(piece)).await;
                    (piece.index, t.elapsed(), res)
                }
                .instrument(tracing::debug_span!("piece", index = piece.index))
                // In the task's span even when the piece's is off (`telemetry`'s parent links).
                .in_current_span(),
            );
        }
        if engine.is_complete() && jobs.is_empty() {
            return Ok(Ended::Complete);
        }
        let Some(done) = jobs.join_next().await else {
            // Nothing in flight and nothing asked for, yet pieces are missing: the planner
            // would never finish this download.
            return Err(StoreError::Uring(std::io::Error::other(format!(
                "the planner stopped with {} pieces missing",
                engine.missing()
            )))
            .into());
        };
        match done {
            Ok((index, elapsed, Ok(()))) => {
                engine.on_piece(Peer::Source, index, elapsed, start.elapsed());
            }
            Ok((_, _, Err(e))) => {
                jobs.shutdown().await;
                return Err(e);
            }
            Err(e) => {
                jobs.shutdown().await;
                return Err(StoreError::Uring(std::io::Error::other(format!(
                    "a piece job failed: {e}"
                )))
                .into());
            }
        }
    }
}

/// What one piece request needs.
struct PieceJob {
    origin: Origin,
    retry: Retry,
    task: Arc<TaskHandle>,
    url: String,
    validator: String,
    progress: Arc<Progress>,
    feed: Feed,
}

impl PieceJob {
    /// One attempt at one piece: a checked Range request, then stored for the chain.
    async fn piece(&self, piece: Piece) -> Result<(), FetchError> {
        let total = self.task.plan().content_length();
        let chunks = range_body(
            &self.origin,
            &self.url,
            piece,
            total,
            &self.validator,
            &self.progress,
        )
        .await?;
        self.feed.feed(piece.index, &chunks);
        self.task.store_unchecked(piece, chunks).await?;
        self.progress
            .done
            .fetch_add(piece.length, Ordering::Relaxed);
        Ok(())
    }
}

/// One piece's bytes from the origin by a checked Range request (status, `Content-Range`,
/// length and `validator` checked before a byte is kept; a body of exactly the piece's length),
/// counted into `progress.origin_bytes` as they arrive. Shared by the swarm's source jobs.
pub async fn range_body(
    origin: &Origin,
    url: &str,
    piece: Piece,
    total: u64,
    validator: &str,
    progress: &Progress,
) -> Result<Vec<Bytes>, SourceError> {
    // One back-to-source request's span (see `telemetry`); the URL without its query, which
    // may carry a signature.
    let span = tracing::info_span!(
        "source",
        url = url.split('?').next().unwrap_or(url),
        offset = piece.offset as i64,
        length = piece.length as i64,
        bytes = tracing::field::Empty,
        result = tracing::field::Empty,
    );
    let received = std::sync::atomic::AtomicU64::new(0);
    let res: Result<Vec<Bytes>, SourceError> = async {
        let body = origin
            .range(url, piece.offset, piece.length, total, validator)
            .await?;
        let mut body = std::pin::pin!(body);
        let mut chunks = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            progress.add_origin(chunk.len() as u64);
            progress.pace_origin(chunk.len() as u64).await;
            received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            chunks.push(chunk);
        }
        Ok(chunks)
    }
    .instrument(span.clone())
    .await;
    span.record("bytes", received.load(Ordering::Relaxed) as i64);
    match &res {
        Ok(_) => span.record("result", "ok"),
        Err(e) => span.record("result", e.to_string().as_str()),
    };
    res
}
