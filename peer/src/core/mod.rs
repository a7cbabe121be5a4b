//! Core types shared by every layer: digests, task IDs, the piece plan, the manifest, and what a
//! client asks for.

mod chain;
pub mod codec;
mod digest;
mod manifest;
mod piece;
mod request;
mod task_id;

pub use chain::{Chain, ChainValue, Link, PieceChain};
pub use digest::{Digest, DigestError, Sha256Stream};
pub use manifest::{Manifest, ManifestError};
pub use piece::{
    default_piece_length, Piece, PiecePlan, PiecePlanError, MAX_PIECE_LENGTH, MIN_PIECE_LENGTH,
};
pub use request::{header, parse_headers, HeaderError, Import, Request};
pub use task_id::{normalize_url, TaskId, TaskIdError, TaskKind};
