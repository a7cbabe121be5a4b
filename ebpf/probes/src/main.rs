//! Starling's eBPF programs. For now: tc (clsact) classifiers that count packets and bytes per
//! direction on an interface; the per-flow MTU and loss probes build on them.
#![no_std]
#![no_main]

use aya_ebpf::bindings::TC_ACT_PIPE;
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::TcContext;
use starling_netprobe_common::{PacketCounters, DIRECTIONS, DIR_EGRESS, DIR_INGRESS};

#[map]
static COUNTERS: PerCpuArray<PacketCounters> = PerCpuArray::with_max_entries(DIRECTIONS, 0);

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
