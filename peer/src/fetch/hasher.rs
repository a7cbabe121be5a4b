//! The whole-content SHA-256, computed in order while pieces arrive in any order.
//!
//! Pieces are handed over as the very `Bytes` chunks that were written to disk (no copy). Each
//! carries a window permit that is released only once the piece has been hashed, so at most
//! `window` pieces wait in memory whatever the content size.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use crate::core::{Digest, Sha256Stream};

type Item = (u32, Vec<Bytes>, Option<OwnedSemaphorePermit>);

pub struct ContentHasher {
    tx: Option<mpsc::Sender<Item>>,
    thread: Option<JoinHandle<Option<Digest>>>,
}

impl ContentHasher {
    /// Starts hashing a content of `count` pieces on its own thread.
    pub fn start(count: u32) -> ContentHasher {
        let (tx, rx) = mpsc::channel::<Item>();
        let thread = std::thread::Builder::new()
            .name("starling-hash".into())
            .spawn(move || {
                let mut h = Sha256Stream::new();
                let mut next = 0u32;
                let mut waiting: BTreeMap<u32, Vec<Bytes>> = BTreeMap::new();
                // Permits of pieces waiting here are held until those pieces are hashed.
                let mut permits: BTreeMap<u32, OwnedSemaphorePermit> = BTreeMap::new();
                for (index, chunks, permit) in rx {
                    if index < next {
                        continue;
                    }
                    waiting.insert(index, chunks);
                    if let Some(p) = permit {
                        permits.insert(index, p);
                    }
                    while let Some(chunks) = waiting.remove(&next) {
                        for c in &chunks {
                            h.update(c);
                        }
                        permits.remove(&next);
                        next += 1;
                    }
                }
                (next == count).then(|| h.finish())
            })
            .ok();
        ContentHasher {
            tx: Some(tx),
            thread,
        }
    }

    /// Hands over piece `index`'s bytes.
    pub fn feed(&self, index: u32, chunks: Vec<Bytes>, permit: Option<OwnedSemaphorePermit>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((index, chunks, permit));
        }
    }

    /// The content digest, or None if some piece never arrived (or the thread could not start).
    pub fn finish(mut self) -> Option<Digest> {
        drop(self.tx.take());
        self.thread.take()?.join().ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_pieces_hash_in_order() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let pieces: Vec<&[u8]> = data.chunks(7_000).collect();
        let h = ContentHasher::start(pieces.len() as u32);
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        order.reverse();
        order.swap(0, 5);
        for i in order {
            let b = Bytes::copy_from_slice(pieces[i]);
            h.feed(i as u32, vec![b.slice(..100), b.slice(100..)], None);
        }
        assert_eq!(h.finish(), Some(Digest::of(&data)));
    }

    #[test]
    fn a_missing_piece_gives_none() {
        let h = ContentHasher::start(3);
        h.feed(0, vec![Bytes::from_static(b"a")], None);
        h.feed(2, vec![Bytes::from_static(b"c")], None);
        assert_eq!(h.finish(), None);
    }
}
