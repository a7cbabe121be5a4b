//! `cargo xtask bench ...`: every benchmark, and the harness they share. Each prints ratios
//! against a baseline run in the same command (bench/README.md describes them).
//!
//! | module | command |
//! |---|---|
//! | `get` (here) | `bench get`: runs `bench/` (starling-bench), one peer's data path vs curl |
//! | [`swarm`] | `bench swarm`: one seed + N peers in shaped namespaces vs T_min and plain HTTP |
//! | [`stock`] | `bench stock`: the same job for Starling and the stock peers |
//! | [`registry`] | `bench registry`: image pulls through the mirror vs from the registry |
//! | [`models`] | `bench models`: N nodes fetch a multi-file model from a local Hub: huggingface_hub direct vs `starling get hf://` |
//! | [`chaos`] | `bench chaos`: the chaos swarm (kills, a dead seed, scheduler restarts, a bad disk, loss) vs the clean run |
//! | [`adapt`] | `bench adapt`: path adaptation on vs off per netlab topology |
//! | [`throughput`] | `bench throughput`: fast links vs nginx → curl and aria2, CPU per GiB |
//! | [`soak`] | `bench soak`: a bounded soak (continuous gets under GC pressure, peers leaving and joining): RSS and descriptors over time |
//! | [`scale`] | `bench scale`: the simulator (`sim/`) at 1,000–10,000 peers over the real engine and scheduler |
//! | `scheduler` (here) | `bench scheduler`: one scheduler's capacity over QUIC + mTLS (`bench/src/bin/sched_load.rs`) |
//!
//! The harness: [`run`] runs one swarm job (also the demo's), [`procs`] measures processes,
//! [`memory`] is `--warm-memory`'s guard, [`make_file`] writes the payload, [`release_build`]
//! prepares the binaries.

pub mod adapt;
pub mod chaos;
pub mod memory;
pub mod models;
pub mod procs;
pub mod registry;
pub mod run;
pub mod scale;
pub mod soak;
pub mod stock;
pub mod swarm;
pub mod throughput;

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use clap::Subcommand;

use crate::{cargo, root, setup, sh};

pub const MIB: u64 = 1024 * 1024;

#[derive(Subcommand)]
pub enum Bench {
    /// SHA-256 path, io_uring store and `starling get` vs curl, as ratios.
    Get {
        /// Size of the test file.
        #[arg(long, default_value_t = 1024)]
        size_mib: usize,
        /// Timed runs of each measure (medians are printed).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Turn the VM's free page reporting off while the bench runs and touch the memory
        /// first, so neither side pays host faults on its page-cache writes.
        #[arg(long)]
        warm_memory: bool,
    },
    /// One seed + N peers in shaped namespaces: Starling vs T_min and plain HTTP.
    Swarm(swarm::Args),
    /// The same swarm job for Starling, HTTP, aria2, libtorrent and rqbit: report, CSV, plots.
    Stock(stock::Args),
    /// N nodes pull a multi-layer image with skopeo: through Starling vs from the registry.
    Registry(registry::Args),
    /// N nodes fetch a multi-file model from a local Hugging Face Hub at once: huggingface_hub
    /// straight from the Hub vs `starling get hf://` (and, with --mirror, huggingface_hub
    /// through each node's mirror).
    Models(models::Args),
    /// Path adaptation on vs off on the netlab topologies (jumbo, dind, vxlan, lossy).
    Adapt(adapt::Args),
    /// A bounded soak: continuous gets of varied sizes under GC pressure, peers leaving and
    /// joining; RSS and descriptors over time, every output verified.
    Soak(soak::Args),
    /// The chaos swarm (peers killed and restarted, the seed killed half-way, scheduler
    /// restarts, a bad disk, loss) against the same job without faults.
    Chaos(chaos::Args),
    /// Fast links: 1 → 1 unshaped (MTU 1500 and 9000), 1 → 4 at 1 and 10 Gbit/s, against
    /// nginx → curl and aria2: GB/s and CPU per GiB, machine-wide and per process.
    Throughput(throughput::Args),
    /// The swarm simulator over the real engine and scheduler: 1,000 and 10,000 peers, the
    /// Kraken case, churn, racks: completion against the bound, origin and spine bytes.
    Scale(scale::Args),
    /// One scheduler under load over QUIC with mutual TLS: announcements and parent queries
    /// per second per core, latency percentiles, memory per peer-task.
    Scheduler {
        /// Registered peers.
        #[arg(long, default_value_t = 10_000)]
        peers: usize,
        /// Tasks each peer announces.
        #[arg(long, default_value_t = 100)]
        tasks: usize,
        /// Seconds of each measured phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Get {
            size_mib,
            runs,
            warm_memory,
        } => get(size_mib, runs, warm_memory),
        Bench::Swarm(a) => swarm::run(a),
        Bench::Stock(a) => stock::run(a),
        Bench::Registry(a) => registry::run(a),
        Bench::Models(a) => models::run(a),
        Bench::Adapt(a) => adapt::run(a),
        Bench::Chaos(a) => chaos::run(a),
        Bench::Soak(a) => soak::run(a),
        Bench::Throughput(a) => throughput::run(a),
        Bench::Scale(a) => scale::run(a),
        Bench::Scheduler {
            peers,
            tasks,
            seconds,
        } => scheduler(peers, tasks, seconds),
    }
}

/// `bench get`: the release `starling-bench` binary against the release `starling`.
fn get(size_mib: usize, runs: usize, warm_memory: bool) -> Result<()> {
    setup::run()?;
    sh(cargo().args([
        "build",
        "--release",
        "--package",
        "starling",
        "--package",
        "starling-bench",
    ]))?;
    // Both outputs, the store's copy and the origin's file, with headroom.
    let _warm = if warm_memory {
        Some(memory::warm_up_to(4 * size_mib as u64 * MIB + (2 << 30))?)
    } else {
        None
    };
    let bin = root().join("target/release/starling-bench");
    sh(Command::new(bin)
        .args([
            "get",
            "--size-mib",
            &size_mib.to_string(),
            "--runs",
            &runs.to_string(),
        ])
        .env("STARLING_BIN", root().join("target/release/starling")))
}

/// `bench scheduler`: the release `starling-sched-load` (bench/src/bin/sched_load.rs).
fn scheduler(peers: usize, tasks: usize, seconds: u64) -> Result<()> {
    sh(cargo().args([
        "build",
        "--release",
        "--package",
        "starling-bench",
        "--bin",
        "sched_load",
    ]))?;
    sh(
        Command::new(root().join("target/release/sched_load")).args([
            "--peers",
            &peers.to_string(),
            "--tasks",
            &tasks.to_string(),
            "--seconds",
            &seconds.to_string(),
        ]),
    )
}

/// Installs the apt packages, builds the release binary (and the eBPF object with `ebpf`), and
/// points the test harness at it (unless `STARLING_BIN` names another build).
pub fn release_build(ebpf: bool) -> Result<()> {
    setup::ensure_apt_packages()?;
    if ebpf {
        crate::build_ebpf()?;
    }
    sh(cargo().args(["build", "--release", "--package", "starling"]))?;
    crate::use_release_binary();
    Ok(())
}

/// Writes `len` pseudo-random bytes to `path` unless it already has that size.
pub fn make_file(path: &Path, len: u64) -> Result<()> {
    if std::fs::metadata(path)
        .map(|m| m.len() == len)
        .unwrap_or(false)
    {
        return Ok(());
    }
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(4 * MIB as usize, std::fs::File::create(path)?);
    let mut left = len;
    let mut seed = 0x5eed;
    while left > 0 {
        let n = left.min(4 * MIB);
        f.write_all(&starling_tests::random_bytes(n as usize, seed))?;
        seed += 1;
        left -= n;
    }
    f.flush()?;
    Ok(())
}
