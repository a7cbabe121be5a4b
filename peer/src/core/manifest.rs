//! The manifest: what a peer needs to verify a whole content piece by piece and end to end.
//!
//! Each piece is listed by its *end value* (see [`super::Link`]): the SHA-256 chaining value
//! at its end, the last piece's being the content digest. Piece `i` is checked from piece
//! `i - 1`'s end value to its own, so every byte is hashed once and the whole-content check
//! comes out of the piece checks.
//!
//! Binary form (little-endian), used on disk and on the wire:
//! `"STLM" | version u16 | content_length u64 | piece_length u64 | piece_count u32 |
//!  content sha256 [32] | piece end value [32] * piece_count | crc32 of all before u32`.
//! Decoding checks lengths before allocating and the CRC before trusting anything. Version 1
//! (earlier releases) listed each piece's own SHA-256; it is refused with its own error.

use super::codec::{self, Reader};
use super::{ChainValue, Digest, Link, PieceChain, PiecePlan, PiecePlanError};

const MAGIC: &[u8; 4] = b"STLM";
const VERSION: u16 = 2;
const HEADER: usize = 4 + 2 + 8 + 8 + 4 + 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    plan: PiecePlan,
    /// Each piece's end value.
    pieces: Vec<ChainValue>,
    content: Digest,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is truncated: {got} bytes, expected {want}")]
    Truncated { got: usize, want: usize },
    #[error("manifest does not start with the Starling magic bytes")]
    BadMagic,
    #[error("manifest version 1 was written by an older Starling (per-piece SHA-256s, before chained verification); this one reads version {VERSION}")]
    OldVersion,
    #[error("manifest version {0} is not supported by this Starling (supports {VERSION}); upgrade Starling")]
    BadVersion(u16),
    #[error("manifest's last piece ends at {last:?}, not at its content digest {content}")]
    LastPiece { last: ChainValue, content: Digest },
    #[error("manifest checksum mismatch: the record is corrupt")]
    BadChecksum,
    #[error("manifest lists {got} pieces but its plan needs {want}")]
    PieceCount { got: usize, want: u32 },
    #[error("manifest has an invalid piece plan: {0}")]
    Plan(#[from] PiecePlanError),
}

impl Manifest {
    /// A manifest from each piece's end value; the last must be `content`.
    pub fn new(
        plan: PiecePlan,
        pieces: Vec<ChainValue>,
        content: Digest,
    ) -> Result<Self, ManifestError> {
        if pieces.len() != plan.count() as usize {
            return Err(ManifestError::PieceCount {
                got: pieces.len(),
                want: plan.count(),
            });
        }
        if let Some(&last) = pieces.last() {
            if last != ChainValue::of_digest(content) {
                return Err(ManifestError::LastPiece { last, content });
            }
        }
        Ok(Manifest {
            plan,
            pieces,
            content,
        })
    }

    pub fn plan(&self) -> &PiecePlan {
        &self.plan
    }

    pub fn content_digest(&self) -> Digest {
        self.content
    }

    /// The manifest of `data` cut by `plan` (hashed here, in one pass).
    pub fn of_content(plan: PiecePlan, data: &[u8]) -> Result<Manifest, ManifestError> {
        let mut chain = PieceChain::new(plan.count());
        let values = plan
            .pieces()
            .map(|p| {
                let bytes = data.get(p.offset as usize..p.end() as usize).unwrap_or(&[]);
                chain.next(&p, &[bytes]).end
            })
            .collect();
        Manifest::of_values(plan, values)
    }

    /// A manifest from every piece's end value: the last is the content digest (that of empty
    /// content when there are no pieces).
    pub fn of_values(plan: PiecePlan, values: Vec<ChainValue>) -> Result<Manifest, ManifestError> {
        let content = values
            .last()
            .map_or_else(|| Digest::of(b""), |v| v.to_digest());
        Manifest::new(plan, values, content)
    }

    /// Piece `index`'s start and end values.
    pub fn link(&self, index: u32) -> Option<Link> {
        let end = self.piece_value(index)?;
        let start = match index {
            0 => ChainValue::START,
            i => self.piece_value(i - 1)?,
        };
        Some(Link { index, start, end })
    }

    /// Piece `index`'s end value.
    pub fn piece_value(&self, index: u32) -> Option<ChainValue> {
        self.pieces.get(index as usize).copied()
    }

    /// Every piece's end value, in order.
    pub fn piece_values(&self) -> &[ChainValue] {
        &self.pieces
    }

    /// The length of [`Manifest::encode`]'s output for a content of `count` pieces.
    pub const fn encoded_len(count: u32) -> usize {
        HEADER + 32 * count as usize + 4
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::encoded_len(self.pieces.len() as u32));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.plan.content_length().to_le_bytes());
        out.extend_from_slice(&self.plan.piece_length().to_le_bytes());
        out.extend_from_slice(&self.plan.count().to_le_bytes());
        out.extend_from_slice(&self.content.0);
        for p in &self.pieces {
            out.extend_from_slice(&p.to_bytes());
        }
        codec::seal(&mut out);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Manifest, ManifestError> {
        let truncated = |want| ManifestError::Truncated {
            got: buf.len(),
            want,
        };
        if buf.len() < HEADER + 4 {
            return Err(truncated(HEADER + 4));
        }
        let mut r = Reader::new(buf);
        if r.bytes(4) != Some(&MAGIC[..]) {
            return Err(ManifestError::BadMagic);
        }
        let version = r.u16().ok_or(truncated(HEADER + 4))?;
        if version == 1 {
            return Err(ManifestError::OldVersion);
        }
        if version != VERSION {
            return Err(ManifestError::BadVersion(version));
        }
        let (content_length, piece_length) = (r.u64(), r.u64());
        let count = r.u32().ok_or(truncated(HEADER + 4))? as usize;
        // Check the length implied by the count before allocating anything for the pieces.
        let want = count
            .checked_mul(32)
            .and_then(|n| n.checked_add(HEADER + 4))
            .unwrap_or(usize::MAX);
        if buf.len() != want {
            return Err(truncated(want));
        }
        let body = codec::unseal(buf).ok_or(ManifestError::BadChecksum)?;
        let mut r = Reader::new(&body[HEADER - 32..]);
        let plan = PiecePlan::new(content_length.unwrap_or(0), piece_length.unwrap_or(0))?;
        let content = r.digest().ok_or(truncated(want))?;
        let pieces = (0..count)
            .map_while(|_| r.digest().map(ChainValue::of_digest))
            .collect();
        Manifest::new(plan, pieces, content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let plan = PiecePlan::new(100_000, 16384).unwrap();
        let mut pieces: Vec<ChainValue> = (0..plan.count())
            .map(|i| ChainValue::of_digest(Digest::of(&i.to_le_bytes())))
            .collect();
        *pieces.last_mut().unwrap() = ChainValue::of_digest(Digest::of(b"all"));
        Manifest::new(plan, pieces, Digest::of(b"all")).unwrap()
    }

    #[test]
    fn a_contents_manifest_links_every_piece_to_its_digest() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let plan = PiecePlan::new(data.len() as u64, 16384).unwrap();
        let m = Manifest::of_content(plan, &data).unwrap();
        assert_eq!(m.content_digest(), Digest::of(&data));
        for p in plan.pieces() {
            let link = m.link(p.index).unwrap();
            let last = p.index + 1 == plan.count();
            assert!(link.holds(&p, last, &[&data[p.offset as usize..p.end() as usize]]));
        }
        assert_eq!(m.link(plan.count()), None);
    }

    #[test]
    fn the_last_piece_must_end_at_the_content_digest() {
        let m = sample();
        let plan = *m.plan();
        let pieces = m.piece_values().to_vec();
        assert!(matches!(
            Manifest::new(plan, pieces, Digest::of(b"other")),
            Err(ManifestError::LastPiece { .. })
        ));
    }

    #[test]
    fn a_version_1_manifest_gets_its_own_error() {
        let mut enc = sample().encode();
        enc[4..6].copy_from_slice(&1u16.to_le_bytes());
        let e = Manifest::decode(&enc).unwrap_err();
        assert_eq!(e, ManifestError::OldVersion);
        assert!(e.to_string().contains("older Starling"), "{e}");
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        let empty =
            Manifest::new(PiecePlan::new(0, 16384).unwrap(), vec![], Digest::of(b"")).unwrap();
        assert_eq!(Manifest::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn every_single_bit_flip_and_truncation_is_detected() {
        let enc = sample().encode();
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            assert!(
                Manifest::decode(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        for cut in 0..enc.len() {
            assert!(
                Manifest::decode(&enc[..cut]).is_err(),
                "truncation at {cut} went unnoticed"
            );
        }
    }

    #[test]
    fn huge_count_does_not_allocate() {
        let mut enc = sample().encode();
        enc[22..26].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Manifest::decode(&enc),
            Err(ManifestError::Truncated { .. })
        ));
    }
}
