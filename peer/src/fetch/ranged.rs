//! Parallel ranged fetches back to source. Each connection's worker is its own tokio task, so
//! receiving and per-piece hashing spread over every core while the in-order content hash
//! runs on its own thread.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::retry::Retry;
use super::{ContentHasher, FetchError, Progress};
use crate::core::{Digest, Piece, Sha256Stream};
use crate::source::Origin;
use crate::storage::{StoreError, TaskHandle};

/// What every worker shares.
struct Ctx {
    origin: Origin,
    retry: Retry,
    task: Arc<TaskHandle>,
    url: String,
    validator: String,
    progress: Arc<Progress>,
    queue: Mutex<VecDeque<u32>>,
    permits: Arc<Semaphore>,
    hasher: Option<ContentHasher>,
}

/// Fetches the `missing` pieces over `concurrency` connections. With `hash`, the whole-content
/// digest is computed on the way (every piece passes through), else the caller re-reads.
#[allow(clippy::too_many_arguments)]
pub async fn fetch(
    origin: &Origin,
    retry: Retry,
    task: Arc<TaskHandle>,
    url: &str,
    missing: Vec<u32>,
    hash: bool,
    concurrency: usize,
    progress: &Arc<Progress>,
) -> Result<Option<Digest>, FetchError> {
    let plan = task.plan();
    let ctx = Arc::new(Ctx {
        origin: origin.clone(),
        retry,
        validator: task.header().validator.clone(),
        task,
        url: url.to_string(),
        progress: progress.clone(),
        queue: Mutex::new(VecDeque::from(missing)),
        permits: Arc::new(Semaphore::new(window(concurrency, plan.piece_length()))),
        hasher: hash.then(|| ContentHasher::start(plan.count())),
    });
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let ctx = ctx.clone();
        workers.spawn(async move { ctx.worker().await }.in_current_span());
    }
    while let Some(done) = workers.join_next().await {
        let res =
            done.map_err(|e| FetchError::Store(StoreError::Uring(std::io::Error::other(e))))?;
        if let Err(e) = res {
            workers.shutdown().await;
            return Err(e);
        }
    }
    // Every worker has finished and dropped its reference.
    Ok(Arc::into_inner(ctx)
        .and_then(|c| c.hasher)
        .and_then(ContentHasher::finish))
}

/// Pieces that may be in flight or waiting for the in-order hasher: enough to keep every
/// connection busy, capped at 64 MiB of piece data (never below one per connection plus one).
pub fn window(concurrency: usize, piece_length: u64) -> usize {
    let cap = (64 * 1024 * 1024 / piece_length.max(1)) as usize;
    (concurrency * 4).min(cap).max(concurrency + 1)
}

impl Ctx {
    async fn worker(&self) -> Result<(), FetchError> {
        loop {
            // Take the permit before the index: permit holders then always own the lowest
            // outstanding pieces, so the in-order hasher never waits on a piece that is itself
            // waiting for a permit.
            let permit = self.permits.clone().acquire_owned().await.map_err(|_| {
                FetchError::Store(StoreError::Uring(std::io::Error::other(
                    "piece window closed",
                )))
            })?;
            let Some(index) = self.queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                return Ok(());
            };
            let Some(piece) = self.task.plan().piece(index) else {
                continue;
            };
            let chunks = self
                .retry
                .run("piece", || self.piece(piece))
                .instrument(tracing::debug_span!("piece", index))
                .await?;
            match &self.hasher {
                Some(h) => h.feed(index, chunks, Some(permit)),
                None => drop(permit),
            }
        }
    }

    /// One attempt at one piece: a checked Range request, hashed as it arrives, then stored.
    async fn piece(&self, piece: Piece) -> Result<Vec<Bytes>, FetchError> {
        let total = self.task.plan().content_length();
        let body = self
            .origin
            .range(
                &self.url,
                piece.offset,
                piece.length,
                total,
                &self.validator,
            )
            .await?;
        let mut body = std::pin::pin!(body);
        let mut hash = Sha256Stream::new();
        let mut chunks = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            self.progress
                .origin_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            hash.update(&chunk);
            chunks.push(chunk);
        }
        self.task
            .write_piece(piece, chunks.clone(), hash.finish())
            .await?;
        self.progress
            .done
            .fetch_add(piece.length, Ordering::Relaxed);
        Ok(chunks)
    }
}
