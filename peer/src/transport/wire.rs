//! The peer wire protocol: one QUIC bidirectional stream per request.
//!
//! Request (fixed 51 bytes): `"STLP" | version u8 | kind u8 | task kind u8 | task hash [32] |
//! index u32 | aux u32 | body length u32` (all LE), then `body length` bytes (at most
//! [`MAX_BODY`], and only for the kinds that carry one).
//!
//! Kinds:
//! - 1 manifest: the sealed manifest of a complete task;
//! - 2 piece `index` (`aux` = the requester's rack tag, 0 if none): a verified piece's bytes;
//! - 3 have (`index` = log position, `aux` = log epoch): the news since that position of the
//!   parent's log: pieces it verified and chain values it used, each with its end value (see
//!   [`HaveReply`]); the parent holds the answer up to about a second while it has no news
//!   (long poll);
//! - 4 seed order (body: JSON [`SeedOrder`](crate::swarm::SeedOrder), the client's request):
//!   asks a seed peer to go back to source for a task, which it then serves;
//! - 5 announce, 6 candidates (body: JSON): scheduler calls (see `scheduler::service`).
//!
//! Response header (fixed 13 bytes): `"STLR" | version u8 | status u8 | reserved u8 |
//! length u48 LE in 6 bytes`, then `length` payload bytes.
//!
//! A piece request answered `Busy` may carry an *offer*: up to [`MAX_OFFER`] piece indexes
//! (u32 LE each) that the parent would send the requester now (see
//! `swarm::policy::Spread::offer`). Releases before offers send none, and ignore one.
//!
//! Everything is fixed-size until a body, and every length is checked against its limit
//! before a byte of the body is allocated or read.
//!
//! Versions: 2 carries chain values where 1 (earlier releases) carried each piece's SHA-256. Both
//! sides check the version byte of every frame: a request of another version is answered
//! `BadRequest` in this side's version, so either side fails with [`WireError::Version`],
//! which names both versions.

use crate::core::{ChainValue, Digest, TaskId, TaskKind, MAX_PIECE_LENGTH};
use crate::storage::LogEntry;

pub const VERSION: u8 = 2;
pub const REQUEST_LEN: usize = 51;
/// The longest request body (scheduler announcements of many tasks included).
pub const MAX_BODY: u32 = 4 << 20;
/// The longest JSON answer (scheduler replies).
pub const MAX_RPC_REPLY: u64 = 4 << 20;
pub const RESPONSE_HEADER_LEN: usize = 13;
/// Most pieces a task exchanged between peers may have: 2^21 (32 GiB at the smallest piece
/// length, 128 TiB at the largest; the default rule picks about 1024).
pub const MAX_WIRE_PIECES: u32 = 1 << 21;
/// Manifests hold 32 bytes per piece.
pub const MAX_MANIFEST_LEN: u64 = 64 + 32 * MAX_WIRE_PIECES as u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Manifest {
        task: TaskId,
    },
    Piece {
        task: TaskId,
        index: u32,
        /// The requester's rack tag (`aux`; 0: none), which a spreading parent holds pieces
        /// by (see [`crate::swarm::policy::Spread`]). Older peers send 0 and ignore it.
        group: u32,
    },
    Have {
        task: TaskId,
        epoch: u32,
        since: u32,
    },
    SeedOrder {
        task: TaskId,
        body: u32,
    },
    Announce {
        body: u32,
    },
    Candidates {
        task: TaskId,
        body: u32,
    },
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
    #[error("the peer runs another Starling release: it speaks wire version {0}, this one speaks {VERSION}; run the same release on every node")]
    Version(u8),
    #[error("unknown request kind {0}")]
    Kind(u8),
    #[error("unknown task kind {0}")]
    TaskKind(u8),
    #[error("malformed have reply")]
    BadHave,
    #[error("malformed Busy answer: an offer of {0} bytes")]
    BadOffer(u64),
    #[error("unknown status {0}")]
    Status(u8),
    #[error("request body of {0} bytes exceeds the limit of {MAX_BODY}")]
    BodyTooLong(u32),
    #[error("a {0} request carries no body")]
    UnexpectedBody(&'static str),
    #[error("payload of {got} bytes exceeds the limit of {limit} for this request")]
    TooLong { got: u64, limit: u64 },
}

impl Request {
    /// The body length that follows the fixed part.
    pub fn body_len(&self) -> u32 {
        match *self {
            Request::SeedOrder { body, .. }
            | Request::Announce { body }
            | Request::Candidates { body, .. } => body,
            _ => 0,
        }
    }

    /// The most payload bytes a well-behaved peer can send back.
    pub fn limit(&self) -> u64 {
        match self {
            Request::Manifest { .. } => MAX_MANIFEST_LEN,
            Request::Piece { .. } => MAX_PIECE_LENGTH,
            Request::Have { .. } => MAX_HAVE_LEN,
            Request::SeedOrder { .. } | Request::Announce { .. } | Request::Candidates { .. } => {
                MAX_RPC_REPLY
            }
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(b"STLP");
        b[4] = VERSION;
        // Scheduler announcements concern many tasks: the task field is zero there.
        let none = TaskId::for_content(Digest([0; 32]));
        let (kind, task, index, aux) = match *self {
            Request::Manifest { task } => (1, task, 0, 0),
            Request::Piece { task, index, group } => (2, task, index, group),
            Request::Have { task, epoch, since } => (3, task, since, epoch),
            Request::SeedOrder { task, .. } => (4, task, 0, 0),
            Request::Announce { .. } => (5, none, 0, 0),
            Request::Candidates { task, .. } => (6, task, 0, 0),
        };
        b[5] = kind;
        b[6] = match task.kind {
            TaskKind::Content => 1,
            TaskKind::Url => 2,
        };
        b[7..39].copy_from_slice(&task.hash.0);
        b[39..43].copy_from_slice(&index.to_le_bytes());
        b[43..47].copy_from_slice(&aux.to_le_bytes());
        b[47..51].copy_from_slice(&self.body_len().to_le_bytes());
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
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (index, aux, body) = (word(39), word(43), word(47));
        if body > MAX_BODY {
            return Err(WireError::BodyTooLong(body));
        }
        let bodiless = |name, r| {
            if body == 0 {
                Ok(r)
            } else {
                Err(WireError::UnexpectedBody(name))
            }
        };
        match b[5] {
            1 => bodiless("manifest", Request::Manifest { task }),
            2 => bodiless(
                "piece",
                Request::Piece {
                    task,
                    index,
                    group: aux,
                },
            ),
            3 => bodiless(
                "have",
                Request::Have {
                    task,
                    epoch: aux,
                    since: index,
                },
            ),
            4 => Ok(Request::SeedOrder { task, body }),
            5 => Ok(Request::Announce { body }),
            6 => Ok(Request::Candidates { task, body }),
            k => Err(WireError::Kind(k)),
        }
    }
}

/// A parent's answer to a have request: its plan for the task, its content digest once sealed,
/// and the news from its log. Each entry is 4 + 32 bytes: the piece index, whose top bit is
/// set when the parent does not hold the piece (a value it used only), and the piece's end
/// value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaveReply {
    pub content_length: u64,
    pub piece_length: u64,
    pub content: Option<Digest>,
    pub epoch: u32,
    /// The parent's log length after these entries: the child's next `since`.
    pub end: u32,
    pub entries: Vec<LogEntry>,
}

/// An entry's index with this bit set: the parent does not hold the piece.
const VALUE_ONLY: u32 = 1 << 31;

const HAVE_HEADER: usize = 4 + 8 + 8 + 1 + 32 + 4 + 4 + 4;
/// Header plus 2^21 entries of 36 bytes.
pub const MAX_HAVE_LEN: u64 = HAVE_HEADER as u64 + 36 * MAX_WIRE_PIECES as u64;

impl HaveReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HAVE_HEADER + 36 * self.entries.len());
        b.extend_from_slice(b"STLH");
        b.extend_from_slice(&self.content_length.to_le_bytes());
        b.extend_from_slice(&self.piece_length.to_le_bytes());
        b.push(self.content.is_some() as u8);
        b.extend_from_slice(&self.content.map_or([0; 32], |d| d.0));
        b.extend_from_slice(&self.epoch.to_le_bytes());
        b.extend_from_slice(&self.end.to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            let flag = if e.held { 0 } else { VALUE_ONLY };
            b.extend_from_slice(&(e.index | flag).to_le_bytes());
            b.extend_from_slice(&e.value.to_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<HaveReply, WireError> {
        if b.len() < HAVE_HEADER || &b[..4] != b"STLH" {
            return Err(WireError::BadHave);
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let digest_at = |i: usize| {
            let mut d = [0u8; 32];
            d.copy_from_slice(&b[i..i + 32]);
            Digest(d)
        };
        let n = u32_at(61) as usize;
        if b.len() != HAVE_HEADER + 36 * n {
            return Err(WireError::BadHave);
        }
        let entries = (0..n)
            .map(|k| {
                let at = HAVE_HEADER + 36 * k;
                let word = u32_at(at);
                LogEntry {
                    index: word & !VALUE_ONLY,
                    value: ChainValue::of_digest(digest_at(at + 4)),
                    held: word & VALUE_ONLY == 0,
                }
            })
            .collect();
        Ok(HaveReply {
            content_length: u64_at(4),
            piece_length: u64_at(12),
            content: (b[20] == 1).then(|| digest_at(21)),
            epoch: u32_at(53),
            end: u32_at(57),
            entries,
        })
    }
}

/// Most pieces a `Busy` answer offers.
pub const MAX_OFFER: usize = 16;

/// A `Busy` answer's payload: `piece u32 LE × n`, the pieces the parent would send the
/// requester now (only the first [`MAX_OFFER`]).
pub fn encode_offer(pieces: &[u32]) -> Vec<u8> {
    pieces
        .iter()
        .take(MAX_OFFER)
        .flat_map(|i| i.to_le_bytes())
        .collect()
}

/// The pieces a `Busy` answer offers (none from releases before offers); a payload that is
/// not whole indexes, or more than [`MAX_OFFER`] of them, is malformed.
pub fn decode_offer(b: &[u8]) -> Result<Vec<u32>, WireError> {
    if !b.len().is_multiple_of(4) || b.len() as u64 > MAX_OFFER_LEN {
        return Err(WireError::BadOffer(b.len() as u64));
    }
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The longest `Busy` payload.
pub const MAX_OFFER_LEN: u64 = 4 * MAX_OFFER as u64;

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
                group: 0,
            },
            Request::Piece {
                task: task(),
                index: u32::MAX,
                group: 0x1234_5678,
            },
            Request::Have {
                task: task(),
                epoch: 3,
                since: 9,
            },
            Request::SeedOrder {
                task: task(),
                body: 100,
            },
            Request::Candidates {
                task: task(),
                body: 5,
            },
        ] {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn an_offer_round_trips_and_a_malformed_one_is_refused() {
        let all: Vec<u32> = (0..40).collect();
        let b = encode_offer(&all);
        assert_eq!(
            b.len() as u64,
            MAX_OFFER_LEN,
            "at most MAX_OFFER pieces are sent"
        );
        assert_eq!(decode_offer(&b), Ok(all[..MAX_OFFER].to_vec()));
        assert_eq!(decode_offer(&[]), Ok(Vec::new()), "an older release's");
        assert_eq!(decode_offer(&[1, 2, 3]), Err(WireError::BadOffer(3)));
        let long = [0; MAX_OFFER_LEN as usize + 4];
        assert_eq!(
            decode_offer(&long),
            Err(WireError::BadOffer(long.len() as u64))
        );
    }

    #[test]
    fn bad_frames_are_errors() {
        let good = Request::Piece {
            task: task(),
            index: 3,
            group: 0,
        }
        .encode();
        let mut b = good;
        b[0] = b'X';
        assert_eq!(Request::decode(&b), Err(WireError::BadMagic));
        let mut b = good;
        b[4] = 9;
        assert_eq!(Request::decode(&b), Err(WireError::Version(9)));
        // A peer of the release before chain values: both versions named, and what to do.
        let mut b = good;
        b[4] = 1;
        let e = Request::decode(&b).unwrap_err();
        assert_eq!(e, WireError::Version(1));
        let text = e.to_string();
        assert!(
            text.contains("version 1")
                && text.contains("speaks 2")
                && text.contains("same release"),
            "{text}"
        );
        let mut h = encode_response_header(Status::Ok, 0);
        h[4] = 1;
        assert_eq!(decode_response_header(&h, 0), Err(WireError::Version(1)));
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

    #[test]
    fn have_replies_round_trip_and_reject_bad_lengths() {
        let r = HaveReply {
            content_length: 10 << 20,
            piece_length: 1 << 20,
            content: Some(Digest::of(b"c")),
            epoch: 2,
            end: 7,
            entries: vec![
                LogEntry {
                    index: 3,
                    value: ChainValue([3; 8]),
                    held: true,
                },
                LogEntry {
                    index: MAX_WIRE_PIECES - 1,
                    value: ChainValue([0; 8]),
                    held: false,
                },
            ],
        };
        let b = r.encode();
        assert_eq!(HaveReply::decode(&b), Ok(r));
        assert_eq!(
            HaveReply::decode(&b[..b.len() - 1]),
            Err(WireError::BadHave)
        );
        assert_eq!(HaveReply::decode(&b[..10]), Err(WireError::BadHave));
    }

    #[test]
    fn bodies_are_bounded_and_only_where_expected() {
        let mut b = Request::Announce { body: 10 }.encode();
        assert_eq!(Request::decode(&b), Ok(Request::Announce { body: 10 }));
        b[47..51].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        assert_eq!(
            Request::decode(&b),
            Err(WireError::BodyTooLong(MAX_BODY + 1))
        );
        let mut b = Request::Piece {
            task: task(),
            index: 1,
            group: 7,
        }
        .encode();
        b[47] = 1;
        assert_eq!(Request::decode(&b), Err(WireError::UnexpectedBody("piece")));
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
            let _ = HaveReply::decode(&bytes);
        }
    }
}
