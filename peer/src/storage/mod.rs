//! The piece store. One directory per task under `<data_dir>/tasks/<task-id>/`:
//! - `content`: the preallocated content file; pieces are written at their offsets via io_uring;
//! - `header`: what the task is (ID, plan, expected digest, origin validator), written once;
//! - `journal`: append-only records of verified pieces (each with its start and end chain
//!   values), re-hashed before a resume trusts them; its room (a record per piece) is reserved
//!   when the task is created or resumed, as is `manifest.tmp`'s, so a disk that fills during a
//!   download cannot stop it being journaled and sealed;
//! - `manifest`: every piece's end value and the content's digest, written when the task
//!   completes;
//! - `lock`: flock'd by whoever uses the task; its mtime is the last use.
//!
//! See `record` for the on-disk formats, `uring` for the storage thread, `gc` for eviction,
//! `inventory` for listing and removing tasks on request.

mod book;
mod chainer;
mod gc;
mod inventory;
mod lease;
mod record;
mod task;
mod upload;
mod uring;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use book::{Entry as LogEntry, Learned, LogSlice};
pub use chainer::{ChainEnd, Chainer, Feed};
pub use gc::{choose_victims, GcEntry, Reason as GcReason, Usage};
pub use inventory::{Eviction, StoredTask};
pub use lease::{Lease, Mode as LeaseMode};
pub use record::{decode_journal, encode_journal_record, TaskHeader, JOURNAL_RECORD};
pub use task::{TaskHandle, CONTENT as CONTENT_FILE};
pub use upload::UploadView;

use crate::config::GcConfig;
use crate::core::{ChainValue, TaskId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("not enough disk space for {need} bytes at {}; free some space, or lower gc.high_watermark so old tasks are evicted", path.display())]
    NoSpace { path: PathBuf, need: u64 },
    #[error(
        "piece {index} does not match the manifest: it ends at {got:?}, the manifest says {want:?}"
    )]
    PieceMismatch {
        index: u32,
        got: ChainValue,
        want: ChainValue,
    },
    #[error("storage: {0}")]
    Uring(io::Error),
}

impl StoreError {
    /// True when the cause is a full disk, however it surfaced.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Io { source, .. } | StoreError::Uring(source) => {
                source.raw_os_error() == Some(libc::ENOSPC)
            }
            StoreError::PieceMismatch { .. } => false,
        }
    }
}

/// Wraps an I/O error with what was being done and to which path.
pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// What one GC pass did.
#[derive(Debug, Default)]
pub struct GcReport {
    pub evicted: Vec<(String, u64, GcReason)>,
    pub in_use: usize,
    pub before: Option<Usage>,
    pub after: Option<Usage>,
}

pub struct Store {
    root: PathBuf,
    uring: uring::Uring,
}

impl Store {
    /// Opens (creating) the store under `data_dir` and starts its storage thread.
    pub fn open(data_dir: &Path, commit_interval: Duration) -> Result<Store, StoreError> {
        let root = data_dir.join("tasks");
        std::fs::create_dir_all(&root).map_err(|source| StoreError::Io {
            op: "create data directory",
            path: root.clone(),
            source,
        })?;
        remove_stale_stages(&root);
        let uring = uring::Uring::start(commit_interval).map_err(StoreError::Uring)?;
        Ok(Store { root, uring })
    }

    /// A fresh path in the store's root (so on the store's file system, where a rename into a
    /// task directory is atomic) to stage an imported file at. It is named after this process,
    /// so what a crashed process left behind is recognised and removed by the next `open`.
    pub fn stage_path(&self) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.root
            .join(format!("{STAGE_PREFIX}{}-{n}", std::process::id()))
    }

    /// Makes the staged file at `staged` (see [`Store::stage_path`]), whose pieces and content
    /// hash to `manifest`, a sealed task under this lease, replacing anything stored there.
    pub fn adopt(
        &self,
        lease: impl Into<Arc<Lease>>,
        header: TaskHeader,
        staged: &Path,
        manifest: &crate::core::Manifest,
    ) -> Result<TaskHandle, StoreError> {
        TaskHandle::adopt(lease.into(), header, staged, manifest, &self.uring)
    }

    pub fn task_dir(&self, id: &TaskId) -> PathBuf {
        self.root.join(id.dir_name())
    }

    /// Takes a lease on a task, waiting while another process holds a conflicting one.
    pub async fn acquire(&self, id: &TaskId, mode: LeaseMode) -> Result<Lease, StoreError> {
        let dir = self.task_dir(id);
        let d = dir.clone();
        tokio::task::spawn_blocking(move || lease::acquire(&d, mode))
            .await
            .map_err(|e| StoreError::Uring(io::Error::other(e)))?
            .map_err(|source| StoreError::Io {
                op: "lock",
                path: dir,
                source,
            })
    }

    /// The stored task under this lease, or the lease back when there is none (or it was
    /// damaged and has been discarded).
    pub fn load(
        &self,
        lease: impl Into<Arc<Lease>>,
    ) -> Result<Result<TaskHandle, Arc<Lease>>, StoreError> {
        TaskHandle::load(lease.into(), &self.uring)
    }

    /// Creates a fresh task under this lease, replacing anything stored there.
    pub fn create(
        &self,
        lease: impl Into<Arc<Lease>>,
        header: TaskHeader,
    ) -> Result<TaskHandle, StoreError> {
        TaskHandle::create(lease.into(), header, &self.uring)
    }

    /// The stored tasks last used within `within` of now (by their lock file's mtime), most
    /// recent first, with that time. Unreadable entries are skipped.
    pub fn used_within(&self, within: Duration) -> Result<Vec<(TaskId, SystemTime)>, StoreError> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        for dirent in std::fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let Ok(dirent) = dirent else { continue };
            let Ok(id) = TaskId::from_dir_name(&dirent.file_name().to_string_lossy()) else {
                continue;
            };
            let Ok(used) = lease::last_use(&dirent.path()) else {
                continue;
            };
            if now.duration_since(used).map_or(true, |age| age <= within) {
                out.push((id, used));
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.1));
        Ok(out)
    }

    /// One GC pass. Tasks in use by anyone are skipped.
    pub fn gc(&self, cfg: &GcConfig, now: SystemTime) -> Result<GcReport, StoreError> {
        let mut entries = Vec::new();
        let mut held = Vec::new();
        for dirent in std::fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let dirent = dirent.map_err(io_err("list", &self.root))?;
            let name = dirent.file_name().to_string_lossy().into_owned();
            if TaskId::from_dir_name(&name).is_err() {
                continue;
            }
            let dir = dirent.path();
            let lease = lease::try_exclusive(&dir).map_err(io_err("lock", &dir))?;
            let last_used = lease::last_use(&dir).unwrap_or(SystemTime::UNIX_EPOCH);
            entries.push(GcEntry {
                name,
                bytes: dir_bytes(&dir),
                last_used,
                in_use: lease.is_none(),
            });
            held.push((dir, lease));
        }
        let before = self.usage(cfg, &entries);
        let victims = choose_victims(&entries, now, cfg, before);
        let mut report = GcReport {
            in_use: entries.iter().filter(|e| e.in_use).count(),
            before: Some(before),
            ..Default::default()
        };
        for (i, reason) in victims {
            let (dir, lease) = &held[i];
            if lease.is_none() {
                continue;
            }
            inventory::remove_task_dir(dir)?;
            tracing::info!(task = %entries[i].name, bytes = entries[i].bytes, %reason, "evicted");
            report
                .evicted
                .push((entries[i].name.clone(), entries[i].bytes, reason));
        }
        drop(held);
        let remaining: Vec<GcEntry> = entries
            .into_iter()
            .filter(|e| !report.evicted.iter().any(|v| v.0 == e.name))
            .collect();
        report.after = Some(self.usage(cfg, &remaining));
        Ok(report)
    }

    fn usage(&self, cfg: &GcConfig, entries: &[GcEntry]) -> Usage {
        if cfg.capacity_bytes > 0 {
            return Usage {
                used: entries.iter().map(|e| e.bytes).sum(),
                capacity: cfg.capacity_bytes,
            };
        }
        match rustix::fs::statvfs(&self.root) {
            Ok(s) => Usage {
                used: (s.f_blocks - s.f_bfree) * s.f_frsize,
                capacity: s.f_blocks * s.f_frsize,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot read file system usage; watermarks skipped");
                Usage {
                    used: 0,
                    capacity: 0,
                }
            }
        }
    }
}

/// Staged imports are `<root>/.import-<pid>-<n>`.
const STAGE_PREFIX: &str = ".import-";

/// Removes staged imports whose process is gone (killed or crashed mid-import).
fn remove_stale_stages(root: &Path) {
    let Ok(dir) = std::fs::read_dir(root) else {
        return;
    };
    for dirent in dir.flatten() {
        let name = dirent.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(STAGE_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_file(dirent.path()) {
            Ok(()) => {
                tracing::info!(file = %dirent.path().display(), "removed an import left by a process that is gone")
            }
            Err(e) => {
                tracing::warn!(file = %dirent.path().display(), error = %e, "cannot remove an abandoned import")
            }
        }
    }
}

/// Bytes a task takes on disk (allocated blocks, so preallocated space counts).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
