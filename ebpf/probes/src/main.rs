//! Starling's eBPF programs.
//!
//! - `count_ingress` / `count_egress` (tc): packets and bytes per direction on an interface.
//! - `flow_ingress` / `flow_egress` (tc, clsact): per-flow counters keyed by remote address and
//!   ports (TCP and UDP, IPv4 and IPv6): packets, bytes, the largest packet each way, and when
//!   the flow was last seen. On ingress, ICMP "fragmentation needed" and ICMPv6 "packet too big"
//!   are parsed into `PMTU`: the next-hop MTU per destination.
//!
//! - `tcp_paths` (sock_ops, on the daemon's cgroup): per TCP connection (back-to-source and
//!   proxy upstream): smoothed RTT, MSS, retransmits, segments and bytes each way. A connection
//!   to a destination in `CLAMP` advertises that MSS in its SYN (set by user space when a path
//!   turns out to be an MTU black hole), so full-size segments from the origin fit the path.
//!
//! - `kfree_skb` (tp_btf): kernel packet drops by reason, all of them and those on the daemon's
//!   own sockets (the receiving socket's cookie is in `OUR_SOCKETS`): receive-buffer overflow,
//!   qdisc drops and the rest.
//!
//! Maps are LRU-bounded; user space also expires entries it has not seen change.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG, BPF_SOCK_OPS_RTT_CB,
    BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    BPF_SOCK_OPS_TCP_CONNECT_CB, TC_ACT_PIPE,
};
use aya_ebpf::helpers::{
    bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_setsockopt,
};
use aya_ebpf::macros::{btf_tracepoint, classifier, map, sock_ops};
use aya_ebpf::maps::{HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray};
use aya_ebpf::programs::{BtfTracePointContext, SockOpsContext, TcContext};
use starling_netprobe_common::{
    FlowKey, FlowStats, PacketCounters, PmtuEntry, TcpStats, DIRECTIONS, DIR_EGRESS, DIR_INGRESS,
    DROP_REASONS, MAX_CLAMP, MAX_FLOWS, MAX_OUR_SOCKETS, MAX_PMTU, MAX_TCP,
};

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASONS, 0);

#[map]
static OUR_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASONS, 0);

#[map]
static OUR_SOCKETS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_OUR_SOCKETS, 0);

/// kfree_skb(skb, location, reason, rx_sk).
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    let slot = if reason < DROP_REASONS {
        reason
    } else {
        DROP_REASONS - 1
    };
    bump(&DROPS, slot);
    let rx_sk: *mut core::ffi::c_void = ctx.arg(3);
    if !rx_sk.is_null() {
        // SAFETY: a non-null socket pointer the tracepoint hands over.
        let cookie = unsafe { bpf_get_socket_cookie(rx_sk) };
        // SAFETY: a lookup; only presence matters.
        if unsafe { OUR_SOCKETS.get(&cookie) }.is_some() {
            bump(&OUR_DROPS, slot);
        }
    }
    0
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, slot: u32) {
    if let Some(c) = map.get_ptr_mut(slot) {
        // SAFETY: this CPU's slot; programs on one CPU do not preempt each other.
        unsafe { *c += 1 };
    }
}

#[map]
static COUNTERS: PerCpuArray<PacketCounters> = PerCpuArray::with_max_entries(DIRECTIONS, 0);

#[map]
static FLOWS: LruPerCpuHashMap<FlowKey, FlowStats> =
    LruPerCpuHashMap::with_max_entries(MAX_FLOWS, 0);

#[map]
static PMTU: LruHashMap<[u8; 16], PmtuEntry> = LruHashMap::with_max_entries(MAX_PMTU, 0);

#[map]
static TCP: LruHashMap<FlowKey, TcpStats> = LruHashMap::with_max_entries(MAX_TCP, 0);

#[map]
static CLAMP: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_CLAMP, 0);

const AF_INET: u32 = 2;
const SOL_TCP: i32 = 6;
const TCP_MAXSEG: i32 = 2;

#[sock_ops]
pub fn tcp_paths(ctx: SockOpsContext) -> u32 {
    if ctx.family() != AF_INET {
        return 1;
    }
    // remote_ip4 holds the address in network byte order.
    let remote = mapped(ctx.remote_ip4().to_ne_bytes());
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: a map lookup; the value is copied out at once.
            if let Some(mss) = unsafe { CLAMP.get(&remote) } {
                let mut mss: i32 = *mss as i32;
                // SAFETY: the helper reads optlen bytes from a live stack value.
                unsafe {
                    bpf_setsockopt(
                        ctx.ops.cast(),
                        SOL_TCP,
                        TCP_MAXSEG,
                        (&mut mss as *mut i32).cast(),
                        4,
                    );
                }
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let _ = ctx.set_cb_flags(
                (BPF_SOCK_OPS_RTT_CB_FLAG
                    | BPF_SOCK_OPS_RETRANS_CB_FLAG
                    | BPF_SOCK_OPS_STATE_CB_FLAG) as i32,
            );
            record_tcp(&ctx, remote);
        }
        BPF_SOCK_OPS_RTT_CB | BPF_SOCK_OPS_RETRANS_CB | BPF_SOCK_OPS_STATE_CB => {
            record_tcp(&ctx, remote)
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn record_tcp(ctx: &SockOpsContext, remote: [u8; 16]) {
    let key = FlowKey {
        remote,
        // The remote port is in network byte order in the upper 16 bits (little-endian hosts).
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        local_port: ctx.local_port() as u16,
        proto: 6,
        _pad: [0; 3],
    };
    let ops = ctx.ops;
    // Each context field is read on its own, at its fixed offset: the verifier allows only
    // such loads from the context.
    macro_rules! field {
        ($f:ident) => {
            // SAFETY: a read of one field of the live context.
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ops).$f)) }
        };
    }
    let s = TcpStats {
        srtt_us: field!(srtt_us) >> 3,
        mss: field!(mss_cache),
        total_retrans: field!(total_retrans),
        data_segs_in: field!(data_segs_in),
        data_segs_out: field!(data_segs_out),
        state: if ctx.op() == BPF_SOCK_OPS_STATE_CB {
            ctx.arg(1)
        } else {
            field!(state)
        },
        bytes_received: field!(bytes_received),
        bytes_acked: field!(bytes_acked),
        // SAFETY: a helper without preconditions.
        last_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = TCP.insert(&key, &s, 0);
}

#[classifier]
pub fn count_ingress(ctx: TcContext) -> i32 {
    count(&ctx, DIR_INGRESS);
    TC_ACT_PIPE
}

#[classifier]
pub fn count_egress(ctx: TcContext) -> i32 {
    count(&ctx, DIR_EGRESS);
    TC_ACT_PIPE
}

#[classifier]
pub fn flow_ingress(ctx: TcContext) -> i32 {
    let _ = observe(&ctx, false);
    TC_ACT_PIPE
}

#[classifier]
pub fn flow_egress(ctx: TcContext) -> i32 {
    let _ = observe(&ctx, true);
    TC_ACT_PIPE
}

#[inline(always)]
fn count(ctx: &TcContext, dir: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(dir) {
        // SAFETY: the pointer is to this CPU's slot of a map value; programs on one CPU do not
        // preempt each other.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += ctx.len() as u64;
        }
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

fn mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Parses one packet and updates the maps. Errors (short packets) just skip it.
///
/// It runs for every packet the host sends or receives, so it reads each header with one
/// helper call and looks the flow up once (helper calls and map lookups are its cost).
#[inline(always)]
fn observe(ctx: &TcContext, egress: bool) -> Result<(), i64> {
    // The Ethernet header and a 20-byte IPv4 header (anything shorter is not IP or TCP/UDP).
    let h: [u8; ETH_HLEN + 20] = ctx.load(0)?;
    let ethertype = u16::from_be_bytes([h[12], h[13]]);
    let (proto, src, dst, l4, size) = match ethertype {
        ETH_P_IP => {
            let ip = &h[ETH_HLEN..];
            let ihl = ((ip[0] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Ok(());
            }
            let total = u16::from_be_bytes([ip[2], ip[3]]) as u32;
            let proto = ip[9];
            let src = [ip[12], ip[13], ip[14], ip[15]];
            let dst = [ip[16], ip[17], ip[18], ip[19]];
            let l4 = ETH_HLEN + ihl;
            if proto == IPPROTO_ICMP && !egress {
                let ty: u8 = ctx.load(l4)?;
                let code: u8 = ctx.load(l4 + 1)?;
                if ty == 3 && code == 4 {
                    let mtu = u16::from_be(ctx.load::<u16>(l4 + 6)?) as u32;
                    let inner_dst: [u8; 4] = ctx.load(l4 + 8 + 16)?;
                    record_pmtu(mapped(inner_dst), mtu);
                }
                return Ok(());
            }
            (proto, mapped(src), mapped(dst), l4, total)
        }
        ETH_P_IPV6 => {
            let ip: [u8; 40] = ctx.load(ETH_HLEN)?;
            let payload = u16::from_be_bytes([ip[4], ip[5]]) as u32;
            let proto = ip[6];
            let mut src = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&ip[24..40]);
            let l4 = ETH_HLEN + 40;
            if proto == IPPROTO_ICMPV6 && !egress {
                let ty: u8 = ctx.load(l4)?;
                if ty == 2 {
                    let mtu = u32::from_be(ctx.load::<u32>(l4 + 4)?);
                    let inner_dst: [u8; 16] = ctx.load(l4 + 8 + 24)?;
                    record_pmtu(inner_dst, mtu);
                }
                return Ok(());
            }
            (proto, src, dst, l4, payload + 40)
        }
        _ => return Ok(()),
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(());
    }
    let ports: [u8; 4] = ctx.load(l4)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    // SAFETY: the context's skb pointer is valid for the program's run.
    let gso = unsafe { (*ctx.skb.skb).gso_size };
    let size = if gso > 0 {
        // A GSO packet leaves (a GRO packet arrived) as segments of gso_size payload bytes
        // plus the headers.
        let l4_header = if proto == IPPROTO_UDP { 8 } else { 20 };
        gso + (l4 - ETH_HLEN) as u32 + l4_header
    } else {
        size
    };
    let key = if egress {
        FlowKey {
            remote: dst,
            remote_port: dport,
            local_port: sport,
            proto,
            _pad: [0; 3],
        }
    } else {
        FlowKey {
            remote: src,
            remote_port: sport,
            local_port: dport,
            proto,
            _pad: [0; 3],
        }
    };
    let bytes = ctx.len() as u64;
    let s = match FLOWS.get_ptr_mut(&key) {
        Some(s) => s,
        None => {
            let _ = FLOWS.insert(&key, &FlowStats::default(), BPF_NOEXIST as u64);
            match FLOWS.get_ptr_mut(&key) {
                Some(s) => s,
                None => return Ok(()),
            }
        }
    };
    // SAFETY: this CPU's copy of the value; programs on one CPU do not preempt each other.
    unsafe {
        let s = &mut *s;
        if egress {
            s.tx_packets += 1;
            s.tx_bytes += bytes;
            if size > s.tx_max {
                s.tx_max = size;
            }
        } else {
            s.rx_packets += 1;
            s.rx_bytes += bytes;
            if size > s.rx_max {
                s.rx_max = size;
            }
        }
        // The coarse clock (CLOCK_MONOTONIC at tick resolution) is enough to expire idle
        // flows and costs less than a precise read on every packet.
        s.last_ns = bpf_ktime_get_coarse_ns();
    }
    Ok(())
}

#[inline(always)]
fn record_pmtu(dst: [u8; 16], mtu: u32) {
    let e = PmtuEntry {
        mtu,
        _pad: 0,
        // SAFETY: a helper without preconditions.
        at_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = PMTU.insert(&dst, &e, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
