//! The in-order chain: gives end values to pieces read from the origin, and the content's
//! digest once every piece is verified.
//!
//! A piece from a parent is checked on arrival against values the swarm already knows. A piece
//! from the origin has no known end value: it is stored *unchecked* (not served), and this task
//! walks the pieces in order, hashing each unchecked one from the end value of the piece before
//! it (so each origin byte is hashed once), and marks it verified with the value it ends at.
//! Verified pieces are skipped without hashing: their end value is the next one's start. The
//! last piece's end value is the content digest, so the end-to-end check costs nothing more.
//!
//! The chain also goes on past missing pieces whose start and end values are both known (a
//! parent published them) when origin pieces wait behind them ([`Book::skippable_run`]):
//! such a piece is checked on arrival against those values, from a parent or the origin. A
//! reader that took over from a stalled one reads the pieces its predecessor verified last
//! (their values are known; the predecessor may come back and serve them), and its chain does
//! not wait for them meanwhile. One of them stored unchecked after all (asked of the origin
//! before its values were known) is hashed here from its known start; the chain ends only once
//! each of them is verified.
//!
//! Since values come in order, a seed reading the origin with `n` Range requests in flight
//! serves (and lets children verify) a piece once every piece before it has arrived: at most
//! about `n` pieces behind what it holds.
//!
//! An unchecked piece is hashed from the buffers it arrived in when the downloader hands them
//! over ([`Feed::feed`], before storing the piece), else straight from the content file's memory
//! map (pieces fed too far ahead). Hashing runs off the async threads, and each piece's buffers
//! or pages are released once hashed. Fed buffers are bounded ([`FEED_AHEAD`]): beyond it a
//! piece is dropped from the feed and read from the map instead, so memory stays bounded
//! whatever the arrival order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::book::Book;
use super::task::Marker;
use super::UploadView;
use crate::core::{ChainValue, Digest, Link, Piece, PieceChain};

/// Pieces hashed per blocking job.
const BATCH: usize = 8;

/// Missing pieces the chain goes past at most, so that what it checks at each change stays
/// small: a peer far behind its parents that also reads the origin would otherwise skip (and
/// re-check) most of the task.
const MAX_SKIPPED: usize = 1024;

/// Bytes of fed pieces kept at most while they wait for their turn.
pub const FEED_AHEAD: u64 = 64 * 1024 * 1024;

/// How the chain over one task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainEnd {
    /// Every piece is verified; the content's digest (the last piece's end value).
    Done(Digest),
    /// The task was reset (discarded) meanwhile.
    Reset,
    /// An origin piece ended at another value than the one the swarm gave for it: the origin
    /// and the swarm hold different content. The piece is left unverified.
    Conflict { index: u32 },
}

/// Follows one task; [`Chainer::finish`] gives how the chain ended.
pub struct Chainer {
    task: JoinHandle<ChainEnd>,
    feed: Feed,
}

/// Hands a piece's own buffers to the chain, so it need not read them back from the map.
#[derive(Clone, Default)]
pub struct Feed {
    waiting: Arc<Mutex<Fed>>,
}

#[derive(Default)]
struct Fed {
    pieces: BTreeMap<u32, Vec<Bytes>>,
    bytes: u64,
}

impl Feed {
    /// Offers piece `index`'s buffers (call it before the piece is stored). Over the bound,
    /// the piece is not kept: the chain reads it from the map.
    pub fn feed(&self, index: u32, chunks: &[Bytes]) {
        let n: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if let Ok(mut w) = self.waiting.lock() {
            if w.bytes + n <= FEED_AHEAD {
                w.bytes += n;
                if let Some(old) = w.pieces.insert(index, chunks.to_vec()) {
                    w.bytes -= old.iter().map(|c| c.len() as u64).sum::<u64>();
                }
            }
        }
    }

    /// The fed buffers of `index`, if any (removed from the feed).
    fn take(&self, index: u32) -> Option<Vec<Bytes>> {
        let mut w = self.waiting.lock().ok()?;
        let chunks = w.pieces.remove(&index)?;
        w.bytes -= chunks.iter().map(|c| c.len() as u64).sum::<u64>();
        Some(chunks)
    }
}

impl Chainer {
    pub(crate) fn start(view: UploadView, marker: Marker) -> Chainer {
        let feed = Feed::default();
        Chainer {
            task: tokio::spawn(follow(view, marker, feed.clone())),
            feed,
        }
    }

    /// The handle to feed pieces' own buffers through.
    pub fn feed(&self) -> Feed {
        self.feed.clone()
    }

    /// How the chain ended, once every piece is verified (or it could not go on).
    pub async fn finish(mut self) -> ChainEnd {
        (&mut self.task).await.unwrap_or(ChainEnd::Reset)
    }
}

impl Drop for Chainer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An unchecked piece's bytes: its fed buffers, else from the map.
fn bytes_of(feed: &Feed, view: &UploadView, i: u32) -> Option<Vec<Bytes>> {
    feed.take(i)
        .or_else(|| view.stored_piece(i).map(|b| vec![b]))
}

enum Strays {
    /// No skipped piece is stored unchecked.
    None,
    /// Some were, and are verified now.
    Checked,
    /// The chain ends: one ended at another value than the one known, or the task was reset.
    End(ChainEnd),
}

/// Hashes the skipped pieces stored unchecked (`strays`: asked of the origin before their
/// values were known), each from its known start value, and marks those that end at their
/// known end value.
async fn check_strays(
    book: &Book,
    view: &UploadView,
    marker: &Marker,
    feed: &Feed,
    strays: &[u32],
    epoch: u32,
) -> Strays {
    let plan = view.plan();
    let count = plan.count();
    let mut work = Vec::new();
    for &i in strays {
        let (Some(start), Some(piece)) = (book.link(i).0, plan.piece(i)) else {
            continue;
        };
        let Some(chunks) = bytes_of(feed, view, i) else {
            continue;
        };
        work.push((start, piece, chunks));
    }
    if work.is_empty() {
        return Strays::None;
    }
    let Ok(links) = tokio::task::spawn_blocking(move || {
        work.into_iter()
            .map(|(start, piece, chunks)| PieceChain::resume(start, count).next(&piece, &chunks))
            .collect::<Vec<Link>>()
    })
    .await
    else {
        return Strays::End(ChainEnd::Reset);
    };
    // Values retracted meanwhile (a lying parent caught): these links may be stale.
    if view.epoch() != epoch {
        return Strays::End(ChainEnd::Reset);
    }
    for link in links {
        if book.value(link.index) != Some(link.end) {
            return Strays::End(ChainEnd::Conflict { index: link.index });
        }
        if let Err(e) = marker.mark(link) {
            tracing::debug!(error = %e, piece = link.index, "chained piece not journaled");
        }
    }
    Strays::Checked
}

async fn follow(view: UploadView, marker: Marker, feed: Feed) -> ChainEnd {
    let book = marker.book();
    let mut changes = view.subscribe();
    let epoch = view.epoch();
    let plan = view.plan();
    let count = plan.count();
    let mut value = ChainValue::START;
    let mut next = 0u32;
    // Missing pieces the chain went past (their values known), until verified.
    let mut skipped: Vec<u32> = Vec::new();
    let mut waits = Waits::default();
    loop {
        if view.epoch() != epoch {
            return ChainEnd::Reset;
        }
        loop {
            // Verified pieces need no hashing: the chain continues from their end value.
            while next < count && book.is_verified(next) {
                let Some(v) = book.value(next) else { break };
                value = v;
                feed.take(next);
                next += 1;
            }
            let room = MAX_SKIPPED.saturating_sub(skipped.len());
            let Some((to, v)) = (next < count && room > 0)
                .then(|| book.skippable_run(next, room))
                .flatten()
                .and_then(|to| Some((to, book.value(to - 1)?)))
            else {
                break;
            };
            skipped.extend(next..to);
            value = v;
            next = to;
        }
        let strays = book.pending(&mut skipped);
        match check_strays(book, &view, &marker, &feed, &strays, epoch).await {
            Strays::None => {}
            Strays::Checked => continue,
            Strays::End(end) => return end,
        }
        if next == count && skipped.is_empty() {
            waits.report();
            return ChainEnd::Done(if count == 0 {
                Digest::of(b"")
            } else {
                value.to_digest()
            });
        }
        // The unchecked pieces from `next` on (up to BATCH), hashed in one blocking job: from
        // their fed buffers, else from the map.
        let mut batch: Vec<(Piece, Vec<Bytes>)> = Vec::new();
        let mut stored_at = Vec::new();
        while batch.len() < BATCH {
            let i = next + batch.len() as u32;
            let Some((piece, stored)) = plan.piece(i).zip(book.unchecked_since(i)) else {
                break;
            };
            let Some(chunks) = bytes_of(&feed, &view, i) else {
                break;
            };
            batch.push((piece, chunks));
            stored_at.push(stored);
        }
        if batch.is_empty() {
            if changes.changed().await.is_err() {
                return ChainEnd::Reset;
            }
            continue;
        }
        let mut chain = PieceChain::resume(value, count);
        let Ok(links) = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|(piece, chunks)| chain.next(&piece, &chunks))
                .collect::<Vec<Link>>()
        })
        .await
        else {
            return ChainEnd::Reset;
        };
        if view.epoch() != epoch {
            return ChainEnd::Reset;
        }
        for (link, stored) in links.into_iter().zip(stored_at) {
            waits.add(stored.elapsed());
            if book
                .value(link.index)
                .is_some_and(|known| known != link.end)
            {
                return ChainEnd::Conflict { index: link.index };
            }
            // A journal that cannot be written only costs a re-fetch after a restart.
            if let Err(e) = marker.mark(link) {
                tracing::debug!(error = %e, piece = link.index, "chained piece not journaled");
            }
            value = link.end;
            next = link.index + 1;
        }
    }
}

/// How long origin pieces waited between being stored and being chained (served): what the
/// in-order values cost the children of a seed reading the origin.
#[derive(Default)]
struct Waits {
    count: u32,
    total: Duration,
    max: Duration,
}

impl Waits {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.total += d;
        self.max = self.max.max(d);
    }

    fn report(&self) {
        if self.count > 0 {
            tracing::info!(
                pieces = self.count,
                mean_ms = (self.total / self.count).as_secs_f64() * 1e3,
                max_ms = self.max.as_secs_f64() * 1e3,
                "origin pieces chained: time from stored to served"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_feed_is_bounded_and_gives_each_piece_once() {
        let f = Feed::default();
        let piece = |n: usize| vec![Bytes::from(vec![7u8; n])];
        f.feed(0, &piece(10));
        f.feed(1, &piece(FEED_AHEAD as usize - 10));
        // Over the bound: not kept (the chain reads it from the map).
        f.feed(2, &piece(1));
        assert!(f.take(2).is_none());
        assert_eq!(f.take(0).map(|c| c[0].len()), Some(10));
        assert!(f.take(0).is_none(), "once");
        // Room again once taken.
        f.feed(3, &piece(10));
        assert!(f.take(3).is_some());
        assert!(f.take(1).is_some());
        assert_eq!(f.waiting.lock().unwrap().bytes, 0);
    }
}
