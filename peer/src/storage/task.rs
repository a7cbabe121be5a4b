//! One stored task: its files, its verified pieces, and the operations the fetch pipeline
//! needs. A `TaskHandle` exists only while its holder has a lease on the task directory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use super::book::{Book, Learned};
use super::chainer::Chainer;
use super::lease::Lease;
use super::record::{decode_journal, reserve, write_atomic, TaskHeader, JOURNAL_RECORD};
use super::uring::{FileKey, Uring};
use super::{io_err, StoreError};
use crate::core::{ChainValue, Digest, Link, Manifest, Piece, PiecePlan, Sha256Stream};

pub const CONTENT: &str = "content";
pub const HEADER: &str = "header";
pub const JOURNAL: &str = "journal";
pub const MANIFEST: &str = "manifest";

pub struct TaskHandle {
    lease: Arc<Lease>,
    header: TaskHeader,
    manifest: Arc<Mutex<Option<Manifest>>>,
    /// The verified pieces and the chain values known. Verified means: hashed from its start
    /// value to its end value, checked against the manifest when there is one, and written. It
    /// is journaled at the next group commit. The pieces an unsealed task's journal names from
    /// an earlier run are only claims in it until [`TaskHandle::verify_journaled`] re-hashes
    /// them (the journal is not synced with the content, so after a power loss it may name
    /// bytes that never reached the disk).
    pieces: Arc<Book>,
    file: OpenKey,
    appended: watch::Receiver<u64>,
}

impl TaskHandle {
    /// Opens the task in `lease`'s directory. `Ok(None)` when there is no task there, or when
    /// its metadata was corrupt or truncated, in which case the files are removed and the
    /// reason logged: a damaged task is never served.
    pub(crate) fn load(
        lease: Arc<Lease>,
        uring: &Uring,
    ) -> Result<Result<TaskHandle, Arc<Lease>>, StoreError> {
        let dir = lease.dir().to_path_buf();
        let header_bytes = match std::fs::read(dir.join(HEADER)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(lease)),
            Err(e) => return Err(io_err("read", &dir.join(HEADER))(e)),
        };
        match Self::load_checked(&dir, &header_bytes) {
            Ok((header, manifest, journaled, content, journal, journal_len)) => {
                if manifest.is_none() {
                    // Resumed: its journal and manifest need their room as on the first run.
                    reserve_metadata(&dir, &journal, &header.plan)?;
                }
                let (key, appended) = uring
                    .open(content, journal, journal_len)
                    .map_err(StoreError::Uring)?;
                let count = header.plan.count() as usize;
                // A sealed task is vouched for by its manifest (`verify_sealed`), not its journal.
                let claims = if manifest.is_some() {
                    Vec::new()
                } else {
                    journaled
                };
                Ok(Ok(TaskHandle {
                    lease,
                    header,
                    manifest: Arc::new(Mutex::new(manifest)),
                    pieces: Arc::new(Book::claimed(count, claims)),
                    file: OpenKey {
                        uring: uring.clone(),
                        key,
                    },
                    appended,
                }))
            }
            Err(reason) => {
                tracing::warn!(task = %dir.display(), %reason, "discarding stored task: its metadata cannot be used; it will be fetched again");
                wipe(&dir)?;
                Ok(Err(lease))
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn load_checked(
        dir: &Path,
        header_bytes: &[u8],
    ) -> Result<(TaskHeader, Option<Manifest>, Vec<Link>, File, File, u64), String> {
        let header = TaskHeader::decode(header_bytes).map_err(|e| format!("header: {e}"))?;
        let plan = header.plan;
        let manifest = match std::fs::read(dir.join(MANIFEST)) {
            Ok(b) => {
                let m = Manifest::decode(&b).map_err(|e| format!("manifest: {e}"))?;
                if *m.plan() != plan {
                    return Err("manifest plan differs from the header's".into());
                }
                if header.expected.is_some_and(|d| d != m.content_digest()) {
                    return Err("manifest digest differs from the expected digest".into());
                }
                Some(m)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("manifest unreadable: {e}")),
        };
        let journal_bytes =
            std::fs::read(dir.join(JOURNAL)).map_err(|e| format!("journal: {e}"))?;
        let journaled =
            decode_journal(&journal_bytes, &plan).map_err(|e| format!("journal: {e}"))?;
        if let Some(m) = &manifest {
            if let Some(link) = journaled
                .iter()
                .find(|l| m.piece_value(l.index) != Some(l.end))
            {
                return Err(format!(
                    "journaled value of piece {} differs from the manifest",
                    link.index
                ));
            }
        }
        let content = OpenOptions::new()
            .read(true)
            .write(manifest.is_none())
            .open(dir.join(CONTENT))
            .map_err(|e| format!("content: {e}"))?;
        let len = content
            .metadata()
            .map_err(|e| format!("content: {e}"))?
            .len();
        if len != plan.content_length() {
            return Err(format!(
                "content file has {len} bytes, expected {}",
                plan.content_length()
            ));
        }
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(JOURNAL))
            .map_err(|e| format!("journal: {e}"))?;
        // Later appends go after the last whole record, overwriting any torn tail.
        let journal_len = (journal_bytes.len() / super::record::JOURNAL_RECORD
            * super::record::JOURNAL_RECORD) as u64;
        Ok((header, manifest, journaled, content, journal, journal_len))
    }

    /// Creates a fresh task in `lease`'s directory, replacing whatever was there: the content
    /// file is preallocated (so a full disk fails now, not halfway), then the journal, and the
    /// header last, which is what makes the task exist.
    pub(crate) fn create(
        lease: Arc<Lease>,
        header: TaskHeader,
        uring: &Uring,
    ) -> Result<TaskHandle, StoreError> {
        let dir = lease.dir().to_path_buf();
        wipe(&dir)?;
        let len = header.plan.content_length();
        let path = dir.join(CONTENT);
        let content = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        preallocate(&content, len, &path)?;
        let jpath = dir.join(JOURNAL);
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&jpath)
            .map_err(io_err("create", &jpath))?;
        reserve_metadata(&dir, &journal, &header.plan)?;
        let hpath = dir.join(HEADER);
        let hbytes = header.encode();
        write_atomic(&hpath, &hbytes).map_err(no_space_or("write", &hpath, hbytes.len()))?;
        let (key, appended) = uring.open(content, journal, 0).map_err(StoreError::Uring)?;
        let count = header.plan.count() as usize;
        Ok(TaskHandle {
            lease,
            header,
            manifest: Arc::new(Mutex::new(None)),
            pieces: Arc::new(Book::new(count)),
            file: OpenKey {
                uring: uring.clone(),
                key,
            },
            appended,
        })
    }

    /// Makes `staged` (a file on the store's file system whose pieces and whole content hash
    /// to `manifest`) the content of a sealed task in `lease`'s directory, replacing whatever
    /// was there. The content is synced and made read-only before the manifest and, last, the
    /// header make the task exist, so a crash in between leaves no task rather than a wrong one.
    pub(crate) fn adopt(
        lease: Arc<Lease>,
        header: TaskHeader,
        staged: &Path,
        manifest: &Manifest,
        uring: &Uring,
    ) -> Result<TaskHandle, StoreError> {
        let dir = lease.dir().to_path_buf();
        if *manifest.plan() != header.plan {
            return Err(StoreError::Uring(io::Error::other(
                "the imported file's plan differs from its header's",
            )));
        }
        wipe(&dir)?;
        File::open(staged)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", staged))?;
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o444))
            .map_err(io_err("chmod", staged))?;
        let cpath = dir.join(CONTENT);
        std::fs::rename(staged, &cpath).map_err(io_err("move", staged))?;
        let jpath = dir.join(JOURNAL);
        File::create(&jpath).map_err(io_err("create", &jpath))?;
        let mpath = dir.join(MANIFEST);
        write_atomic(&mpath, &manifest.encode()).map_err(io_err("write", &mpath))?;
        let hpath = dir.join(HEADER);
        write_atomic(&hpath, &header.encode()).map_err(io_err("write", &hpath))?;
        match TaskHandle::load(lease, uring)? {
            Ok(task) => {
                // Hashed a moment ago, from these very bytes.
                task.pieces.mark_all(manifest.piece_values());
                Ok(task)
            }
            Err(_) => Err(StoreError::Uring(io::Error::other(format!(
                "the imported task in {} did not load back",
                dir.display()
            )))),
        }
    }

    pub fn header(&self) -> &TaskHeader {
        &self.header
    }

    pub fn plan(&self) -> PiecePlan {
        self.header.plan
    }

    pub fn dir(&self) -> &Path {
        self.lease.dir()
    }

    pub fn content_path(&self) -> PathBuf {
        self.dir().join(CONTENT)
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn manifest(&self) -> Option<Manifest> {
        self.manifest.lock().ok().and_then(|m| m.clone())
    }

    /// Changes whenever the task's pieces are forgotten.
    pub fn epoch(&self) -> u32 {
        self.pieces.epoch()
    }

    /// Which pieces are verified.
    pub fn bitmap(&self) -> Vec<bool> {
        self.pieces.bitmap()
    }

    /// Piece `index`'s start and end values, each if known.
    pub fn link(&self, index: u32) -> (Option<ChainValue>, Option<ChainValue>) {
        self.pieces.link(index)
    }

    /// Piece `index`'s end value, if known.
    pub fn value(&self, index: u32) -> Option<ChainValue> {
        self.pieces.value(index)
    }

    /// Records an end value heard from a parent (the first one known stays).
    pub fn learn(&self, index: u32, value: ChainValue) -> Learned {
        self.pieces.learn(index, value)
    }

    /// Takes back values a lying parent named (see [`Book::retract`]); returns the pieces no
    /// longer verified.
    pub fn retract(&self, values: &[u32]) -> Vec<u32> {
        self.pieces.retract(values)
    }

    /// Starts the in-order chain over this task's pieces (see [`Chainer`]).
    pub fn chainer(&self) -> Result<Chainer, StoreError> {
        Ok(Chainer::start(self.upload_view()?, self.marker()))
    }

    pub fn verified_count(&self) -> u32 {
        self.pieces.count()
    }

    pub fn is_complete(&self) -> bool {
        self.manifest().is_some() && self.verified_count() == self.plan().count()
    }

    /// Journal records appended since this handle was opened.
    pub fn journaled_watch(&self) -> watch::Receiver<u64> {
        self.appended.clone()
    }

    /// For a task resumed from an earlier run: re-hashes every piece its journal names and
    /// counts verified those whose stored bytes still hash to the journaled digest. Returns how
    /// many were dropped (their bytes never reached the disk, or changed there); they are
    /// fetched again.
    pub async fn verify_journaled(&self) -> Result<u32, StoreError> {
        let named = self.pieces.take_claims();
        let plan = self.plan();
        let mut dropped = 0;
        for link in named {
            let Some(piece) = plan.piece(link.index) else {
                continue;
            };
            let last = link.index + 1 == plan.count();
            if link.holds(&piece, last, &[self.read_piece(piece).await?]) {
                self.pieces.mark(link);
            } else {
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Stores a piece whose bytes hashed from `link.start` to `link.end`: checks it against the
    /// manifest when there is one, writes the chunks at the piece's offset, marks it verified
    /// and queues it for the next group commit.
    pub async fn write_piece(
        &self,
        piece: Piece,
        chunks: Vec<Bytes>,
        link: Link,
    ) -> Result<(), StoreError> {
        if let Some(want) = self.manifest().and_then(|m| m.piece_value(piece.index)) {
            if want != link.end {
                return Err(StoreError::PieceMismatch {
                    index: piece.index,
                    got: link.end,
                    want,
                });
            }
        }
        self.write(piece, chunks).await?;
        self.marker().mark(link)
    }

    fn marker(&self) -> Marker {
        Marker {
            book: self.pieces.clone(),
            uring: self.file.uring.clone(),
            key: self.file.key,
        }
    }

    /// Stores a piece read from the origin whose end value is not known yet: it is not served
    /// until the in-order chain ([`Chainer`]) reaches it, gives it its value and marks it.
    pub async fn store_unchecked(
        &self,
        piece: Piece,
        chunks: Vec<Bytes>,
    ) -> Result<(), StoreError> {
        self.write(piece, chunks).await?;
        self.pieces.store_unchecked(piece.index);
        Ok(())
    }

    async fn write(&self, piece: Piece, chunks: Vec<Bytes>) -> Result<(), StoreError> {
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if len != piece.length {
            return Err(StoreError::Uring(io::Error::other(format!(
                "piece {} has {len} bytes, expected {}",
                piece.index, piece.length
            ))));
        }
        self.file
            .uring
            .write(self.file.key, piece.offset, chunks)
            .await
            .map_err(io_err("write", &self.content_path()))
    }

    /// Reads a stored piece back. Callers that serve it must have it verified.
    pub async fn read_piece(&self, piece: Piece) -> Result<Bytes, StoreError> {
        self.file
            .uring
            .read(self.file.key, piece.offset, piece.length as usize)
            .await
            .map_err(io_err("read", &self.content_path()))
    }

    /// For a sealed task: hashes the whole stored content once and, if it matches the manifest,
    /// counts every piece verified (the content digest covers every byte). The marks stay in
    /// memory: a sealed task is vouched for by its manifest, re-checked like this on every use,
    /// not by the journal. Returns whether the content is intact; None without a manifest.
    pub async fn verify_sealed(&self) -> Result<Option<bool>, StoreError> {
        let Some(m) = self.manifest() else {
            return Ok(None);
        };
        if self.hash_content().await? != m.content_digest() {
            return Ok(Some(false));
        }
        self.pieces.mark_all(m.piece_values());
        Ok(Some(true))
    }

    /// Seals a fully verified task whose last piece ends at `content`: writes its manifest
    /// (atomically) and makes the content read-only, since outputs may be hard links to it.
    pub fn complete(&self, content: Digest) -> Result<Manifest, StoreError> {
        let values = self.pieces.verified_values().ok_or_else(|| {
            StoreError::Uring(io::Error::other(
                "task is not complete: a piece is not verified",
            ))
        })?;
        let manifest = Manifest::new(self.plan(), values, content).map_err(|e| {
            StoreError::Uring(io::Error::other(format!("task is not complete: {e}")))
        })?;
        let path = self.dir().join(MANIFEST);
        let bytes = manifest.encode();
        write_atomic(&path, &bytes).map_err(no_space_or("write", &path, bytes.len()))?;
        let cpath = self.content_path();
        std::fs::set_permissions(&cpath, std::fs::Permissions::from_mode(0o444))
            .map_err(io_err("chmod", &cpath))?;
        if let Ok(mut m) = self.manifest.lock() {
            *m = Some(manifest.clone());
        }
        self.file.uring.sealed(self.file.key);
        self.pieces.touch();
        Ok(manifest)
    }

    /// Hashes the whole stored content in order (a sealed task's check against its manifest).
    pub async fn hash_content(&self) -> Result<Digest, StoreError> {
        let mut h = Sha256Stream::new();
        for piece in self.plan().pieces() {
            h.update(&self.read_piece(piece).await?);
        }
        Ok(h.finish())
    }

    /// Waits until everything queued is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.file
            .uring
            .flush(self.file.key)
            .await
            .map_err(io_err("sync", &self.content_path()))
    }

    /// Throws the task's files away (keeping the lease), e.g. when the origin's content
    /// changed under a resumed download.
    pub fn discard(self) -> Result<Arc<Lease>, StoreError> {
        // Upload views share these: they stop serving the discarded bytes at once.
        if let Ok(mut m) = self.manifest.lock() {
            *m = None;
        }
        self.pieces.reset();
        let lease = self.into_lease();
        wipe(lease.dir())?;
        Ok(lease)
    }

    pub fn into_lease(self) -> Arc<Lease> {
        let TaskHandle { lease, .. } = self;
        lease
    }

    /// A view for serving this task's verified pieces to peers, straight from a read-only
    /// memory map of the content file. It holds the task's lease, so GC cannot evict the task
    /// while it is uploaded.
    pub fn upload_view(&self) -> Result<super::UploadView, StoreError> {
        super::upload::UploadView::open(
            self.header.id,
            self.plan(),
            &self.content_path(),
            self.pieces.clone(),
            self.manifest.clone(),
            self.lease.clone(),
        )
    }
}

/// Marks pieces verified and journals them: shared by the handle and its [`Chainer`]. It does
/// not keep the files open: once the handle closes them, records are no longer journaled.
#[derive(Clone)]
pub(crate) struct Marker {
    book: Arc<Book>,
    uring: Uring,
    key: FileKey,
}

impl Marker {
    pub(crate) fn mark(&self, link: Link) -> Result<(), StoreError> {
        self.book.mark(link);
        self.uring
            .journal(self.key, link)
            .map_err(StoreError::Uring)
    }

    pub(crate) fn book(&self) -> &Book {
        &self.book
    }
}

/// The task's files on the storage thread; closed (after a last commit) when dropped.
struct OpenKey {
    uring: Uring,
    key: FileKey,
}

impl Drop for OpenKey {
    fn drop(&mut self) {
        self.uring.close(self.key);
    }
}

/// Removes a task's data and metadata, keeping the lock file (the caller holds the lease).
pub(crate) fn wipe(dir: &Path) -> Result<(), StoreError> {
    for name in [
        HEADER,
        MANIFEST,
        JOURNAL,
        CONTENT,
        "header.tmp",
        "manifest.tmp",
    ] {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &p)(e)),
        }
    }
    Ok(())
}

/// Reserves the room an unsealed task's metadata grows into: a journal record per piece, and
/// its manifest (written at the end as `manifest.tmp`, then renamed). With the content
/// preallocated too, a disk that fills during the download cannot stop the task from being
/// journaled and sealed: a full disk fails a task at its start, never halfway.
fn reserve_metadata(dir: &Path, journal: &File, plan: &PiecePlan) -> Result<(), StoreError> {
    let jpath = dir.join(JOURNAL);
    let jlen = plan.count() as usize * JOURNAL_RECORD;
    reserve(journal, jlen as u64).map_err(no_space_or("reserve", &jpath, jlen))?;
    let mlen = Manifest::encoded_len(plan.count());
    let mpath = dir.join("manifest.tmp");
    let tmp = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&mpath)
        .map_err(no_space_or("create", &mpath, mlen))?;
    reserve(&tmp, mlen as u64).map_err(no_space_or("reserve", &mpath, mlen))
}

/// An I/O error as a [`StoreError`]: `NoSpace` when the disk is full (exit code 6 and the
/// message that says so), else the operation and path.
fn no_space_or<'a>(
    op: &'static str,
    path: &'a Path,
    need: usize,
) -> impl Fn(io::Error) -> StoreError + 'a {
    move |e| {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::NoSpace {
                path: path.to_path_buf(),
                need: need as u64,
            }
        } else {
            io_err(op, path)(e)
        }
    }
}

fn preallocate(file: &File, len: u64, path: &Path) -> Result<(), StoreError> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOSPC) => Err(StoreError::NoSpace {
            path: path.to_path_buf(),
            need: len,
        }),
        // File systems without fallocate (some FUSE, old NFS): a sparse file still works.
        Err(rustix::io::Errno::OPNOTSUPP) => file.set_len(len).map_err(io_err("resize", path)),
        Err(e) => Err(io_err("preallocate", path)(e.into())),
    }
}
