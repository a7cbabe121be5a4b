//! The manifest: what a peer needs to verify a whole content piece by piece and end to end.
//!
//! Binary form (little-endian), used on disk and later on the wire:
//! `"STLM" | version u16 | content_length u64 | piece_length u64 | piece_count u32 |
//!  content sha256 [32] | piece sha256 [32] * piece_count | crc32 of all before u32`.
//! Decoding checks lengths before allocating and the CRC before trusting anything.

use super::codec::{self, Reader};
use super::{Digest, PiecePlan, PiecePlanError};

const MAGIC: &[u8; 4] = b"STLM";
const VERSION: u16 = 1;
const HEADER: usize = 4 + 2 + 8 + 8 + 4 + 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    plan: PiecePlan,
    pieces: Vec<Digest>,
    content: Digest,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is truncated: {got} bytes, expected {want}")]
    Truncated { got: usize, want: usize },
    #[error("manifest does not start with the Starling magic bytes")]
    BadMagic,
    #[error("manifest version {0} is not supported by this Starling (supports {VERSION}); upgrade Starling")]
    BadVersion(u16),
    #[error("manifest checksum mismatch: the record is corrupt")]
    BadChecksum,
    #[error("manifest lists {got} pieces but its plan needs {want}")]
    PieceCount { got: usize, want: u32 },
    #[error("manifest has an invalid piece plan: {0}")]
    Plan(#[from] PiecePlanError),
}

impl Manifest {
    pub fn new(
        plan: PiecePlan,
        pieces: Vec<Digest>,
        content: Digest,
    ) -> Result<Self, ManifestError> {
        if pieces.len() != plan.count() as usize {
            return Err(ManifestError::PieceCount {
                got: pieces.len(),
                want: plan.count(),
            });
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

    pub fn piece_digest(&self, index: u32) -> Option<Digest> {
        self.pieces.get(index as usize).copied()
    }

    pub fn piece_digests(&self) -> &[Digest] {
        &self.pieces
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 32 * self.pieces.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.plan.content_length().to_le_bytes());
        out.extend_from_slice(&self.plan.piece_length().to_le_bytes());
        out.extend_from_slice(&self.plan.count().to_le_bytes());
        out.extend_from_slice(&self.content.0);
        for p in &self.pieces {
            out.extend_from_slice(&p.0);
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
        let pieces = (0..count).map_while(|_| r.digest()).collect();
        Manifest::new(plan, pieces, content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let plan = PiecePlan::new(100_000, 16384).unwrap();
        let pieces = (0..plan.count())
            .map(|i| Digest::of(&i.to_le_bytes()))
            .collect();
        Manifest::new(plan, pieces, Digest::of(b"all")).unwrap()
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
