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

    /// Bytes host `i` has sent through its upload shaper so far, as the shaper counts them: each
    /// packet whole. The bridge port's count ([`Lab::host_sent_bytes`]) takes a GSO or TSO
    /// batch's headers once (about 2.5% less for a QUIC sender at 1500 bytes). 0 when the link
    /// is not shaped or `tc` cannot tell.
    pub fn host_shaped_sent_bytes(&self, i: usize) -> u64 {
        shaper_sent_bytes(Some(&self.hosts[i].ns), "eth0")
    }

    /// Bytes host `i`'s download shaper (on its bridge port) has passed so far, each packet
    /// whole, as [`Lab::host_shaped_sent_bytes`] counts the upload side.
    pub fn host_shaped_received_bytes(&self, i: usize) -> u64 {
        shaper_sent_bytes(None, &self.hosts[i].port)
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

/// What the root qdisc on `dev` (in namespace `ns` when given) has sent, by `tc -s`; 0 when
/// there is none or `tc` cannot tell.
fn shaper_sent_bytes(ns: Option<&str>, dev: &str) -> u64 {
    let mut c = Command::new("tc");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    let Ok(out) = c.args(["-s", "qdisc", "show", "dev", dev]).output() else {
        return 0;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    // "qdisc tbf 8001: root ... \n Sent 284237031 bytes 190317 pkt ...": the root's line.
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Sent "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
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
