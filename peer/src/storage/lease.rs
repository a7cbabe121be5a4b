//! Leases on a task directory, with flock(2) on its `lock` file, so they hold across processes:
//! a downloader holds an exclusive lease, a reader (a client copying the output, an upload) a
//! shared one, and GC only evicts a task it can lock exclusively without waiting. The lock
//! file's mtime is the task's last use.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{flock, FlockOperation};

pub const LOCK_FILE: &str = "lock";

#[derive(Debug)]
pub struct Lease {
    file: File,
    dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

impl Lease {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Marks the task as used now (GC's least-recently-used order and TTL read this).
    pub fn touch(&self) {
        if let Err(e) = self.file.set_modified(SystemTime::now()) {
            tracing::debug!(dir = %self.dir.display(), error = %e, "could not update last-use time");
        }
    }

    /// Sets the task's last-use time back to `at` (a daemon that serves its store again after
    /// a restart has not used the tasks it merely re-verified).
    pub fn set_last_use(&self, at: SystemTime) {
        if let Err(e) = self.file.set_modified(at) {
            tracing::debug!(dir = %self.dir.display(), error = %e, "could not set the last-use time");
        }
    }

    /// Turns an exclusive lease into a shared one without a window where it is unlocked.
    pub fn downgrade(&self) -> io::Result<()> {
        flock(&self.file, FlockOperation::LockShared).map_err(io::Error::from)
    }
}

impl Drop for Lease {
    /// A directory that holds no task (a reservation that failed, an origin that answered 404,
    /// a look-up of something never stored) is removed when its last lease goes, so failures
    /// leave nothing behind. Only when no other lease is held: a non-blocking exclusive lock
    /// on the same open file, and the lock file still the directory's.
    fn drop(&mut self) {
        if self.dir.join(super::task::HEADER).exists() {
            return;
        }
        if flock(&self.file, FlockOperation::NonBlockingLockExclusive).is_err() {
            return;
        }
        if !matches!(
            still_linked(&self.file, &self.dir.join(LOCK_FILE)),
            Ok(true)
        ) {
            return;
        }
        // Waiters retake the lease on a fresh directory (`acquire` checks the link).
        if let Err(e) = super::inventory::remove_task_dir(&self.dir) {
            tracing::debug!(dir = %self.dir.display(), error = %e, "could not remove an empty task directory");
        }
    }
}

/// Takes a lease on `dir`, creating it, and blocks until it is granted. Call it off the async
/// runtime (spawn_blocking): another process may hold the lease for a whole download.
pub fn acquire(dir: &Path, mode: Mode) -> io::Result<Lease> {
    let op = match mode {
        Mode::Shared => FlockOperation::LockShared,
        Mode::Exclusive => FlockOperation::LockExclusive,
    };
    loop {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOCK_FILE);
        let file = match open_lock(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // GC removed the dir
            Err(e) => return Err(e),
        };
        flock(&file, op)?;
        if still_linked(&file, &path)? {
            let lease = Lease {
                file,
                dir: dir.to_path_buf(),
            };
            lease.touch();
            return Ok(lease);
        }
        // GC evicted the task while we waited; our lock is on a deleted file. Start over.
    }
}

/// When the task in `dir` was last used: its lock file's mtime (each lease touches it).
pub fn last_use(dir: &Path) -> io::Result<SystemTime> {
    std::fs::metadata(dir.join(LOCK_FILE)).and_then(|m| m.modified())
}

/// Takes an exclusive lease only if nobody holds any lease now. `None` means: in use.
pub fn try_exclusive(dir: &Path) -> io::Result<Option<Lease>> {
    let path = dir.join(LOCK_FILE);
    let file = match open_lock(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    Ok(still_linked(&file, &path)?.then(|| Lease {
        file,
        dir: dir.to_path_buf(),
    }))
}

fn open_lock(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

fn still_linked(file: &File, path: &Path) -> io::Result<bool> {
    let held = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.ino() == held.ino() && now.dev() == held.dev()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_blocks_gc() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        let a = acquire(&t, Mode::Exclusive).unwrap();
        std::fs::write(t.join(super::super::task::HEADER), b"a task").unwrap();
        assert!(try_exclusive(&t).unwrap().is_none());
        drop(a);
        let s = acquire(&t, Mode::Shared).unwrap();
        assert!(try_exclusive(&t).unwrap().is_none());
        drop(s);
        assert!(try_exclusive(&t).unwrap().is_some());
    }

    #[test]
    fn lease_on_evicted_dir_is_retaken() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        let gc = acquire(&t, Mode::Exclusive).unwrap();
        let t2 = t.clone();
        let waiter = std::thread::spawn(move || acquire(&t2, Mode::Exclusive).unwrap());
        // Wait until the waiter is blocked on our lock: /proc/locks lists blocked requests as
        // "-> FLOCK ... MAJ:MIN:INODE".
        let ino = std::fs::metadata(t.join(LOCK_FILE)).unwrap().ino();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
            let blocked = locks.lines().any(|l| {
                l.contains("->") && l.contains("FLOCK") && l.contains(&format!(":{ino} "))
            });
            if blocked {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never blocked on the lease"
            );
            std::thread::yield_now();
        }
        std::fs::remove_dir_all(&t).unwrap();
        drop(gc);
        let got = waiter.join().unwrap();
        assert!(
            got.dir().join(LOCK_FILE).exists(),
            "the waiter must hold a lock on a live file"
        );
        assert!(try_exclusive(&t).unwrap().is_none());
    }

    #[test]
    fn a_directory_without_a_task_goes_with_its_last_lease() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("t");
        let a = acquire(&t, Mode::Shared).unwrap();
        let b = acquire(&t, Mode::Shared).unwrap();
        drop(a);
        assert!(t.join(LOCK_FILE).exists(), "another lease still holds it");
        std::fs::write(t.join("content"), b"half a reservation").unwrap();
        drop(b);
        assert!(!t.exists(), "an empty task directory is left behind");
        let c = acquire(&t, Mode::Exclusive).unwrap();
        std::fs::write(t.join(super::super::task::HEADER), b"a task").unwrap();
        drop(c);
        assert!(t.join(LOCK_FILE).exists(), "a task's directory stays");
    }
}
