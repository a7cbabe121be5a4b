//! A task's verified pieces and the chain values it knows, shared by its handle and its upload
//! views.
//!
//! - **Values.** Each piece's end value (see [`crate::core::Link`]), once known: from a piece
//!   this node verified, or heard from a parent (the first parent to name a value wins; a
//!   piece checked against a wrong value fails, and the whole content's check at the end
//!   stands behind every value).
//! - **Verified pieces**, which are served, and pieces stored from the origin that wait for the
//!   in-order chain (`storage/chainer.rs`) to give them their values (not served until then).
//! - **The log** that children follow: "what have you verified since entry N?" gets only the
//!   news, so a 1024-piece bitmap with its values is never re-sent. Each entry is a verified
//!   piece with its end value, or a value this node used (the start of a piece it verified)
//!   without holding the piece it ends. So whatever a child sees held, it can check. A watch
//!   wakes long-polling children at once.

use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::watch;

use crate::core::{ChainValue, Link};

pub struct Book {
    inner: Mutex<Inner>,
    /// Bumped on every change (a piece verified or stored, or the task reset/sealed).
    changed: watch::Sender<u64>,
}

struct Inner {
    values: Vec<Option<ChainValue>>,
    verified: Vec<bool>,
    verified_count: u32,
    /// Stored from the origin, waiting for the chain to reach it: since when.
    unchecked: Vec<Option<Instant>>,
    /// How many pieces are stored unchecked.
    unchecked_count: u32,
    /// Whether a piece's end value is in the log.
    logged: Vec<bool>,
    log: Vec<Entry>,
    /// Increases whenever the log is reset (discard), so a child's position is known stale.
    epoch: u32,
    /// Pieces an earlier run's journal names: not verified (never served) until the task
    /// handle re-hashes them.
    claimed: Vec<Link>,
}

/// One log entry: piece `index`'s end value, and whether this node holds that piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: u32,
    pub value: ChainValue,
    pub held: bool,
}

/// News from a book: entries from `since` on, or everything when `since` is stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSlice {
    pub epoch: u32,
    /// Log length after these entries.
    pub end: u32,
    pub entries: Vec<Entry>,
}

/// What [`Book::learn`] made of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// New, or the value already known.
    Agrees,
    /// Another value is already known for this piece: the new one is not used.
    Conflicts,
    /// No such piece.
    OutOfRange,
}

impl Book {
    /// A book with nothing known.
    pub fn new(count: usize) -> Book {
        Book {
            inner: Mutex::new(Inner {
                values: vec![None; count],
                verified: vec![false; count],
                verified_count: 0,
                unchecked: vec![None; count],
                unchecked_count: 0,
                logged: vec![false; count],
                log: Vec::new(),
                epoch: 0,
                claimed: Vec::new(),
            }),
            changed: watch::Sender::new(0),
        }
    }

    /// A book with nothing verified yet, and `claimed` pieces to re-check (see
    /// [`Book::take_claims`]).
    pub fn claimed(count: usize, claimed: Vec<Link>) -> Book {
        let book = Book::new(count);
        book.with(|i| i.claimed = claimed);
        book
    }

    /// The claimed pieces, once: the caller verifies them and marks those that pass.
    pub fn take_claims(&self) -> Vec<Link> {
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

    /// Which pieces are verified.
    pub fn bitmap(&self) -> Vec<bool> {
        self.with(|i| i.verified.clone())
    }

    pub fn is_verified(&self, index: u32) -> bool {
        self.with(|i| i.verified.get(index as usize).copied().unwrap_or(false))
    }

    pub fn is_unchecked(&self, index: u32) -> bool {
        self.unchecked_since(index).is_some()
    }

    /// When piece `index` was stored unchecked, if it waits for the chain.
    pub fn unchecked_since(&self, index: u32) -> Option<Instant> {
        self.with(|i| i.unchecked.get(index as usize).copied().flatten())
    }

    pub fn count(&self) -> u32 {
        self.with(|i| i.verified_count)
    }

    /// Where the in-order chain, stopped at piece `from` (neither verified nor stored), can go
    /// on: past a run of such pieces whose start and end values are both known (and of
    /// verified ones), when the run ends at a piece stored unchecked. Those pieces are checked on arrival against their
    /// known values, so origin pieces behind them need not wait for them (see
    /// [`super::Chainer`]). None when the chain must wait: a value is unknown, or nothing
    /// unchecked waits behind the run (a download from parents alone never skips).
    /// At most `max` pieces are skipped at once.
    pub fn skippable_run(&self, from: u32, max: usize) -> Option<u32> {
        self.with(|i| {
            if i.unchecked_count == 0 {
                return None;
            }
            let n = i.verified.len().min(from as usize + max + 1);
            let mut at = from as usize;
            while at < n
                && (i.verified[at]
                    || (i.unchecked[at].is_none()
                        && i.values[at].is_some()
                        && i.start(at as u32).is_some()))
            {
                at += 1;
            }
            (at > from as usize && at < n && i.unchecked[at].is_some()).then_some(at as u32)
        })
    }

    /// Drops the verified pieces from `pieces`, and gives those of the rest stored unchecked
    /// (under one lock: the chain asks this at every change).
    pub fn pending(&self, pieces: &mut Vec<u32>) -> Vec<u32> {
        self.with(|i| {
            pieces.retain(|p| !i.verified.get(*p as usize).copied().unwrap_or(true));
            pieces
                .iter()
                .copied()
                .filter(|p| i.unchecked.get(*p as usize).is_some_and(Option::is_some))
                .collect()
        })
    }

    /// Piece `index`'s end value, if known.
    pub fn value(&self, index: u32) -> Option<ChainValue> {
        self.with(|i| i.value(index))
    }

    /// Piece `index`'s start and end values, each if known.
    pub fn link(&self, index: u32) -> (Option<ChainValue>, Option<ChainValue>) {
        self.with(|i| (i.start(index), i.value(index)))
    }

    /// Every piece's end value, once every piece is verified.
    pub fn verified_values(&self) -> Option<Vec<ChainValue>> {
        self.with(|i| {
            i.values
                .iter()
                .zip(&i.verified)
                .map(|(v, verified)| v.filter(|_| *verified))
                .collect()
        })
    }

    /// Records a value heard from a parent. The first value known for a piece stays.
    pub fn learn(&self, index: u32, value: ChainValue) -> Learned {
        self.with(|i| match i.values.get_mut(index as usize) {
            None => Learned::OutOfRange,
            Some(slot @ None) => {
                *slot = Some(value);
                Learned::Agrees
            }
            Some(Some(v)) if *v == value => Learned::Agrees,
            Some(Some(_)) => Learned::Conflicts,
        })
    }

    /// Marks a piece verified: its bytes hashed from `link.start` to `link.end` (once;
    /// re-marking keeps its place in the log). Its start value goes in the log too if it is
    /// not there yet, so a child can check it.
    pub fn mark(&self, link: Link) {
        let fresh = self.with(|i| {
            let n = link.index as usize;
            if n >= i.verified.len() || i.verified[n] {
                return false;
            }
            i.verified[n] = true;
            i.verified_count += 1;
            if i.unchecked[n].take().is_some() {
                i.unchecked_count -= 1;
            }
            if n > 0 {
                i.values[n - 1].get_or_insert(link.start);
                if !i.logged[n - 1] {
                    i.logged[n - 1] = true;
                    i.log.push(Entry {
                        index: link.index - 1,
                        value: link.start,
                        held: false,
                    });
                }
            }
            i.values[n] = Some(link.end);
            i.logged[n] = true;
            i.log.push(Entry {
                index: link.index,
                value: link.end,
                held: true,
            });
            true
        });
        if fresh {
            self.bump();
        }
    }

    /// Marks every piece at once (a sealed task vouched for by its manifest).
    pub fn mark_all(&self, values: &[ChainValue]) {
        self.with(|i| {
            for (n, &v) in values.iter().enumerate().take(i.verified.len()) {
                i.values[n] = Some(v);
                if i.unchecked[n].take().is_some() {
                    i.unchecked_count -= 1;
                }
                if !i.verified[n] {
                    i.verified[n] = true;
                    i.verified_count += 1;
                    i.logged[n] = true;
                    i.log.push(Entry {
                        index: n as u32,
                        value: v,
                        held: true,
                    });
                }
            }
        });
        self.bump();
    }

    /// Records that piece `index` was stored from the origin and waits for the chain.
    pub fn store_unchecked(&self, index: u32) {
        let fresh = self.with(|i| match i.unchecked.get_mut(index as usize) {
            Some(u @ None) if !i.verified[index as usize] => {
                *u = Some(Instant::now());
                i.unchecked_count += 1;
                true
            }
            _ => false,
        });
        if fresh {
            self.bump();
        }
    }

    /// Bumped by every [`Book::reset`].
    pub fn epoch(&self) -> u32 {
        self.with(|i| i.epoch)
    }

    /// Forgets every piece and value (the task was discarded).
    pub fn reset(&self) {
        self.with(|i| {
            i.values.iter_mut().for_each(|v| *v = None);
            i.verified.iter_mut().for_each(|v| *v = false);
            i.unchecked.iter_mut().for_each(|v| *v = None);
            i.unchecked_count = 0;
            i.logged.iter_mut().for_each(|v| *v = false);
            i.verified_count = 0;
            i.log.clear();
            i.claimed.clear();
            i.epoch += 1;
        });
        self.bump();
    }

    /// Takes back values a lying parent named, and the pieces verified against them (each
    /// value is the end of piece `j` and the start of piece `j + 1`). Those pieces are no
    /// longer served; the log is rebuilt from what stays, under a new epoch, so children
    /// following this node hear every value again and drop the retracted ones. Returns the
    /// pieces that were verified and are not any more.
    pub fn retract(&self, values: &[u32]) -> Vec<u32> {
        let lost = self.with(|i| {
            let n = i.values.len();
            let mut lost = Vec::new();
            for &j in values {
                let j = j as usize;
                if j >= n {
                    continue;
                }
                i.values[j] = None;
                for p in [j, j + 1] {
                    if p < n && i.verified[p] {
                        i.verified[p] = false;
                        i.verified_count -= 1;
                        lost.push(p as u32);
                    }
                }
            }
            // The log again, from the pieces still verified and the values they used.
            i.log.clear();
            i.logged.iter_mut().for_each(|l| *l = false);
            for p in 0..n {
                if !i.verified[p] {
                    continue;
                }
                if p > 0 && !i.logged[p - 1] {
                    if let Some(v) = i.values[p - 1] {
                        i.logged[p - 1] = true;
                        i.log.push(Entry {
                            index: p as u32 - 1,
                            value: v,
                            held: false,
                        });
                    }
                }
                if let Some(v) = i.values[p] {
                    // A value logged as a start is logged again as held.
                    i.logged[p] = true;
                    i.log.push(Entry {
                        index: p as u32,
                        value: v,
                        held: true,
                    });
                }
            }
            i.epoch += 1;
            lost.sort_unstable();
            lost.dedup();
            lost
        });
        self.bump();
        lost
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
                entries: i.log[start..].to_vec(),
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

impl Inner {
    fn value(&self, index: u32) -> Option<ChainValue> {
        self.values.get(index as usize).copied().flatten()
    }

    fn start(&self, index: u32) -> Option<ChainValue> {
        match index {
            0 => Some(ChainValue::START),
            i if (i as usize) <= self.values.len() => self.value(i - 1),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(n: u32) -> ChainValue {
        ChainValue([n; 8])
    }

    fn link(index: u32) -> Link {
        Link {
            index,
            start: if index == 0 {
                ChainValue::START
            } else {
                v(index - 1)
            },
            end: v(index),
        }
    }

    #[test]
    fn retracting_a_value_unverifies_both_pieces_it_links_and_rebuilds_the_log() {
        let b = Book::new(4);
        for i in 0..4 {
            b.mark(link(i));
        }
        assert_eq!(b.count(), 4);
        let epoch = b.epoch();
        assert_eq!(b.retract(&[1]), vec![1, 2]);
        assert_eq!(b.count(), 2);
        assert_eq!(b.bitmap(), vec![true, false, false, true]);
        assert_eq!(b.value(1), None);
        let s = b.since(epoch, 4);
        assert_eq!(s.epoch, epoch + 1, "children start over");
        assert_eq!(
            s.entries,
            vec![
                Entry {
                    index: 0,
                    value: v(0),
                    held: true
                },
                Entry {
                    index: 2,
                    value: v(2),
                    held: false
                },
                Entry {
                    index: 3,
                    value: v(3),
                    held: true
                },
            ]
        );
        // Learned again, and verified again.
        assert_eq!(b.learn(1, v(1)), Learned::Agrees);
        b.mark(link(1));
        b.mark(link(2));
        assert_eq!(b.count(), 4);
    }

    #[test]
    fn log_follows_verification_order_and_resets() {
        let b = Book::new(3);
        b.mark(link(1));
        assert_eq!(b.count(), 1);
        // Piece 1's start (piece 0's end) is logged with it, as a value only.
        assert_eq!(
            b.since(0, 0).entries,
            vec![
                Entry {
                    index: 0,
                    value: v(0),
                    held: false
                },
                Entry {
                    index: 1,
                    value: v(1),
                    held: true
                }
            ]
        );
        b.mark(link(2));
        b.mark(link(2));
        b.mark(link(9));
        let s = b.since(0, 2);
        assert_eq!(s.end, 3);
        assert_eq!(
            s.entries,
            vec![Entry {
                index: 2,
                value: v(2),
                held: true
            }]
        );
        assert_eq!(b.since(0, 3).entries, vec![]);
        // A position past the end, or of an old epoch, gets the whole log.
        assert_eq!(b.since(0, 7).entries.len(), 3);
        b.mark(link(0));
        assert_eq!(
            b.since(0, 3).entries.len(),
            1,
            "piece 0's value was logged, not the piece"
        );
        b.reset();
        assert_eq!(b.value(2), None);
        b.mark(link(0));
        let s = b.since(0, 1);
        assert_eq!((s.epoch, s.end), (1, 1));
        assert_eq!(s.entries.len(), 1);
    }

    #[test]
    fn the_first_value_heard_stays() {
        let b = Book::new(2);
        assert_eq!(b.link(0), (Some(ChainValue::START), None));
        assert_eq!(b.learn(0, v(0)), Learned::Agrees);
        assert_eq!(b.learn(0, v(0)), Learned::Agrees);
        assert_eq!(b.learn(0, v(7)), Learned::Conflicts);
        assert_eq!(b.learn(5, v(7)), Learned::OutOfRange);
        assert_eq!(b.link(1), (Some(v(0)), None));
        // Learned values are not news for children: only values this node used are.
        assert!(b.since(0, 0).entries.is_empty());
    }

    #[test]
    fn the_chain_skips_only_known_runs_with_origin_pieces_behind_them() {
        let b = Book::new(8);
        for i in 0..4 {
            assert_eq!(b.learn(i, v(i)), Learned::Agrees);
        }
        // Nothing unchecked anywhere: a download from parents never skips.
        assert_eq!(b.skippable_run(0, 64), None);
        b.store_unchecked(4);
        assert_eq!(b.skippable_run(0, 64), Some(4));
        assert_eq!(b.skippable_run(0, 3), None, "longer than allowed");
        assert_eq!(
            b.skippable_run(4, 64),
            None,
            "an unchecked piece is the chain's"
        );
        // A run that ends at a missing piece of unknown value waits.
        b.store_unchecked(6);
        assert_eq!(b.skippable_run(5, 64), None);
        let mut skipped = vec![0, 1, 2, 3];
        b.mark(link(1));
        b.store_unchecked(2);
        assert_eq!(b.pending(&mut skipped), vec![2]);
        assert_eq!(skipped, vec![0, 2, 3], "the verified one is dropped");
        b.mark(link(4));
        b.mark(link(6));
        assert_eq!(
            b.skippable_run(0, 64),
            Some(2),
            "still ends at an unchecked piece"
        );
        b.mark(link(2));
        assert_eq!(b.skippable_run(0, 64), None, "none left unchecked");
    }

    #[test]
    fn unchecked_pieces_are_not_verified_until_marked() {
        let b = Book::new(2);
        b.store_unchecked(1);
        assert!(b.is_unchecked(1) && !b.is_verified(1));
        assert_eq!(b.count(), 0);
        b.mark(link(1));
        assert!(!b.is_unchecked(1) && b.is_verified(1));
    }
}
