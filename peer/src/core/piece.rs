//! The piece plan: how a content of known length is cut into fixed-length pieces.
//!
//! Every piece but the last has `piece_length` bytes; the last one holds the remainder. Empty
//! content has no pieces. Piece lengths are multiples of 4 KiB so that pieces stay page-aligned
//! in the content file (io_uring writes and mmap'd uploads both like that).

/// Smallest piece length accepted from `--piece-length` or config.
pub const MIN_PIECE_LENGTH: u64 = 16 * 1024;
/// Largest piece length accepted. A piece is held in memory while it is verified, so this
/// bounds memory per in-flight request.
pub const MAX_PIECE_LENGTH: u64 = 64 * 1024 * 1024;

/// Pieces the default rule aims for. Enough pieces for peers to trade early and spread load;
/// few enough that per-piece overhead (one request, one hash, one manifest entry) stays small.
const TARGET_PIECES: u64 = 2048;
const DEFAULT_MIN: u64 = 256 * 1024;
const DEFAULT_MAX: u64 = 16 * 1024 * 1024;

/// Small content keeps at least this many pieces (down to [`SMALL_MIN`]): in a large swarm a
/// piece must pass through many peers, and with few pieces the pipeline spends much of the
/// download filling and draining. `bench scale`'s model of 50 and 100 peers on 10 Mbit/s links
/// fetching 32 MiB: 1.61 and 1.73 x T_min at 256 KiB (128 pieces), 1.22 and 1.21 at 64 KiB,
/// 1.25 and 1.26 at 32 KiB (docs/decisions.md S2).
const MIN_PIECES: u64 = 512;
const SMALL_MIN: u64 = 64 * 1024;

/// The default piece length for a content of `content_length` bytes: about
/// [`TARGET_PIECES`] pieces, rounded up to a power of two, clamped to 256 KiB ..= 16 MiB; and
/// for content under 128 MiB, small enough to make [`MIN_PIECES`] pieces, but not under 64 KiB.
/// Small pieces pass through a swarm sooner (a peer relays a piece only once it has all of it
/// and has verified it): `bench swarm`'s default job ran 1.21 × T_min at 512 KiB against 1.26
/// at 1 MiB and 1.35 at 2 MiB, and later (`--import`, 8 alternating pairs) 23.60–23.80 s at
/// 256 KiB against 23.88–23.99 s at 512 KiB, for about a tenth more CPU (medians 20.4 against
/// 18.0 CPU-s; the per-piece work of a request stream, news and a journal record); 128 KiB
/// was slower again (24.1 s) on that 256 MiB job, which keeps its 1,024 pieces.
/// Small content still gets a plan (one piece) and still goes peer to peer.
pub fn default_piece_length(content_length: u64) -> u64 {
    let want = content_length.div_ceil(TARGET_PIECES).max(1);
    let length = want
        .checked_next_power_of_two()
        .unwrap_or(DEFAULT_MAX)
        .clamp(DEFAULT_MIN, DEFAULT_MAX);
    // The largest power of two that still makes MIN_PIECES pieces.
    let many = match content_length / MIN_PIECES {
        0 => SMALL_MIN,
        q => (1u64 << (63 - q.leading_zeros())).max(SMALL_MIN),
    };
    length.min(many)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PiecePlanError {
    #[error("piece length {0} is out of range: use a multiple of 4096 between {MIN_PIECE_LENGTH} and {MAX_PIECE_LENGTH} bytes")]
    BadPieceLength(u64),
    #[error("content of {content_length} bytes at {piece_length}-byte pieces needs more than 2^32 pieces; use a larger piece length")]
    TooManyPieces {
        content_length: u64,
        piece_length: u64,
    },
}

/// One piece of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub index: u32,
    pub offset: u64,
    pub length: u64,
}

impl Piece {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PiecePlan {
    content_length: u64,
    piece_length: u64,
    count: u32,
}

impl PiecePlan {
    /// A plan with an explicit piece length (validated).
    pub fn new(content_length: u64, piece_length: u64) -> Result<Self, PiecePlanError> {
        if !(MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&piece_length)
            || !piece_length.is_multiple_of(4096)
        {
            return Err(PiecePlanError::BadPieceLength(piece_length));
        }
        let count = content_length.div_ceil(piece_length);
        let count = u32::try_from(count).map_err(|_| PiecePlanError::TooManyPieces {
            content_length,
            piece_length,
        })?;
        Ok(PiecePlan {
            content_length,
            piece_length,
            count,
        })
    }

    /// A plan with the default piece length for this content length.
    pub fn with_default(content_length: u64) -> Self {
        // The default rule always yields a valid length and at most 2^32 pieces for any u64
        // below 2^56; clamp the pathological rest to the maximum length.
        PiecePlan::new(content_length, default_piece_length(content_length))
            .or_else(|_| PiecePlan::new(content_length, MAX_PIECE_LENGTH))
            .unwrap_or(PiecePlan {
                content_length: 0,
                piece_length: DEFAULT_MIN,
                count: 0,
            })
    }

    pub fn content_length(&self) -> u64 {
        self.content_length
    }

    pub fn piece_length(&self) -> u64 {
        self.piece_length
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// The piece at `index`, or None past the end.
    pub fn piece(&self, index: u32) -> Option<Piece> {
        if index >= self.count {
            return None;
        }
        let offset = index as u64 * self.piece_length;
        let length = self.piece_length.min(self.content_length - offset);
        Some(Piece {
            index,
            offset,
            length,
        })
    }

    pub fn pieces(&self) -> impl Iterator<Item = Piece> + '_ {
        (0..self.count).filter_map(move |i| self.piece(i))
    }

    /// The piece that holds byte `offset`.
    pub fn piece_at(&self, offset: u64) -> Option<Piece> {
        if offset >= self.content_length {
            return None;
        }
        self.piece((offset / self.piece_length) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn assert_covers_exactly(plan: &PiecePlan) {
        let mut next = 0u64;
        for (i, p) in plan.pieces().enumerate() {
            assert_eq!(p.index as usize, i);
            assert_eq!(p.offset, next, "gap or overlap before piece {i}");
            assert!(p.length > 0 && p.length <= plan.piece_length());
            if (i as u32) + 1 < plan.count() {
                assert_eq!(p.length, plan.piece_length());
            }
            next = p.end();
        }
        assert_eq!(
            next,
            plan.content_length(),
            "bytes left uncovered at the end"
        );
        assert!(plan.piece(plan.count()).is_none());
    }

    #[test]
    fn edge_sizes() {
        let pl = 64 * 1024;
        for len in [0, 1, pl - 1, pl, pl + 1, 3 * pl, 10 * pl + 4095, 12_345_679] {
            let plan = PiecePlan::new(len, pl).unwrap();
            assert_covers_exactly(&plan);
        }
        assert_eq!(PiecePlan::new(0, pl).unwrap().count(), 0);
        assert_eq!(PiecePlan::new(1, pl).unwrap().count(), 1);
        assert_eq!(PiecePlan::new(pl, pl).unwrap().count(), 1);
        assert_eq!(PiecePlan::new(pl + 1, pl).unwrap().count(), 2);
        assert_eq!(
            PiecePlan::new(pl + 1, pl).unwrap().piece(1).unwrap().length,
            1
        );
    }

    #[test]
    fn bad_lengths_are_rejected() {
        for bad in [
            0,
            4096,
            MIN_PIECE_LENGTH + 1,
            MAX_PIECE_LENGTH + 4096,
            100_000,
        ] {
            assert_eq!(
                PiecePlan::new(10, bad),
                Err(PiecePlanError::BadPieceLength(bad))
            );
        }
        assert!(matches!(
            PiecePlan::new(u64::MAX, MIN_PIECE_LENGTH),
            Err(PiecePlanError::TooManyPieces { .. })
        ));
    }

    #[test]
    fn default_rule() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(default_piece_length(0), MIB / 16);
        assert_eq!(default_piece_length(1), MIB / 16);
        assert_eq!(default_piece_length(32 * MIB), MIB / 16);
        assert_eq!(default_piece_length(32 * MIB + 1), MIB / 16);
        assert_eq!(default_piece_length(64 * MIB), MIB / 8);
        assert_eq!(default_piece_length(128 * MIB), MIB / 4);
        assert_eq!(default_piece_length(256 * MIB), MIB / 4);
        assert_eq!(default_piece_length(512 * MIB), MIB / 4);
        assert_eq!(default_piece_length(512 * MIB + 1), MIB / 2);
        assert_eq!(default_piece_length(1024 * MIB), MIB / 2);
        assert_eq!(default_piece_length(2048 * MIB), MIB);
        assert_eq!(default_piece_length(4096 * MIB), 2 * MIB);
        assert_eq!(default_piece_length(20 * 1024 * MIB), 16 * MIB);
        assert_eq!(default_piece_length(u64::MAX), 16 * MIB);
        assert_covers_exactly(&PiecePlan::with_default(u64::MAX / 2));
    }

    proptest! {
        #[test]
        fn every_byte_covered_once(len in 0u64..(1u64 << 40), pl_pages in 4u64..=16384) {
            let plan = PiecePlan::new(len, pl_pages * 4096).unwrap();
            prop_assume!(plan.count() < 200_000);
            assert_covers_exactly(&plan);
        }

        #[test]
        fn piece_at_agrees(len in 1u64..(1u64 << 34), pl_pages in 4u64..=16384, pos in any::<u64>()) {
            let plan = PiecePlan::new(len, pl_pages * 4096).unwrap();
            let off = pos % len;
            let p = plan.piece_at(off).unwrap();
            prop_assert!(p.offset <= off && off < p.end());
            prop_assert!(plan.piece_at(len).is_none());
        }

        #[test]
        fn near_piece_boundaries(k in 1u64..2000, delta in -1i64..=1, pl_pages in 4u64..=64) {
            let pl = pl_pages * 4096;
            let len = (k * pl).saturating_add_signed(delta);
            assert_covers_exactly(&PiecePlan::new(len, pl).unwrap());
        }

        #[test]
        fn default_plan_is_valid(len in any::<u64>()) {
            let plan = PiecePlan::with_default(len >> 8);
            prop_assert!(plan.piece_length().is_multiple_of(4096));
            prop_assert_eq!(plan.content_length(), len >> 8);
        }
    }
}
