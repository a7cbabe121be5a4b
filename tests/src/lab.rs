//! A network lab: one namespace per host, each joined to a bridge by a veth pair, every link
//! shaped with tbf in both directions (the host's egress is its upload, the bridge port's
//! egress its download). Addresses are 198.18.<subnet>.<host+1>/24 (RFC 2544's benchmarking
//! range); the bridge itself is .254, so the caller's namespace reaches every host (to scrape
//! metrics and wait for ports). Everything is deleted when the guard drops.

use std::process::Command;

pub struct Lab {
    pub bridge: String,
    pub subnet: u8,
    pub hosts: Vec<Host>,
    /// More namespaces (a router) and links (bridges, veth ends) a topology added, deleted on
    /// drop.
    pub(crate) extra_ns: Vec<String>,
    pub(crate) extra_links: Vec<String>,
}

pub struct Host {
    pub ns: String,
    pub addr: String,
    /// The bridge-side veth end, in the caller's namespace.
    pub(crate) port: String,
}

pub(crate) fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub(crate) fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

/// tbf at `mbit` on `dev` (in namespace `ns` when given): a burst of a few packets' worth at
/// line rate and about 20 ms of queue.
pub(crate) fn shape(ns: Option<&str>, dev: &str, mbit: u32) -> Result<(), String> {
    let rate = format!("{mbit}mbit");
    // At least 32 KiB, and about 1 ms worth of line rate.
    let burst = format!("{}", (mbit as u64 * 1000 / 8).max(32 * 1024));
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend([
        "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency",
        "20ms",
    ]);
    run("tc", &args)
}

impl Lab {
    /// `hosts` namespaces on one bridge, every link shaped at `mbit` (0: unshaped).
    pub fn new(tag: &str, subnet: u8, hosts: usize, mbit: u32) -> Result<Lab, String> {
        raise_neighbour_limits(hosts);
        let pid = std::process::id() % 100_000;
        let mut lab = Lab {
            bridge: format!("stl{tag}b{pid}"),
            subnet,
            hosts: Vec::new(),
            extra_ns: Vec::new(),
            extra_links: Vec::new(),
        };
        ip(&["link", "add", &lab.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("198.18.{subnet}.254/24"),
            "dev",
            &lab.bridge,
        ])?;
        ip(&["link", "set", &lab.bridge, "up"])?;
        for i in 0..hosts {
            let addr = format!("198.18.{subnet}.{}", i + 1);
            let bridge = lab.bridge.clone();
            lab.add_host(tag, pid, i, &addr, &bridge, None, None, mbit)?;
        }
        Ok(lab)
    }

    /// Host `i`: a namespace whose `eth0` (a veth, `mtu` when given) has `addr`/24 and is a
    /// port of `bridge`, with a default route via `gateway` when given, every direction
    /// shaped at `mbit` (0: unshaped).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_host(
        &mut self,
        tag: &str,
        pid: u32,
        i: usize,
        addr: &str,
        bridge: &str,
        mtu: Option<&str>,
        gateway: Option<&str>,
        mbit: u32,
    ) -> Result<(), String> {
        let h = Host {
            ns: format!("stl{tag}{pid}h{i}"),
            addr: addr.to_string(),
            port: format!("stl{tag}{i}p{pid}"),
        };
        let inner = format!("stl{tag}{i}i{pid}");
        ip(&["netns", "add", &h.ns])?;
        self.hosts.push(h);
        let h = &self.hosts[self.hosts.len() - 1];
        ip(&[
            "link", "add", &h.port, "type", "veth", "peer", "name", &inner,
        ])?;
        if let Some(mtu) = mtu {
            ip(&["link", "set", &h.port, "mtu", mtu])?;
            ip(&["link", "set", &inner, "mtu", mtu])?;
        }
        ip(&["link", "set", &inner, "netns", &h.ns])?;
        ip(&["-n", &h.ns, "link", "set", &inner, "name", "eth0"])?;
        ip(&[
            "-n",
            &h.ns,
            "addr",
            "add",
            &format!("{}/24", h.addr),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &h.ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
        if let Some(gw) = gateway {
            ip(&["-n", &h.ns, "route", "add", "default", "via", gw])?;
        }
        ip(&["link", "set", &h.port, "master", bridge])?;
        ip(&["link", "set", &h.port, "up"])?;
        if mbit > 0 {
            shape(Some(&h.ns), "eth0", mbit)?;
            shape(None, &h.port, mbit)?;
        }
        Ok(())
    }

    /// `program args...` inside host `i`'s namespace. `ip netns exec` execs the program, so
    /// the child's PID is the program's.
    /// Host `i` drops `probability` (0..1) of its packets at random, each way (iptables'
    /// statistic match: this kernel has no netem).
    pub fn drop_at_random(&self, i: usize, probability: f64) -> Result<(), String> {
        let p = format!("{probability}");
        for chain in ["INPUT", "OUTPUT"] {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.hosts[i].ns,
                    "iptables",
                    "-A",
                    chain,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            )?;
        }
        Ok(())
    }

    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns]).arg(program);
        c
    }

    /// Bytes host `i` has sent on its link so far (what its bridge port received: IP packets
    /// with their Ethernet headers, every protocol, overlay encapsulation included).
    pub fn host_sent_bytes(&self, i: usize) -> u64 {
        self.port_counter(i, "rx_bytes")
    }

    /// What host `i`'s upload shaper has counted so far: every packet whole (the bridge
    /// port's count, [`Lab::host_sent_bytes`], takes a GSO or TSO batch's headers once: about
    /// 2.5% less for a QUIC sender at 1500 bytes), and what it dropped.
    pub fn host_upload_shaper(&self, i: usize) -> ShaperCount {
        shaper_count(Some(&self.hosts[i].ns), "eth0")
    }

    /// What host `i`'s download shaper (on its bridge port) has counted so far, as
    /// [`Lab::host_upload_shaper`] counts the upload side.
    pub fn host_download_shaper(&self, i: usize) -> ShaperCount {
        shaper_count(None, &self.hosts[i].port)
    }

    /// Bytes host `i`'s link carried to it (its download side).
    pub fn host_received_bytes(&self, i: usize) -> u64 {
        self.port_counter(i, "tx_bytes")
    }

    /// A counter of host `i`'s bridge port (0 when unreadable).
    fn port_counter(&self, i: usize, name: &str) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/{name}", self.hosts[i].port);
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// What a link's shaper (its root qdisc) has counted, by `tc -s`; zeros when the link is not
/// shaped or `tc` cannot tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShaperCount {
    /// Bytes passed, each packet with all its headers.
    pub bytes: u64,
    /// Enqueues refused because the queue was full. A GSO batch is one enqueue, so one drop
    /// may be ten packets.
    pub dropped: u64,
}

impl ShaperCount {
    /// What was counted since `before`.
    pub fn since(self, before: ShaperCount) -> ShaperCount {
        ShaperCount {
            bytes: self.bytes.saturating_sub(before.bytes),
            dropped: self.dropped.saturating_sub(before.dropped),
        }
    }

    /// Reads the root qdisc's line of `tc -s qdisc show`: "qdisc tbf 8001: root ...\n Sent
    /// 284237031 bytes 190317 pkt (dropped 205, overlimits 67914 requeues 0)".
    fn parse(text: &str) -> ShaperCount {
        let Some(rest) = text.lines().find_map(|l| l.trim().strip_prefix("Sent ")) else {
            return ShaperCount::default();
        };
        let number = |s: Option<&str>| s.and_then(|n| n.trim_end_matches(',').parse().ok());
        let bytes = number(rest.split_whitespace().next()).unwrap_or(0);
        let dropped = rest
            .split_once("(dropped ")
            .and_then(|(_, d)| number(d.split_whitespace().next()))
            .unwrap_or(0);
        ShaperCount { bytes, dropped }
    }
}

fn shaper_count(ns: Option<&str>, dev: &str) -> ShaperCount {
    let mut c = Command::new("tc");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    match c.args(["-s", "qdisc", "show", "dev", dev]).output() {
        Ok(out) => ShaperCount::parse(&String::from_utf8_lossy(&out.stdout)),
        Err(_) => ShaperCount::default(),
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.extra_ns {
            let _ = ip(&["netns", "del", ns]);
        }
        for l in &self.extra_links {
            let _ = ip(&["link", "del", l]);
        }
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
            let _ = ip(&["link", "del", &h.port]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Makes room in the kernel's neighbour (ARP) table for `hosts` namespaces that may all talk
/// to each other. Its limits (`net.ipv4.neigh.default.gc_thresh1..3`) count entries across
/// every namespace; at the default 1,024, 50 daemons with 16 parents each overflowed it
/// ("neighbor table overflow" in dmesg), sends failed with ENOBUFS, and thousands of QUIC
/// handshakes timed out: a lab artifact that looked like a swarm problem. The limits are only
/// raised, never lowered (labs of parallel tests share them), and cost nothing until used.
pub fn raise_neighbour_limits(hosts: usize) {
    let want = 1024 + 2 * hosts * hosts;
    for (key, value) in [
        ("gc_thresh3", want),
        ("gc_thresh2", want / 2),
        ("gc_thresh1", want / 8),
    ] {
        let path = format!("/proc/sys/net/ipv4/neigh/default/{key}");
        let now: usize = std::fs::read_to_string(&path)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if now < value {
            let _ = std::fs::write(&path, value.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ShaperCount;

    #[test]
    fn a_shapers_count_is_read_from_its_root_line() {
        let text = "qdisc tbf 8001: root refcnt 2 rate 100Mbit burst 32Kb lat 20ms \n \
                    Sent 284237031 bytes 190317 pkt (dropped 205, overlimits 67914 requeues 0) \n \
                    backlog 0b 0p requeues 0\n";
        assert_eq!(
            ShaperCount::parse(text),
            ShaperCount {
                bytes: 284_237_031,
                dropped: 205
            }
        );
        assert_eq!(ShaperCount::parse(""), ShaperCount::default());
        let later = ShaperCount {
            bytes: 300_000_000,
            dropped: 210,
        };
        assert_eq!(
            later.since(ShaperCount::parse(text)),
            ShaperCount {
                bytes: 15_762_969,
                dropped: 5
            }
        );
    }
}
