//! Serving stored pieces to peers without copying: a read-only memory map of the content file,
//! handed out as `Bytes` slices that keep the map alive. Only verified pieces are served.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::book::{Book, LogSlice};

use bytes::Bytes;
use memmap2::Mmap;

use super::lease::Lease;
use super::{io_err, StoreError};
use crate::core::{Digest, Manifest, PiecePlan, TaskId};

pub struct UploadView {
    task: TaskId,
    plan: PiecePlan,
    map: Option<Arc<Mmap>>,
    pieces: Arc<Book>,
    manifest: Arc<Mutex<Option<Manifest>>>,
    _lease: Arc<Lease>,
}

/// A piece's bytes inside the shared map.
struct MapSlice {
    map: Arc<Mmap>,
    start: usize,
    end: usize,
}

/// When a served piece's last reference goes, its pages leave this process's resident set
/// (they stay in the page cache): the daemon's RSS then tracks the pieces in flight, not the
/// file size.
impl Drop for MapSlice {
    fn drop(&mut self) {
        // SAFETY: a shared, read-only file mapping: MADV_DONTNEED drops only this process's
        // page table entries for the range, and any later read (another slice of the same
        // pages) faults the same bytes back in from the page cache.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.start,
                self.end - self.start,
            )
        };
    }
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}

impl UploadView {
    pub(crate) fn open(
        task: TaskId,
        plan: PiecePlan,
        content: &Path,
        pieces: Arc<Book>,
        manifest: Arc<Mutex<Option<Manifest>>>,
        lease: Arc<Lease>,
    ) -> Result<UploadView, StoreError> {
        let map = if plan.content_length() == 0 {
            None
        } else {
            let f = std::fs::File::open(content).map_err(io_err("open", content))?;
            // SAFETY: the content file is preallocated to its full length and never truncated
            // while a lease on the task is held, which this view keeps; bytes of pieces not yet
            // verified may change under the map, but those are never handed out.
            let m = unsafe { Mmap::map(&f) }.map_err(io_err("map", content))?;
            Some(Arc::new(m))
        };
        Ok(UploadView {
            task,
            plan,
            map,
            pieces,
            manifest,
            _lease: lease,
        })
    }

    pub fn task(&self) -> TaskId {
        self.task
    }

    /// Whether piece `index` is verified (served, and part of the content).
    pub fn is_verified(&self, index: u32) -> bool {
        self.pieces.is_verified(index)
    }

    /// A verified piece's bytes, or None (not verified yet, or out of range).
    pub fn piece(&self, index: u32) -> Option<Bytes> {
        if !self.pieces.is_verified(index) {
            return None;
        }
        self.slice(index)
    }

    /// A piece stored from the origin, for the chain to hash: never served.
    pub(crate) fn stored_piece(&self, index: u32) -> Option<Bytes> {
        if !self.pieces.is_unchecked(index) {
            return None;
        }
        self.slice(index)
    }

    fn slice(&self, index: u32) -> Option<Bytes> {
        let p = self.plan.piece(index)?;
        let map = self.map.as_ref()?;
        Some(Bytes::from_owner(MapSlice {
            map: map.clone(),
            start: p.offset as usize,
            end: p.end() as usize,
        }))
    }

    pub fn plan(&self) -> PiecePlan {
        self.plan
    }

    /// Which pieces are verified.
    pub fn bitmap(&self) -> Vec<bool> {
        self.pieces.bitmap()
    }

    /// Pieces verified and values used since position `since` of the log (see [`Book`]).
    pub fn log_since(&self, epoch: u32, since: u32) -> LogSlice {
        self.pieces.since(epoch, since)
    }

    /// Changes whenever the task's pieces are forgotten (reset).
    pub fn epoch(&self) -> u32 {
        self.pieces.epoch()
    }

    /// Woken whenever a piece is verified or the task is sealed or reset.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.pieces.subscribe()
    }

    /// The content digest, once the task is complete and sealed.
    pub fn content_digest(&self) -> Option<Digest> {
        self.manifest
            .lock()
            .ok()?
            .as_ref()
            .map(|m| m.content_digest())
    }

    pub fn is_complete(&self) -> bool {
        self.content_digest().is_some()
    }

    /// The encoded manifest, once the task is complete.
    pub fn manifest(&self) -> Option<Bytes> {
        self.manifest
            .lock()
            .ok()?
            .as_ref()
            .map(|m| Bytes::from(m.encode()))
    }
}
