//! `cargo xtask bench models`: N nodes (default 8) fetch one multi-file model (default 4 GiB:
//! safetensors shards of at most 1 GiB, plus small JSON files) from a local Hugging Face Hub
//! (`starling-hub`) at once, in the same shaped lab:
//! - **direct**: the real `huggingface_hub` client (`snapshot_download`) on every node, straight
//!   from the Hub;
//! - **starling**: `starling get hf://ORG/REPO -O DIR` on every node through its daemon (a seed
//!   and a scheduler beside them);
//! - with `--mirror`, also `huggingface_hub` on every node with `HF_ENDPOINT` at its own
//!   daemon's mirror (needs disk for two more copies per node).
//!
//! The Hub, the seed and every node are network namespaces on one bridge, each link
//! tbf-shaped both ways (default 1000 Mbit/s). Prints wall times, each node's time against
//! T_min (the model's size over one link, the least any node can take), what the Hub sent
//! (against the model's size), and the machine's CPU, and checks every file by SHA-256.

use std::path::Path;

use anyhow::{bail, Context, Result};
use starling_tests::hub::{safetensors_like, HubProc, RepoBuilder};
use starling_tests::{is_root, sha256_file, Cluster, Lab};

use super::registry::{daemon_cpu, pull_all, Timing};
use super::{release_build, MIB};
use crate::{cargo, root, setup, sh};

/// `cargo xtask bench models` (bench/README.md).
#[derive(clap::Args)]
pub struct Args {
    /// Nodes fetching the model at once.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Size of the model (its shards).
    #[arg(long, default_value_t = 4096)]
    size_mib: u64,
    /// Every link's rate, each way (tbf).
    #[arg(long, default_value_t = 1000)]
    mbit: u32,
    /// Also run huggingface_hub through each node's HF_ENDPOINT mirror.
    #[arg(long)]
    mirror: bool,
}

const REPO: &str = "bench/model";

/// The model's files: (path, size).
fn layout(size_mib: u64) -> Vec<(String, u64)> {
    let shard = 1024 * MIB;
    let total = size_mib * MIB;
    let n = total.div_ceil(shard).max(1);
    let mut out = vec![
        ("config.json".to_string(), 0),
        ("tokenizer.json".to_string(), 0),
    ];
    let mut left = total;
    for i in 1..=n {
        let len = left.min(shard);
        out.push((format!("model-{i:05}-of-{n:05}.safetensors"), len));
        left -= len;
    }
    out
}

pub fn run(args: Args) -> Result<()> {
    let Args {
        nodes,
        size_mib,
        mbit,
        mirror,
    } = args;
    if !is_root() {
        bail!("bench models builds network namespaces: run it as root");
    }
    setup::ensure_model_tools()?;
    release_build(false)?;
    sh(cargo().args([
        "build",
        "--release",
        "--package",
        "starling-tests",
        "--bin",
        "starling-hub",
    ]))?;
    let hub_bin = root().join("target/release/starling-hub");
    let dir = root().join("target/bench-models");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    // The model, written once (shards streamed to disk).
    let hub_root = dir.join("hub");
    let repo = RepoBuilder::new(&hub_root, REPO);
    let files = layout(size_mib);
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    let commit = repo.commit_with(&paths, |p, at| {
        let len = files.iter().find(|(q, _)| q == p).map_or(0, |(_, n)| *n);
        if len == 0 {
            let _ = std::fs::write(at, format!("{{\"name\": {p:?}, \"hidden_size\": 4096}}\n"));
        } else {
            // Every shard different (identical ones would be one blob, fetched once).
            let seed = p
                .bytes()
                .fold(len, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
            let _ = write_shard(at, len, seed);
        }
    });
    repo.set_ref("main", &commit);
    let model_bytes: u64 = files
        .iter()
        .map(|(p, _)| {
            std::fs::metadata(repo.dir.join("commits").join(&commit).join(p)).map_or(0, |m| m.len())
        })
        .sum();
    let want: Vec<(String, String)> = files
        .iter()
        .map(|(p, _)| {
            (
                p.clone(),
                sha256_file(&repo.dir.join("commits").join(&commit).join(p)),
            )
        })
        .collect();

    // Hosts 0..=nodes: the seed and the nodes (Cluster's layout); the Hub is the last.
    let lab = Lab::new("m", 204, nodes + 2, mbit).map_err(anyhow::Error::msg)?;
    let hub_host = nodes + 1;
    let hub = HubProc::start(
        &hub_bin,
        &hub_root,
        Some(&lab.hosts[hub_host].ns),
        &lab.hosts[hub_host].addr,
        50,
    );
    let t_min = model_bytes as f64 * 8.0 / (mbit as f64 * 1e6);
    println!(
        "bench models: {nodes} nodes fetch a {size_mib} MiB model ({} files) at once, {mbit} Mbit/s links (tbf both ways); T_min {t_min:.1} s",
        files.len()
    );
    let hub_sent = |h: &HubProc| h.stat("lfs_bytes") + h.stat("small_bytes");
    let snapshot = |i: usize, cache: &Path, endpoint: &str| {
        let mut c = lab.command(i, "python3");
        c.arg("-c")
            .arg(format!(
                "from huggingface_hub import snapshot_download\nsnapshot_download({REPO:?}, cache_dir={:?})",
                cache.display().to_string()
            ))
            .env("HF_ENDPOINT", endpoint)
            .env("HF_HUB_DISABLE_XET", "1")
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env("HF_HUB_ETAG_TIMEOUT", "60")
            .env("HF_HUB_DOWNLOAD_TIMEOUT", "120")
            .env_remove("HF_TOKEN");
        c
    };
    let cache_snapshot = |cache: &Path| {
        cache
            .join(format!("models--{}", REPO.replace('/', "--")))
            .join("snapshots")
            .join(&commit)
    };
    let mut rows: Vec<(&str, Timing, u64, Option<f64>)> = Vec::new();

    // 1. Straight from the Hub.
    let before = hub_sent(&hub);
    let direct = pull_all(&lab, nodes, &dir, "direct", |i, out| {
        snapshot(i, Path::new(out), &hub.url())
    })?;
    let sent = hub_sent(&hub) - before;
    for i in 1..=nodes {
        check(
            &cache_snapshot(&dir.join(format!("direct-{i}"))),
            &want,
            "direct",
            i,
        )?;
        let _ = std::fs::remove_dir_all(dir.join(format!("direct-{i}")));
    }
    rows.push(("huggingface_hub, straight from the Hub", direct, sent, None));

    // 2. starling get hf:// through each node's daemon.
    let extra = format!(
        "[hf]\nendpoint = \"{}\"\n[proxy]\nlisten = \"127.0.0.1:65001\"\n",
        hub.url()
    );
    for run in ["starling", "mirror"] {
        if run == "mirror" && !mirror {
            break;
        }
        let mut cluster = Cluster::new_in(Some(&lab), nodes, "", &extra);
        cluster.start_all();
        let cpu0 = daemon_cpu(&cluster);
        let before = hub_sent(&hub);
        let timing = if run == "starling" {
            let scratches: Vec<_> = cluster.nodes.iter().map(|n| &n.scratch).collect();
            pull_all(&lab, nodes, &dir, run, |i, out| {
                let mut c = scratches[i].starling_in_ns();
                c.args(["get", &format!("hf://{REPO}"), "-q", "-O", out]);
                c
            })?
        } else {
            pull_all(&lab, nodes, &dir, run, |i, out| {
                snapshot(i, Path::new(out), "http://127.0.0.1:65001")
            })?
        };
        let sent = hub_sent(&hub) - before;
        let cpu = daemon_cpu(&cluster) - cpu0;
        for i in 1..=nodes {
            let out = dir.join(format!("{run}-{i}"));
            let at = if run == "starling" {
                out.clone()
            } else {
                cache_snapshot(&out)
            };
            check(&at, &want, run, i)?;
            std::fs::write(
                dir.join(format!("{run}-node-{i}.log")),
                cluster.nodes[i].log(),
            )?;
        }
        let label = if run == "starling" {
            "starling get hf://, through the swarm"
        } else {
            "huggingface_hub through each node's mirror"
        };
        rows.push((label, timing, sent, Some(cpu)));
        drop(cluster);
        for i in 1..=nodes {
            let _ = std::fs::remove_dir_all(dir.join(format!("{run}-{i}")));
        }
    }

    let gib = model_bytes as f64 / (1u64 << 30) as f64;
    println!(
        "\n| {size_mib} MiB model on {nodes} nodes, {mbit} Mbit/s | wall (all done) | per node min / median / max × T_min | Hub sent | machine CPU busy | daemons CPU-s per GiB delivered |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, t, sent, cpu) in &rows {
        let mut ts = t.times.clone();
        ts.sort_by(f64::total_cmp);
        let med = ts.get(ts.len() / 2).copied().unwrap_or(0.0);
        println!(
            "| {name} | {:.1} s ({:.2} × T_min) | {:.2} / {:.2} / {:.2} | {:.2} × model | {:.0}% | {} |",
            t.wall,
            t.wall / t_min,
            t.min / t_min,
            med / t_min,
            t.max / t_min,
            *sent as f64 / model_bytes as f64,
            t.busy * 100.0,
            cpu.map_or("—".to_string(), |c| format!("{:.1}", c / (gib * nodes as f64)))
        );
    }
    if let [(_, d, _, _), (_, s, _, _), ..] = rows.as_slice() {
        println!("\ndirect / starling = {:.2}", d.wall / s.wall);
    }
    println!(
        "every file on every node checked by sha256sum; logs: {}",
        dir.display()
    );
    drop(hub);
    let _ = std::fs::remove_dir_all(&hub_root);
    Ok(())
}

/// A shard: a safetensors header at the front, so the file reads as one, then pseudo-random
/// bytes from `seed`.
fn write_shard(at: &Path, len: u64, seed: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(4 * MIB as usize, std::fs::File::create(at)?);
    let head = safetensors_like(4096, seed);
    f.write_all(&head[..head.len().min(len as usize)])?;
    let mut left = len.saturating_sub(head.len() as u64);
    let mut n = 0u64;
    while left > 0 {
        let chunk = left.min(4 * MIB);
        f.write_all(&starling_tests::random_bytes(
            chunk as usize,
            seed ^ (n << 32),
        ))?;
        left -= chunk;
        n += 1;
    }
    f.flush()
}

fn check(dir: &Path, want: &[(String, String)], run: &str, node: usize) -> Result<()> {
    for (p, sha) in want {
        let at = dir.join(p);
        let got = sha256_file(&at);
        if &got != sha {
            bail!(
                "{run}: node {node} has {} with {got}, not {sha}",
                at.display()
            );
        }
    }
    std::fs::read_dir(dir).with_context(|| format!("{run}: node {node}: {}", dir.display()))?;
    Ok(())
}
