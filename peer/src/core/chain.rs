//! Chained SHA-256: the content's SHA-256 computed piece by piece, each piece continuing from
//! the hash state (the *chaining value*) where the previous one ended. With the chaining value
//! at every piece boundary known, each piece can be checked on its own (from its start value to
//! its end value) and the last piece's end finalises to the whole content's digest: every byte
//! is hashed once, and the end-to-end check comes out of the piece checks.
//!
//! ring exposes no hash state, so the compression function is RustCrypto's
//! `sha2::block_api::compress256`, which uses SHA-NI where the CPU has it. ring stays wherever
//! a plain digest is enough ([`Digest::of`], [`super::Sha256Stream`]).
//!
//! Piece boundaries must fall on 64-byte blocks: every piece length is a multiple of 4096.
//!
//! A piece's *end value* is the chaining value at its end, except for the last piece, whose end
//! value is the content's digest itself (the finalised hash). Piece `i` is checked from the end
//! value of piece `i - 1` (or [`ChainValue::START`]) to its own: [`Link`].

use sha2::block_api::compress256;

use super::{Digest, Piece};

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The SHA-256 state at a block boundary.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainValue(pub [u32; 8]);

impl ChainValue {
    /// The value before the first byte.
    pub const START: ChainValue = ChainValue(IV);

    /// Big-endian bytes, as on the wire and on disk.
    pub fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.0) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }

    /// The last piece's end value: the content's digest.
    pub fn of_digest(d: Digest) -> ChainValue {
        ChainValue::from_bytes(d.0)
    }

    /// This value as a digest (meaningful for the last piece's end value).
    pub fn to_digest(self) -> Digest {
        Digest(self.to_bytes())
    }

    pub fn from_bytes(b: [u8; 32]) -> ChainValue {
        let mut words = [0u32; 8];
        for (w, c) in words.iter_mut().zip(b.chunks_exact(4)) {
            *w = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        ChainValue(words)
    }
}

impl std::fmt::Debug for ChainValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.to_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// SHA-256 from a chaining value at byte offset `len` of the content, fed in chunks of any
/// size (a network read's), each byte hashed once.
#[derive(Clone)]
pub struct Chain {
    state: [u32; 8],
    /// A partial block carried between chunks.
    buf: [u8; 64],
    buffered: usize,
    /// Bytes hashed since the start of the content.
    len: u64,
}

impl Chain {
    /// Continues the content's hash at `offset` (a multiple of 64) from `value`.
    pub fn resume(value: ChainValue, offset: u64) -> Chain {
        debug_assert_eq!(offset % 64, 0, "piece boundaries fall on 64-byte blocks");
        Chain {
            state: value.0,
            buf: [0; 64],
            buffered: 0,
            len: offset,
        }
    }

    /// A content's hash from its first byte.
    pub fn new() -> Chain {
        Chain::resume(ChainValue::START, 0)
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.buffered > 0 {
            let take = (64 - self.buffered).min(data.len());
            self.buf[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
            self.buffered += take;
            data = &data[take..];
            if self.buffered < 64 {
                return;
            }
            compress256(&mut self.state, &[self.buf]);
            self.buffered = 0;
        }
        let (blocks, rest) = data.as_chunks::<64>();
        if !blocks.is_empty() {
            compress256(&mut self.state, blocks);
        }
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    /// The chaining value here, if this is a block boundary (else None: a piece boundary is
    /// always one).
    pub fn value(&self) -> Option<ChainValue> {
        (self.buffered == 0).then_some(ChainValue(self.state))
    }

    /// The whole content's digest, this being its end.
    pub fn finish(mut self) -> Digest {
        let bits = self.len.wrapping_mul(8);
        let mut tail = [0u8; 128];
        tail[..self.buffered].copy_from_slice(&self.buf[..self.buffered]);
        tail[self.buffered] = 0x80;
        let total = if self.buffered < 56 { 64 } else { 128 };
        tail[total - 8..total].copy_from_slice(&bits.to_be_bytes());
        let (blocks, _) = tail[..total].as_chunks::<64>();
        compress256(&mut self.state, blocks);
        Digest(ChainValue(self.state).to_bytes())
    }
}

/// A piece's place in the chain: its index and the values at its start and end. A piece is
/// verified when its bytes, hashed from `start`, end at `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub start: ChainValue,
    pub end: ChainValue,
}

impl Link {
    /// The end value of `piece`'s bytes (in chunks of any size) hashed from `start`; `last`
    /// says whether it is the content's last piece (its end value is then the digest).
    pub fn end_of<B: AsRef<[u8]>>(
        start: ChainValue,
        piece: &Piece,
        last: bool,
        chunks: &[B],
    ) -> ChainValue {
        let mut c = Chain::resume(start, piece.offset);
        for b in chunks {
            c.update(b.as_ref());
        }
        if last {
            ChainValue::of_digest(c.finish())
        } else {
            // Piece lengths are multiples of 4096, so a piece's end is a block boundary; if a
            // caller passed fewer bytes than that, this is a value no honest piece ends at.
            c.value().unwrap_or(ChainValue([0; 8]))
        }
    }

    /// Whether `piece`'s bytes hash from this link's start to its end.
    pub fn holds<B: AsRef<[u8]>>(&self, piece: &Piece, last: bool, chunks: &[B]) -> bool {
        Link::end_of(self.start, piece, last, chunks) == self.end
    }
}

/// A content's pieces hashed in order, each from the end value of the one before: one SHA-256
/// pass over the content, giving each piece's [`Link`].
pub struct PieceChain {
    value: ChainValue,
    count: u32,
}

impl PieceChain {
    /// From the content's first byte; `count` is the plan's piece count.
    pub fn new(count: u32) -> PieceChain {
        PieceChain::resume(ChainValue::START, count)
    }

    /// From `value`, the end value of the piece before the next one given.
    pub fn resume(value: ChainValue, count: u32) -> PieceChain {
        PieceChain { value, count }
    }

    /// The next piece in order, from its bytes (in chunks of any size).
    pub fn next<B: AsRef<[u8]>>(&mut self, piece: &Piece, chunks: &[B]) -> Link {
        let start = self.value;
        let end = Link::end_of(start, piece, piece.index + 1 == self.count, chunks);
        self.value = end;
        Link {
            index: piece.index,
            start,
            end,
        }
    }
}

impl Default for Chain {
    fn default() -> Self {
        Chain::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn the_known_answers() {
        // FIPS 180-2 examples.
        let abc = {
            let mut c = Chain::new();
            c.update(b"abc");
            c.finish()
        };
        assert_eq!(
            abc.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Chain::new().finish(), Digest::of(b""));
        for n in [55, 56, 63, 64, 65, 119, 120, 128] {
            let d = bytes(n, n as u64);
            let mut c = Chain::new();
            c.update(&d);
            assert_eq!(c.finish(), Digest::of(&d), "{n} bytes");
        }
    }

    #[test]
    fn values_round_trip_as_bytes() {
        let mut c = Chain::new();
        c.update(&bytes(4096, 3));
        let v = c.value().unwrap();
        assert_eq!(ChainValue::from_bytes(v.to_bytes()), v);
        assert_eq!(
            ChainValue::from_bytes(ChainValue::START.to_bytes()),
            ChainValue::START
        );
    }

    #[test]
    fn a_link_checks_a_piece_from_its_start_to_its_end() {
        let data = bytes(3 * 4096 + 100, 9);
        let plan = crate::core::PiecePlan::new(data.len() as u64, 16384).unwrap();
        let p = plan.piece(0).unwrap();
        let end = Link::end_of(ChainValue::START, &p, true, &[&data[..10], &data[10..]]);
        assert_eq!(end.to_digest(), Digest::of(&data));
        let link = Link {
            index: 0,
            start: ChainValue::START,
            end,
        };
        assert!(link.holds(&p, true, &[&data[..]]));
        let mut bad = data.clone();
        bad[5000] ^= 1;
        assert!(!link.holds(&p, true, &[&bad[..]]));
        // A short piece never ends at a boundary value.
        assert_eq!(
            Link::end_of(ChainValue::START, &p, false, &[&data[..100]]),
            ChainValue([0; 8])
        );
    }

    proptest! {
        /// Pieces hashed separately, each resumed from the value where the previous ended and
        /// fed in arbitrary chunks, give the same boundary values as one pass, and the last
        /// finalises to ring's digest of the whole.
        #[test]
        fn pieces_chain_to_the_whole_contents_digest(
            pieces in 1usize..6,
            blocks in 1usize..5,
            tail in 0usize..9000,
            chunk in 1usize..5000,
            seed in any::<u64>(),
        ) {
            let piece_len = blocks * 4096;
            let len = (pieces - 1) * piece_len + tail.max(1);
            let data = bytes(len, seed);
            let mut one = Chain::new();
            let mut value = ChainValue::START;
            let mut at = 0;
            while at < len {
                let end = (at + piece_len).min(len);
                let mut c = Chain::resume(value, at as u64);
                for part in data[at..end].chunks(chunk) {
                    c.update(part);
                }
                one.update(&data[at..end]);
                if end < len {
                    value = c.value().expect("a piece boundary is a block boundary");
                    prop_assert_eq!(Some(value), one.value());
                } else {
                    prop_assert_eq!(c.finish(), Digest::of(&data));
                }
                at = end;
            }
            prop_assert_eq!(one.finish(), Digest::of(&data));
        }
    }
}
