//! Types shared, byte for byte, by the eBPF programs in `ebpf/probes` and the peer in `peer/`.
#![no_std]

/// Index of the ingress counters in the `COUNTERS` per-CPU array.
pub const DIR_INGRESS: u32 = 0;
/// Index of the egress counters in the `COUNTERS` per-CPU array.
pub const DIR_EGRESS: u32 = 1;
/// Entries in the `COUNTERS` map.
pub const DIRECTIONS: u32 = 2;

/// Packets and bytes seen in one direction on one CPU. User space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounters {
    pub packets: u64,
    pub bytes: u64,
}

impl PacketCounters {
    /// Adds another CPU's counters.
    pub fn add(&mut self, other: &PacketCounters) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

// SAFETY: plain-old-data: #[repr(C)], two u64s, no padding, every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PacketCounters {}

/// Entries in the `FLOWS` map (LRU: the least recently updated flow goes first).
pub const MAX_FLOWS: u32 = 16384;
/// Entries in the `PMTU` map (LRU).
pub const MAX_PMTU: u32 = 4096;

/// One flow, seen from this host: the remote end (an IPv4 address is IPv4-mapped,
/// `::ffff:a.b.c.d`), its port, our port and the IP protocol (6 TCP, 17 UDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub remote: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Per-CPU counters of one flow (user space sums packets and bytes, and takes the largest of
/// the maxima and of the timestamps). Sizes are IP packet bytes (what an MTU limits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// The largest packet received from the remote: what its path lets through.
    pub rx_max: u32,
    /// The largest packet sent (segment size for GSO packets).
    pub tx_max: u32,
    /// bpf_ktime_get_ns() of the last packet.
    pub last_ns: u64,
}

impl FlowStats {
    /// Adds another CPU's counters.
    pub fn add(&mut self, o: &FlowStats) {
        self.rx_packets = self.rx_packets.wrapping_add(o.rx_packets);
        self.rx_bytes = self.rx_bytes.wrapping_add(o.rx_bytes);
        self.tx_packets = self.tx_packets.wrapping_add(o.tx_packets);
        self.tx_bytes = self.tx_bytes.wrapping_add(o.tx_bytes);
        self.rx_max = self.rx_max.max(o.rx_max);
        self.tx_max = self.tx_max.max(o.tx_max);
        self.last_ns = self.last_ns.max(o.last_ns);
    }
}

/// A next-hop MTU learnt from an ICMP "fragmentation needed" or ICMPv6 "packet too big" for a
/// destination (the inner packet's destination), with when it arrived.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PmtuEntry {
    pub mtu: u32,
    pub _pad: u32,
    pub at_ns: u64,
}

// SAFETY: plain-old-data: #[repr(C)], explicit padding, every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above: u64s and u32s, no implicit padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowStats {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PmtuEntry {}

/// Entries in the `TCP` map (LRU) and the `CLAMP` map.
pub const MAX_TCP: u32 = 4096;
pub const MAX_CLAMP: u32 = 1024;

/// A TCP connection of the daemon's cgroup, as sock_ops last saw it (keyed by [`FlowKey`] with
/// `proto` 6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    pub srtt_us: u32,
    pub mss: u32,
    pub total_retrans: u32,
    pub data_segs_in: u32,
    pub data_segs_out: u32,
    /// The kernel's TCP state (1 established, 7 close, ...).
    pub state: u32,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    pub last_ns: u64,
}

// SAFETY: u32s and u64s in an order without implicit padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for TcpStats {}

/// Entries in the `DROPS` and `OUR_DROPS` per-CPU arrays: one per kernel drop reason
/// (`enum skb_drop_reason`); larger reasons count in the last slot.
pub const DROP_REASONS: u32 = 256;
/// Entries in the `OUR_SOCKETS` map (socket cookies of the daemon's sockets).
pub const MAX_OUR_SOCKETS: u32 = 64;
