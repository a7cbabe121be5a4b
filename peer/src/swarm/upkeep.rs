//! Path upkeep: the netprobe side of the peer. Connections start at the packet size already
//! validated toward a host; once a second the peer snapshots connection statistics, tunes its
//! UDP buffers from kernel drops, picks the congestion mode and whether reads are gathered;
//! every 10 s the probes attach to new interfaces; an origin transfer that stalls across an MTU
//! black hole clamps the TCP MSS toward it; and `starling probe` reads the joined view.

use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use super::Swarm;
use crate::config::Config;
use crate::netprobe::policy::{congestion, Gather};
use crate::transport::{Parent, PathPolicy, TransportError};

/// How QUIC sizes packets: adapted to the interfaces, or quinn's defaults.
pub(super) fn path_policy(cfg: &Config) -> PathPolicy {
    if cfg.netprobe.adapt {
        PathPolicy {
            upper_bound: crate::netprobe::udp_upper_bound(),
            ..PathPolicy::default()
        }
    } else {
        PathPolicy::quinn_defaults()
    }
}

/// Once a second, adapts the node to its measured paths; every 10 s attaches the probes to
/// interfaces that came up and expires idle flows. Ends with the swarm.
pub(super) async fn run(swarm: Weak<Swarm>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    let mut gather = Gather::default();
    loop {
        tick.tick().await;
        let Some(s) = swarm.upgrade() else { return };
        // Keeps each connection's last statistics fresh for after it closes.
        let conns = s.node.connections();
        if s.ctx.cfg.netprobe.adapt {
            let report = s.node.tune_buffers();
            *s.socket.lock().unwrap_or_else(|p| p.into_inner()) = report;
            let live: Vec<_> = conns.into_iter().filter(|c| c.live).collect();
            let c = congestion(s.node.congestion(), &live);
            s.node.set_congestion(c);
            s.node.gather_reads(gather.decide(&live));
        }
        n += 1;
        if n.is_multiple_of(10) {
            s.probe.attach_new();
            s.probe.expire(Duration::from_secs(300));
        }
    }
}

impl Swarm {
    /// Connects to a peer, starting at the packet size already validated toward its host.
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<Parent, TransportError> {
        let hint = if self.ctx.cfg.netprobe.adapt {
            crate::netprobe::view::known_udp_mtu(&self.node.connections(), addr.ip())
        } else {
            None
        };
        self.node.connect_with(addr, hint).await
    }

    /// An origin transfer stalled: if the probes show an MTU black hole toward it, clamp the
    /// MSS of new connections to it (to what QUIC validated toward that host, if anything).
    pub(super) fn origin_stalled(&self, url: &str) {
        use std::net::ToSocketAddrs;
        let Ok(u) = url::Url::parse(url) else { return };
        let Some(host) = u.host_str() else { return };
        let port = u.port_or_known_default().unwrap_or(80);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(addrs) = (host, port).to_socket_addrs() else {
            return;
        };
        let conns = self.node.connections();
        for a in addrs {
            let mss = crate::netprobe::view::known_udp_mtu(&conns, a.ip())
                .map(|udp| u32::from(udp) + 28 - 40);
            self.probe.stalled(a.ip(), mss);
        }
    }

    /// The per-connection path view (`starling probe`).
    pub fn probe_report(&self) -> crate::netprobe::ProbeReport {
        let conns = self.node.connections();
        let local_port = self.node.local_addr().map(|a| a.port()).unwrap_or(0);
        let (ebpf, detail) = match self.probe.status() {
            Ok(ifaces) => (true, format!("attached to {}", ifaces.join(", "))),
            Err(why) => (false, why),
        };
        crate::netprobe::ProbeReport {
            ebpf,
            detail,
            udp_upper_bound: self.node.path_policy().upper_bound,
            adapt: self.ctx.cfg.netprobe.adapt,
            socket: *self.socket.lock().unwrap_or_else(|p| p.into_inner()),
            congestion: self.node.congestion(),
            paths: crate::netprobe::join(
                &conns,
                local_port,
                &self.probe.flows(),
                &self.probe.icmp_mtus(),
            ),
            tcp: crate::netprobe::view::tcp_views(&self.probe.tcp(), &self.probe.clamps()),
            kernel_drops: self.probe.kernel_drops(),
        }
    }
}
