//! `cargo xtask demo`: the main job, live. A local nginx origin serves a generated file;
//! `starling get` fetches it (progress bar on a terminal), a second get is served from the
//! store, and `curl -o` runs as the baseline. A summary table follows.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use starling_tests::{sha256_file, Nginx};

use crate::{cargo, root, setup, sh};

const MIB: u64 = 1024 * 1024;

struct Row {
    what: &'static str,
    secs: f64,
    requests: usize,
    bytes: u64,
    verified: bool,
}

pub fn run(args: &[&str]) -> Result<()> {
    let size_mib: u64 = match args {
        [] => 1024,
        ["--size-mib", n] => n.parse().context("--size-mib takes a number")?,
        _ => bail!("usage: cargo xtask demo [--size-mib N]"),
    };
    setup::ensure_apt_packages()?;
    sh(cargo().args(["build", "--release", "--package", "starling"]))?;
    let bin = root().join("target/release/starling");
    let dir = root().join("target/demo");
    let (www, out, data) = (dir.join("www"), dir.join("out"), dir.join("data"));
    for d in [&www, &out] {
        std::fs::create_dir_all(d)?;
    }
    let _ = std::fs::remove_dir_all(&data);
    let file = www.join("artifact.bin");
    make_file(&file, size_mib * MIB)?;
    let want = sha256_file(&file);
    let nginx = Nginx::start(&www);
    let url = nginx.url("artifact.bin");
    println!("\nDemo: {size_mib} MiB artifact served by nginx at {url}\nexpected {want}\n");

    let mut rows = Vec::new();
    let mut measure = |what, cmd: &mut Command, output: &Path| -> Result<()> {
        let _ = std::fs::remove_file(output);
        let (r0, b0) = (nginx.requests(), nginx.bytes_sent());
        println!("$ {}", crate::show(cmd));
        let t = Instant::now();
        let status = cmd
            .status()
            .with_context(|| format!("cannot run {}", crate::show(cmd)))?;
        let secs = t.elapsed().as_secs_f64();
        if !status.success() {
            bail!("{} failed ({status})", crate::show(cmd));
        }
        let verified = sha256_file(output) == want;
        rows.push(Row {
            what,
            secs,
            requests: nginx.requests() - r0,
            bytes: nginx.bytes_sent() - b0,
            verified,
        });
        Ok(())
    };
    let o1 = out.join("starling-1.bin");
    measure(
        "starling get (cold store)",
        Command::new(&bin)
            .arg("--data-dir")
            .arg(&data)
            .args(["get", &url, "-O"])
            .arg(&o1),
        &o1,
    )?;
    let o2 = out.join("starling-2.bin");
    measure(
        "starling get (again: local store)",
        Command::new(&bin)
            .arg("--data-dir")
            .arg(&data)
            .args(["get", &url, "-O"])
            .arg(&o2),
        &o2,
    )?;
    let o3 = out.join("curl.bin");
    measure(
        "curl -o (baseline)",
        Command::new("curl").args(["-sS", "-o"]).arg(&o3).arg(&url),
        &o3,
    )?;

    println!(
        "\n{:<36} {:>9} {:>16} {:>14} {:>10}",
        "run", "wall (s)", "origin requests", "origin bytes", "verified"
    );
    for r in &rows {
        println!(
            "{:<36} {:>9.2} {:>16} {:>14} {:>10}",
            r.what,
            r.secs,
            r.requests,
            r.bytes,
            if r.verified { "yes" } else { "NO" }
        );
    }
    if let [cold, _, curl] = &rows[..] {
        println!(
            "\nstarling (cold) / curl wall time: {:.2}",
            cold.secs / curl.secs
        );
    }
    drop(nginx);
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&data);
    if rows.iter().any(|r| !r.verified) {
        bail!("an output did not match the expected digest");
    }
    Ok(())
}

/// Writes `len` pseudo-random bytes to `path` unless it already has that size.
fn make_file(path: &Path, len: u64) -> Result<()> {
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
