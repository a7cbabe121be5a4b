//! `sched_load` (run by `cargo xtask bench scheduler`): a load generator for one
//! scheduler over the real path: the scheduler service (`StandaloneScheduler`, what
//! `starling scheduler` serves) on a QUIC endpoint with mutual TLS, on its own thread with a
//! current-thread runtime (one core), and clients on another thread calling it the way
//! daemons do (wire kinds 5 and 6, JSON bodies).
//!
//! 1. Registration: `--peers` peers each announce `--tasks` tasks in full (a bitmap of
//!    `--pieces` pieces, a random tenth held). The scheduler's resident memory before and
//!    after gives the memory per peer-task.
//! 2. Announcements: incremental, as daemons send every 500 ms: one task, a few pieces added,
//!    and link reports, from random peers, for `--seconds`.
//! 3. Parent queries: `CandidatesCall`s for random (peer, task) pairs, 16 parents each.
//!
//! For each phase: calls per second of wall time, calls per CPU-second of the scheduler's
//! thread (what one core sustains), and latency percentiles. The clients keep `--inflight`
//! calls outstanding over `--conns` connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use starling::core::{Digest, TaskId};
use starling::scheduler::service::{CandidatesCall, SchedulerService, StandaloneScheduler};
use starling::scheduler::{Announce, Holding, LinkReport, Place, SchedulerConfig};
use starling::transport::tls::ClusterCa;
use starling::transport::wire::Request as Wire;
use starling::transport::{Node, Parent};

#[derive(Clone, Copy)]
struct Opts {
    peers: usize,
    tasks: usize,
    pieces: usize,
    seconds: u64,
    conns: usize,
    inflight: usize,
}

fn main() -> Result<()> {
    let mut o = Opts {
        peers: 10_000,
        tasks: 100,
        pieces: 1024,
        seconds: 10,
        conns: 32,
        inflight: 256,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v: usize = it
            .next()
            .with_context(|| format!("{a} needs a value"))?
            .parse()
            .with_context(|| format!("{a} takes a number"))?;
        match a.as_str() {
            "--peers" => o.peers = v,
            "--tasks" => o.tasks = v,
            "--pieces" => o.pieces = v,
            "--seconds" => o.seconds = v as u64,
            "--conns" => o.conns = v.max(1),
            "--inflight" => o.inflight = v.max(1),
            _ => bail!(
                "unknown flag {a}: use --peers, --tasks, --pieces, --seconds, --conns, --inflight"
            ),
        }
    }
    let ca = ClusterCa::generate()?;
    let server_id = ca.issue("starling-scheduler")?;
    let client_id = ca.issue("starling-load")?;
    // The scheduler: one thread, one current-thread runtime.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let cpu = Arc::new(AtomicU64::new(0));
    let cpu_probe = cpu.clone();
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let node = Node::bind("127.0.0.1:0".parse()?, &server_id)?;
                let service = SchedulerService::new(SchedulerConfig {
                    ttl: Duration::from_secs(3600),
                    ..SchedulerConfig::default()
                });
                let _serving = node.serve(Arc::new(StandaloneScheduler(service)), Arc::new(|_| {}));
                addr_tx.send(node.local_addr()?)?;
                // Report this thread's CPU time every 50 ms.
                loop {
                    cpu_probe.store(thread_cpu_ns(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })?;
    let addr = addr_rx.recv_timeout(Duration::from_secs(10))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = Node::bind("127.0.0.1:0".parse()?, &client_id)?;
        let mut conns = Vec::new();
        for _ in 0..o.conns {
            conns.push(client.connect(addr).await?);
        }
        let conns = Arc::new(conns);
        let tasks: Arc<Vec<TaskId>> = Arc::new(
            (0..o.tasks)
                .map(|t| TaskId::for_content(Digest::of(format!("load task {t}").as_bytes())))
                .collect(),
        );
        println!(
            "bench scheduler: {} peers x {} tasks x {} pieces; one scheduler thread; {} connections, {} calls in flight",
            o.peers, o.tasks, o.pieces, o.conns, o.inflight
        );
        let rss0 = rss_kib();
        let reg = phase(&conns, &cpu, o.inflight, Load::Register(o.peers), &o, &tasks).await?;
        let rss1 = rss_kib();
        let per = (rss1.saturating_sub(rss0) as f64 * 1024.0) / (o.peers * o.tasks) as f64;
        report("register (full, all tasks)", &reg);
        println!(
            "  scheduler memory: {:.0} MiB more for {} peer-tasks: {:.0} bytes per peer-task (process RSS)",
            rss1.saturating_sub(rss0) as f64 / 1024.0,
            o.peers * o.tasks,
            per
        );
        let ann = phase(&conns, &cpu, o.inflight, Load::Announce, &o, &tasks).await?;
        report("announce (incremental)", &ann);
        let cand = phase(&conns, &cpu, o.inflight, Load::Candidates, &o, &tasks).await?;
        report("parent query (16 parents)", &cand);
        Ok::<(), anyhow::Error>(())
    })
}

#[derive(Clone, Copy)]
enum Load {
    Register(usize),
    Announce,
    Candidates,
}

struct Outcome {
    calls: u64,
    wall: f64,
    cpu: f64,
    lat_us: Vec<u64>,
}

fn report(what: &str, o: &Outcome) {
    let pct = |p: f64| {
        if o.lat_us.is_empty() {
            0.0
        } else {
            o.lat_us[((o.lat_us.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    println!(
        "{what:<28} {:>8} calls in {:>6.2} s: {:>8.0} /s wall, {:>8.0} per scheduler CPU-s (one core); latency ms p50 {:.2} p99 {:.2} max {:.2}",
        o.calls,
        o.wall,
        o.calls as f64 / o.wall,
        o.calls as f64 / o.cpu.max(1e-9),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}

/// A cheap deterministic generator (splitmix64).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn peer_name(p: usize) -> String {
    format!("10.{}.{}.{}:7950", (p >> 16) & 255, (p >> 8) & 255, p & 255)
}

/// The body of call number `i` of `load`, and the task a parent query is about.
fn body(load: Load, i: u64, o: &Opts, tasks: &[TaskId]) -> (Vec<u8>, Option<TaskId>) {
    let r = mix(i);
    let p = (r % o.peers as u64) as usize;
    let base = |tasks: Vec<(TaskId, Holding)>| Announce {
        peer: peer_name(p),
        addr: peer_name(p).parse().expect("a socket address"),
        seed: false,
        upload_capacity: 1.25e9,
        uploads: (r >> 40) as u32 % 8,
        tasks,
        links: (0..4)
            .map(|k| {
                (
                    peer_name((p + 1 + k) % o.peers),
                    LinkReport {
                        throughput: 1e8,
                        rtt: Duration::from_micros(500),
                        loss: 0.0,
                        mtu: 1500,
                    },
                )
            })
            .collect(),
        place: Place::default(),
        fetching: vec![],
    };
    match load {
        Load::Register(_) => {
            let p = i as usize;
            let all = tasks
                .iter()
                .enumerate()
                .map(|(t, id)| {
                    let have = (0..o.pieces)
                        .map(|k| mix((p * 1_000_003 + t * 7919 + k) as u64).is_multiple_of(10))
                        .collect();
                    (
                        *id,
                        Holding::Full {
                            pieces: o.pieces as u32,
                            have,
                        },
                    )
                })
                .collect();
            let mut a = base(all);
            a.peer = peer_name(p);
            a.addr = peer_name(p).parse().expect("a socket address");
            (serde_json::to_vec(&a).expect("json"), None)
        }
        Load::Announce => {
            let t = (r >> 20) as usize % tasks.len();
            let added = (0..4)
                .map(|k| ((r >> (8 * k)) % o.pieces as u64) as u32)
                .collect();
            let a = base(vec![(tasks[t], Holding::Added(added))]);
            (serde_json::to_vec(&a).expect("json"), None)
        }
        Load::Candidates => {
            let t = (r >> 20) as usize % tasks.len();
            let call = CandidatesCall {
                peer: peer_name(p),
                max: 16,
                exclude: Vec::new(),
                look: false,
                banned: Vec::new(),
                holds: 0,
                place: None,
            };
            (serde_json::to_vec(&call).expect("json"), Some(tasks[t]))
        }
    }
}

async fn phase(
    conns: &Arc<Vec<Parent>>,
    cpu: &Arc<AtomicU64>,
    inflight: usize,
    load: Load,
    o: &Opts,
    tasks: &Arc<Vec<TaskId>>,
) -> Result<Outcome> {
    let total = match load {
        Load::Register(n) => Some(n as u64),
        _ => None,
    };
    let deadline = Instant::now() + Duration::from_secs(o.seconds);
    let next = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..inflight {
        let (conns, next, tasks) = (conns.clone(), next.clone(), tasks.clone());
        let o = *o;
        workers.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if total.is_some_and(|t| i >= t) || total.is_none() && Instant::now() >= deadline {
                    return Ok::<Vec<u64>, anyhow::Error>(lat);
                }
                let (b, task) = body(load, i, &o, &tasks);
                let conn = &conns[w % conns.len()];
                let t0 = Instant::now();
                conn.call(
                    |len| match task {
                        Some(task) => Wire::Candidates { task, body: len },
                        None => Wire::Announce { body: len },
                    },
                    &b,
                )
                .await
                .with_context(|| format!("scheduler call {i}"))?;
                lat.push(t0.elapsed().as_micros() as u64);
            }
        });
    }
    let mut lat_us = Vec::new();
    while let Some(r) = workers.join_next().await {
        lat_us.extend(r??);
    }
    let wall = start.elapsed().as_secs_f64();
    // Let the CPU probe catch up.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let cpu_s = (cpu.load(Ordering::Relaxed).saturating_sub(cpu0)) as f64 / 1e9;
    lat_us.sort_unstable();
    Ok(Outcome {
        calls: lat_us.len() as u64,
        wall,
        cpu: cpu_s,
        lat_us,
    })
}

/// This thread's CPU time (user + system), in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
