//! The whole-content SHA-256 of a download, computed in order while its pieces verify, so the
//! end-to-end check costs no re-read and no tail once the last piece lands. It hashes the
//! verified pieces straight from the content file's memory map (no copy; each piece's pages
//! leave the resident set when it is done), off the async threads.

use tokio::task::JoinHandle;

use super::UploadView;
use crate::core::{Digest, Sha256Stream};

/// Pieces hashed per blocking job.
const BATCH: usize = 8;

/// Follows one task; [`FollowHash::finish`] gives the digest once every piece is hashed.
pub struct FollowHash {
    task: JoinHandle<Option<(u32, Digest)>>,
}

impl FollowHash {
    pub fn start(view: UploadView) -> FollowHash {
        FollowHash {
            task: tokio::spawn(follow(view)),
        }
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

async fn follow(view: UploadView) -> Option<(u32, Digest)> {
    let mut changes = view.subscribe();
    let epoch = view.epoch();
    let count = view.plan().count();
    let mut hash = Sha256Stream::new();
    let mut next = 0u32;
    loop {
        // The verified pieces from `next` on (up to BATCH), hashed in one blocking job; each
        // piece's slice is dropped once hashed, so its pages leave the resident set.
        let mut batch = Vec::new();
        while let Some(b) = (next + (batch.len() as u32) < count && batch.len() < BATCH)
            .then(|| view.piece(next + batch.len() as u32))
            .flatten()
        {
            batch.push(b);
        }
        if !batch.is_empty() {
            next += batch.len() as u32;
            hash = tokio::task::spawn_blocking(move || {
                for b in batch {
                    hash.update(&b);
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
