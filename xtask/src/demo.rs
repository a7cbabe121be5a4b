//! `cargo xtask demo`: the main job, live. A local nginx origin, a scheduler, one seed and 4
//! peers distribute a generated 1 GiB file; the peers all ask at once. As root, every host is a
//! network namespace with tbf-shaped links (1 Gbit/s by default); otherwise all runs on
//! loopback. Live progress bars, then a summary table.

use anyhow::{bail, Result};
use starling_tests::{is_root, sha256_file, Lab};

use crate::bench::memory::warm_up_to;
use crate::bench::run::{self as swarm, Job};
use crate::bench::{make_file, release_build, MIB};
use crate::root;

#[derive(clap::Args)]
pub struct Args {
    /// Size of the artifact.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Peer daemons beside the seed.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=200))]
    peers: u16,
    /// Every link's rate, each way (tbf), when run as root.
    #[arg(long, default_value_t = 1000)]
    mbit: u32,
    /// Touch the memory the copies will use before the run, with this VM's free page
    /// reporting off (restored at exit), as the benches' `--warm-memory` does: on a VM that
    /// hands freed pages back to its host, the first write to each page costs a host fault,
    /// which can double the run. Needs root.
    #[arg(long)]
    warm_memory: bool,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        size_mib,
        mbit,
        warm_memory,
        ..
    } = args;
    let peers = usize::from(args.peers);
    release_build(false)?;
    let dir = root().join("target/demo");
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    let file = www.join("artifact.bin");
    make_file(&file, size_mib * MIB)?;
    let want = sha256_file(&file);
    // Every node's copy and the origin's file (the outputs are hard links to the copies), plus
    // headroom.
    let _warm = if warm_memory {
        Some(warm_up_to((peers as u64 + 2) * size_mib * MIB + (2 << 30))?)
    } else {
        None
    };
    let lab = if is_root() {
        Some(Lab::new("d", 201, peers + 1, mbit).map_err(anyhow::Error::msg)?)
    } else {
        println!("(not root: running on loopback, without shaped links)");
        None
    };
    println!(
        "\nDemo: one seed and {peers} peers distribute a {size_mib} MiB artifact from an nginx origin.\n\
         {}\nexpected {want}\n",
        match &lab {
            Some(_) => format!("Each host is a network namespace; every link is {mbit} Mbit/s each way (tbf)."),
            None => "All on loopback.".to_string(),
        }
    );
    let job = Job {
        lab: lab.as_ref(),
        peers,
        www: &www,
        file: "artifact.bin",
        want: &want,
        live: true,
        piece_length: None,
        peer_toml: "",
        daemon_toml: "",
        import: false,
    };
    let o = swarm::run(&job)?;
    println!(
        "\n{:<8} {:>9} {:>16} {:>16} {:>9}",
        "peer", "time (s)", "from peers", "from origin", "verified"
    );
    for (i, p) in o.peers.iter().enumerate() {
        println!(
            "{:<8} {:>9.2} {:>16} {:>16} {:>9}",
            format!("peer {}", i + 1),
            p.secs,
            p.from_peers,
            p.from_origin,
            if p.verified { "yes" } else { "NO" }
        );
    }
    println!(
        "\nall peers done in {:.2} s; the origin served {} bytes for a {}-byte file ({:.3}x); daemons used {:.1} CPU-seconds",
        o.wall,
        o.origin_bytes,
        o.size,
        o.origin_bytes as f64 / o.size as f64,
        o.cpu_secs
    );
    println!(
        "the whole machine spent {:.1} CPU-s meanwhile (every process and the kernel: user {:.1}, system {:.1}, softirq {:.1})",
        o.machine.busy, o.machine.user, o.machine.system, o.machine.softirq
    );
    println!("uploaded, in file sizes: {}", swarm::uploads_line(&o));
    if lab.is_some() {
        let t = swarm::t_min(o.size, peers, mbit);
        println!(
            "theoretical bound T_min = {t:.2} s; time / T_min = {:.2}",
            o.wall / t
        );
    }
    if o.peers.iter().any(|p| !p.verified) {
        bail!("an output did not match the expected digest");
    }
    Ok(())
}
