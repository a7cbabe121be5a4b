//! The whole-content SHA-256 of a download, computed in order while its pieces verify, so the
//! end-to-end check costs no extra pass and no tail once the last piece lands. Every download
//! uses it, from peers or from the origin.
//!
//! A piece is hashed from the buffers it arrived in when the downloader hands them over
//! ([`Feed::feed`], before storing the piece), else straight from the content file's memory map
//! (pieces stored earlier, or fed too far ahead). Either way only verified pieces are hashed,
//! off the async threads, and each piece's buffers or pages are released once hashed. Fed
//! buffers are bounded ([`FEED_AHEAD`]): beyond it a piece is dropped from the feed and read
//! from the map instead, so memory stays bounded whatever the arrival order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::UploadView;
use crate::core::{Digest, Sha256Stream};

/// Pieces hashed per blocking job.
const BATCH: usize = 8;

/// Bytes of fed pieces kept at most while they wait for their turn.
pub const FEED_AHEAD: u64 = 64 * 1024 * 1024;

/// Follows one task; [`FollowHash::finish`] gives the digest once every piece is hashed.
pub struct FollowHash {
    task: JoinHandle<Option<(u32, Digest)>>,
    feed: Feed,
}

/// Hands a piece's own buffers to the follower, so it need not read them back from the map.
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
    /// Offers piece `index`'s buffers (call it before the piece is stored as verified). Over
    /// the bound, the piece is not kept: the follower reads it from the map.
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

impl FollowHash {
    pub fn start(view: UploadView) -> FollowHash {
        let feed = Feed::default();
        FollowHash {
            task: tokio::spawn(follow(view, feed.clone())),
            feed,
        }
    }

    /// The handle to feed pieces' own buffers through.
    pub fn feed(&self) -> Feed {
        self.feed.clone()
    }

    /// The content digest, once every piece has verified and been hashed, provided no reset
    /// happened since the start (`epoch` is the task's epoch now). None: hash it some other way.
    pub async fn finish(mut self, epoch: u32) -> Option<Digest> {
        let (started, digest) = (&mut self.task).await.ok().flatten()?;
        (started == epoch).then_some(digest)
    }
}

impl Drop for FollowHash {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(view: UploadView, feed: Feed) -> Option<(u32, Digest)> {
    let mut changes = view.subscribe();
    let epoch = view.epoch();
    let count = view.plan().count();
    let mut hash = Sha256Stream::new();
    let mut next = 0u32;
    loop {
        // The verified pieces from `next` on (up to BATCH), hashed in one blocking job: from
        // their fed buffers, else from the map. Each is dropped once hashed, so its memory (or
        // its pages) is released.
        let mut batch: Vec<Vec<Bytes>> = Vec::new();
        while next + (batch.len() as u32) < count && batch.len() < BATCH {
            let i = next + batch.len() as u32;
            if !view.is_verified(i) {
                break;
            }
            // Its own buffers when fed; else a slice of the map (none is made, and no pages
            // are touched or released, for a fed piece).
            let Some(chunks) = feed.take(i).or_else(|| view.piece(i).map(|b| vec![b])) else {
                break;
            };
            batch.push(chunks);
        }
        if !batch.is_empty() {
            next += batch.len() as u32;
            hash = tokio::task::spawn_blocking(move || {
                for chunks in batch {
                    for c in chunks {
                        hash.update(&c);
                    }
                }
                hash
            })
            .await
            .ok()?;
            continue;
        }
        if next == count {
            return Some((epoch, hash.finish()));
        }
        if view.epoch() != epoch {
            return None;
        }
        changes.changed().await.ok()?;
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
        // Over the bound: not kept (the follower reads it from the map).
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
