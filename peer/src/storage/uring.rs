//! The storage thread: a tokio-uring runtime on its own OS thread, fed by a channel from the
//! network runtime. It owns every open task file and does all piece I/O:
//! - piece writes as one vectored write of the very `Bytes` chunks that came off the network
//!   (no copy in user space);
//! - reads of stored pieces;
//! - the group commit that journals verified pieces: append their records to the journal, in
//!   groups at the commit interval, without fdatasync. A restart re-hashes every journaled
//!   piece before trusting it (`TaskHandle::verify_journaled`), so a record whose data never
//!   reached the disk (power loss) costs that piece, never correctness. Syncing on the hot
//!   path wrote every task's dirty pages back in bursts that stalled transfers on a busy host.
//!   An explicit flush, and closing an unsealed task, do sync: fdatasync the content, append,
//!   fdatasync the journal.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::record::encode_journal_record;
use crate::core::Link;

/// Linux accepts at most this many iovecs per writev.
const IOV_MAX: usize = 1024;

pub(crate) type FileKey = u64;

enum Cmd {
    Open {
        key: FileKey,
        content: std::fs::File,
        journal: std::fs::File,
        journal_len: u64,
        journaled: watch::Sender<u64>,
    },
    Write {
        key: FileKey,
        offset: u64,
        chunks: Vec<Bytes>,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Read {
        key: FileKey,
        offset: u64,
        len: usize,
        reply: oneshot::Sender<io::Result<Bytes>>,
    },
    Journal {
        key: FileKey,
        link: Link,
    },
    Flush {
        key: FileKey,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Sealed {
        key: FileKey,
    },
    Close {
        key: FileKey,
    },
}

/// A handle to the storage thread. Cloning is cheap; the thread drains and exits when the
/// last handle is dropped.
#[derive(Clone)]
pub(crate) struct Uring {
    tx: mpsc::UnboundedSender<Cmd>,
    next_key: Arc<AtomicU64>,
}

fn gone() -> io::Error {
    io::Error::other("the storage thread has stopped")
}

impl Uring {
    /// Starts the storage thread. Fails with a clear error when io_uring is unavailable
    /// (old kernel, `kernel.io_uring_disabled`, or a seccomp profile that blocks it).
    pub fn start(commit_interval: Duration) -> io::Result<Uring> {
        io_uring::IoUring::new(8).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "io_uring is not available ({e}); Starling needs Linux 5.11+ with io_uring \
                     enabled (check sysctl kernel.io_uring_disabled and the container's seccomp profile)"
                ),
            )
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("starling-uring".into())
            .spawn(move || {
                tokio_uring::builder()
                    .entries(256)
                    .start(run(rx, commit_interval))
            })?;
        Ok(Uring {
            tx,
            next_key: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Hands a task's content and journal files to the storage thread. The watch counts the
    /// journal records appended since open.
    pub fn open(
        &self,
        content: std::fs::File,
        journal: std::fs::File,
        journal_len: u64,
    ) -> io::Result<(FileKey, watch::Receiver<u64>)> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (journaled, rx) = watch::channel(0);
        self.tx
            .send(Cmd::Open {
                key,
                content,
                journal,
                journal_len,
                journaled,
            })
            .map_err(|_| gone())?;
        Ok((key, rx))
    }

    pub async fn write(&self, key: FileKey, offset: u64, chunks: Vec<Bytes>) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Write {
                key,
                offset,
                chunks,
                reply,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn read(&self, key: FileKey, offset: u64, len: usize) -> io::Result<Bytes> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Read {
                key,
                offset,
                len,
                reply,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Queues a verified, written piece for the next group commit.
    pub fn journal(&self, key: FileKey, link: Link) -> io::Result<()> {
        self.tx.send(Cmd::Journal { key, link }).map_err(|_| gone())
    }

    /// Commits everything queued for `key` now and waits until it is durable.
    pub async fn flush(&self, key: FileKey) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Flush { key, reply })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// The task is sealed (its manifest is durable): queued journal records are no longer
    /// needed, since pieces missing from the journal are re-verified against the manifest.
    pub fn sealed(&self, key: FileKey) {
        let _ = self.tx.send(Cmd::Sealed { key });
    }

    /// Commits what is queued, then closes the files. Does not wait.
    pub fn close(&self, key: FileKey) {
        let _ = self.tx.send(Cmd::Close { key });
    }
}

struct OpenFile {
    content: tokio_uring::fs::File,
    journal: tokio_uring::fs::File,
    /// Touched only between awaits (single-threaded runtime), never held across one.
    state: RefCell<CommitState>,
    /// One group commit at a time per task; piece writes and reads never wait for it.
    committing: tokio::sync::Mutex<()>,
    journaled: watch::Sender<u64>,
}

/// Whether a group commit makes its pieces durable before journaling them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Append only: the periodic commit (restarts re-hash what the journal names).
    Later,
    /// fdatasync the content, append, fdatasync the journal: flush, close, shutdown.
    Now,
}

struct CommitState {
    journal_len: u64,
    pending: Vec<Link>,
    /// Records appended by a [`Durability::Later`] commit since the last [`Durability::Now`] one.
    unsynced: bool,
}

type Files = Rc<RefCell<HashMap<FileKey, Rc<OpenFile>>>>;

async fn run(mut rx: mpsc::UnboundedReceiver<Cmd>, commit_interval: Duration) {
    let files: Files = Rc::default();
    let mut tick = tokio::time::interval(commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let cmd = tokio::select! {
            cmd = rx.recv() => cmd,
            _ = tick.tick() => {
                for f in files.borrow().values() {
                    if !f.state.borrow().pending.is_empty() {
                        tokio_uring::spawn(commit(f.clone(), Durability::Later));
                    }
                }
                continue;
            }
        };
        let Some(cmd) = cmd else { break };
        handle(cmd, &files);
    }
    // Every handle is gone: make what is queued durable before the thread exits.
    let all: Vec<_> = files.borrow_mut().drain().map(|(_, f)| f).collect();
    for f in all {
        let _ = commit(f, Durability::Now).await;
    }
}

fn lookup(files: &Files, key: FileKey) -> io::Result<Rc<OpenFile>> {
    files
        .borrow()
        .get(&key)
        .cloned()
        .ok_or_else(|| io::Error::other("task file is not open"))
}

/// Runs `op` on the open file `key` on the storage runtime and sends its result back.
fn spawn_op<T, F, Fut>(files: &Files, key: FileKey, reply: oneshot::Sender<io::Result<T>>, op: F)
where
    T: 'static,
    F: FnOnce(Rc<OpenFile>) -> Fut + 'static,
    Fut: std::future::Future<Output = io::Result<T>> + 'static,
{
    let f = lookup(files, key);
    tokio_uring::spawn(async move {
        let res = match f {
            Ok(f) => op(f).await,
            Err(e) => Err(e),
        };
        let _ = reply.send(res);
    });
}

fn handle(cmd: Cmd, files: &Files) {
    match cmd {
        Cmd::Open {
            key,
            content,
            journal,
            journal_len,
            journaled,
        } => {
            let f = OpenFile {
                content: tokio_uring::fs::File::from_std(content),
                journal: tokio_uring::fs::File::from_std(journal),
                state: RefCell::new(CommitState {
                    journal_len,
                    pending: Vec::new(),
                    unsynced: false,
                }),
                committing: tokio::sync::Mutex::new(()),
                journaled,
            };
            files.borrow_mut().insert(key, Rc::new(f));
        }
        Cmd::Write {
            key,
            offset,
            chunks,
            reply,
        } => spawn_op(files, key, reply, move |f| async move {
            write_chunks(&f, offset, chunks).await
        }),
        Cmd::Read {
            key,
            offset,
            len,
            reply,
        } => spawn_op(files, key, reply, move |f| async move {
            let (res, buf) = f
                .content
                .read_exact_at(Vec::with_capacity(len), offset)
                .await;
            res.map(|()| Bytes::from(buf))
        }),
        Cmd::Journal { key, link } => {
            if let Ok(f) = lookup(files, key) {
                f.state.borrow_mut().pending.push(link);
            }
        }
        Cmd::Flush { key, reply } => spawn_op(files, key, reply, |f| commit(f, Durability::Now)),
        Cmd::Sealed { key } => {
            if let Ok(f) = lookup(files, key) {
                // Nor need its appended records be synced at close: the manifest vouches.
                let mut st = f.state.borrow_mut();
                st.pending.clear();
                st.unsynced = false;
            }
        }
        Cmd::Close { key } => {
            if let Some(f) = files.borrow_mut().remove(&key) {
                tokio_uring::spawn(async move {
                    let _ = commit(f, Durability::Now).await;
                });
            }
        }
    }
}

async fn write_chunks(f: &OpenFile, mut offset: u64, mut chunks: Vec<Bytes>) -> io::Result<()> {
    chunks.retain(|c| !c.is_empty());
    while !chunks.is_empty() {
        let rest = chunks.split_off(chunks.len().min(IOV_MAX));
        let want: usize = chunks.iter().map(|c| c.len()).sum();
        let (res, _) = f.content.writev_at_all(chunks, Some(offset)).await;
        if res? != want {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to content file",
            ));
        }
        offset += want as u64;
        chunks = rest;
    }
    Ok(())
}

/// fdatasync on the blocking pool, not through the ring: io_uring queues work on one regular
/// file behind a single worker, so a multi-second fdatasync there would stall every piece
/// write queued after it.
async fn sync_data_off_ring(file: &tokio_uring::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    tokio::task::spawn_blocking(move || {
        // SAFETY: the caller holds the file (an `Rc<OpenFile>` kept across this await), so
        // `fd` stays open until the call returns.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        rustix::fs::fdatasync(fd).map_err(io::Error::from)
    })
    .await
    .map_err(io::Error::other)?
}

/// The group commit: append the queued records; with [`Durability::Now`], data first, then the
/// journal that vouches for it, each made durable.
async fn commit(f: Rc<OpenFile>, sync: Durability) -> io::Result<()> {
    let _one = f.committing.lock().await;
    let (batch, at, unsynced) = {
        let mut st = f.state.borrow_mut();
        (std::mem::take(&mut st.pending), st.journal_len, st.unsynced)
    };
    if batch.is_empty() && (sync == Durability::Later || !unsynced) {
        return Ok(());
    }
    let mut buf = Vec::with_capacity(batch.len() * super::record::JOURNAL_RECORD);
    for link in &batch {
        encode_journal_record(link, &mut buf);
    }
    let n = buf.len() as u64;
    let res = async {
        if sync == Durability::Now {
            sync_data_off_ring(&f.content).await?;
        }
        let (res, _) = f.journal.write_all_at(buf, at).await;
        res?;
        if sync == Durability::Now {
            sync_data_off_ring(&f.journal).await?;
        }
        Ok(())
    }
    .await;
    match &res {
        Ok(()) => {
            let mut st = f.state.borrow_mut();
            st.journal_len = at + n;
            st.unsynced = sync == Durability::Later;
            drop(st);
            f.journaled.send_modify(|d| *d += batch.len() as u64);
        }
        Err(e) => {
            // A failed append may have left a partial record at `at`; the next commit
            // overwrites it from the same offset.
            tracing::error!(error = %e, pieces = batch.len(), "storage commit failed; these pieces stay unjournaled and will be fetched again after a restart");
        }
    }
    res
}
