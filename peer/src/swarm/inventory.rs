//! What this node holds, for operators: `starling tasks` (every task), `starling stat` (one
//! task: its pieces, parents and paths), `starling rm` (evict one, refused while in use), and
//! the status page.
//!
//! The store's listing (read without leases) is joined with this daemon's live state: the
//! served views' verified pieces, the downloads in progress with their parents as last
//! measured (the driver publishes them once a second), and the holder counts the owning
//! scheduler knows.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::Swarm;
use crate::core::{normalize_url, TaskId};
use crate::fetch::exit;
use crate::scheduler::PeerId;
use crate::storage::{Eviction, StoreError, StoredTask};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Every piece verified and the manifest written.
    Complete,
    /// A download, import or re-serve runs now.
    Downloading,
    /// Some pieces, and nobody working on it (the next pull resumes it).
    Partial,
}

/// One task, as `starling tasks` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub id: TaskId,
    /// The content's digest: known once complete, or named by the request.
    pub digest: Option<String>,
    /// Where the content was first fetched from (`file://` for an import).
    pub url: String,
    pub state: TaskState,
    pub size: u64,
    pub piece_length: u64,
    pub pieces: u32,
    pub verified: u32,
    /// Whether this node serves it to peers now.
    pub serving: bool,
    /// Live peers the owning scheduler knows hold it (this one included); None when the
    /// scheduler did not answer.
    pub holders: Option<Holders>,
    /// Seconds since the Unix epoch.
    pub last_used: u64,
    pub disk_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holders {
    pub complete: u32,
    pub partial: u32,
}

/// One task in detail (`starling stat`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskDetail {
    #[serde(flatten)]
    pub info: TaskInfo,
    pub dir: PathBuf,
    pub content: PathBuf,
    /// Verified pieces as ranges, e.g. `0-511,514`.
    pub have: String,
    /// Whether it downloads from peers now (else `parents` is the last download's record).
    pub from_peers_now: bool,
    /// The parents of its download from peers as last measured (empty when it came from the
    /// origin, an import, or before this daemon started).
    pub parents: Vec<ParentView>,
}

/// A parent of a download in progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParentView {
    pub peer: PeerId,
    /// Pieces received from it and verified.
    pub pieces: u32,
    /// Measured rate in bytes per second (None until measured).
    pub rate: Option<f64>,
    pub rtt_ms: f64,
    pub loss: f64,
    pub mtu: u32,
    pub strikes: u32,
    pub blacklisted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("no stored task matches {0:?}; `starling tasks` lists them")]
    NotFound(String),
    #[error("{name:?} matches {} tasks ({}); give more of the ID", .ids.len(), .ids.join(", "))]
    Ambiguous { name: String, ids: Vec<String> },
    #[error("task {task} is in use ({why}); it was not removed; try again when it is idle")]
    InUse { task: TaskId, why: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl InventoryError {
    pub fn exit_code(&self) -> u8 {
        match self {
            InventoryError::NotFound(_) | InventoryError::Ambiguous { .. } => exit::USAGE,
            InventoryError::InUse { .. } | InventoryError::Store(_) => exit::LOCAL,
        }
    }
}

/// Downloads from peers, with their parents as the driver last measured them: live while the
/// download runs, kept afterwards (for the last [`KEEP_FINISHED`] tasks) as its record.
#[derive(Default)]
pub(super) struct Downloads {
    parents: Mutex<HashMap<TaskId, (bool, Vec<ParentView>)>>,
}

/// Finished downloads whose parents are remembered.
const KEEP_FINISHED: usize = 256;

impl Downloads {
    pub(super) fn publish(&self, task: TaskId, parents: Vec<ParentView>) {
        if let Ok(mut d) = self.parents.lock() {
            d.insert(task, (true, parents));
        }
    }

    /// The download of `task` ended (its parents stay on record).
    pub(super) fn end(&self, task: &TaskId) {
        if let Ok(mut d) = self.parents.lock() {
            if let Some(e) = d.get_mut(task) {
                e.0 = false;
            }
            if d.len() > KEEP_FINISHED {
                let old: Vec<TaskId> = d.iter().filter(|e| !e.1 .0).map(|e| *e.0).collect();
                for t in old.iter().take(d.len() - KEEP_FINISHED) {
                    d.remove(t);
                }
            }
        }
    }

    fn forget(&self, task: &TaskId) {
        if let Ok(mut d) = self.parents.lock() {
            d.remove(task);
        }
    }

    /// Whether the download runs now, and its parents.
    fn of(&self, task: &TaskId) -> (bool, Vec<ParentView>) {
        self.parents
            .lock()
            .ok()
            .and_then(|d| d.get(task).cloned())
            .unwrap_or_default()
    }
}

/// How long `starling tasks` waits for the schedulers' holder counts.
const HOLDERS_WAIT: Duration = Duration::from_secs(2);

impl Swarm {
    /// The stored tasks (the `limit` most recently used), with this node's live state and the
    /// schedulers' holder counts.
    pub async fn tasks(self: &Arc<Self>, limit: usize) -> Result<Vec<TaskInfo>, InventoryError> {
        let stored = self.list_store().await?;
        let infos: Vec<TaskInfo> = futures::stream::iter(stored.into_iter().take(limit))
            .map(|t| {
                let s = self.clone();
                async move { s.info(&t).await }
            })
            .buffered(16)
            .collect()
            .await;
        Ok(infos)
    }

    /// Verified pieces of a task this node serves, as ranges (see [`ranges`]).
    pub fn verified_ranges(&self, id: &TaskId) -> Option<String> {
        self.view(id).map(|v| ranges(&v.bitmap()))
    }

    /// One task, named by its ID (or a unique prefix of the hex), its digest or its URL.
    pub async fn stat(self: &Arc<Self>, name: &str) -> Result<TaskDetail, InventoryError> {
        let id = self.resolve(name).await?;
        let t = self
            .ctx
            .store
            .peek(&id)
            .ok_or_else(|| InventoryError::NotFound(name.to_string()))?;
        let have = match self.view(&id) {
            Some(v) => v.bitmap(),
            None if t.sealed.is_some() => vec![true; t.header.plan.count() as usize],
            None => Vec::new(),
        };
        let info = self.info(&t).await;
        let (from_peers_now, parents) = self.downloads.of(&id);
        Ok(TaskDetail {
            dir: t.dir.clone(),
            content: t.dir.join(crate::storage::CONTENT_FILE),
            have: ranges(&have),
            from_peers_now,
            parents,
            info,
        })
    }

    /// Evicts one task: refused while this daemon downloads or uploads it, or anyone else
    /// holds a lease on it. Returns the bytes freed.
    pub async fn remove(self: &Arc<Self>, name: &str) -> Result<u64, InventoryError> {
        let id = self.resolve(name).await?;
        // A pull or re-serve holds the gate: refuse rather than wait for it.
        if self.gates.busy(&id) {
            return Err(InventoryError::InUse {
                task: id,
                why: "this daemon is downloading or verifying it",
            });
        }
        let swarm = self.clone();
        let (res, withdrawn) = self
            .gates
            .one_at_a_time(id, async move {
                let withdrawn = match swarm.withdraw(&id) {
                    Ok(w) => w,
                    Err(why) => return (Err(InventoryError::InUse { task: id, why }), false),
                };
                let ctx = swarm.ctx.clone();
                let res = tokio::task::spawn_blocking(move || ctx.store.evict(&id))
                    .await
                    .unwrap_or_else(|e| Err(StoreError::Uring(std::io::Error::other(e))));
                let res = match res {
                    Ok(Eviction::Removed(bytes)) => Ok(bytes),
                    Ok(Eviction::InUse) => Err(InventoryError::InUse {
                        task: id,
                        why: "a client or another process is reading or writing it",
                    }),
                    Ok(Eviction::Absent) => Err(InventoryError::NotFound(id.to_string())),
                    Err(e) => Err(e.into()),
                };
                (res, withdrawn)
            })
            .await;
        match &res {
            Ok(bytes) => {
                tracing::info!(task = %id, bytes, "removed on request");
                self.downloads.forget(&id);
                super::announce::now(self).await;
            }
            // It was served until now: serve it again (re-verified, as at start).
            Err(_) if withdrawn => {
                let s = self.clone();
                tokio::spawn(async move { s.serve_stored(id, None).await });
            }
            Err(_) => {}
        }
        res
    }

    async fn list_store(&self) -> Result<Vec<StoredTask>, StoreError> {
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || ctx.store.list())
            .await
            .unwrap_or_else(|e| Err(StoreError::Uring(std::io::Error::other(e))))
    }

    /// The task `name` stands for: `sha256:<hex>`, a directory name (`sha256-…`, `url-…`), a
    /// unique prefix of 4 or more hex digits of a stored task's ID, or an http(s) URL.
    async fn resolve(&self, name: &str) -> Result<TaskId, InventoryError> {
        let not_found = || InventoryError::NotFound(name.to_string());
        if name.starts_with("http://") || name.starts_with("https://") {
            // The URL's own task, or the content tasks fetched from it (`get --digest`).
            let filtered = &self.ctx.cfg.source.filtered_query_params;
            let url_id = TaskId::for_url(name, filtered).map_err(|_| not_found())?;
            let norm = |u: &str| normalize_url(u, filtered).ok();
            let want = norm(name);
            let matches: Vec<TaskId> = self
                .list_store()
                .await?
                .into_iter()
                .filter(|t| t.id == url_id || (want.is_some() && norm(&t.header.url) == want))
                .map(|t| t.id)
                .collect();
            return one_of(name, matches);
        }
        if let Ok(d) = name.parse::<crate::core::Digest>() {
            return Ok(TaskId::for_content(d));
        }
        if let Ok(id) = TaskId::from_dir_name(name) {
            return Ok(id);
        }
        let hex = name
            .trim_start_matches("sha256:")
            .trim_start_matches("url:")
            .to_ascii_lowercase();
        if hex.len() < 4 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_found());
        }
        let matches: Vec<TaskId> = self
            .list_store()
            .await?
            .into_iter()
            .map(|t| t.id)
            .filter(|id| id.hash.hex().starts_with(&hex))
            .collect();
        one_of(name, matches)
    }

    async fn info(&self, t: &StoredTask) -> TaskInfo {
        let live = self.view(&t.id);
        let verified = live.as_ref().map_or(t.journaled, |v| {
            v.bitmap().iter().filter(|b| **b).count() as u32
        });
        let digest = live
            .as_ref()
            .and_then(|v| v.content_digest())
            .or(t.sealed)
            .or(t.header.expected);
        let state = if t.sealed.is_some() || live.as_ref().is_some_and(|v| v.is_complete()) {
            TaskState::Complete
        } else if self.gates.busy(&t.id) {
            TaskState::Downloading
        } else {
            TaskState::Partial
        };
        let holders = tokio::time::timeout(HOLDERS_WAIT, self.holders(t.id))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|(complete, partial)| Holders { complete, partial });
        let plan = t.header.plan;
        TaskInfo {
            id: t.id,
            digest: digest.map(|d| d.to_string()),
            url: t.header.url.clone(),
            state,
            size: plan.content_length(),
            piece_length: plan.piece_length(),
            pieces: plan.count(),
            verified,
            serving: live.is_some(),
            holders,
            last_used: t
                .last_used
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            disk_bytes: t.disk_bytes,
        }
    }
}

/// The one task `name` matched.
fn one_of(name: &str, matches: Vec<TaskId>) -> Result<TaskId, InventoryError> {
    match matches.as_slice() {
        [] => Err(InventoryError::NotFound(name.to_string())),
        [one] => Ok(*one),
        many => Err(InventoryError::Ambiguous {
            name: name.to_string(),
            ids: many.iter().map(TaskId::dir_name).collect(),
        }),
    }
}

/// `0-511,514`: the indexes set in `bits`, as ranges.
pub fn ranges(bits: &[bool]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bits.len() {
        if !bits[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < bits.len() && bits[i] {
            i += 1;
        }
        out.push(if i - 1 == start {
            start.to_string()
        } else {
            format!("{start}-{}", i - 1)
        });
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_runs_of_verified_pieces() {
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[false, false]), "");
        assert_eq!(ranges(&[true]), "0");
        assert_eq!(
            ranges(&[true, true, false, true, false, true, true]),
            "0-1,3,5-6"
        );
    }
}
