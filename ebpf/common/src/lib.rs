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
