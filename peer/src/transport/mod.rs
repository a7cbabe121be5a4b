//! Peer-to-peer transport: QUIC (quinn) with verified mutual TLS under a cluster CA, one
//! bidirectional stream per request (see [`wire`]). A node serves manifests and verified pieces
//! from a [`PieceSource`] while it downloads, and fetches from its parents.
//!
//! Status: the protocol, the TLS identity and the QUIC node exist and are tested on loopback;
//! the daemon that drives them (with the engine and a store-backed, mmap'd `PieceSource`) is
//! not built yet.

pub mod tls;
pub mod wire;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::core::{Manifest, TaskId};
use tls::Identity;
use wire::{Request, Status, WireError, REQUEST_LEN, RESPONSE_HEADER_LEN};

/// A request that sends nothing for this long is dropped (a slowloris peer holds no stream).
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("TLS setup: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind the QUIC endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot connect to peer {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("peer stream failed: {0}")]
    Stream(String),
    #[error("peer sent a bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("peer answered {0:?}")]
    Refused(Status),
    #[error("peer sent a manifest that does not decode: {0}")]
    Manifest(#[from] crate::core::ManifestError),
}

/// What a node serves: manifests and verified pieces, as shared buffers (no copy on the way to
/// QUIC's encryption).
pub trait PieceSource: Send + Sync + 'static {
    fn manifest(&self, task: &TaskId) -> Option<Bytes>;
    fn piece(&self, task: &TaskId, index: u32) -> Option<Bytes>;
}

/// A QUIC endpoint that serves and fetches.
pub struct Node {
    endpoint: quinn::Endpoint,
}

impl Node {
    pub fn bind(addr: SocketAddr, id: &Identity) -> Result<Node, TransportError> {
        let mut server = tls::server_config(id)?;
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(256u32.into());
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        let transport = Arc::new(transport);
        server.transport_config(transport.clone());
        let mut endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        let mut client = tls::client_config(id)?;
        client.transport_config(transport);
        endpoint.set_default_client_config(client);
        Ok(Node { endpoint })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Serves `source` to every peer that passes mutual TLS, until the endpoint closes.
    pub fn serve(&self, source: Arc<dyn PieceSource>) -> tokio::task::JoinHandle<()> {
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let source = source.clone();
                tokio::spawn(async move {
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::info!(error = %e, "refused a peer connection");
                            return;
                        }
                    };
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(serve_stream(source.clone(), send, recv));
                    }
                });
            }
        })
    }

    /// Connects to a parent, verifying it against the cluster CA.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Parent, TransportError> {
        let err = |detail: String| TransportError::Connect { addr, detail };
        let conn = self
            .endpoint
            .connect(addr, tls::SERVER_NAME)
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(Parent { conn })
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

async fn serve_stream(
    source: Arc<dyn PieceSource>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut buf = [0u8; REQUEST_LEN];
    let read = tokio::time::timeout(REQUEST_READ_TIMEOUT, recv.read_exact(&mut buf)).await;
    let (status, payload) = match read {
        Ok(Ok(())) => match Request::decode(&buf) {
            Ok(Request::Manifest { task }) => found(source.manifest(&task)),
            Ok(Request::Piece { task, index }) => found(source.piece(&task, index)),
            Err(e) => {
                tracing::info!(error = %e, "bad request from a peer");
                (Status::BadRequest, Bytes::new())
            }
        },
        // Short, slow or reset: nothing sensible to answer.
        _ => (Status::BadRequest, Bytes::new()),
    };
    let header = wire::encode_response_header(status, payload.len() as u64);
    if send.write_all(&header).await.is_ok()
        && (payload.is_empty() || send.write_chunk(payload).await.is_ok())
    {
        let _ = send.finish();
    }
}

fn found(b: Option<Bytes>) -> (Status, Bytes) {
    match b {
        Some(b) => (Status::Ok, b),
        None => (Status::NotFound, Bytes::new()),
    }
}

/// A connection to one parent.
pub struct Parent {
    conn: quinn::Connection,
}

impl Parent {
    async fn ask(&self, req: Request) -> Result<Vec<Bytes>, TransportError> {
        let s = |e: &dyn std::fmt::Display| TransportError::Stream(e.to_string());
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| s(&e))?;
        send.write_all(&req.encode()).await.map_err(|e| s(&e))?;
        let _ = send.finish();
        let mut h = [0u8; RESPONSE_HEADER_LEN];
        recv.read_exact(&mut h).await.map_err(|e| s(&e))?;
        // The length is checked against the request's limit before any payload is read.
        let (status, len) = wire::decode_response_header(&h, req.limit())?;
        if status != Status::Ok {
            return Err(TransportError::Refused(status));
        }
        let mut chunks = Vec::new();
        let mut got = 0u64;
        while got < len {
            match recv
                .read_chunk((len - got) as usize, true)
                .await
                .map_err(|e| s(&e))?
            {
                Some(c) => {
                    got += c.bytes.len() as u64;
                    chunks.push(c.bytes);
                }
                None => {
                    return Err(TransportError::Stream(format!(
                        "stream ended after {got} of {len} bytes"
                    )))
                }
            }
        }
        Ok(chunks)
    }

    pub async fn manifest(&self, task: TaskId) -> Result<Manifest, TransportError> {
        let chunks = self.ask(Request::Manifest { task }).await?;
        Ok(Manifest::decode(&chunks.concat())?)
    }

    /// A piece's bytes as received (chunks, not concatenated); the caller verifies them.
    pub async fn piece(&self, task: TaskId, index: u32) -> Result<Vec<Bytes>, TransportError> {
        self.ask(Request::Piece { task, index }).await
    }

    /// QUIC's own view of the path: RTT, lost packets, MTU.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }
}
