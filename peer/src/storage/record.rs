//! On-disk metadata for one task: the header (written once, at creation), the journal of
//! verified pieces (append-only, one fixed-size record per piece written; a resume re-hashes
//! each), and the manifest (written once the whole content is verified). Every record carries
//! a CRC32.
//!
//! A journal may end in a torn record after a crash during an append; that tail is ignored
//! (the piece is simply not known to be verified). Anything else that fails to decode means the
//! metadata is corrupt, and the task is discarded rather than trusted.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use crate::core::codec::{self, put_string, Reader};
use crate::core::{ChainValue, Digest, Link, PiecePlan, TaskId, TaskKind};

const HEADER_MAGIC: &[u8; 4] = b"STLH";
/// Version 2: the journal records chain values (version 1 journaled per-piece SHA-256s).
const HEADER_VERSION: u16 = 2;
/// One journal record: piece index u32, the piece's start and end values (see
/// [`crate::core::Link`]), CRC32 of the 68 bytes before.
pub const JOURNAL_RECORD: usize = 4 + 32 + 32 + 4;

/// What a task was created with. Identifies the content it holds and the origin version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskHeader {
    pub id: TaskId,
    pub plan: PiecePlan,
    /// The whole-content digest the user or registry named, if any.
    pub expected: Option<Digest>,
    /// The origin's ETag or Last-Modified when the download began; a resumed download from an
    /// origin whose validator changed starts over.
    pub validator: String,
    /// The URL the content was first fetched from (informational).
    pub url: String,
}

impl TaskHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.url.len());
        out.extend_from_slice(HEADER_MAGIC);
        out.extend_from_slice(&HEADER_VERSION.to_le_bytes());
        out.push(match self.id.kind {
            TaskKind::Content => 1,
            TaskKind::Url => 2,
        });
        out.extend_from_slice(&self.id.hash.0);
        out.extend_from_slice(&self.plan.content_length().to_le_bytes());
        out.extend_from_slice(&self.plan.piece_length().to_le_bytes());
        match self.expected {
            Some(d) => {
                out.push(1);
                out.extend_from_slice(&d.0);
            }
            None => out.push(0),
        }
        put_string(&mut out, &self.validator);
        put_string(&mut out, &self.url);
        codec::seal(&mut out);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<TaskHeader, String> {
        let body = codec::unseal(buf).ok_or("header checksum mismatch or truncated header")?;
        let mut r = Reader::new(body);
        let short = || "header is truncated".to_string();
        if r.bytes(4) != Some(&HEADER_MAGIC[..]) {
            return Err("header has the wrong magic bytes".into());
        }
        let version = r.u16().ok_or_else(short)?;
        if version == 1 {
            return Err("it was stored by an older Starling (task format 1, per-piece SHA-256s; this one uses chain values)".into());
        }
        if version != HEADER_VERSION {
            return Err(format!("header version {version} is not supported"));
        }
        let kind = match r.u8().ok_or_else(short)? {
            1 => TaskKind::Content,
            2 => TaskKind::Url,
            k => return Err(format!("header has unknown task kind {k}")),
        };
        let hash = r.digest().ok_or_else(short)?;
        let (len, piece) = (r.u64().ok_or_else(short)?, r.u64().ok_or_else(short)?);
        let plan = PiecePlan::new(len, piece).map_err(|e| format!("header plan: {e}"))?;
        let expected = match r.u8().ok_or_else(short)? {
            0 => None,
            1 => Some(r.digest().ok_or_else(short)?),
            f => return Err(format!("header has unknown digest flag {f}")),
        };
        let validator = r.string().ok_or_else(short)?;
        let url = r.string().ok_or_else(short)?;
        if r.remaining() != 0 {
            return Err("header has trailing bytes".into());
        }
        Ok(TaskHeader {
            id: TaskId { kind, hash },
            plan,
            expected,
            validator,
            url,
        })
    }
}

pub fn encode_journal_record(link: &Link, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&link.index.to_le_bytes());
    out.extend_from_slice(&link.start.to_bytes());
    out.extend_from_slice(&link.end.to_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// The verified pieces a journal lists, in order. A torn final record is dropped; a bad record
/// before the end, or an index outside the plan, is corruption.
pub fn decode_journal(buf: &[u8], plan: &PiecePlan) -> Result<Vec<Link>, String> {
    let whole = buf.len() / JOURNAL_RECORD;
    let mut out = Vec::with_capacity(whole.min(plan.count() as usize));
    for (n, rec) in buf.chunks_exact(JOURNAL_RECORD).enumerate() {
        let Some(body) = codec::unseal(rec) else {
            if n + 1 == whole && buf.len().is_multiple_of(JOURNAL_RECORD) {
                break; // torn last record: the append never completed
            }
            return Err(format!("journal record {n} has a bad checksum"));
        };
        let mut r = Reader::new(body);
        let (Some(index), Some(start), Some(end)) = (r.u32(), r.digest(), r.digest()) else {
            return Err(format!("journal record {n} is short"));
        };
        if index >= plan.count() {
            return Err(format!(
                "journal record {n} names piece {index} of {}",
                plan.count()
            ));
        }
        out.push(Link {
            index,
            start: ChainValue::of_digest(start),
            end: ChainValue::of_digest(end),
        });
    }
    Ok(out)
}

/// Writes `data` to `path` so that after a crash the path holds either the old content or
/// the new, complete: write a sibling temp file, fsync it, rename over, fsync the directory.
/// The temp file is written in place, not truncated first, so space reserved for it (see
/// [`reserve`]) is used rather than freed; it is removed if anything fails.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("path has no parent directory"))?;
    let tmp = path.with_extension("tmp");
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp)?;
        f.write_all(data)?;
        f.set_len(data.len() as u64)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// Reserves `len` bytes of disk for `file` without changing its length (fallocate with
/// KEEP_SIZE), so later appends and writes up to `len` cannot fail for lack of space. A file
/// system without fallocate reserves nothing, and that is not an error.
pub fn reserve(file: &File, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, len) {
        Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> TaskHeader {
        TaskHeader {
            id: TaskId::for_url("http://h/x", &[]).unwrap(),
            plan: PiecePlan::new(1_000_000, 65536).unwrap(),
            expected: Some(Digest::of(b"e")),
            validator: "\"etag-1\"".into(),
            url: "http://h/x".into(),
        }
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let h = header();
        let enc = h.encode();
        assert_eq!(TaskHeader::decode(&enc).unwrap(), h);
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x40;
            assert!(TaskHeader::decode(&bad).is_err(), "flip at {i}");
        }
        assert!(TaskHeader::decode(&enc[..enc.len() - 1]).is_err());
        assert!(TaskHeader::decode(&[]).is_err());
    }

    #[test]
    fn a_format_1_header_says_an_older_starling_stored_it() {
        let mut enc = header().encode();
        enc[4..6].copy_from_slice(&1u16.to_le_bytes());
        // Re-seal so only the version differs.
        enc.truncate(enc.len() - 4);
        codec::seal(&mut enc);
        let e = TaskHeader::decode(&enc).unwrap_err();
        assert!(e.contains("older Starling"), "{e}");
    }

    #[test]
    fn journal_torn_tail_vs_corruption() {
        let plan = header().plan;
        let mut j = Vec::new();
        let link = |index: u32| Link {
            index,
            start: ChainValue([index; 8]),
            end: ChainValue([index + 1; 8]),
        };
        for i in [3u32, 0, 7] {
            encode_journal_record(&link(i), &mut j);
        }
        let got = decode_journal(&j, &plan).unwrap();
        assert_eq!(got, vec![link(3), link(0), link(7)]);
        // A partial record at the end (append cut short) is ignored.
        assert_eq!(decode_journal(&j[..j.len() - 5], &plan).unwrap().len(), 2);
        // A zero-filled last record (extended but never written) is a torn tail.
        let mut z = j.clone();
        z.extend_from_slice(&[0u8; JOURNAL_RECORD]);
        assert_eq!(decode_journal(&z, &plan).unwrap().len(), 3);
        // A bad record before the end is corruption.
        let mut bad = j.clone();
        bad[5] ^= 1;
        assert!(decode_journal(&bad, &plan).is_err());
        // An index past the plan is corruption.
        let mut far = Vec::new();
        encode_journal_record(&link(plan.count()), &mut far);
        encode_journal_record(&link(0), &mut far);
        assert!(decode_journal(&far, &plan).is_err());
    }
}
