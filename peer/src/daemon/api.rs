//! The local API: JSON lines over a unix socket. The client sends one request line; the daemon
//! answers with progress lines and one final line (`done` or `error`, with the exit code).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::core::{Import, Request};
use crate::swarm::inventory::{TaskDetail, TaskInfo};
use crate::swarm::preheat::{Job, PreheatSpec};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Longest line either side accepts (a request names a URL and a few headers).
pub const MAX_LINE: usize = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ApiRequest {
    Get(GetRequest),
    /// Add a local file to the store and seed it (`starling import`).
    Import(ImportRequest),
    /// The per-connection path report (`starling probe`).
    Probe,
    /// Every stored task (`starling tasks`).
    Tasks,
    /// One task in detail (`starling stat`): named by ID, unique ID prefix, digest or URL.
    Stat {
        task: String,
    },
    /// Evict one task (`starling rm`); refused while it is in use.
    Rm {
        task: String,
    },
    /// Start a preheat job (`starling preheat`).
    Preheat(PreheatSpec),
    /// A preheat job's progress.
    PreheatStatus {
        id: u64,
    },
}

/// One request line, parsed (and its digest and headers checked).
pub fn parse_request(line: &str) -> Result<ApiRequest, serde_json::Error> {
    serde_json::from_str(line)
}

/// A download, and where to put it. The request's digest and headers are checked when the line
/// is read: a malformed one is a usage error naming it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GetRequest {
    #[serde(flatten)]
    pub request: Request,
    /// Absolute path of the output file.
    pub output: PathBuf,
    #[serde(default)]
    pub no_hardlink: bool,
}

/// An import: the file's absolute path is read with the daemon's own permissions (the socket
/// admits only the daemon's user).
pub type ImportRequest = Import;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ApiEvent {
    Progress {
        total: u64,
        done: u64,
    },
    Done {
        bytes: u64,
        digest: String,
        from_store: bool,
        origin_bytes: u64,
        #[serde(default)]
        parent_bytes: u64,
        placed: String,
    },
    Error {
        code: u8,
        message: String,
    },
    Probe(crate::netprobe::ProbeReport),
    Tasks(Vec<TaskInfo>),
    Stat(Box<TaskDetail>),
    Removed {
        task: String,
        bytes: u64,
    },
    Preheat {
        id: u64,
    },
    Job(Box<Job>),
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at end of stream.
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok((!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned()));
        }
        let (line_end, take) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (true, i + 1),
            None => (false, chunk.len()),
        };
        buf.extend_from_slice(&chunk[..take]);
        r.consume(take);
        if buf.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
        if line_end {
            buf.pop();
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
    }
}
