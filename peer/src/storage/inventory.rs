//! What the store holds, read without taking leases (`starling tasks`, `stat`, the status
//! page), and eviction of one task on request (`starling rm`).
//!
//! A listing reads each task's header, whether a manifest exists and how many pieces its
//! journal claims. It opens no content and locks nothing, so it never waits on a download.
//! Counts read this way are claims: the daemon replaces them with its live counts for the
//! tasks it has open.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::record::{decode_journal, TaskHeader};
use super::task::{HEADER, JOURNAL, MANIFEST};
use super::{dir_bytes, io_err, lease, Store, StoreError};
use crate::core::{Digest, Manifest, TaskId};

/// One stored task as its files describe it.
#[derive(Clone, Debug)]
pub struct StoredTask {
    pub id: TaskId,
    pub dir: PathBuf,
    pub header: TaskHeader,
    /// The content's digest, once the manifest is written (the task is complete).
    pub sealed: Option<Digest>,
    /// Pieces the journal records as verified (all of them when sealed).
    pub journaled: u32,
    /// Bytes the task's files take on disk.
    pub disk_bytes: u64,
    pub last_used: SystemTime,
}

/// What `Store::evict` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Removed, with the bytes it took on disk.
    Removed(u64),
    /// Someone holds a lease on it (a download, a reader, an upload): nothing was removed.
    InUse,
    /// No such task in the store.
    Absent,
}

impl Store {
    /// Every task in the store, most recently used first. A directory whose records cannot
    /// be read (a download that is just starting, or damage the next load discards) is left
    /// out.
    pub fn list(&self) -> Result<Vec<StoredTask>, StoreError> {
        let mut out = Vec::new();
        for dirent in std::fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let Ok(dirent) = dirent else { continue };
            let Ok(id) = TaskId::from_dir_name(&dirent.file_name().to_string_lossy()) else {
                continue;
            };
            if let Some(t) = peek(id, &dirent.path()) {
                out.push(t);
            }
        }
        out.sort_by_key(|t| std::cmp::Reverse(t.last_used));
        Ok(out)
    }

    /// One task, as [`Store::list`] reads it; None when it is not stored (or not readable).
    pub fn peek(&self, id: &TaskId) -> Option<StoredTask> {
        peek(*id, &self.task_dir(id))
    }

    /// Removes one task if nobody holds a lease on it; never waits.
    pub fn evict(&self, id: &TaskId) -> Result<Eviction, StoreError> {
        let dir = self.task_dir(id);
        if !dir.exists() {
            return Ok(Eviction::Absent);
        }
        let Some(lease) = lease::try_exclusive(&dir).map_err(io_err("lock", &dir))? else {
            return Ok(Eviction::InUse);
        };
        let bytes = dir_bytes(&dir);
        remove_task_dir(&dir)?;
        drop(lease);
        Ok(Eviction::Removed(bytes))
    }
}

/// Deletes a task directory whose exclusive lease the caller holds.
pub(super) fn remove_task_dir(dir: &Path) -> Result<(), StoreError> {
    super::task::wipe(dir)?;
    std::fs::remove_file(dir.join(lease::LOCK_FILE)).map_err(io_err("remove", dir))?;
    std::fs::remove_dir(dir).map_err(io_err("remove", dir))
}

fn peek(id: TaskId, dir: &Path) -> Option<StoredTask> {
    let header = TaskHeader::decode(&std::fs::read(dir.join(HEADER)).ok()?).ok()?;
    if header.id != id {
        return None;
    }
    let sealed = std::fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|b| Manifest::decode(&b).ok())
        .map(|m| m.content_digest());
    let journaled = if sealed.is_some() {
        header.plan.count()
    } else {
        std::fs::read(dir.join(JOURNAL))
            .ok()
            .and_then(|b| decode_journal(&b, &header.plan).ok())
            .map_or(0, |links| {
                let mut seen: Vec<u32> = links.iter().map(|l| l.index).collect();
                seen.sort_unstable();
                seen.dedup();
                seen.len() as u32
            })
    };
    Some(StoredTask {
        id,
        dir: dir.to_path_buf(),
        disk_bytes: dir_bytes(dir),
        last_used: lease::last_use(dir).unwrap_or(SystemTime::UNIX_EPOCH),
        header,
        sealed,
        journaled,
    })
}
