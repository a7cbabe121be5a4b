//! The eBPF toolchain end to end: the object built by `cargo xtask build-ebpf` loads into the
//! kernel, its tc programs attach, and user space reads its map through the shared types.

use std::net::UdpSocket;
use std::time::Duration;

use aya::maps::PerCpuArray;
use aya::programs::{tc, SchedClassifier, TcAttachType};
use starling_netprobe_common::{PacketCounters, DIR_EGRESS, DIR_INGRESS};
use starling_tests::*;

fn read(bpf: &aya::Ebpf, dir: u32) -> PacketCounters {
    let map = bpf.map("COUNTERS").expect("COUNTERS map");
    let counters: PerCpuArray<_, PacketCounters> =
        PerCpuArray::try_from(map).expect("per-CPU array");
    let mut total = PacketCounters::default();
    for c in counters.get(&dir, 0).expect("read counters").iter() {
        total.add(c);
    }
    total
}

#[test]
fn tc_probes_count_packets_on_a_veth() {
    if !is_root() {
        eprintln!("skipped: loading eBPF programs needs root");
        return;
    }
    let obj = root().join("ebpf/target/bpfel-unknown-none/release/starling-probes");
    assert!(
        obj.exists(),
        "{} is missing: run `cargo xtask build-ebpf`",
        obj.display()
    );
    let ns = Netns::new("e", 7);
    let mut bpf = aya::Ebpf::load_file(&obj).expect("load the eBPF object");
    tc::qdisc_add_clsact(&ns.host_if).expect("add clsact qdisc");
    for (name, at) in [
        ("count_egress", TcAttachType::Egress),
        ("count_ingress", TcAttachType::Ingress),
    ] {
        let prog: &mut SchedClassifier = bpf
            .program_mut(name)
            .expect(name)
            .try_into()
            .expect("classifier");
        prog.load().expect("verifier accepts the program");
        prog.attach(&ns.host_if, at).expect("attach");
    }
    let sock = UdpSocket::bind((ns.host_addr.as_str(), 0)).expect("bind on the veth address");
    let payload = [0x5au8; 1000];
    for _ in 0..200 {
        sock.send_to(&payload, (ns.ns_addr.as_str(), 9))
            .expect("send");
    }
    // Egress saw every datagram (1000 bytes of payload + 28 of headers + 14 of Ethernet).
    let eg = read(&bpf, DIR_EGRESS);
    assert!(eg.packets >= 200, "egress packets {}", eg.packets);
    assert!(eg.bytes >= 200 * 1042, "egress bytes {}", eg.bytes);
    // Ingress sees the namespace's ARP reply and ICMP port-unreachable answers.
    wait_until(Duration::from_secs(5), "ingress packets", || {
        read(&bpf, DIR_INGRESS).packets >= 1
    });
}
