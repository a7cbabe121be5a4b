//! The per-connection path view: quinn's statistics joined with the eBPF flow counters and the
//! ICMP next-hop MTUs. Pure: the daemon gathers the inputs, this joins them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use starling_netprobe_common::{FlowKey, FlowStats, TcpStats};

use crate::transport::ConnInfo;

/// One QUIC connection's path.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PathView {
    /// The other end's address.
    pub peer: String,
    /// `parent` (we download from it) or `child` (it downloads from us).
    pub role: String,
    /// Whether the connection is open (else: its last statistics, kept for 10 minutes).
    pub live: bool,
    /// Best estimate of the path MTU in IP packet bytes (see `mtu_source`).
    pub path_mtu: u32,
    /// Where `path_mtu` comes from: `icmp` (a "fragmentation needed" / "packet too big" for this
    /// peer), `ebpf` (the largest packet that arrived from the peer), or `quic` (the size QUIC's
    /// PLPMTUD validated toward the peer).
    pub mtu_source: String,
    /// QUIC's validated packet size toward the peer, in IP bytes.
    pub quic_mtu: u32,
    /// The largest packet received from the peer, in IP bytes (eBPF).
    pub ebpf_rx_max: Option<u32>,
    /// The next-hop MTU an ICMP error reported for the peer (eBPF).
    pub icmp_mtu: Option<u32>,
    pub rtt_ms: f64,
    pub cwnd: u64,
    pub sent_packets: u64,
    pub lost_packets: u64,
    /// UDP payload bytes sent to the peer, and the bytes of packets QUIC declared lost (their
    /// data is sent again).
    #[serde(default)]
    pub sent_bytes: u64,
    #[serde(default)]
    pub lost_bytes: u64,
    /// lost / sent packets, by QUIC's loss detection toward the peer.
    pub loss: f64,
    pub black_holes: u64,
    /// Packets seen by eBPF on this flow, each way.
    pub rx_packets: Option<u64>,
    pub tx_packets: Option<u64>,
}

/// What `starling probe` shows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProbeReport {
    /// Whether the eBPF probes run.
    pub ebpf: bool,
    /// The interfaces they are attached to, or why they do not run.
    pub detail: String,
    /// The largest UDP payload QUIC may try (from the interfaces' MTUs).
    pub udp_upper_bound: u16,
    /// Whether transfers adapt to the measurements (`netprobe.adapt`).
    #[serde(default)]
    pub adapt: bool,
    /// The peer socket's receive drops and buffer.
    #[serde(default)]
    pub socket: crate::transport::SocketReport,
    /// The congestion controller new connections use.
    #[serde(default = "cubic")]
    pub congestion: crate::transport::Congestion,
    pub paths: Vec<PathView>,
    /// TCP connections (back to source, proxy upstream) from sock_ops.
    #[serde(default)]
    pub tcp: Vec<TcpView>,
    /// Kernel packet drops by reason (kfree_skb), all and on the daemon's sockets; None
    /// without the probe.
    #[serde(default)]
    pub kernel_drops: Option<Vec<super::DropCount>>,
}

fn cubic() -> crate::transport::Congestion {
    crate::transport::Congestion::Cubic
}

/// One TCP connection of the daemon, from sock_ops.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TcpView {
    pub peer: String,
    pub local_port: u16,
    pub rtt_ms: f64,
    pub mss: u32,
    pub retransmits: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The MSS new connections to this peer advertise, when clamped for an MTU black hole.
    pub clamped_mss: Option<u32>,
}

pub fn tcp_views(tcp: &[(FlowKey, TcpStats)], clamps: &HashMap<IpAddr, u32>) -> Vec<TcpView> {
    let mut v: Vec<TcpView> = tcp
        .iter()
        .map(|(k, s)| {
            let ip = unmap(k.remote);
            TcpView {
                peer: SocketAddr::new(ip, k.remote_port).to_string(),
                local_port: k.local_port,
                rtt_ms: s.srtt_us as f64 / 1000.0,
                mss: s.mss,
                retransmits: s.total_retrans,
                segs_in: s.data_segs_in,
                segs_out: s.data_segs_out,
                bytes_in: s.bytes_received,
                bytes_out: s.bytes_acked,
                clamped_mss: clamps.get(&ip).copied(),
            }
        })
        .collect();
    v.sort_by(|a, b| (&a.peer, a.local_port).cmp(&(&b.peer, b.local_port)));
    v
}

/// `::ffff:a.b.c.d` back to an IPv4 address; other keys as IPv6.
pub fn unmap(k: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(k);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub(crate) fn key_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// IP and UDP header bytes in front of a QUIC packet.
fn headers(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(_) => 28,
        IpAddr::V6(_) => 48,
    }
}

/// Joins each connection with its flow (UDP, remote address and port, our port) and the ICMP
/// MTU for its remote.
pub fn join(
    conns: &[ConnInfo],
    local_port: u16,
    flows: &HashMap<FlowKey, FlowStats>,
    icmp: &HashMap<IpAddr, u32>,
) -> Vec<PathView> {
    let mut out: Vec<PathView> = conns
        .iter()
        .map(|c| {
            let remote = normalize(c.remote);
            let key = FlowKey {
                remote: key_addr(remote.ip()),
                remote_port: remote.port(),
                local_port,
                proto: 17,
                _pad: [0; 3],
            };
            let flow = flows.get(&key);
            let p = &c.stats.path;
            let quic_mtu = p.current_mtu as u32 + headers(remote.ip());
            let rx_max = flow.map(|f| f.rx_max).filter(|m| *m > 0);
            let icmp_mtu = icmp.get(&remote.ip()).copied();
            let (path_mtu, source) = match (icmp_mtu, rx_max) {
                (Some(i), _) => (i, "icmp"),
                (None, Some(r)) if r > quic_mtu => (r, "ebpf"),
                _ => (quic_mtu, "quic"),
            };
            PathView {
                peer: remote.to_string(),
                role: if c.incoming { "child" } else { "parent" }.into(),
                live: c.live,
                path_mtu,
                mtu_source: source.into(),
                quic_mtu,
                ebpf_rx_max: rx_max,
                icmp_mtu,
                rtt_ms: p.rtt.as_secs_f64() * 1000.0,
                cwnd: p.cwnd,
                sent_packets: p.sent_packets,
                lost_packets: p.lost_packets,
                sent_bytes: c.stats.udp_tx.bytes,
                lost_bytes: p.lost_bytes,
                loss: if p.sent_packets > 0 {
                    p.lost_packets as f64 / p.sent_packets as f64
                } else {
                    0.0
                },
                black_holes: p.black_holes_detected,
                rx_packets: flow.map(|f| f.rx_packets),
                tx_packets: flow.map(|f| f.tx_packets),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.role, &a.peer).cmp(&(&b.role, &b.peer)));
    out
}

/// An IPv4-mapped IPv6 socket address as plain IPv4 (how the flow keys name it).
fn normalize(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

impl ProbeReport {
    /// A fixed-width table for `starling probe`.
    pub fn table(&self) -> String {
        let mut s = format!(
            "eBPF probes: {}\nadaptation: {}; QUIC packet size upper bound {} bytes of UDP payload; congestion control {:?}\nUDP socket: {} receive drops, receive buffer {} bytes{}; {} sends found the send buffer full\n",
            if self.ebpf {
                format!("on ({})", self.detail)
            } else {
                format!("off ({})", self.detail)
            },
            if self.adapt { "on" } else { "off" },
            self.udp_upper_bound,
            self.congestion,
            self.socket.rx_drops,
            self.socket.rcvbuf,
            if self.socket.at_limit {
                " (at its limit: raise net.core.rmem_max)"
            } else {
                ""
            },
            self.socket.sends_refused
        );
        s.push_str(&format!(
            "{:<22} {:<6} {:>8} {:<6} {:>8} {:>8} {:>6} {:>9} {:>7} {:>10} {:>6}\n",
            "peer",
            "role",
            "path_mtu",
            "from",
            "quic_mtu",
            "rx_max",
            "icmp",
            "rtt_ms",
            "loss_%",
            "sent",
            "blkhol"
        ));
        for p in &self.paths {
            let opt = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
            s.push_str(&format!(
                "{:<22} {:<6} {:<6} {:>8} {:<6} {:>8} {:>8} {:>6} {:>9.2} {:>7.2} {:>10} {:>6}\n",
                p.peer,
                p.role,
                if p.live { "open" } else { "closed" },
                p.path_mtu,
                p.mtu_source,
                p.quic_mtu,
                opt(p.ebpf_rx_max),
                opt(p.icmp_mtu),
                p.rtt_ms,
                p.loss * 100.0,
                p.sent_packets,
                p.black_holes
            ));
        }
        if self.paths.is_empty() {
            s.push_str("(no peer connections)\n");
        }
        if let Some(drops) = &self.kernel_drops {
            s.push_str("\nkernel drops (kfree_skb): reason, all, on Starling's sockets\n");
            for d in drops.iter().take(10) {
                s.push_str(&format!("  {:<28} {:>10} {:>8}\n", d.reason, d.all, d.ours));
            }
        }
        if !self.tcp.is_empty() {
            s.push_str(&format!(
                "\nTCP (back to source, proxy upstream)\n{:<22} {:>6} {:>9} {:>6} {:>7} {:>9} {:>12} {:>8}\n",
                "peer", "lport", "rtt_ms", "mss", "retrans", "segs_in", "bytes_in", "clamp"
            ));
            for t in &self.tcp {
                s.push_str(&format!(
                    "{:<22} {:>6} {:>9.2} {:>6} {:>7} {:>9} {:>12} {:>8}\n",
                    t.peer,
                    t.local_port,
                    t.rtt_ms,
                    t.mss,
                    t.retransmits,
                    t.segs_in,
                    t.bytes_in,
                    t.clamped_mss.map_or("-".to_string(), |m| m.to_string())
                ));
            }
        }
        s
    }
}

/// The UDP payload known to pass toward `ip`, from the connections to it: a new connection
/// starts there instead of at 1200.
pub fn known_udp_mtu(conns: &[ConnInfo], ip: IpAddr) -> Option<u16> {
    conns
        .iter()
        .filter(|c| normalize(c.remote).ip() == ip && c.stats.path.black_holes_detected == 0)
        .map(|c| c.stats.path.current_mtu)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn unmap_round_trips() {
        let v4: IpAddr = Ipv4Addr::new(198, 18, 1, 2).into();
        assert_eq!(unmap(key_addr(v4)), v4);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(unmap(key_addr(v6)), v6);
    }

    #[test]
    fn mtu_source_prefers_icmp_then_the_larger_measurement() {
        let remote: SocketAddr = "198.18.1.1:7950".parse().unwrap();
        let mut stats = quinn::ConnectionStats::default();
        stats.path.current_mtu = 1422;
        stats.path.sent_packets = 1000;
        stats.path.lost_packets = 20;
        stats.path.lost_bytes = 28_440;
        stats.udp_tx.bytes = 1_422_000;
        let conns = vec![ConnInfo {
            id: 0,
            remote,
            incoming: false,
            stats,
            live: true,
        }];
        let key = FlowKey {
            remote: key_addr(remote.ip()),
            remote_port: 7950,
            local_port: 5000,
            proto: 17,
            _pad: [0; 3],
        };
        let mut flows = HashMap::new();
        let v = join(&conns, 5000, &flows, &HashMap::new());
        assert_eq!((v[0].path_mtu, v[0].mtu_source.as_str()), (1450, "quic"));
        assert!((v[0].loss - 0.02).abs() < 1e-9);
        assert_eq!((v[0].sent_bytes, v[0].lost_bytes), (1_422_000, 28_440));
        flows.insert(
            key,
            FlowStats {
                rx_max: 1450,
                rx_packets: 5,
                ..FlowStats::default()
            },
        );
        let v = join(&conns, 5000, &flows, &HashMap::new());
        assert_eq!(v[0].path_mtu, 1450);
        assert_eq!(v[0].rx_packets, Some(5));
        flows.get_mut(&key).unwrap().rx_max = 1480;
        let v = join(&conns, 5000, &flows, &HashMap::new());
        assert_eq!((v[0].path_mtu, v[0].mtu_source.as_str()), (1480, "ebpf"));
        let icmp = HashMap::from([(remote.ip(), 1400)]);
        let v = join(&conns, 5000, &flows, &icmp);
        assert_eq!((v[0].path_mtu, v[0].mtu_source.as_str()), (1400, "icmp"));
        assert_eq!(known_udp_mtu(&conns, remote.ip()), Some(1422));
        assert!(v[0].peer.contains("198.18.1.1"));
    }
}
