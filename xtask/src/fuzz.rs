//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (libFuzzer), each for a bounded time.
//!
//! Refreshes the seed corpora from the real encoders (`fuzz/tests/seeds.rs`), builds the targets
//! with nightly (debug assertions on, so overflow panics too), runs each on its working corpus
//! (`fuzz/corpus/<target>`, kept between runs) and its seeds, and prints executions, corpus
//! size, crashes and hangs per target. Any crash or hang fails the command; its input is in
//! `fuzz/artifacts/<target>/` (replay it with `cargo +nightly fuzz run <target> <file>`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{root, sh, show};

/// Every target, in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["wire", "store", "config", "api", "proxy_route"];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Targets to run (default: all).
    pub targets: Vec<String>,
}

/// One target's run.
struct Outcome {
    target: String,
    runs: u64,
    seconds: f64,
    corpus: usize,
    crashed: bool,
    hung: bool,
    artifact: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    crate::setup::ensure_cargo_fuzz()?;
    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        args.targets.clone()
    };
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "no fuzz target {t:?}; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let dir = root().join("fuzz");
    // The seeds, from today's encoders; built in the workspace's target directory, which
    // already holds the starling crate's build.
    sh(Command::new("cargo")
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", root().join("target"))
        .args(["test", "--quiet", "--test", "seeds"]))?;
    let flags = ["--sanitizer", "none", "--debug-assertions"];
    sh(fuzz_cmd(&dir).arg("build").args(flags))?;
    let mut outcomes = Vec::new();
    for t in &targets {
        outcomes.push(run_one(&dir, t, args.seconds, &flags)?);
    }
    println!("\n| target | executions | seconds | exec/s | corpus | crashes | hangs |");
    println!("|---|---|---|---|---|---|---|");
    for o in &outcomes {
        println!(
            "| {} | {} | {:.0} | {:.0} | {} | {} | {} |",
            o.target,
            o.runs,
            o.seconds,
            o.runs as f64 / o.seconds.max(1e-9),
            o.corpus,
            u8::from(o.crashed),
            u8::from(o.hung)
        );
    }
    let bad: Vec<_> = outcomes.iter().filter(|o| o.crashed || o.hung).collect();
    if !bad.is_empty() {
        for o in &bad {
            eprintln!(
                "xtask: fuzz target {} {}: {}",
                o.target,
                if o.hung { "hung" } else { "crashed" },
                o.artifact.as_deref().unwrap_or("(no input saved)")
            );
        }
        bail!("{} fuzz target(s) found a crash or a hang", bad.len());
    }
    Ok(())
}

fn fuzz_cmd(dir: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args(["+nightly", "fuzz"]);
    c
}

fn run_one(dir: &Path, target: &str, seconds: u64, flags: &[&str]) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    let mut cmd = fuzz_cmd(dir);
    cmd.args(["run", target])
        .arg(&corpus)
        .arg(dir.join("seeds").join(target))
        .args(flags)
        .arg("--")
        .args([
            &format!("-max_total_time={seconds}"),
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("xtask: $ {}", show(&cmd));
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", show(&cmd)))?;
    let elapsed = start.elapsed().as_secs_f64();
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let runs = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let artifact = log
        .lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .map(|s| s.trim().to_string());
    if log.contains("failed to build fuzz script") {
        eprintln!("{log}");
        bail!("building fuzz target {target} failed (see above)");
    }
    let hung = log.contains("ERROR: libFuzzer: timeout");
    let crashed = !out.status.success() && !hung;
    if crashed || hung {
        // The whole report: the panic message and the input's path.
        eprintln!("{log}");
    }
    let corpus_len = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
    eprintln!("xtask: fuzz {target}: {runs} executions in {elapsed:.0} s, corpus {corpus_len}");
    Ok(Outcome {
        target: target.to_string(),
        runs,
        seconds: elapsed,
        corpus: corpus_len,
        crashed,
        hung,
        artifact,
    })
}
