//! SHA-256 digests in the OCI form `sha256:<64 lowercase hex>`, and streaming hashing over
//! owned chunks (no copy: the hasher reads the same buffers that go to disk).

use std::fmt;
use std::str::FromStr;

use ring::digest::{Context, SHA256};

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {input:?} has no algorithm prefix; write it as sha256:<64 hex digits>")]
    MissingAlgorithm { input: String },
    #[error("digest {input:?} uses algorithm {algorithm:?}; Starling supports only sha256")]
    UnsupportedAlgorithm { input: String, algorithm: String },
    #[error("digest {input:?} must have exactly 64 lowercase hex digits after sha256:")]
    BadHex { input: String },
}

impl Digest {
    /// Hashes a whole buffer.
    pub fn of(data: &[u8]) -> Digest {
        let d = ring::digest::digest(&SHA256, data);
        Digest::from_ring(d)
    }

    fn from_ring(d: ring::digest::Digest) -> Digest {
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Digest(out)
    }

    /// The 64 lowercase hex digits, without the algorithm prefix.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
            s.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
        }
        s
    }

    /// Parses 64 lowercase hex digits (no prefix).
    pub fn from_hex(hex: &str) -> Option<Digest> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (lower_hex_val(pair[0])? << 4) | lower_hex_val(pair[1])?;
        }
        Some(Digest(out))
    }
}

fn lower_hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algo, hex)) = s.split_once(':') else {
            return Err(DigestError::MissingAlgorithm {
                input: s.to_string(),
            });
        };
        if algo != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm {
                input: s.to_string(),
                algorithm: algo.to_string(),
            });
        }
        Digest::from_hex(hex).ok_or_else(|| DigestError::BadHex {
            input: s.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An incremental SHA-256 over a sequence of chunks.
pub struct Sha256Stream {
    ctx: Context,
    len: u64,
}

impl Default for Sha256Stream {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256Stream {
    pub fn new() -> Self {
        Sha256Stream {
            ctx: Context::new(&SHA256),
            len: 0,
        }
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.ctx.update(chunk);
        self.len += chunk.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> Digest {
        Digest::from_ring(self.ctx.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn stream_equals_oneshot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut s = Sha256Stream::new();
        for c in data.chunks(333) {
            s.update(c);
        }
        assert_eq!(s.len(), 10_000);
        assert_eq!(s.finish(), Digest::of(&data));
    }

    #[test]
    fn parse_errors_name_the_input() {
        let e = "abc".parse::<Digest>().unwrap_err();
        assert!(e.to_string().contains("\"abc\""));
        assert!(matches!(
            "sha512:00".parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm { .. })
        ));
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(matches!(
            upper.parse::<Digest>(),
            Err(DigestError::BadHex { .. })
        ));
        let short = format!("sha256:{}", "a".repeat(63));
        assert!(matches!(
            short.parse::<Digest>(),
            Err(DigestError::BadHex { .. })
        ));
    }
}
