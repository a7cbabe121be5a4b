//! The peer wire protocol: one QUIC bidirectional stream per request.
//!
//! Request (fixed 43 bytes): `"STLP" | version u8 | kind u8 | task kind u8 | task hash [32] |
//! piece u32 LE`. Kinds: 1 = manifest, 2 = piece.
//! Response header (fixed 13 bytes): `"STLR" | version u8 | status u8 | reserved u8 |
//! length u48 LE in 6 bytes`, then `length` payload bytes (the encoded manifest, or the piece).
//!
//! Everything is fixed-size until the payload, and the payload length is checked against the
//! request's limit before a byte of it is allocated or read.

use crate::core::{Digest, TaskId, TaskKind, MAX_PIECE_LENGTH};

pub const VERSION: u8 = 1;
pub const REQUEST_LEN: usize = 43;
pub const RESPONSE_HEADER_LEN: usize = 13;
/// Manifests hold 32 bytes per piece; 2^21 pieces (at least 32 TiB of content) is plenty.
pub const MAX_MANIFEST_LEN: u64 = 64 + 32 * (1 << 21);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Manifest { task: TaskId },
    Piece { task: TaskId, index: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadRequest = 2,
    Busy = 3,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a Starling frame (bad magic)")]
    BadMagic,
    #[error("peer speaks wire version {0}; this Starling speaks {VERSION}")]
    Version(u8),
    #[error("unknown request kind {0}")]
    Kind(u8),
    #[error("unknown task kind {0}")]
    TaskKind(u8),
    #[error("unknown status {0}")]
    Status(u8),
    #[error("payload of {got} bytes exceeds the limit of {limit} for this request")]
    TooLong { got: u64, limit: u64 },
}

impl Request {
    pub fn task(&self) -> TaskId {
        match *self {
            Request::Manifest { task } | Request::Piece { task, .. } => task,
        }
    }

    /// The most payload bytes a well-behaved peer can send back.
    pub fn limit(&self) -> u64 {
        match self {
            Request::Manifest { .. } => MAX_MANIFEST_LEN,
            Request::Piece { .. } => MAX_PIECE_LENGTH,
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(b"STLP");
        b[4] = VERSION;
        let (kind, task, index) = match *self {
            Request::Manifest { task } => (1, task, 0),
            Request::Piece { task, index } => (2, task, index),
        };
        b[5] = kind;
        b[6] = match task.kind {
            TaskKind::Content => 1,
            TaskKind::Url => 2,
        };
        b[7..39].copy_from_slice(&task.hash.0);
        b[39..43].copy_from_slice(&index.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
        if &b[..4] != b"STLP" {
            return Err(WireError::BadMagic);
        }
        if b[4] != VERSION {
            return Err(WireError::Version(b[4]));
        }
        let kind = match b[6] {
            1 => TaskKind::Content,
            2 => TaskKind::Url,
            k => return Err(WireError::TaskKind(k)),
        };
        let mut h = [0u8; 32];
        h.copy_from_slice(&b[7..39]);
        let task = TaskId {
            kind,
            hash: Digest(h),
        };
        let index = u32::from_le_bytes([b[39], b[40], b[41], b[42]]);
        match b[5] {
            1 => Ok(Request::Manifest { task }),
            2 => Ok(Request::Piece { task, index }),
            k => Err(WireError::Kind(k)),
        }
    }
}

pub fn encode_response_header(status: Status, len: u64) -> [u8; RESPONSE_HEADER_LEN] {
    let mut b = [0u8; RESPONSE_HEADER_LEN];
    b[..4].copy_from_slice(b"STLR");
    b[4] = VERSION;
    b[5] = status as u8;
    b[7..13].copy_from_slice(&len.to_le_bytes()[..6]);
    b
}

/// Decodes a response header and checks its length against `limit` before anything is read.
pub fn decode_response_header(
    b: &[u8; RESPONSE_HEADER_LEN],
    limit: u64,
) -> Result<(Status, u64), WireError> {
    if &b[..4] != b"STLR" {
        return Err(WireError::BadMagic);
    }
    if b[4] != VERSION {
        return Err(WireError::Version(b[4]));
    }
    let status = match b[5] {
        0 => Status::Ok,
        1 => Status::NotFound,
        2 => Status::BadRequest,
        3 => Status::Busy,
        s => return Err(WireError::Status(s)),
    };
    let mut l = [0u8; 8];
    l[..6].copy_from_slice(&b[7..13]);
    let len = u64::from_le_bytes(l);
    if len > limit {
        return Err(WireError::TooLong { got: len, limit });
    }
    Ok((status, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn task() -> TaskId {
        TaskId::for_content(Digest::of(b"x"))
    }

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Manifest { task: task() },
            Request::Piece {
                task: task(),
                index: 0,
            },
            Request::Piece {
                task: task(),
                index: u32::MAX,
            },
        ] {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        let good = Request::Piece {
            task: task(),
            index: 3,
        }
        .encode();
        let mut b = good;
        b[0] = b'X';
        assert_eq!(Request::decode(&b), Err(WireError::BadMagic));
        let mut b = good;
        b[4] = 9;
        assert_eq!(Request::decode(&b), Err(WireError::Version(9)));
        let mut b = good;
        b[5] = 7;
        assert_eq!(Request::decode(&b), Err(WireError::Kind(7)));
        let mut b = good;
        b[6] = 0;
        assert_eq!(Request::decode(&b), Err(WireError::TaskKind(0)));
    }

    #[test]
    fn oversized_payloads_are_refused_before_reading() {
        let h = encode_response_header(Status::Ok, MAX_PIECE_LENGTH + 1);
        assert!(matches!(
            decode_response_header(&h, MAX_PIECE_LENGTH),
            Err(WireError::TooLong { .. })
        ));
        let h = encode_response_header(Status::Ok, (1 << 48) - 1);
        assert!(matches!(
            decode_response_header(&h, MAX_MANIFEST_LEN),
            Err(WireError::TooLong { .. })
        ));
        let h = encode_response_header(Status::NotFound, 0);
        assert_eq!(decode_response_header(&h, 0), Ok((Status::NotFound, 0)));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), REQUEST_LEN)) {
            let mut b = [0u8; REQUEST_LEN];
            b.copy_from_slice(&bytes);
            let _ = Request::decode(&b);
            let mut h = [0u8; RESPONSE_HEADER_LEN];
            h.copy_from_slice(&bytes[..RESPONSE_HEADER_LEN]);
            let _ = decode_response_header(&h, MAX_MANIFEST_LEN);
        }
    }
}
