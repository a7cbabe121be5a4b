//! Network topologies shared by the tests, the benches and `cargo xtask netlab`: a server side
//! and a client side joined by a router namespace, each host its own namespace, every host link
//! shaped with tbf both ways.
//!
//! ```text
//!  host 0 ──┐                         ┌── host 1
//!  (server) ├─ bridge A ── router ── bridge B ─┼── host 2
//!           │ 198.18.S.0/24    198.18.S+1.0/24 └── ...
//! ```
//!
//! - `clean`: MTU 1500 everywhere.
//! - `dind`: 1500-byte interfaces everywhere, but the router's link to bridge B is 1450, and the
//!   router drops the ICMP "fragmentation needed" it would send: a true MTU black hole, as in
//!   docker-in-docker.
//! - `vxlan`: the clean underlay, with a real VXLAN overlay (VNI 42, UDP 4789, head-end
//!   replication through FDB entries) between all hosts; host addresses are overlay addresses
//!   (10.S.0.x), whose interfaces know their MTU is 1450.
//! - `jumbo`: MTU 9000 everywhere.
//! - `lossy`: the clean topology with 2% of forwarded packets dropped at random by the router
//!   (iptables `statistic`). Every host's interface sends one packet per buffer
//!   (`gso_max_segs 1`: the kernel splits a GSO or TSO batch before it leaves the host, as a
//!   NIC does before the wire), so the router drops packets, not whole batches: a dropped
//!   batch of up to 44 QUIC datagrams made the loss a sender saw range from 1.5% to 3.1% of
//!   its packets from run to run.
//!
//! The caller's namespace gets `.253` on both bridges (and on the overlay), so it reaches every
//! host directly, without the router.

use crate::lab::{ip, run, Lab};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    Clean,
    Dind,
    Vxlan,
    Jumbo,
    Lossy,
}

impl Topology {
    pub const ALL: [Topology; 5] = [
        Topology::Clean,
        Topology::Dind,
        Topology::Vxlan,
        Topology::Jumbo,
        Topology::Lossy,
    ];

    pub fn parse(s: &str) -> Option<Topology> {
        Topology::ALL.into_iter().find(|t| t.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            Topology::Clean => "clean",
            Topology::Dind => "dind",
            Topology::Vxlan => "vxlan",
            Topology::Jumbo => "jumbo",
            Topology::Lossy => "lossy",
        }
    }

    /// The true path MTU between the server and a client (IP packet bytes).
    pub fn path_mtu(self) -> u32 {
        match self {
            Topology::Clean | Topology::Lossy => 1500,
            Topology::Dind | Topology::Vxlan => 1450,
            Topology::Jumbo => 9000,
        }
    }

    /// The random drop rate the router applies to forwarded packets.
    pub fn loss(self) -> f64 {
        if self == Topology::Lossy {
            0.02
        } else {
            0.0
        }
    }

    fn link_mtu(self) -> u32 {
        if self == Topology::Jumbo {
            9000
        } else {
            1500
        }
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Builds `topology` with host 0 on the server side and hosts 1..hosts on the client side, every
/// host link shaped at `mbit` (0: unshaped). Everything is deleted when the lab drops.
pub fn build(
    tag: &str,
    subnet: u8,
    hosts: usize,
    mbit: u32,
    topology: Topology,
) -> Result<Lab, String> {
    build_with_loss(tag, subnet, hosts, mbit, topology, topology.loss())
}

/// [`build`], with the router dropping `loss` (0..1) of forwarded packets at random instead of
/// the topology's own rate (`lossy` only; the other topologies ignore it).
pub fn build_with_loss(
    tag: &str,
    subnet: u8,
    hosts: usize,
    mbit: u32,
    topology: Topology,
    loss: f64,
) -> Result<Lab, String> {
    crate::lab::raise_neighbour_limits(hosts + 2);
    let probability = format!("{loss}");
    let pid = std::process::id() % 100_000;
    let (sa, sb) = (subnet, subnet.wrapping_add(1));
    let mtu = topology.link_mtu().to_string();
    let mut lab = Lab {
        bridge: format!("stl{tag}a{pid}"),
        subnet,
        hosts: Vec::new(),
        extra_ns: Vec::new(),
        extra_links: Vec::new(),
    };
    let bridge_b = format!("stl{tag}b{pid}");
    lab.extra_links.push(bridge_b.clone());
    for (br, s) in [(lab.bridge.clone(), sa), (bridge_b.clone(), sb)] {
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "mtu", &mtu])?;
        ip(&["addr", "add", &format!("198.18.{s}.253/24"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
    }
    // The router.
    let rt = format!("stl{tag}{pid}rt");
    ip(&["netns", "add", &rt])?;
    lab.extra_ns.push(rt.clone());
    for (side, br, s) in [("a", lab.bridge.clone(), sa), ("b", bridge_b.clone(), sb)] {
        let outer = format!("stl{tag}r{side}{pid}");
        let inner = format!("stl{tag}ri{side}{pid}");
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        lab.extra_links.push(outer.clone());
        let link_mtu = if topology == Topology::Dind && side == "b" {
            "1450".to_string()
        } else {
            mtu.clone()
        };
        ip(&["link", "set", &outer, "mtu", &link_mtu])?;
        ip(&["link", "set", &inner, "mtu", &link_mtu])?;
        ip(&["link", "set", &inner, "netns", &rt])?;
        ip(&[
            "-n",
            &rt,
            "link",
            "set",
            &inner,
            "name",
            &format!("eth{side}"),
        ])?;
        ip(&[
            "-n",
            &rt,
            "addr",
            "add",
            &format!("198.18.{s}.254/24"),
            "dev",
            &format!("eth{side}"),
        ])?;
        ip(&["-n", &rt, "link", "set", &format!("eth{side}"), "up"])?;
        ip(&["link", "set", &outer, "master", &br])?;
        ip(&["link", "set", &outer, "up"])?;
    }
    ip(&["-n", &rt, "link", "set", "lo", "up"])?;
    in_ns(&rt, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    match topology {
        Topology::Dind => in_ns(
            &rt,
            &[
                "iptables",
                "-A",
                "OUTPUT",
                "-p",
                "icmp",
                "--icmp-type",
                "fragmentation-needed",
                "-j",
                "DROP",
            ],
        )?,
        Topology::Lossy => in_ns(
            &rt,
            &[
                "iptables",
                "-A",
                "FORWARD",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
                "-j",
                "DROP",
            ],
        )?,
        _ => {}
    }
    // The hosts.
    for i in 0..hosts {
        let (s, br, last) = if i == 0 {
            (sa, lab.bridge.clone(), 1)
        } else {
            (sb, bridge_b.clone(), i)
        };
        let addr = format!("198.18.{s}.{last}");
        let gateway = format!("198.18.{s}.254");
        lab.add_host(tag, pid, i, &addr, &br, Some(&mtu), Some(&gateway), mbit)?;
        if topology == Topology::Lossy {
            let ns = lab.hosts[i].ns.clone();
            ip(&["-n", &ns, "link", "set", "eth0", "gso_max_segs", "1"])?;
        }
    }
    // Routes from the caller's namespace are direct (it sits on both bridges); a client-side
    // host reaches the server side only through the router.
    if topology == Topology::Vxlan {
        overlay(&mut lab, tag, pid, sa)?;
    }
    Ok(lab)
}

/// A VXLAN overlay over the underlay addresses: every host (and the caller's namespace) gets
/// `vx0` with an overlay address 10.S.0.x, and FDB entries to every other member.
fn overlay(lab: &mut Lab, tag: &str, pid: u32, sa: u8) -> Result<(), String> {
    let underlay: Vec<String> = lab
        .hosts
        .iter()
        .map(|h| h.addr.clone())
        .chain(std::iter::once(format!("198.18.{sa}.253")))
        .collect();
    let members = lab.hosts.len() + 1;
    for m in 0..members {
        let ns = lab.hosts.get(m).map(|h| h.ns.clone());
        let dev = if ns.is_some() {
            "vx0".to_string()
        } else {
            format!("stl{tag}vx{pid}")
        };
        let pre: Vec<&str> = match &ns {
            Some(ns) => vec!["-n", ns.as_str()],
            None => vec![],
        };
        let with = |args: &[&str]| -> Vec<String> {
            pre.iter()
                .chain(args.iter())
                .map(|s| s.to_string())
                .collect()
        };
        let lower = if ns.is_some() {
            "eth0".to_string()
        } else {
            lab.bridge.clone()
        };
        let cmd = with(&[
            "link",
            "add",
            &dev,
            "type",
            "vxlan",
            "id",
            "42",
            "dstport",
            "4789",
            "local",
            &underlay[m],
            "dev",
            &lower,
        ]);
        ip(&cmd.iter().map(String::as_str).collect::<Vec<_>>())?;
        if ns.is_none() {
            lab.extra_links.push(dev.clone());
        }
        for (o, other) in underlay.iter().enumerate() {
            if o == m {
                continue;
            }
            let mut args: Vec<&str> = vec![];
            if let Some(ns) = &ns {
                args.extend(["-n", ns.as_str()]);
            }
            args.extend([
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                &dev,
                "dst",
                other,
            ]);
            run("bridge", &args)?;
        }
        let last = if m < lab.hosts.len() { m + 1 } else { 253 };
        let addr = format!("10.{sa}.0.{last}");
        let cmd = with(&["addr", "add", &format!("{addr}/24"), "dev", &dev]);
        ip(&cmd.iter().map(String::as_str).collect::<Vec<_>>())?;
        let cmd = with(&["link", "set", &dev, "up"]);
        ip(&cmd.iter().map(String::as_str).collect::<Vec<_>>())?;
        if let Some(h) = lab.hosts.get_mut(m) {
            h.addr = addr;
        }
    }
    Ok(())
}

/// Whether an IPv4 packet of `size` bytes with DF set gets from host `from` to `to_addr`
/// (one ping, 1 s).
pub fn df_ping(lab: &Lab, from: usize, to_addr: &str, size: u32) -> bool {
    lab.command(from, "ping")
        .args([
            "-M",
            "do",
            "-c",
            "1",
            "-W",
            "1",
            "-s",
            &(size - 28).to_string(),
            to_addr,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
