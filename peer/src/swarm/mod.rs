//! The daemon as a peer. Wiring only; each role has its own module:
//!
//! | module | role |
//! |---|---|
//! | [`pull`] | one task onto this node: gate, served copy, store, scheduler advice, peers or source |
//! | [`download`] | the peer-to-peer driver: the I/O shell around the sans-IO [`crate::engine`] |
//! | `jobs` | the driver's I/O jobs: the scheduler ask loop, parent pollers, piece jobs |
//! | `serve` | serving peers: the served registry, [`crate::transport::PieceSource`], spread, pacing |
//! | `schedulers` | the scheduler client (embedded or remote), and `starling scheduler` |
//! | `announce` | telling the schedulers what this peer holds and how its links measure |
//! | `order` | orders to pull a task: a seed asked to read the origin, or a preheat |
//! | `upkeep` | path upkeep from netprobe: packet sizes, buffers, congestion mode, probe report |
//! | `gate` | one pull, import or re-serve per task at a time |
//! | [`preheat`] | preheat jobs: resolve images, order targets, follow their holders |
//! | [`inventory`] | what this node holds: `starling tasks`, `stat`, `rm`, the status page |
//! | [`policy`] | sans-IO rules besides the engine's: its config, the driver's timings, upload spread (shared with `sim/`) |
//!
//! The planning is the engine's, the piece exchange the transport's, the storage the store's,
//! and the back-to-source pipeline the fetcher's.

mod announce;
pub mod download;
mod gate;
pub mod inventory;
mod jobs;
mod order;
pub mod policy;
pub mod preheat;
mod provenance;
pub mod pull;
mod schedulers;
mod serve;
mod upkeep;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub use order::SeedOrder;
pub use pull::PullError;
pub use schedulers::run_scheduler;

use crate::config::Config;
use crate::context::NodeContext;
use crate::core::TaskId;
use crate::fetch::Fetcher;
use crate::scheduler::{LinkReport, PeerId};
use crate::transport::tls::{ClusterCa, TlsError};
use crate::transport::{Node, TransportError};
use schedulers::Schedulers;
use upkeep::path_policy;

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("cluster TLS")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve on {key} = {addr}: {source}; set it to a free address, or to \"\" to disable it")]
    Listen {
        key: &'static str,
        addr: String,
        source: std::io::Error,
    },
    /// A `[tls]` file that is missing, unreadable, not PEM, or not a pair (a usage error).
    #[error("{key} = {}: {detail}", path.display())]
    CaFile {
        key: &'static str,
        path: std::path::PathBuf,
        detail: String,
    },
}

impl SwarmError {
    /// True when the configuration is at fault (exit code 2), not the machine.
    pub fn is_config(&self) -> bool {
        matches!(self, SwarmError::CaFile { .. })
    }
}

pub struct Swarm {
    ctx: Arc<NodeContext>,
    /// The origin pipeline: store look-ups, back-to-source downloads, imports.
    fetcher: Arc<Fetcher>,
    node: Node,
    me: PeerId,
    addr: SocketAddr,
    schedulers: Schedulers,
    served: serve::Registry,
    gates: gate::Gates,
    /// Orders in progress, and the turns they take (see `order`).
    orders: Mutex<HashSet<TaskId>>,
    order_slots: tokio::sync::Semaphore,
    /// Link quality measured per parent, reported with announcements.
    links: Mutex<HashMap<PeerId, LinkReport>>,
    announcer: announce::State,
    /// The eBPF path probes (or their absence).
    probe: crate::netprobe::NetProbe,
    /// The peer socket's receive side as last tuned.
    socket: Mutex<crate::transport::SocketReport>,
    /// Downloads from peers in progress, with their parents (for `starling stat`).
    downloads: inventory::Downloads,
    /// Preheat jobs this daemon runs.
    preheats: preheat::Jobs,
    /// This node's rack tag ([`policy::rack_group`]), sent with piece requests.
    group: u32,
}

impl Swarm {
    /// Binds the peer's QUIC endpoint under the cluster CA and starts serving and announcing.
    pub async fn start(
        ctx: Arc<NodeContext>,
        fetcher: Arc<Fetcher>,
    ) -> Result<Arc<Swarm>, SwarmError> {
        let cfg = &ctx.cfg;
        let ca = cluster_ca(cfg)?;
        let listen: SocketAddr =
            cfg.peer.listen.parse().map_err(|_| {
                TransportError::Stream(format!("peer.listen {:?}", cfg.peer.listen))
            })?;
        let schedulers = Schedulers::new(cfg);
        if let Some(d) = schedulers.directory() {
            d.refresh().await;
        }
        let first_scheduler = schedulers
            .directory()
            .and_then(|d| d.members().iter().find_map(|a| a.parse().ok()));
        // Peers are authenticated by the CA's signature; the certificate's common name is
        // informational (the peer ID is the advertised address, known only after binding).
        let identity = ca.issue("starling-peer")?;
        let probe = crate::netprobe::NetProbe::pending(&cfg.netprobe);
        let node = Node::bind_with(listen, &identity, path_policy(cfg))?;
        let cookie = node.socket_cookie();
        let addr = advertise(cfg, node.local_addr()?, first_scheduler);
        let swarm = Arc::new(Swarm {
            group: policy::rack_group(&cfg.peer.zone, &cfg.peer.rack),
            me: addr.to_string(),
            addr,
            schedulers,
            served: serve::Registry::new(cfg.peer.upload_limit_mbps),
            fetcher,
            node,
            gates: gate::Gates::default(),
            orders: Mutex::new(HashSet::new()),
            order_slots: tokio::sync::Semaphore::new(order::ORDERS_AT_ONCE),
            links: Mutex::new(HashMap::new()),
            announcer: announce::State::default(),
            probe,
            socket: Mutex::default(),
            downloads: inventory::Downloads::default(),
            preheats: preheat::Jobs::default(),
            ctx,
        });
        let metrics = swarm.ctx.metrics.clone();
        swarm.node.serve(
            swarm.clone(),
            Arc::new(move |why| metrics.handshake_refused(why)),
        );
        if swarm.ctx.cfg.netprobe.adapt {
            let weak = Arc::downgrade(&swarm);
            swarm.fetcher.on_stall(Arc::new(move |url: &str| {
                let (weak, url) = (weak.clone(), url.to_string());
                tokio::task::spawn_blocking(move || {
                    if let Some(s) = weak.upgrade() {
                        s.origin_stalled(&url);
                    }
                });
            }));
        }
        // The probes load once the peer serves (see `NetProbe::load`), on a thread of their
        // own at a lower priority: daemons starting together on a busy node get to serve
        // before any of them spends its tens of milliseconds in BTF parsing and the verifier.
        let weak = Arc::downgrade(&swarm);
        let loader = std::thread::Builder::new()
            .name("probe-load".into())
            .spawn(move || {
                crate::netprobe::lower_this_threads_priority();
                if let Some(s) = weak.upgrade() {
                    s.probe.load(&s.ctx.cfg.netprobe, cookie);
                }
            });
        if let Err(e) = loader {
            tracing::warn!("eBPF probes not loaded: cannot start their thread: {e}");
        }
        tokio::spawn(announce::run(swarm.clone()));
        if swarm.schedulers.directory().is_some() {
            let every =
                std::time::Duration::from_secs(swarm.ctx.cfg.scheduler.resolve_interval_seconds);
            tokio::spawn(schedulers::Directory::keep_resolving(
                Arc::downgrade(&swarm),
                every,
            ));
        }
        tokio::spawn(upkeep::run(Arc::downgrade(&swarm)));
        tokio::spawn(swarm.clone().resume_serving());
        tracing::info!(peer = %swarm.me, seed = swarm.ctx.cfg.peer.seed, embedded_scheduler = swarm.schedulers.is_embedded(), "peer listening (QUIC, mutual TLS)");
        Ok(swarm)
    }

    /// The node context this peer runs on.
    pub fn context(&self) -> &Arc<NodeContext> {
        &self.ctx
    }

    pub fn id(&self) -> &str {
        &self.me
    }
}

/// The cluster CA from `[tls]`, else the one in `<data_dir>/tls/` (created on first use).
/// A configured file that is missing, not PEM, or a key that is not the certificate's, is a
/// configuration error naming the file.
fn cluster_ca(cfg: &Config) -> Result<ClusterCa, SwarmError> {
    match (&cfg.tls.ca_cert, &cfg.tls.ca_key) {
        (Some(c), Some(k)) => {
            let read = |key: &'static str, p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|e| SwarmError::CaFile {
                    key,
                    path: p.to_path_buf(),
                    detail: format!("cannot be read ({e}); give the cluster CA's PEM files (`starling ca DIR` creates them)"),
                })
            };
            let (cert, key) = (read("tls.ca_cert", c)?, read("tls.ca_key", k)?);
            ClusterCa::from_pem(&cert, &key).map_err(|e| match e {
                TlsError::KeyMismatch => SwarmError::CaFile {
                    key: "tls.ca_key",
                    path: k.clone(),
                    detail: format!("is not the key of the certificate in tls.ca_cert = {}; give the pair `starling ca` made", c.display()),
                },
                TlsError::BadKey(detail) => SwarmError::CaFile {
                    key: "tls.ca_key",
                    path: k.clone(),
                    detail: format!("is not a PEM private key ({detail})"),
                },
                other => SwarmError::CaFile {
                    key: "tls.ca_cert",
                    path: c.clone(),
                    detail: format!("is not a PEM CA certificate ({other})"),
                },
            })
        }
        _ => Ok(ClusterCa::load_or_create(&cfg.data_dir.join("tls"))?),
    }
}

/// The address other peers dial: `peer.advertise`, else the bound port on the local address
/// that routes to the scheduler (loopback with the embedded scheduler).
fn advertise(cfg: &Config, bound: SocketAddr, scheduler: Option<SocketAddr>) -> SocketAddr {
    if let Ok(a) = cfg.peer.advertise.parse::<SocketAddr>() {
        return a;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = scheduler
        .and_then(|s| {
            let u = std::net::UdpSocket::bind(("0.0.0.0", 0)).ok()?;
            u.connect(s).ok()?;
            u.local_addr().ok().map(|a| a.ip())
        })
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, bound.port())
}
