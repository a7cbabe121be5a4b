//! `cargo xtask bench registry`: N nodes (default 4) pull one multi-layer image (default 1 GiB)
//! at once with `skopeo copy`, first straight from the registry, then through Starling (each
//! node's mirror, a seed and the swarm), in the same run and the same shaped lab: the registry,
//! the seed and every node are network namespaces on one bridge, each link tbf-shaped both ways
//! (default 200 Mbit/s). Prints both wall times, their ratio, and what the registry sent.

use std::process::Child;
use std::time::Instant;

use anyhow::{bail, Result};
use starling_tests::registry::{skopeo, OciImage, Registry, TestCa};
use starling_tests::{is_root, sha256_file, Cluster, Lab};

use super::procs::{cpu_secs, MachineCpu};
use super::{release_build, MIB};
use crate::{root, sh};

/// `cargo xtask bench registry` (bench/README.md).
#[derive(clap::Args)]
pub struct Args {
    /// Nodes pulling the image at once.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Size of the image (6 layers).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Every link's rate, each way (tbf).
    #[arg(long, default_value_t = 200)]
    mbit: u32,
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        nodes,
        size_mib,
        mbit,
    } = args;
    if !is_root() {
        bail!("bench registry builds network namespaces: run it as root");
    }
    release_build(false)?;
    let dir = root().join("target/bench-registry");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Hosts 0..=nodes: the seed and the nodes (Cluster's layout); the registry is the last.
    let lab = Lab::new("g", 203, nodes + 2, mbit).map_err(anyhow::Error::msg)?;
    let reg_host = nodes + 1;
    let ca = TestCa::new(&dir, "registry", &[&lab.hosts[reg_host].addr]);
    let registry = Registry::start_in(&lab, reg_host, &dir, &ca);
    let layers = layer_sizes(size_mib);
    println!(
        "bench registry: {nodes} nodes pull a {size_mib} MiB image ({} layers) at once, {mbit} Mbit/s links (tbf both ways)",
        layers.len()
    );
    let image = OciImage::build(&dir, &layers, 7);
    let image_bytes: u64 = image.blobs.iter().map(|(_, n)| n).sum();
    sh(skopeo()
        .arg("copy")
        .arg("--dest-cert-dir")
        .arg(&ca.cert_dir)
        .arg(format!("oci:{}:v1", image.layout.display()))
        .arg(format!("docker://{}/bench/app:v1", registry.addr)))?;
    let sent =
        |r: &Registry| -> u64 { image.blobs.iter().map(|(d, _)| r.blob_bytes_sent(d)).sum() };

    // Directly from the registry.
    let before = sent(&registry);
    // `skopeo copy` of the image into `out` on host `i`, through the mirrors in `conf` if given.
    let copy = |i: usize, out: &str, conf: Option<&std::path::Path>| {
        let mut c = lab.command(i, "skopeo");
        c.arg("--insecure-policy");
        if let Some(conf) = conf {
            c.arg("--registries-conf").arg(conf);
        }
        c.arg("copy")
            .arg("--src-cert-dir")
            .arg(&ca.cert_dir)
            .arg(format!("docker://{}/bench/app:v1", registry.addr))
            .arg(format!("oci:{out}:v1"));
        c
    };
    let direct = pull_all(&lab, nodes, &dir, "direct", |i, out| copy(i, out, None))?;
    let direct_sent = sent(&registry) - before;
    check_outputs(&image, &dir, "direct", nodes)?;

    // Through Starling: every node's mirror on its own 127.0.0.1:65001.
    let extra = format!(
        "[proxy]\nlisten = \"127.0.0.1:65001\"\ndefault_upstream = \"https://{}\"\n[source]\nca_certs = [{:?}]\n",
        registry.addr, ca.ca_cert
    );
    let mut cluster = Cluster::new_in(Some(&lab), nodes, "", &extra);
    cluster.start_all();
    let conf = dir.join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nlocation = \"{}\"\n[[registry.mirror]]\nlocation = \"127.0.0.1:65001\"\ninsecure = true\n",
            registry.addr
        ),
    )?;
    let cpu0: f64 = daemon_cpu(&cluster);
    let before = sent(&registry);
    let starling = pull_all(&lab, nodes, &dir, "starling", |i, out| {
        copy(i, out, Some(&conf))
    })?;
    let starling_sent = sent(&registry) - before;
    let cpu = daemon_cpu(&cluster) - cpu0;
    check_outputs(&image, &dir, "starling", nodes)?;

    let gib = image_bytes as f64 / (1u64 << 30) as f64;
    println!("\n| pull of {size_mib} MiB on {nodes} nodes | wall time (all done) | per node min / max | registry sent | machine CPU busy |");
    println!("|---|---|---|---|---|");
    for (name, r, s) in [
        ("direct from the registry", &direct, direct_sent),
        ("through Starling", &starling, starling_sent),
    ] {
        println!(
            "| {name} | {:.2} s | {:.2} / {:.2} s | {:.2} x image | {:.0}% |",
            r.wall,
            r.min,
            r.max,
            s as f64 / image_bytes as f64,
            r.busy * 100.0
        );
    }
    println!(
        "\ndirect / starling = {:.2}  (Starling is {:.2}x faster); starling daemons used {:.1} CPU-s ({:.2} per GiB pulled)",
        direct.wall / starling.wall,
        direct.wall / starling.wall,
        cpu,
        cpu / (gib * nodes as f64)
    );
    println!("every pulled blob verified by sha256sum");
    // Keep the logs for a look; drop the bulky layouts.
    for (i, n) in cluster.nodes.iter().enumerate() {
        std::fs::write(dir.join(format!("node-{i}.log")), n.log())?;
    }
    std::fs::write(dir.join("registry.log"), registry.log())?;
    drop(cluster);
    drop(registry);
    for e in std::fs::read_dir(&dir)?.flatten() {
        if e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    println!("logs: {}", dir.display());
    Ok(())
}

/// Layers of growing size (8, 24, 64, 128 MiB, ...) summing to `total_mib`.
fn layer_sizes(total_mib: u64) -> Vec<usize> {
    let mut left = total_mib;
    let mut out = Vec::new();
    for mib in [8u64, 24, 64, 128, 256] {
        if left <= mib {
            break;
        }
        out.push((mib * MIB) as usize);
        left -= mib;
    }
    out.push((left * MIB) as usize);
    out
}

pub(super) struct Timing {
    pub wall: f64,
    pub min: f64,
    pub max: f64,
    /// Fraction of the machine's CPU time busy meanwhile (all processes).
    pub busy: f64,
    /// Each node's completion time, in node order.
    pub times: Vec<f64>,
}

pub(super) fn pull_all(
    _lab: &Lab,
    nodes: usize,
    dir: &std::path::Path,
    name: &str,
    cmd: impl Fn(usize, &str) -> std::process::Command,
) -> Result<Timing> {
    let start = Instant::now();
    let m0 = MachineCpu::now();
    let children: Vec<Child> = (1..=nodes)
        .map(|i| {
            let out = dir.join(format!("{name}-{i}"));
            cmd(i, &out.display().to_string())
                .stdout(std::process::Stdio::null())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    // One waiter per pull: each records when its own process ends.
    let times = std::thread::scope(|sc| {
        let waiters: Vec<_> = children
            .into_iter()
            .map(|mut c| sc.spawn(move || c.wait().map(|st| (st, start.elapsed().as_secs_f64()))))
            .collect();
        waiters
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a waiter panicked"))?
                    .map_err(anyhow::Error::from)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    if let Some((st, _)) = times.iter().find(|(st, _)| !st.success()) {
        bail!("{name}: a pull failed ({st})");
    }
    let times: Vec<f64> = times.iter().map(|(_, t)| *t).collect();
    let m = MachineCpu::now().since(&m0);
    Ok(Timing {
        busy: m.busy / m.total.max(f64::MIN_POSITIVE),
        wall: start.elapsed().as_secs_f64(),
        min: times.iter().copied().fold(f64::MAX, f64::min),
        max: times.iter().copied().fold(0.0, f64::max),
        times,
    })
}

fn check_outputs(image: &OciImage, dir: &std::path::Path, name: &str, nodes: usize) -> Result<()> {
    for i in 1..=nodes {
        let layout = dir.join(format!("{name}-{i}"));
        for (d, _) in &image.blobs {
            let got = sha256_file(&OciImage::blob_path(&layout, d));
            if &got != d {
                bail!("{name}: node {i} has blob {d} with content {got}");
            }
        }
    }
    Ok(())
}

pub(super) fn daemon_cpu(c: &Cluster) -> f64 {
    c.nodes.iter().filter_map(|n| n.pid()).map(cpu_secs).sum()
}
