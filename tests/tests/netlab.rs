//! The netlab topologies are what they claim: the path MTU between the server side and a client
//! (IPv4 with DF set) is exactly the topology's, and the lossy router drops about 2%.

use starling_tests::netlab::{self, Topology};
use starling_tests::*;

/// A DF ping of `size` bytes gets through (three tries, for the lossy topology).
fn passes(lab: &Lab, to: &str, size: u32) -> bool {
    (0..3).any(|_| netlab::df_ping(lab, 1, to, size))
}

#[test]
fn every_topology_has_its_path_mtu() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    for (k, topo) in Topology::ALL.into_iter().enumerate() {
        let lab = netlab::build(&format!("n{k}"), 220 + 2 * k as u8, 2, 0, topo)
            .unwrap_or_else(|e| panic!("{}: {e}", topo.name()));
        let server = lab.hosts[0].addr.clone();
        let mtu = topo.path_mtu();
        assert!(
            passes(&lab, &server, mtu),
            "{}: {mtu} bytes must pass",
            topo.name()
        );
        assert!(
            !passes(&lab, &server, mtu + 1),
            "{}: {} bytes must not pass",
            topo.name(),
            mtu + 1
        );
    }
}
