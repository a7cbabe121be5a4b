//! A task's verified pieces, shared by its handle and its upload views: each piece's SHA-256,
//! and the order in which pieces were verified. The order is what peers follow: a child asks
//! "what have you verified since entry N of your log?" and gets only the news, so a 1024-piece
//! bitmap with its hashes is never re-sent. A watch wakes long-polling children at once.

use std::sync::Mutex;

use tokio::sync::watch;

use crate::core::Digest;

pub struct Book {
    inner: Mutex<Inner>,
    /// Bumped on every change (a piece verified, or the task reset/sealed).
    changed: watch::Sender<u64>,
}

struct Inner {
    digests: Vec<Option<Digest>>,
    log: Vec<u32>,
    /// Increases whenever the log is reset (discard), so a child's position is known stale.
    epoch: u32,
    /// Pieces an earlier run's journal names: not verified (never served, not in `digests`)
    /// until the task handle re-hashes them.
    claimed: Vec<(u32, Digest)>,
}

/// News from a book: entries from `since` on, or everything when `since` is stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSlice {
    pub epoch: u32,
    /// Log length after these entries.
    pub end: u32,
    pub entries: Vec<(u32, Digest)>,
}

impl Book {
    pub fn new(digests: Vec<Option<Digest>>) -> Book {
        let log = digests
            .iter()
            .enumerate()
            .filter(|(_, d)| d.is_some())
            .map(|(i, _)| i as u32)
            .collect();
        Book {
            inner: Mutex::new(Inner {
                digests,
                log,
                epoch: 0,
                claimed: Vec::new(),
            }),
            changed: watch::Sender::new(0),
        }
    }

    /// A book with nothing verified yet, and `claimed` pieces to re-check (see
    /// [`Book::take_claims`]).
    pub fn claimed(count: usize, claimed: Vec<(u32, Digest)>) -> Book {
        let book = Book::new(vec![None; count]);
        book.with(|i| i.claimed = claimed);
        book
    }

    /// The claimed pieces, once: the caller verifies them and marks those that pass.
    pub fn take_claims(&self) -> Vec<(u32, Digest)> {
        self.with(|i| std::mem::take(&mut i.claimed))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding this lock cannot leave it inconsistent (every mutation is a
        // single assignment or push), so a poisoned lock is still usable.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn digests(&self) -> Vec<Option<Digest>> {
        self.with(|i| i.digests.clone())
    }

    pub fn digest(&self, index: u32) -> Option<Digest> {
        self.with(|i| i.digests.get(index as usize).copied().flatten())
    }

    pub fn count(&self) -> u32 {
        self.with(|i| i.log.len() as u32)
    }

    /// Marks a piece verified (once; re-marking keeps its place in the log).
    pub fn mark(&self, index: u32, digest: Digest) {
        let fresh = self.with(|i| match i.digests.get_mut(index as usize) {
            Some(slot) => {
                let fresh = slot.is_none();
                *slot = Some(digest);
                if fresh {
                    i.log.push(index);
                }
                fresh
            }
            None => false,
        });
        if fresh {
            self.bump();
        }
    }

    /// Marks every piece at once (a sealed task vouched for by its manifest).
    pub fn mark_all(&self, digests: impl Iterator<Item = Digest>) {
        self.with(|i| {
            for (n, d) in digests.enumerate() {
                if let Some(slot) = i.digests.get_mut(n) {
                    if slot.is_none() {
                        i.log.push(n as u32);
                    }
                    *slot = Some(d);
                }
            }
        });
        self.bump();
    }

    /// Bumped by every [`Book::reset`].
    pub fn epoch(&self) -> u32 {
        self.with(|i| i.epoch)
    }

    /// Forgets every piece (the task was discarded).
    pub fn reset(&self) {
        self.with(|i| {
            i.digests.iter_mut().for_each(|d| *d = None);
            i.log.clear();
            i.claimed.clear();
            i.epoch += 1;
        });
        self.bump();
    }

    /// Entries from position `since` of epoch `epoch` on; the whole log if that is stale.
    pub fn since(&self, epoch: u32, since: u32) -> LogSlice {
        self.with(|i| {
            let start = if epoch == i.epoch && (since as usize) <= i.log.len() {
                since as usize
            } else {
                0
            };
            LogSlice {
                epoch: i.epoch,
                end: i.log.len() as u32,
                entries: i.log[start..]
                    .iter()
                    .filter_map(|&p| i.digests[p as usize].map(|d| (p, d)))
                    .collect(),
            }
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Signals a change that is not a new piece (the task was sealed).
    pub fn touch(&self) {
        self.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_follows_verification_order_and_resets() {
        let b = Book::new(vec![None, Some(Digest::of(b"1")), None]);
        assert_eq!(b.count(), 1);
        b.mark(2, Digest::of(b"2"));
        b.mark(2, Digest::of(b"2"));
        b.mark(9, Digest::of(b"9"));
        let s = b.since(0, 1);
        assert_eq!(s.end, 2);
        assert_eq!(s.entries, vec![(2, Digest::of(b"2"))]);
        assert_eq!(b.since(0, 2).entries, vec![]);
        // A position past the end, or of an old epoch, gets the whole log.
        assert_eq!(b.since(0, 7).entries.len(), 2);
        b.reset();
        b.mark(0, Digest::of(b"0"));
        let s = b.since(0, 1);
        assert_eq!((s.epoch, s.end), (1, 1));
        assert_eq!(s.entries, vec![(0, Digest::of(b"0"))]);
    }
}
