//! netprobe: what the network paths look like, per connection.
//!
//! The eBPF programs in `ebpf/` (tc, on every interface that is up, loopback aside) count
//! packets and bytes per flow, keep the largest packet each way, and parse ICMP "fragmentation
//! needed" / ICMPv6 "packet too big" into a next-hop MTU per destination. This module loads and
//! attaches them with aya, reads their maps, and joins them with quinn's own statistics into one
//! view per QUIC connection ([`PathView`]): path MTU, loss, RTT, congestion window.
//!
//! Without BPF privileges, without the object file, or on a kernel that refuses the programs,
//! the daemon logs one line and the view comes from quinn's statistics alone.

pub mod policy;
pub mod view;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, PerCpuArray, PerCpuHashMap};
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{tc, BtfTracePoint, CgroupAttachMode, SchedClassifier, SockOps, TcAttachType};
use starling_netprobe_common::{FlowKey, FlowStats, PmtuEntry, TcpStats};

use crate::config::NetprobeConfig;

pub use view::{join, PathView, ProbeReport, TcpView};

/// The object file's name beside the executable (where `cargo xtask build-ebpf` puts it).
pub const OBJECT_NAME: &str = "starling-probes.bpf.o";

enum State {
    Off(String),
    On {
        bpf: aya::Ebpf,
        /// Interfaces the flow programs are attached to, with their links.
        attached: HashMap<String, Vec<(&'static str, SchedClassifierLinkId)>>,
        /// The cgroup whose TCP connections sock_ops sees, or why none.
        tcp: Result<PathBuf, String>,
        /// Whether the kfree_skb drop counter runs, or why not.
        drops: Result<(), String>,
    },
}

/// Kernel packet drops for one reason: all of them, and those on the daemon's own sockets.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DropCount {
    pub reason: String,
    pub all: u64,
    pub ours: u64,
}

/// Drop reason names from the kfree_skb tracepoint's format (`{ 6, "SOCKET_RCVBUFF" }`), when
/// tracefs is readable; else numbers.
fn drop_reason_names() -> HashMap<u32, String> {
    let text = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|d| std::fs::read_to_string(format!("{d}/events/skb/kfree_skb/format")).ok())
        .unwrap_or_default();
    let mut out = HashMap::new();
    for part in text.split('{').skip(1) {
        let Some((num, rest)) = part.split_once(',') else {
            continue;
        };
        let Ok(n) = num.trim().parse::<u32>() else {
            continue;
        };
        if let Some(name) = rest.split('"').nth(1) {
            out.insert(n, name.to_string());
        }
    }
    out
}

/// The MSS a connection advertises toward a destination behind an MTU black hole when no
/// better size is known: fits a 1200-byte path (IPv4 + TCP headers are 40 bytes).
pub const SAFE_MSS: u32 = 1160;

pub struct NetProbe {
    state: Mutex<State>,
    only: Vec<String>,
}

/// Network interfaces that are up, loopback aside, with their MTUs (from /sys/class/net, which
/// `ip netns exec` remounts for the namespace).
pub fn interfaces() -> Vec<(String, u32)> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut out: Vec<(String, u32)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
            let flags =
                u32::from_str_radix(read("flags").trim().trim_start_matches("0x"), 16).ok()?;
            const IFF_UP: u32 = 0x1;
            const IFF_LOOPBACK: u32 = 0x8;
            if flags & IFF_UP == 0 || flags & IFF_LOOPBACK != 0 {
                return None;
            }
            let mtu = read("mtu").trim().parse().ok()?;
            Some((name, mtu))
        })
        .collect();
    out.sort();
    out
}

/// The largest UDP payload worth trying for QUIC: the largest interface MTU less the IPv4 and
/// UDP headers, at least 1200 (quinn's floor) and at least quinn's own default (1452) when no
/// interface is known.
pub fn udp_upper_bound() -> u16 {
    let mtu = interfaces().iter().map(|(_, m)| *m).max().unwrap_or(1500);
    (mtu.saturating_sub(28)).clamp(1200, 65_507) as u16
}

fn default_object() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STARLING_PROBES").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join(OBJECT_NAME))
}

impl NetProbe {
    /// Probes not loaded yet ([`NetProbe::load`] fills them in): paths are measured with
    /// QUIC's own statistics meanwhile.
    pub fn pending(cfg: &NetprobeConfig) -> NetProbe {
        if !cfg.enabled {
            // Nothing to load: say so at once.
            return NetProbe::start(cfg);
        }
        NetProbe {
            state: Mutex::new(State::Off("the eBPF probes are still loading".into())),
            only: cfg.interfaces.clone(),
        }
    }

    /// Loads and attaches the probes into this (pending) one; the socket `cookie` is the
    /// peer endpoint's. Loading parses the kernel's BTF and runs the verifier (about 70 ms of
    /// CPU today; a CPU-second on earlier builds): a daemon serves before it, and calls it on
    /// a low-priority thread (50 daemons starting at once on 2 cores once spent tens of
    /// seconds in it, and their peers' handshakes timed out meanwhile).
    pub fn load(&self, cfg: &NetprobeConfig, cookie: Option<u64>) {
        if !cfg.enabled {
            return;
        }
        let loaded = NetProbe::start(cfg);
        let state = std::mem::replace(&mut *loaded.lock(), State::Off(String::new()));
        *self.lock() = state;
        if let Some(c) = cookie {
            self.watch_socket(c);
        }
    }

    /// Loads and attaches the probes, or explains in one log line why not.
    pub fn start(cfg: &NetprobeConfig) -> NetProbe {
        let state = if !cfg.enabled {
            tracing::info!("eBPF probes disabled (netprobe.enabled = false); paths are measured with QUIC's own statistics only");
            State::Off("disabled by netprobe.enabled = false".into())
        } else {
            let object = cfg.object.clone().or_else(default_object);
            match object.as_deref().map(load) {
                Some(Ok(mut bpf)) => {
                    let tcp = attach_sock_ops(&mut bpf);
                    let drops = attach_drops(&mut bpf);
                    if let Err(why) = &drops {
                        tracing::warn!("eBPF kernel-drop probe unavailable ({why}); drops are read from the socket's counter only");
                    }
                    match &tcp {
                        Ok(cg) => {
                            tracing::info!(cgroup = %cg.display(), "eBPF TCP probes attached to the daemon's cgroup")
                        }
                        Err(why) => tracing::warn!(
                            "eBPF TCP probes unavailable ({why}); TCP paths are not measured"
                        ),
                    }
                    State::On {
                        bpf,
                        attached: HashMap::new(),
                        tcp,
                        drops,
                    }
                }
                Some(Err(why)) => {
                    tracing::warn!("eBPF probes unavailable ({why}); paths are measured with QUIC's own statistics only");
                    State::Off(why)
                }
                None => {
                    let why = "no probe object (set netprobe.object)".to_string();
                    tracing::warn!("eBPF probes unavailable ({why}); paths are measured with QUIC's own statistics only");
                    State::Off(why)
                }
            }
        };
        let probe = NetProbe {
            state: Mutex::new(state),
            only: cfg.interfaces.clone(),
        };
        probe.attach_new();
        give_back_freed_memory();
        probe
    }

    /// Whether the probes run, and why not.
    pub fn status(&self) -> Result<Vec<String>, String> {
        match &*self.lock() {
            State::Off(why) => Err(why.clone()),
            State::On {
                attached,
                tcp,
                drops,
                ..
            } => {
                let mut v: Vec<String> = attached.keys().cloned().collect();
                v.sort();
                v.push(match tcp {
                    Ok(cg) => format!("sock_ops on cgroup {}", cg.display()),
                    Err(why) => format!("no sock_ops: {why}"),
                });
                v.push(match drops {
                    Ok(()) => "kfree_skb".to_string(),
                    Err(why) => format!("no kfree_skb: {why}"),
                });
                Ok(v)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches the flow programs to interfaces that came up since the last call, and lets go
    /// of the links of those that went away (a pod's veth, a namespace's bridge port): each
    /// link holds a descriptor, and on a node where pods come and go they piled up for the
    /// daemon's life.
    pub fn attach_new(&self) {
        let mut st = self.lock();
        let State::On { bpf, attached, .. } = &mut *st else {
            return;
        };
        let now = interfaces();
        let gone: Vec<String> = attached
            .keys()
            .filter(|a| !now.iter().any(|(n, _)| n == *a))
            .cloned()
            .collect();
        for name in gone {
            for (prog, id) in attached.remove(&name).unwrap_or_default() {
                let link = bpf
                    .program_mut(prog)
                    .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
                    .and_then(|p| p.take_link(id).ok());
                // Dropping the link closes its descriptor; the kernel already removed the
                // interface's hooks.
                drop(link);
            }
            tracing::debug!(interface = %name, "interface gone; eBPF flow probe links released");
        }
        for (name, _) in now {
            if attached.contains_key(&name) || (!self.only.is_empty() && !self.only.contains(&name))
            {
                continue;
            }
            match attach(bpf, &name) {
                Ok(links) => {
                    tracing::info!(interface = %name, "eBPF flow probes attached");
                    attached.insert(name, links);
                }
                Err(e) => {
                    tracing::warn!(interface = %name, error = %e, "cannot attach eBPF flow probes")
                }
            }
        }
    }

    /// Every flow's counters, summed over CPUs (empty without probes).
    pub fn flows(&self) -> HashMap<FlowKey, FlowStats> {
        self.read_map("FLOWS", |m| {
            let flows = PerCpuHashMap::<_, FlowKey, FlowStats>::try_from(m).ok()?;
            Some(
                flows
                    .iter()
                    .flatten()
                    .map(|(k, per_cpu)| {
                        let mut total = FlowStats::default();
                        for s in per_cpu.iter() {
                            total.add(s);
                        }
                        (k, total)
                    })
                    .collect(),
            )
        })
        .unwrap_or_default()
    }

    /// Next-hop MTUs learnt from ICMP, per destination.
    pub fn icmp_mtus(&self) -> HashMap<IpAddr, u32> {
        self.read_map("PMTU", |m| {
            let pmtu = BpfHashMap::<_, [u8; 16], PmtuEntry>::try_from(m).ok()?;
            Some(
                pmtu.iter()
                    .flatten()
                    .map(|(k, e)| (view::unmap(k), e.mtu))
                    .collect(),
            )
        })
        .unwrap_or_default()
    }

    /// TCP connections of the daemon's cgroup, as sock_ops last saw them.
    pub fn tcp(&self) -> Vec<(FlowKey, TcpStats)> {
        self.read_map("TCP", |m| {
            let tcp = BpfHashMap::<_, FlowKey, TcpStats>::try_from(m).ok()?;
            Some(tcp.iter().flatten().collect())
        })
        .unwrap_or_default()
    }

    /// Counts drops on the socket with this cookie (SO_COOKIE) as the daemon's own.
    pub fn watch_socket(&self, cookie: u64) {
        let mut st = self.lock();
        let State::On {
            bpf, drops: Ok(()), ..
        } = &mut *st
        else {
            return;
        };
        if let Some(map) = bpf.map_mut("OUR_SOCKETS") {
            if let Ok(mut m) = BpfHashMap::<_, u64, u8>::try_from(map) {
                let _ = m.insert(cookie, 1, 0);
            }
        }
    }

    /// Kernel drops by reason (nonzero ones, most first), or None without the probe.
    pub fn kernel_drops(&self) -> Option<Vec<DropCount>> {
        let st = self.lock();
        let State::On {
            bpf, drops: Ok(()), ..
        } = &*st
        else {
            return None;
        };
        let read = |name: &str| -> Vec<u64> {
            let Some(map) = bpf.map(name) else {
                return Vec::new();
            };
            let Ok(arr) = PerCpuArray::<_, u64>::try_from(map) else {
                return Vec::new();
            };
            (0..starling_netprobe_common::DROP_REASONS)
                .map(|i| arr.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
                .collect()
        };
        let (all, ours) = (read("DROPS"), read("OUR_DROPS"));
        let names = drop_reason_names();
        let mut out: Vec<DropCount> = all
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| DropCount {
                reason: names
                    .get(&(i as u32))
                    .cloned()
                    .unwrap_or_else(|| format!("reason {i}")),
                all: *n,
                ours: ours.get(i).copied().unwrap_or(0),
            })
            .collect();
        out.sort_by_key(|d| std::cmp::Reverse(d.all));
        Some(out)
    }

    /// Destinations whose new TCP connections advertise a clamped MSS.
    pub fn clamps(&self) -> HashMap<IpAddr, u32> {
        self.read_map("CLAMP", |m| {
            let c = BpfHashMap::<_, [u8; 16], u32>::try_from(m).ok()?;
            Some(
                c.iter()
                    .flatten()
                    .map(|(k, v)| (view::unmap(k), v))
                    .collect(),
            )
        })
        .unwrap_or_default()
    }

    /// Reads the map `name` with `read`; None without probes or without that map.
    fn read_map<T>(
        &self,
        name: &str,
        read: impl FnOnce(&aya::maps::Map) -> Option<T>,
    ) -> Option<T> {
        let st = self.lock();
        let State::On { bpf, .. } = &*st else {
            return None;
        };
        read(bpf.map(name)?)
    }

    /// An origin transfer to `ip` stalled. If no full-size segment ever arrived from it on any
    /// TCP connection (a path that drops large packets and the ICMP that would say so: an MTU
    /// black hole), new connections to it advertise `mss` (or [`SAFE_MSS`]) from now on, so the
    /// origin's segments fit. Returns the MSS set, if any.
    pub fn stalled(&self, ip: IpAddr, mss: Option<u32>) -> Option<u32> {
        let key = view::key_addr(ip);
        let flows: Vec<FlowStats> = self
            .flows()
            .into_iter()
            .filter(|(k, _)| k.proto == 6 && k.remote == key)
            .map(|(_, s)| s)
            .collect();
        // Evidence: we sent requests, and nothing near a full segment ever came back.
        let sent = flows.iter().any(|f| f.tx_packets > 0);
        let largest = flows.iter().map(|f| f.rx_max).max().unwrap_or(0);
        if !sent || largest >= 1000 {
            return None;
        }
        let mss = mss.unwrap_or(SAFE_MSS).clamp(536, 65_495);
        let mut st = self.lock();
        let State::On {
            bpf, tcp: Ok(_), ..
        } = &mut *st
        else {
            return None;
        };
        let map = bpf.map_mut("CLAMP")?;
        let mut clamp = BpfHashMap::<_, [u8; 16], u32>::try_from(map).ok()?;
        if clamp.get(&key, 0).ok() == Some(mss) {
            return None;
        }
        clamp.insert(key, mss, 0).ok()?;
        tracing::warn!(%ip, largest_packet_seen = largest, mss, "MTU black hole suspected on the path from this origin (no full-size TCP segment ever arrived); new connections to it advertise a smaller MSS");
        Some(mss)
    }

    /// Drops flows not seen for `idle` (the map is LRU-bounded too; this keeps it current).
    pub fn expire(&self, idle: std::time::Duration) {
        let now = monotonic_ns();
        let stale: Vec<FlowKey> = self
            .flows()
            .into_iter()
            .filter(|(_, s)| now.saturating_sub(s.last_ns) > idle.as_nanos() as u64)
            .map(|(k, _)| k)
            .collect();
        let mut st = self.lock();
        let State::On { bpf, .. } = &mut *st else {
            return;
        };
        if let Some(map) = bpf.map_mut("FLOWS") {
            if let Ok(mut flows) = PerCpuHashMap::<_, FlowKey, FlowStats>::try_from(map) {
                for k in stale {
                    let _ = flows.remove(&k);
                }
            }
        }
    }
}

/// Runs the calling thread (only it: Linux keeps a nice value per thread) at nice 10.
pub fn lower_this_threads_priority() {
    // SAFETY: plain system calls on this thread's own ID.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if r != 0 {
        tracing::debug!(
            "cannot lower the probe loader's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Returns the heap's free pages to the kernel. The kernel's BTF, parsed to load the probes,
/// is tens of MiB of small allocations freed at once; glibc keeps such pages in the loading
/// thread's arena, where they stayed in the daemon's RSS for its whole life.
fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: bpf_ktime_get_ns()'s clock.
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn load(path: &Path) -> Result<aya::Ebpf, String> {
    // The loader parses the kernel's BTF itself. `Ebpf::load_file` parses it a second time
    // while the first is alive: at about 17 MiB each, that pair was a daemon's peak heap.
    let mut bpf = aya::EbpfLoader::new()
        .load_file(path)
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    for name in ["flow_ingress", "flow_egress"] {
        let prog: &mut SchedClassifier = bpf
            .program_mut(name)
            .ok_or_else(|| format!("{} has no program {name}", path.display()))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        prog.load()
            .map_err(|e| format!("the kernel refused {name}: {e}"))?;
    }
    Ok(bpf)
}

/// The cgroup v2 directory of this process: its own, from /proc/self/cgroup, under the
/// cgroup2 mount (mounted privately when none is visible, as under `ip netns exec`).
fn own_cgroup() -> Result<PathBuf, String> {
    let rel = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .ok_or("no cgroup v2 membership in /proc/self/cgroup")?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mnt = mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .map(Ok)
        .unwrap_or_else(|| {
            let dir = PathBuf::from("/run/starling/cgroup2");
            std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
            rustix::mount::mount(
                "none",
                &dir,
                "cgroup2",
                rustix::mount::MountFlags::empty(),
                None,
            )
            .map_err(|e| format!("mount cgroup2 on {}: {e}", dir.display()))?;
            Ok::<PathBuf, String>(dir)
        })?;
    Ok(mnt.join(rel.trim_start_matches('/')))
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

fn attach_drops(bpf: &mut aya::Ebpf) -> Result<(), String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    let prog: &mut BtfTracePoint = bpf
        .program_mut("kfree_skb")
        .ok_or("no program kfree_skb")?
        .try_into()
        .map_err(|e| format!("kfree_skb: {e}"))?;
    prog.load("kfree_skb", &btf)
        .map_err(|e| format!("the kernel refused kfree_skb: {}", chain(&e)))?;
    prog.attach()
        .map_err(|e| format!("attach kfree_skb: {}", chain(&e)))?;
    Ok(())
}

fn attach_sock_ops(bpf: &mut aya::Ebpf) -> Result<PathBuf, String> {
    let cg = own_cgroup()?;
    let dir = std::fs::File::open(&cg).map_err(|e| format!("open {}: {e}", cg.display()))?;
    let prog: &mut SockOps = bpf
        .program_mut("tcp_paths")
        .ok_or("no program tcp_paths")?
        .try_into()
        .map_err(|e| format!("tcp_paths: {e}"))?;
    prog.load()
        .map_err(|e| format!("the kernel refused tcp_paths: {e}"))?;
    prog.attach(dir, CgroupAttachMode::Single)
        .map_err(|e| format!("attach tcp_paths to {}: {}", cg.display(), chain(&e)))?;
    Ok(cg)
}

fn attach(
    bpf: &mut aya::Ebpf,
    iface: &str,
) -> Result<Vec<(&'static str, SchedClassifierLinkId)>, String> {
    // An existing clsact qdisc is fine.
    let _ = tc::qdisc_add_clsact(iface);
    let mut links = Vec::new();
    for (name, at) in [
        ("flow_ingress", TcAttachType::Ingress),
        ("flow_egress", TcAttachType::Egress),
    ] {
        let prog: &mut SchedClassifier = bpf
            .program_mut(name)
            .ok_or_else(|| format!("no program {name}"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        match prog.attach(iface, at) {
            Ok(id) => links.push((name, id)),
            Err(e) => {
                // Not half attached: the links made so far go too.
                for (prog, id) in links {
                    let link = bpf
                        .program_mut(prog)
                        .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
                        .and_then(|p| p.take_link(id).ok());
                    drop(link);
                }
                return Err(format!("{name}: {e}"));
            }
        }
    }
    Ok(links)
}
