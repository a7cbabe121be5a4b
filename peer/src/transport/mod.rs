//! Peer-to-peer transport: QUIC (quinn) with verified mutual TLS under a cluster CA, one
//! bidirectional stream per request (see [`wire`]). A node serves manifests and verified pieces
//! from a [`PieceSource`] while it downloads, and fetches from its parents.
//!
//! The daemon serves its store through [`PieceSource`]; the scheduler's RPCs ride the same
//! endpoint and the same mutual TLS (`PieceSource::call`).
//!
//! How a connection behaves:
//! - Piece answers leave each connection in request order (stream priority from the stream
//!   index), not interleaved, so each piece is whole, verifiable and relayable sooner; have
//!   replies and manifests go first. Answers are paced by `peer.upload_limit_mbps` and counted
//!   as uploads; a piece's end (acknowledged whole, or failed) goes back through
//!   [`PieceSource::piece_ended`].
//! - Both sides read a stream's end once its message is whole, so finished requests cost no
//!   STOP_SENDING or RESET_STREAM (a test counts those frames).
//! - Each side asks the other (ACK-frequency extension) for one ACK per 64 ack-eliciting
//!   packets, or within 25 ms, or at once on reordering.
//! - Local connection IDs are 4 bytes (quinn's default is 8).
//! - Malformed, truncated, oversized or slow requests get `BadRequest` or are dropped; the
//!   server keeps serving.
//!
//! Files: [`wire`] (the frames), [`tls`] (the cluster CA and rustls configs), `socket.rs` (the
//! endpoint's UDP socket: GSO caps, read-only registration, gathered reads), [`slack`] (timer
//! slack while reads are gathered), `tolerant.rs` (the loss-tolerant Cubic).

pub mod slack;
mod socket;
pub mod tls;
mod tolerant;
pub mod wire;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::core::{Manifest, TaskId};
use tls::Identity;
use wire::{HaveReply, Request, Status, WireError, REQUEST_LEN, RESPONSE_HEADER_LEN};

/// UDP socket buffers asked for: a 1 Gbit/s burst of 60 ms fits, so the kernel does not drop
/// datagrams while the runtime is busy. Above `net.core.rmem_max` this needs CAP_NET_ADMIN.
pub const SOCKET_BUFFER: usize = 8 << 20;

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
    /// A piece request answered `Busy`, with the pieces the parent offers instead (none from
    /// older releases, or when it has none for this node).
    #[error("peer answered Busy")]
    Busy(Vec<u32>),
    #[error("peer sent a manifest that does not decode: {0}")]
    Manifest(#[from] crate::core::ManifestError),
}

/// What a node serves: manifests and verified pieces, as shared buffers (no copy on the way to
/// QUIC's encryption), plus the long-polled verification log and body-carrying calls.
pub trait PieceSource: Send + Sync + 'static {
    fn manifest(&self, task: &TaskId) -> Option<Bytes>;
    fn piece(&self, task: &TaskId, index: u32) -> Option<Bytes>;
    /// A piece for the peer at `to` (in rack `group`, 0: unlabelled), or why not: `NotFound`,
    /// or `Busy` (declined for now; ask later or elsewhere).
    fn piece_status(
        &self,
        task: &TaskId,
        index: u32,
        _to: SocketAddr,
        _group: u32,
    ) -> Result<Bytes, Status> {
        self.piece(task, index).ok_or(Status::NotFound)
    }
    /// An encoded [`HaveReply`]: news since `since` in the log of `epoch`, waiting a little
    /// for some when there is none. None: the task is unknown here.
    fn have(
        self: Arc<Self>,
        _task: TaskId,
        _epoch: u32,
        _since: u32,
    ) -> BoxFuture<'static, Option<Bytes>> {
        Box::pin(async { None })
    }
    /// After `piece_status` said `Busy` to the peer at `to` (rack `group`): the pieces of
    /// `task` it would send that peer now, offered instead (at most [`wire::MAX_OFFER`]).
    fn offer(&self, _task: &TaskId, _to: SocketAddr, _group: u32) -> Vec<u32> {
        Vec::new()
    }
    /// Fetch orders and scheduler calls: the answer, or the status to refuse with.
    fn call(
        self: Arc<Self>,
        _req: Request,
        _body: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        Box::pin(async { Err(Status::BadRequest) })
    }
    /// `bytes` of piece data were sent to a peer.
    fn uploaded(&self, _bytes: u64) {}
    /// A piece handed out by `piece_status` to `to` has left for good: `delivered` when the
    /// receiver acknowledged every byte of it or stopped the stream, false when it could not
    /// have received it (the send failed, the connection is gone).
    fn piece_ended(&self, _task: &TaskId, _index: u32, _to: SocketAddr, _delivered: bool) {}
    /// Waits for the upload rate limit to allow sending `bytes` of piece data.
    fn pace(&self, _bytes: u64) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// Bytes of our connection IDs (see [`Node::bind_with`]).
const CID_LEN: usize = 4;

/// How QUIC sizes its packets (see [`Node::bind_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathPolicy {
    /// The largest UDP payload PLPMTUD may try: the local interfaces' MTU less IP and UDP
    /// headers (8972 on a 9000-byte fabric). quinn's own default is 1452.
    pub upper_bound: u16,
    /// PLPMTUD stops searching when the bounds are this close (quinn's default: 20).
    pub minimum_change: u16,
    /// After a black hole, wait this long before searching upward again (quinn's: 60 s).
    pub black_hole_cooldown: Duration,
    /// Connections run the loss-tolerant Cubic ([`tolerant`]), which the node switches
    /// between backing off on every loss and only on congestion
    /// ([`Node::set_congestion`]). Without it, quinn's Cubic.
    pub loss_gate: bool,
}

impl Default for PathPolicy {
    fn default() -> Self {
        PathPolicy {
            upper_bound: 1452,
            minimum_change: 8,
            black_hole_cooldown: Duration::from_secs(5),
            loss_gate: true,
        }
    }
}

impl PathPolicy {
    /// quinn's own defaults (what Starling does with adaptation off).
    pub fn quinn_defaults() -> PathPolicy {
        PathPolicy {
            upper_bound: 1452,
            minimum_change: 20,
            black_hole_cooldown: Duration::from_secs(60),
            loss_gate: false,
        }
    }
}

/// How the node's connections answer loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Congestion {
    /// Backs off on every loss (Cubic).
    Cubic,
    /// Backs off only for loss that looks like congestion (a queue built, or more loss than
    /// random drops explain); random loss is repaired without shrinking the window. See
    /// [`tolerant`].
    Tolerant,
}

/// Ack-eliciting packets a receiver may take in before it must send an ACK (QUIC's default
/// is 1: an ACK for every second packet). 64 full packets are about 90 KB, under 8 ms of a
/// 100 Mbit/s link. A sender whose congestion window holds fewer packets (the first flights
/// of slow start, or a connection holding a small share of a slow link) gets its ACK after
/// the delay instead: 25 ms, quinn's floor and QUIC's default max_ack_delay, which loss
/// recovery already allows for.
const ACK_EVERY: u32 = 63;

/// The smallest UDP payload every IPv6 path carries, and QUIC's floor.
pub const MIN_UDP_PAYLOAD: u16 = 1200;

/// One QUIC connection, live or closed recently, for the path report.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// quinn's stable id of the connection, unique among this endpoint's connections.
    pub id: usize,
    pub remote: SocketAddr,
    /// Whether the peer connected to us (we upload to it), or we to it (a parent).
    pub incoming: bool,
    pub stats: quinn::ConnectionStats,
    /// False: the connection has closed; `stats` are its last snapshot.
    pub live: bool,
}

/// How long a closed connection's last statistics stay in the path report.
const CLOSED_KEPT: Duration = Duration::from_secs(600);

struct Tracked {
    conn: std::sync::Weak<Conn>,
    id: usize,
    incoming: bool,
    remote: SocketAddr,
    /// The latest statistics, and when the connection was last seen open.
    last: quinn::ConnectionStats,
    seen: std::time::Instant,
    live: bool,
}

type ConnRegistry = Arc<std::sync::Mutex<Vec<Tracked>>>;

/// A connection that leaves its final statistics in the registry when its last handle drops.
pub(crate) struct Conn {
    inner: quinn::Connection,
    registry: ConnRegistry,
}

impl std::ops::Deref for Conn {
    type Target = quinn::Connection;
    fn deref(&self) -> &quinn::Connection {
        &self.inner
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let stats = self.inner.stats();
        let me: *const Conn = self;
        let mut c = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = c.iter_mut().find(|t| std::ptr::eq(t.conn.as_ptr(), me)) {
            t.last = stats;
            t.seen = std::time::Instant::now();
            t.live = false;
        }
    }
}

/// A QUIC endpoint that serves and fetches.
pub struct Node {
    endpoint: quinn::Endpoint,
    identity: Identity,
    policy: PathPolicy,
    conns: ConnRegistry,
    /// Set: random loss is tolerated ([`Congestion::Tolerant`]); read by every connection's
    /// controller on each loss, so a switch applies to open connections too.
    tolerate: Arc<AtomicBool>,
    /// The endpoint's socket as quinn drives it (see [`socket`]); its buffers are resized
    /// through it.
    quiet: Arc<socket::QuietSocket>,
    /// Receive drops seen at the last [`Node::tune_buffers`].
    drops_seen: std::sync::atomic::AtomicU64,
}

/// Told of each incoming connection refused before it was established (see [`refusal`]).
pub type OnRefused = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Why an incoming connection failed its handshake: `tls` (a certificate the cluster CA did
/// not sign, none, a client that does not trust ours, or another TLS failure), `timeout` (the
/// client went quiet), or `other`.
pub fn refusal(e: &quinn::ConnectionError) -> &'static str {
    // QUIC carries TLS alerts as transport errors 0x100 to 0x1ff (RFC 9001, 4.8): ours when
    // we refused the client's certificate, the client's when it refused ours.
    let tls = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        quinn::ConnectionError::TransportError(t) if tls(t.code) => "tls",
        quinn::ConnectionError::ConnectionClosed(c) if tls(c.error_code) => "tls",
        quinn::ConnectionError::TimedOut => "timeout",
        _ => "other",
    }
}

/// The largest receive buffer [`Node::tune_buffers`] grows to.
pub const MAX_SOCKET_BUFFER: usize = 64 << 20;

/// The UDP socket's receive side, for the path report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketReport {
    /// Datagrams the kernel dropped for this socket (receive buffer full), since it opened.
    pub rx_drops: u64,
    /// The receive buffer the kernel grants (SO_RCVBUF; about twice what was asked).
    pub rcvbuf: u64,
    /// True when drops happened and the buffer cannot grow: the limit itself is the problem
    /// (raise net.core.rmem_max, or run with CAP_NET_ADMIN).
    pub at_limit: bool,
    /// Sends that found the socket's send buffer full (each tried again 1 ms later), since it
    /// opened. Growing fast: raise net.core.wmem_max.
    #[serde(default)]
    pub sends_refused: u64,
}

/// The kernel's receive drops on `sock`: SO_MEMINFO's drop count, one getsockopt. (Reading
/// /proc/net/udp for it, once a second, walked every UDP socket of the namespace and printed
/// each as text: a fifth of an idle daemon's CPU.) None when the kernel does not say.
fn udp_drops(sock: &impl std::os::fd::AsRawFd) -> Option<u64> {
    const VARS: usize = libc::SK_MEMINFO_DROPS as usize + 1;
    let mut info = [0u32; VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the array we own, and sets `len`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let filled = len as usize / std::mem::size_of::<u32>();
    (r == 0 && filled >= VARS).then(|| u64::from(info[VARS - 1]))
}

fn transport_config(
    policy: &PathPolicy,
    tolerate: &Arc<AtomicBool>,
) -> Result<quinn::TransportConfig, TransportError> {
    let mut transport = quinn::TransportConfig::default();
    if policy.loss_gate {
        transport.congestion_controller_factory(Arc::new(tolerant::TolerantConfig::new(
            tolerate.clone(),
        )));
    }
    transport.max_concurrent_bidi_streams(1024u32.into());
    // A parent that vanishes (killed, unplugged) is noticed within 5 s.
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(
        Duration::from_secs(5)
            .try_into()
            .map_err(|e| TransportError::Stream(format!("{e}")))?,
    ));
    // Several pieces in flight per connection: the connection window must hold them.
    transport.stream_receive_window((16u32 << 20).into());
    transport.receive_window((64u32 << 20).into());
    transport.send_window(64 << 20);
    // Bulk transfers: every peer asks the other side for an ACK per 64 ack-eliciting packets
    // (or after its max_ack_delay) instead of per 2. Each ACK is a packet encrypted, sent,
    // received, decrypted and processed; this removes 31 in 32 of them (per 8 to per 24 cut
    // the daemons' CPU by 5% on the default bench job, per 24 to per 64 by about 3% more).
    // Out-of-order arrival (a loss)
    // still gets an immediate ACK (quinn's reordering threshold). Peers without the
    // ACK-frequency extension ignore the request.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(ACK_EVERY.into());
    transport.ack_frequency_config(Some(ack));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(policy.upper_bound.max(MIN_UDP_PAYLOAD))
        .minimum_change(policy.minimum_change.max(1))
        .black_hole_cooldown(policy.black_hole_cooldown);
    transport.mtu_discovery_config(Some(mtu));
    Ok(transport)
}

impl Node {
    pub fn bind(addr: SocketAddr, id: &Identity) -> Result<Node, TransportError> {
        Node::bind_with(addr, id, PathPolicy::default())
    }

    /// Binds with PLPMTUD searching up to `policy.upper_bound`, converging within
    /// `policy.minimum_change` bytes, and recovering from black holes after
    /// `policy.black_hole_cooldown`.
    pub fn bind_with(
        addr: SocketAddr,
        id: &Identity,
        policy: PathPolicy,
    ) -> Result<Node, TransportError> {
        let mut server = tls::server_config(id)?;
        let tolerate = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(transport_config(&policy, &tolerate)?);
        server.transport_config(shared.clone());
        let bind_err = |source| TransportError::Bind { addr, source };
        // Buffers hold whole datagrams: larger packets need proportionally more room (the
        // kernel charges each one's full allocation).
        let buffer = (SOCKET_BUFFER as u64 * u64::from(policy.upper_bound).max(1452) / 1452)
            .min(MAX_SOCKET_BUFFER as u64) as usize;
        let socket = udp_socket(addr, buffer).map_err(bind_err)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_err(std::io::Error::other("no async runtime")))?;
        // The largest datagram we accept, advertised to peers: it caps their PLPMTUD (quinn's
        // default, 1472, would keep a 9000-byte fabric at 1500).
        let mut endpoint_cfg = quinn::EndpointConfig::default();
        endpoint_cfg
            .max_udp_payload_size(policy.upper_bound.max(MIN_UDP_PAYLOAD))
            .map_err(|e| TransportError::Stream(format!("max_udp_payload_size: {e}")))?;
        // Every short-header packet carries our connection ID: 4 random bytes (quinn's default
        // is 8) tell this node's connections apart (quinn re-draws on a clash) and leave 4
        // more bytes of each packet for data.
        endpoint_cfg
            .cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(CID_LEN)));
        // GSO batches that fit in one send at the largest packet size, and no wakeups for
        // write space (see `socket`).
        let socket = Arc::new(
            socket::QuietSocket::new(socket, policy.upper_bound.max(MIN_UDP_PAYLOAD))
                .map_err(bind_err)?,
        );
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_cfg,
            Some(server),
            socket.clone(),
            runtime,
        )
        .map_err(bind_err)?;
        let mut client = tls::client_config(id)?;
        client.transport_config(shared);
        endpoint.set_default_client_config(client);
        Ok(Node {
            endpoint,
            identity: id.clone(),
            policy,
            conns: Arc::default(),
            tolerate,
            quiet: socket,
            drops_seen: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Kernel receive drops on the UDP socket: when they grew since the last call, double the
    /// receive buffer (forced when privileged), up to [`MAX_SOCKET_BUFFER`].
    pub fn tune_buffers(&self) -> SocketReport {
        use rustix::net::sockopt;
        use std::sync::atomic::Ordering;
        let drops = udp_drops(self.quiet.io()).unwrap_or(0);
        let before = self.drops_seen.swap(drops, Ordering::Relaxed);
        let granted = sockopt::socket_recv_buffer_size(self.quiet.io()).unwrap_or(0);
        let mut at_limit = false;
        if drops > before {
            // The kernel reports twice the size asked for.
            let want = (granted / 2 * 2).clamp(SOCKET_BUFFER, MAX_SOCKET_BUFFER);
            if granted / 2 < MAX_SOCKET_BUFFER {
                let raised = sockopt::set_socket_recv_buffer_size_force(self.quiet.io(), want)
                    .or_else(|_| sockopt::set_socket_recv_buffer_size(self.quiet.io(), want));
                let now = sockopt::socket_recv_buffer_size(self.quiet.io()).unwrap_or(0);
                at_limit = raised.is_err() || now <= granted;
                tracing::info!(
                    drops = drops - before,
                    rcvbuf = now,
                    at_limit,
                    "UDP receive drops: raised the socket's receive buffer"
                );
            } else {
                at_limit = true;
            }
        }
        SocketReport {
            rx_drops: drops,
            rcvbuf: sockopt::socket_recv_buffer_size(self.quiet.io()).unwrap_or(0) as u64,
            at_limit,
            sends_refused: self.quiet.sends_refused(),
        }
    }

    /// The UDP socket's cookie (SO_COOKIE), which names it in eBPF programs.
    pub fn socket_cookie(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the u64 we own.
        let r = unsafe {
            libc::getsockopt(
                self.quiet.io().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(cookie)
    }

    pub fn congestion(&self) -> Congestion {
        if self.tolerate.load(std::sync::atomic::Ordering::Relaxed) {
            Congestion::Tolerant
        } else {
            Congestion::Cubic
        }
    }

    /// Lets the endpoint gather its reads by the tick, or makes every read immediate again
    /// (see [`socket`]).
    pub fn gather_reads(&self, on: bool) {
        self.quiet.gather(on);
    }

    /// Switches how every connection, open or new, answers loss. Without the policy's
    /// `loss_gate` (quinn's defaults) connections run quinn's Cubic and this changes nothing.
    pub fn set_congestion(&self, c: Congestion) {
        if !self.policy.loss_gate {
            return;
        }
        let on = c == Congestion::Tolerant;
        if self.tolerate.swap(on, std::sync::atomic::Ordering::Relaxed) != on {
            tracing::info!(congestion = ?c, "connections now answer loss differently");
        }
    }

    pub fn path_policy(&self) -> PathPolicy {
        self.policy
    }

    fn track(conns: &ConnRegistry, conn: quinn::Connection, incoming: bool) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            inner: conn,
            registry: conns.clone(),
        });
        let mut c = conns.lock().unwrap_or_else(|p| p.into_inner());
        c.push(Tracked {
            conn: Arc::downgrade(&conn),
            id: conn.stable_id(),
            incoming,
            remote: conn.remote_address(),
            last: conn.stats(),
            seen: std::time::Instant::now(),
            live: true,
        });
        conn
    }

    /// Every connection, live or closed in the last 10 minutes, with its QUIC statistics (a
    /// closed one's as last seen: call this every second or so to keep them fresh).
    pub fn connections(&self) -> Vec<ConnInfo> {
        // Connections upgraded here are dropped only after the lock is released (locals drop
        // in reverse order): if one of them turns out to be the last reference, its Drop takes
        // this same lock, which would deadlock the runtime thread.
        let mut upgraded: Vec<Arc<Conn>> = Vec::new();
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for t in c.iter_mut().filter(|t| t.live) {
            match t.conn.upgrade() {
                Some(conn) if conn.close_reason().is_none() => {
                    t.last = conn.stats();
                    t.seen = std::time::Instant::now();
                    upgraded.push(conn);
                }
                Some(conn) => {
                    t.live = false;
                    upgraded.push(conn);
                }
                None => t.live = false,
            }
        }
        c.retain(|t| t.live || t.seen.elapsed() < CLOSED_KEPT);
        // Every open connection, and per remote and direction the closed one that carried the
        // most packets (short-lived control connections would hide the data one).
        let mut out: Vec<ConnInfo> = Vec::new();
        let info = |t: &Tracked| ConnInfo {
            id: t.id,
            remote: t.remote,
            incoming: t.incoming,
            stats: t.last,
            live: t.live,
        };
        out.extend(c.iter().filter(|t| t.live).map(info));
        for t in c.iter().filter(|t| !t.live) {
            let same = |o: &ConnInfo| !o.live && o.remote == t.remote && o.incoming == t.incoming;
            match out.iter_mut().find(|o| same(o)) {
                Some(o) if o.stats.path.sent_packets < t.last.path.sent_packets => *o = info(t),
                Some(_) => {}
                None => out.push(info(t)),
            }
        }
        out
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Serves `source` to every peer that passes mutual TLS, until the endpoint closes.
    /// `refused` hears of each connection refused before it was established, with its reason
    /// (see [`refusal`]).
    pub fn serve(
        &self,
        source: Arc<dyn PieceSource>,
        refused: OnRefused,
    ) -> tokio::task::JoinHandle<()> {
        let endpoint = self.endpoint.clone();
        let conns = self.conns.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let source = source.clone();
                let conns = conns.clone();
                let refused = refused.clone();
                tokio::spawn(async move {
                    let conn = match incoming.await {
                        Ok(c) => Node::track(&conns, c, true),
                        Err(e) => {
                            let why = refusal(&e);
                            refused(why);
                            tracing::info!(error = %e, reason = why, "refused a peer connection");
                            return;
                        }
                    };
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        let to = conn.remote_address();
                        tokio::spawn(serve_stream(source.clone(), send, recv, to));
                    }
                });
            }
        })
    }

    /// Connects to a parent, verifying it against the cluster CA.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Parent, TransportError> {
        self.connect_with(addr, None).await
    }

    /// Connects starting at `initial_mtu` (UDP payload bytes, a size known to pass on this
    /// path) instead of QUIC's 1200; PLPMTUD still searches upward and falls back on a black
    /// hole.
    pub async fn connect_with(
        &self,
        addr: SocketAddr,
        initial_mtu: Option<u16>,
    ) -> Result<Parent, TransportError> {
        let err = |detail: String| TransportError::Connect { addr, detail };
        let hint = initial_mtu.filter(|m| *m > MIN_UDP_PAYLOAD);
        let connecting = if hint.is_some() {
            let mut t = transport_config(&self.policy, &self.tolerate)?;
            if let Some(mtu) = hint {
                t.initial_mtu(mtu.min(self.policy.upper_bound.max(MIN_UDP_PAYLOAD)));
            }
            let mut client = tls::client_config(&self.identity)?;
            client.transport_config(Arc::new(t));
            self.endpoint.connect_with(client, addr, tls::SERVER_NAME)
        } else {
            self.endpoint.connect(addr, tls::SERVER_NAME)
        };
        let conn = connecting
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        let conn = Node::track(&self.conns, conn, false);
        Ok(Parent { conn })
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

/// A UDP socket with large buffers (forced when privileged, else as large as allowed).
fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(addr)?;
    if sockopt::set_socket_recv_buffer_size_force(&socket, buffer).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(&socket, buffer);
    }
    if sockopt::set_socket_send_buffer_size_force(&socket, buffer).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(&socket, buffer);
    }
    let got = sockopt::socket_recv_buffer_size(&socket).unwrap_or(0);
    if got < buffer {
        tracing::info!(
            got,
            wanted = buffer,
            "UDP receive buffer is capped by net.core.rmem_max; raise it (or run with CAP_NET_ADMIN) to avoid drops at high rates"
        );
    }
    Ok(socket)
}

async fn serve_stream(
    source: Arc<dyn PieceSource>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    to: SocketAddr,
) {
    let (status, payload, served) = answer(source.clone(), &mut recv, to).await;
    let piece = served.is_some();
    // Pieces leave in the order they were asked for on this connection, one after another
    // instead of interleaved: each is complete sooner, so its receiver verifies it and passes
    // it on sooner. Everything else (have replies, manifests) is small and goes first.
    let priority = if piece {
        i32::try_from(send.id().index()).map_or(i32::MIN, |i| -i)
    } else {
        i32::MAX
    };
    let _ = send.set_priority(priority);
    let header = wire::encode_response_header(status, payload.len() as u64);
    let n = payload.len() as u64;
    if piece && status == Status::Ok {
        source.pace(n).await;
    }
    let sent = send.write_all(&header).await.is_ok()
        && (payload.is_empty() || send.write_chunk(payload).await.is_ok())
        && send.finish().is_ok();
    if sent && piece && status == Status::Ok {
        source.uploaded(n);
    }
    if let Some((task, index)) = served.filter(|_| status == Status::Ok) {
        // `write_chunk` returns once quinn has the bytes, not once they left: the piece's end
        // is the receiver's acknowledgement of all of it (a seed holds the piece back from
        // other peers until then). A receiver that stopped the stream counts as an end too:
        // it may stop it after reading every byte, before the stream's end arrived. Only a
        // send that never got going, or a connection that is gone, is a loss.
        let lost = !sent || send.stopped().await.is_err();
        source.piece_ended(&task, index, to, !lost);
    }
}

/// The answer to one request, and the piece it is about when it is a piece request (piece
/// data is paced, counted as upload, and its end reported).
async fn answer(
    source: Arc<dyn PieceSource>,
    recv: &mut quinn::RecvStream,
    to: SocketAddr,
) -> (Status, Bytes, Option<(TaskId, u32)>) {
    let bad = (Status::BadRequest, Bytes::new(), None);
    let mut buf = [0u8; REQUEST_LEN];
    // Short, slow or reset: nothing sensible to answer.
    let Ok(Ok(())) = tokio::time::timeout(REQUEST_READ_TIMEOUT, recv.read_exact(&mut buf)).await
    else {
        return bad;
    };
    let req = match Request::decode(&buf) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "bad request from a peer");
            return bad;
        }
    };
    // The length was checked against MAX_BODY by decode, before this allocation.
    let mut body = vec![0u8; req.body_len() as usize];
    if !body.is_empty()
        && !matches!(
            tokio::time::timeout(REQUEST_READ_TIMEOUT, recv.read_exact(&mut body)).await,
            Ok(Ok(()))
        )
    {
        return bad;
    }
    end_of_stream(recv);
    let (status, bytes) = match req {
        Request::Manifest { task } => found(source.manifest(&task)),
        Request::Piece { task, index, group } => {
            return match source.piece_status(&task, index, to, group) {
                Ok(b) => (Status::Ok, b, Some((task, index))),
                Err(Status::Busy) => {
                    let offer = wire::encode_offer(&source.offer(&task, to, group));
                    (Status::Busy, Bytes::from(offer), Some((task, index)))
                }
                Err(s) => (s, Bytes::new(), Some((task, index))),
            };
        }
        Request::Have { task, epoch, since } => found(source.have(task, epoch, since).await),
        _ => match source.call(req, Bytes::from(body)).await {
            Ok(b) => (Status::Ok, b),
            Err(s) => (s, Bytes::new()),
        },
    };
    (status, bytes, None)
}

/// Reads the end of a stream whose message was read whole, if the end has arrived (it
/// usually comes in the message's last packet). quinn sends STOP_SENDING for a stream
/// dropped before its end was read, and the other side may answer with RESET_STREAM: on a
/// 64 MiB swarm job each peer got about 1,800 of the one and 240 of the other, one per
/// request. If the end has not arrived, or more data came instead, the drop sends them as
/// before.
fn end_of_stream(recv: &mut quinn::RecvStream) {
    use futures::FutureExt;
    let _ = recv.read_chunk(1, true).now_or_never();
}

fn found(b: Option<Bytes>) -> (Status, Bytes) {
    match b {
        Some(b) => (Status::Ok, b),
        None => (Status::NotFound, Bytes::new()),
    }
}

/// A connection to one parent.
#[derive(Clone)]
pub struct Parent {
    /// Shared with the path report's registry only weakly: dropping the last Parent closes it.
    conn: Arc<Conn>,
}

impl Parent {
    async fn ask(&self, req: Request) -> Result<Vec<Bytes>, TransportError> {
        self.ask_with(req, &[]).await
    }

    async fn ask_with(&self, req: Request, body: &[u8]) -> Result<Vec<Bytes>, TransportError> {
        let s = |e: &dyn std::fmt::Display| TransportError::Stream(e.to_string());
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| s(&e))?;
        send.write_all(&req.encode()).await.map_err(|e| s(&e))?;
        if !body.is_empty() {
            send.write_all(body).await.map_err(|e| s(&e))?;
        }
        let _ = send.finish();
        let mut h = [0u8; RESPONSE_HEADER_LEN];
        recv.read_exact(&mut h).await.map_err(|e| s(&e))?;
        // The length is checked against the request's limit before any payload is read.
        let (status, len) = wire::decode_response_header(&h, req.limit())?;
        if status == Status::Busy {
            // Its offer, checked for length before it is read.
            if len > wire::MAX_OFFER_LEN {
                return Err(WireError::BadOffer(len).into());
            }
            let mut offer = vec![0u8; len as usize];
            recv.read_exact(&mut offer).await.map_err(|e| s(&e))?;
            end_of_stream(&mut recv);
            return Err(TransportError::Busy(wire::decode_offer(&offer)?));
        }
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
        end_of_stream(&mut recv);
        Ok(chunks)
    }

    pub async fn manifest(&self, task: TaskId) -> Result<Manifest, TransportError> {
        let chunks = self.ask(Request::Manifest { task }).await?;
        Ok(Manifest::decode(&chunks.concat())?)
    }

    /// A piece's bytes as received (chunks, not concatenated); the caller verifies them.
    /// `group`: this node's rack tag (0: none).
    pub async fn piece(
        &self,
        task: TaskId,
        index: u32,
        group: u32,
    ) -> Result<Vec<Bytes>, TransportError> {
        self.ask(Request::Piece { task, index, group }).await
    }

    /// News from the parent's verification log since `since` (of `epoch`); the parent may hold
    /// the answer about a second while it has none.
    pub async fn have(
        &self,
        task: TaskId,
        epoch: u32,
        since: u32,
    ) -> Result<HaveReply, TransportError> {
        let chunks = self.ask(Request::Have { task, epoch, since }).await?;
        Ok(HaveReply::decode(&chunks.concat())?)
    }

    /// A body-carrying call (seed order, scheduler RPC); `make` builds the request for the
    /// body's length, which must be within [`wire::MAX_BODY`].
    pub async fn call(
        &self,
        make: impl FnOnce(u32) -> Request,
        body: &[u8],
    ) -> Result<Bytes, TransportError> {
        let len = u32::try_from(body.len())
            .ok()
            .filter(|l| *l <= wire::MAX_BODY)
            .ok_or(WireError::BodyTooLong(u32::MAX))?;
        let chunks = self.ask_with(make(len), body).await?;
        Ok(Bytes::from(chunks.concat()))
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Sends `frame` as-is on a fresh stream and returns the response header's status and
    /// length (for diagnostics and tests of hostile input; the payload is not read).
    pub async fn raw_exchange(&self, frame: &[u8]) -> Result<(Status, u64), TransportError> {
        let s = |e: &dyn std::fmt::Display| TransportError::Stream(e.to_string());
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| s(&e))?;
        send.write_all(frame).await.map_err(|e| s(&e))?;
        let _ = send.finish();
        let mut h = [0u8; RESPONSE_HEADER_LEN];
        recv.read_exact(&mut h).await.map_err(|e| s(&e))?;
        Ok(wire::decode_response_header(&h, u64::MAX)?)
    }

    /// Waits until the connection closes, and says why.
    pub async fn closed(&self) -> String {
        self.conn.closed().await.to_string()
    }

    /// Whether the connection has closed (the parent went away or timed out).
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// QUIC's own view of the path: RTT, lost packets, MTU.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }
}
