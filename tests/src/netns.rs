//! Network namespaces made by a test, torn down when the guard drops. Addresses come from
//! 198.18.0.0/15, the range set aside for benchmarking (RFC 2544).

use std::process::Command;

/// A namespace holding one end of a veth pair; the other end stays in the caller's namespace.
pub struct Netns {
    pub name: String,
    /// The veth end in the caller's namespace.
    pub host_if: String,
    pub host_addr: String,
    pub ns_addr: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Netns {
    /// Creates namespace `stl<tag><pid>` linked to the caller by a veth pair, with
    /// 198.18.<subnet>.1/30 on the caller's side and .2 inside.
    pub fn new(tag: &str, subnet: u8) -> Netns {
        let pid = std::process::id() % 100_000;
        let n = Netns {
            name: format!("stl{tag}{pid}"),
            host_if: format!("stl{tag}h{pid}"),
            host_addr: format!("198.18.{subnet}.1"),
            ns_addr: format!("198.18.{subnet}.2"),
        };
        let peer = format!("stl{tag}n{pid}");
        let ok = ip(&["netns", "add", &n.name])
            && ip(&[
                "link", "add", &n.host_if, "type", "veth", "peer", "name", &peer,
            ])
            && ip(&["link", "set", &peer, "netns", &n.name])
            && ip(&[
                "addr",
                "add",
                &format!("{}/30", n.host_addr),
                "dev",
                &n.host_if,
            ])
            && ip(&["link", "set", &n.host_if, "up"])
            && ip(&[
                "-n",
                &n.name,
                "addr",
                "add",
                &format!("{}/30", n.ns_addr),
                "dev",
                &peer,
            ])
            && ip(&["-n", &n.name, "link", "set", &peer, "up"])
            && ip(&["-n", &n.name, "link", "set", "lo", "up"]);
        assert!(
            ok,
            "cannot build network namespace {} (needs root and iproute2)",
            n.name
        );
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it the pair.
        ip(&["netns", "del", &self.name]);
        ip(&["link", "del", &self.host_if]);
    }
}
