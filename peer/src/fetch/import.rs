//! `starling import`: a local file becomes a sealed task, so this node seeds it with no origin
//! behind it (a model checkpoint or an image layer built here).
//!
//! The file is first copied (or, asked to, hard-linked) into the store's root, and the copy is
//! what gets hashed: the pieces and the whole content are hashed from the bytes the store will
//! serve, not from a file that may change meanwhile. Then, under the task's exclusive lease, the
//! staged file becomes the task's content (`Store::adopt`). A digest given by the user is checked
//! before anything is stored.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::core::{Import, Manifest, PieceChain, PiecePlan, TaskId};
use crate::storage::{StoreError, TaskHeader};

use super::{FetchError, Fetched, Fetcher, Progress, Served};

/// A file staged in the store's root and hashed; not yet a task. Dropping it removes the file.
pub struct Staged {
    path: PathBuf,
    source: PathBuf,
    pub id: TaskId,
    manifest: Manifest,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Gone already once adopted; any other failure here is left to the next store open.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Fetcher {
    /// Imports a local file into the store (see the module docs). A content already stored and
    /// intact is kept, and reported as `Served::Store`.
    pub async fn import(
        &self,
        req: &Import,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, FetchError> {
        let staged = self.stage(req, progress).await?;
        self.adopt(staged, progress).await
    }

    /// Copies (or links) the file into the store's root and hashes it there.
    pub async fn stage(
        &self,
        req: &Import,
        progress: &Arc<Progress>,
    ) -> Result<Staged, FetchError> {
        if let Some(pl) = req.piece_length {
            PiecePlan::new(0, pl)?;
        }
        let meta = std::fs::metadata(&req.path).map_err(|e| FetchError::Input {
            path: req.path.clone(),
            detail: format!("{e}; give the path of a readable file"),
        })?;
        if !meta.is_file() {
            return Err(FetchError::Input {
                path: req.path.clone(),
                detail: "not a regular file; give the path of a file".into(),
            });
        }
        progress.total.store(meta.len(), Ordering::Relaxed);
        let path = self.ctx.store.stage_path();
        let (src, dst, link) = (req.path.clone(), path.clone(), req.link);
        let placed = tokio::task::spawn_blocking(move || place(&src, &dst, link, meta.len()))
            .await
            .map_err(|e| StoreError::Uring(std::io::Error::other(e)))?;
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let (p, prog, pl) = (path.clone(), progress.clone(), req.piece_length);
        let hashed = tokio::task::spawn_blocking(move || hash_file(&p, pl, &prog))
            .await
            .map_err(|e| StoreError::Uring(std::io::Error::other(e)))
            .and_then(|r| r);
        let manifest = match hashed {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
        };
        let staged = Staged {
            path,
            source: req.path.clone(),
            id: TaskId::for_content(manifest.content_digest()),
            manifest,
        };
        match req.digest {
            Some(expected) if expected != staged.manifest.content_digest() => {
                Err(FetchError::DigestMismatch {
                    url: req.path.display().to_string(),
                    expected,
                    actual: staged.manifest.content_digest(),
                })
            }
            _ => Ok(staged),
        }
    }

    /// Makes a staged file its task, under the task's exclusive lease; a task already stored
    /// and intact is kept instead.
    pub async fn adopt(
        &self,
        staged: Staged,
        progress: &Arc<Progress>,
    ) -> Result<Fetched, FetchError> {
        match self.lookup(staged.id, progress).await? {
            Ok(done) => Ok(done),
            Err(missing) => {
                let lease = match missing {
                    super::Missing::Partial(t) => t.discard()?,
                    super::Missing::Absent(lease) => lease,
                };
                let plan = *staged.manifest.plan();
                let header = TaskHeader {
                    id: staged.id,
                    plan,
                    expected: Some(staged.manifest.content_digest()),
                    validator: String::new(),
                    url: format!("file://{}", staged.source.display()),
                };
                let task = self
                    .ctx
                    .store
                    .adopt(lease, header, &staged.path, &staged.manifest)?;
                progress
                    .done
                    .store(plan.content_length(), Ordering::Relaxed);
                tracing::info!(task = %staged.id, file = %staged.source.display(), "imported");
                Ok(Fetched {
                    task,
                    manifest: staged.manifest.clone(),
                    served: Served::Local,
                })
            }
        }
    }
}

/// Puts the file at `dst`: a hard link, or a copy (`copy_file_range`: in the kernel, a reflink
/// on file systems that share extents).
fn place(src: &Path, dst: &Path, link: bool, len: u64) -> Result<(), FetchError> {
    if link {
        return std::fs::hard_link(src, dst).map_err(|e| {
            let detail = if e.raw_os_error() == Some(libc::EXDEV) {
                "--link needs the file on the same file system as the store (data_dir); drop --link to copy it".to_string()
            } else {
                format!("cannot hard-link it into the store: {e}")
            };
            FetchError::Input {
                path: src.to_path_buf(),
                detail,
            }
        });
    }
    match std::fs::copy(src, dst) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(StoreError::NoSpace {
            path: dst.to_path_buf(),
            need: len,
        }
        .into()),
        Err(e) => Err(FetchError::Input {
            path: src.to_path_buf(),
            detail: format!("cannot copy it into the store at {}: {e}", dst.display()),
        }),
    }
}

/// Every piece's end value and the content's digest, in one pass: each byte read and hashed
/// once, into one reused buffer. Plain reads, not a memory map: a hard-linked file truncated
/// meanwhile is an error here, not a SIGBUS.
fn hash_file(
    path: &Path,
    piece_length: Option<u64>,
    progress: &Progress,
) -> Result<Manifest, StoreError> {
    use std::io::Read;
    let io_err = |op| {
        move |source| StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = std::fs::File::open(path).map_err(io_err("open"))?;
    let len = file.metadata().map_err(io_err("stat"))?.len();
    let plan = match piece_length {
        Some(pl) => PiecePlan::new(len, pl)
            .map_err(|e| StoreError::Uring(std::io::Error::other(e.to_string())))?,
        None => PiecePlan::with_default(len),
    };
    let mut values = Vec::with_capacity(plan.count() as usize);
    let mut chain = PieceChain::new(plan.count());
    let mut buf = vec![0u8; plan.piece_length().min(len) as usize];
    for p in plan.pieces() {
        let buf = &mut buf[..p.length as usize];
        file.read_exact(buf).map_err(io_err("read"))?;
        values.push(chain.next(&p, &[&buf[..]]).end);
        progress.done.fetch_add(p.length, Ordering::Relaxed);
    }
    Manifest::of_values(plan, values)
        .map_err(|e| StoreError::Uring(std::io::Error::other(e.to_string())))
}
