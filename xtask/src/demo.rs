//! `cargo xtask demo`: the main job, live. A local nginx origin, a scheduler, one seed and 4
//! peers distribute a generated 1 GiB file; the peers all ask at once. As root, every host is a
//! network namespace with tbf-shaped links (1 Gbit/s by default); otherwise all runs on
//! loopback. Live progress bars, then a summary table.

use std::path::Path;

use anyhow::{bail, Context, Result};
use starling_tests::{is_root, sha256_file, Lab};

use crate::swarm::{self, Job, MIB};
use crate::{cargo, root, setup, sh};

pub fn run(args: &[&str]) -> Result<()> {
    let (mut size_mib, mut peers, mut mbit) = (1024u64, 4usize, 1000u32);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().context("every option takes a value")?;
        match *a {
            "--size-mib" => size_mib = v.parse().context("--size-mib takes a number")?,
            "--peers" => peers = v.parse().context("--peers takes a number")?,
            "--mbit" => mbit = v.parse().context("--mbit takes a number")?,
            _ => bail!("usage: cargo xtask demo [--size-mib N] [--peers N] [--mbit N]"),
        }
    }
    setup::ensure_apt_packages()?;
    sh(cargo().args(["build", "--release", "--package", "starling"]))?;
    crate::use_release_binary();
    let dir = root().join("target/demo");
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    let file = www.join("artifact.bin");
    make_file(&file, size_mib * MIB)?;
    let want = sha256_file(&file);
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
