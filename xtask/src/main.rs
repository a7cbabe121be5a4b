//! `cargo xtask`: the project's automation. Every command sets up what it needs first.
//!
//! - `setup`: idempotent machine setup (nightly rust-src, bpf-linker, apt packages, tracefs).
//! - `build-ebpf`: builds the eBPF programs in `ebpf/` for bpfel-unknown-none.
//! - `test`: setup, format and lint checks, eBPF build, then the whole test suite.
//! - `demo`: the main job: a live swarm (origin, scheduler, seed, 4 peers) distributing a file.
//! - `bench ...`: every benchmark, under [`bench`] with its shared harness.
//! - `netlab`: builds one namespace topology and checks its path MTU.
//! - `image`: the container image, as an OCI layout tar (docker load, ctr images import).
//! - `fuzz`: the cargo-fuzz targets, each for a bounded time (60 s each in `test`).

mod bench;
mod demo;
mod fuzz;
mod image;
mod netlab;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// The project's automation: setup, tests, the demo, the benchmarks.
#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what builds and tests need (idempotent).
    Setup,
    /// Build the eBPF programs in ebpf/.
    BuildEbpf,
    /// Setup, fmt + clippy checks, eBPF build, then the whole test suite.
    Test {
        /// Passed to `cargo test --workspace` (a test name filter, `--`, test flags).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        extra: Vec<String>,
    },
    /// The main job: a live swarm distributing a file, verified.
    Demo(demo::Args),
    /// The benchmarks (bench/README.md).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Build a namespace topology (clean, dind, vxlan, jumbo, lossy) and check its path MTU.
    Netlab(netlab::Args),
    /// Build the container image (OCI layout tar, no Dockerfile or daemon needed).
    Image(image::Args),
    /// Run the fuzz targets (fuzz/), each for a bounded time; fails on a crash or a hang.
    Fuzz(fuzz::Args),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Test { extra } => test(&extra),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(b) => bench::run(b),
        Cmd::Netlab(a) => netlab::run(a),
        Cmd::Image(a) => image::run(a),
        Cmd::Fuzz(a) => fuzz::run(a),
    }
}

/// The workspace root.
/// Points the test harness (which starts the daemons) at the release binary. Called before
/// any thread starts.
pub fn use_release_binary() {
    // A binary named by the caller wins (A/B runs of two builds).
    if std::env::var_os("STARLING_BIN").is_some() {
        return;
    }
    // SAFETY: single-threaded at this point: no other thread reads the environment.
    unsafe { std::env::set_var("STARLING_BIN", root().join("target/release/starling")) };
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs a command to completion, failing with its command line if it fails.
pub fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", show(cmd));
    }
    Ok(())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn build_ebpf() -> Result<()> {
    setup::ensure_ebpf_toolchain()?;
    // The nightly toolchain is named explicitly; the ebpf/ workspace's own .cargo/config.toml
    // sets the bpfel-unknown-none target and build-std.
    let mut c = Command::new("cargo");
    c.current_dir(root().join("ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    c.args(["+nightly", "build", "--release"]);
    sh(&mut c)?;
    // The daemon looks for the object beside its executable.
    let obj = root().join("ebpf/target/bpfel-unknown-none/release/starling-probes");
    for profile in ["debug", "release"] {
        let dir = root().join("target").join(profile);
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&obj, dir.join("starling-probes.bpf.o"))
            .with_context(|| format!("copy {} into {}", obj.display(), dir.display()))?;
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    setup::run()?;
    sh(cargo().args(["fmt", "--all", "--check"]))?;
    sh(Command::new("cargo")
        .current_dir(root().join("ebpf"))
        .args(["+nightly", "fmt", "--all", "--check"]))?;
    sh(Command::new("cargo")
        .current_dir(root().join("fuzz"))
        .args(["fmt", "--all", "--check"]))?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build_ebpf()?;
    // The integration tests run the real binary; build it first so they never test a stale one.
    sh(cargo().args(["build", "--package", "starling", "--bin", "starling"]))?;
    run_tests(extra)?;
    // A filtered run is someone's quick loop; the whole suite includes the fuzzers.
    if extra.is_empty() {
        fuzz::run(fuzz::Args {
            seconds: 60,
            targets: Vec::new(),
        })?;
    }
    Ok(())
}

/// `cargo test --workspace`, passing its output through, then one closing line with the totals
/// over every test binary (cargo's own last line is only the last binary's).
fn run_tests(extra: &[String]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"])
        .args(extra)
        .stdout(std::process::Stdio::piped());
    eprintln!("xtask: $ {}", show(&cmd));
    let mut child = cmd.spawn().context("cannot run cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let num = |label: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .strip_suffix(label)
                                .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                        })
                        .unwrap_or(0)
                };
                passed += num("passed");
                failed += num("failed");
                ignored += num("ignored");
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
