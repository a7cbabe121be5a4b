//! `cargo xtask bench scale`: the swarm simulator (`sim/`, the release `starling-sim`) over
//! the named scenarios: 1,000 and 10,000 peers, 1 and 10 GiB, Kraken's published case, a
//! staggered arrival, churn, mixed links, 3 seeds and 3 schedulers, racks under an
//! oversubscribed spine. It writes `bench/results/<date>-scale.{md,csv}` (a later invocation
//! the same day replaces the rows of the scenarios it ran again, and keeps the `## ` sections
//! written under the table) and a completion CDF per scenario (`<date>-scale-<scenario>.png`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use plotters::prelude::*;
use starling_sim::Report;

use super::stock::report::{cdf_axes, cdf_steps, color, load_font, plot_err, today};
use crate::{cargo, root, sh};

/// `cargo xtask bench scale` (bench/README.md).
#[derive(clap::Args)]
pub struct Args {
    /// Scenarios to run (default: all; `--list` names them).
    #[arg(long)]
    scenario: Vec<String>,
    /// Leave out the 10,000-peer scenarios.
    #[arg(long)]
    quick: bool,
    /// Name the scenarios and stop.
    #[arg(long)]
    list: bool,
}

pub fn run(args: Args) -> Result<()> {
    sh(cargo().args(["build", "--release", "--package", "starling-sim"]))?;
    let bin = root().join("target/release/starling-sim");
    if args.list {
        return sh(Command::new(bin).arg("--list"));
    }
    let dir = root().join("target/bench-scale");
    std::fs::create_dir_all(&dir)?;
    // One file per invocation: two runs at once must not share it.
    let json = dir.join(format!("reports-{}.jsonl", std::process::id()));
    let mut cmd = Command::new(bin);
    cmd.arg("--json").arg(&json);
    for s in &args.scenario {
        cmd.args(["--scenario", s]);
    }
    if args.quick {
        cmd.arg("--quick");
    }
    sh(&mut cmd)?;
    let text = std::fs::read_to_string(&json).with_context(|| json.display().to_string())?;
    let reports = text
        .lines()
        .map(serde_json::from_str::<Report>)
        .collect::<Result<Vec<_>, _>>()
        .context("reading the simulator's reports")?;
    for p in write(&root().join("bench/results"), reports)? {
        println!("wrote {}", p.display());
    }
    Ok(())
}

const HEADER: &str = "scenario,peers,content_bytes,bound_s,p50_s,p99_s,max_s,finished,unfinished,origin_x_f,seed_upload_x_f,spine_in_mean_x_f,spine_in_max_x_f,sched_calls_mean,sched_calls_peak,sim_s,wall_s";

fn csv_line(r: &Report) -> String {
    format!(
        "{},{},{},{:.3},{:.3},{:.3},{:.3},{},{},{:.4},{:.4},{:.4},{:.4},{:.0},{:.0},{:.2},{:.1}",
        r.scenario,
        r.peers,
        r.content_bytes,
        r.bound_s,
        r.p50_s,
        r.p99_s,
        r.max_s,
        r.finished,
        r.unfinished,
        r.origin_x_f,
        r.seed_upload_x_f,
        r.spine_in_mean_x_f,
        r.spine_in_max_x_f,
        r.sched_calls_mean,
        r.sched_calls_peak,
        r.sim_seconds,
        r.wall_seconds
    )
}

/// Today's report from `new` and the CSV rows of today's earlier invocations for other
/// scenarios.
fn write(dir: &Path, new: Vec<Report>) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let date = today();
    let base = dir.join(format!("{date}-scale"));
    let earlier = std::fs::read_to_string(base.with_extension("csv")).unwrap_or_default();
    let mut lines: Vec<String> = earlier
        .lines()
        .skip(1)
        .filter(|l| {
            let name = l.split(',').next().unwrap_or("");
            !new.iter().any(|r| r.scenario == name)
        })
        .map(str::to_string)
        .collect();
    lines.extend(new.iter().map(csv_line));
    let mut csv = format!("{HEADER}\n");
    for l in &lines {
        csv.push_str(l);
        csv.push('\n');
    }
    let csv_path = base.with_extension("csv");
    std::fs::write(&csv_path, &csv)?;
    let mut md = format!(
        "# bench scale, {date}\n\n`cargo xtask bench scale`: the flow-level simulator over the real \
         engine and scheduler (`sim/`). Completion times are from each peer's arrival, against the \
         bound (the time the links allow: the content through the source's link, through the \
         slowest peer's, and N copies through every upload together). Origin and seed upload are \
         in F (the content's size); spine is the bytes into a rack through its uplink, in F (max \
         over racks). Scheduler calls are announcements and parent queries together, per \
         simulated second. Wall is this machine's time to simulate.\n\n\
         | scenario | peers | content | bound s | p50 / bound | p99 / bound | max / bound | unfinished | origin × F | seed up × F | spine max × F | sched calls/s (peak) | wall s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for l in &lines {
        let f: Vec<&str> = l.split(',').collect();
        let num = |i: usize| {
            f.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let bound = num(3);
        md.push_str(&format!(
            "| {} | {} | {:.2} GiB | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.3} | {:.2} | {:.2} | {:.0} ({:.0}) | {:.0} |\n",
            f[0],
            f[1],
            num(2) / (1u64 << 30) as f64,
            bound,
            num(4) / bound,
            num(5) / bound,
            num(6) / bound,
            f.get(8).unwrap_or(&"?"),
            num(9),
            num(10),
            num(12),
            num(13),
            num(14),
            num(16),
        ));
    }
    let mut paths = vec![csv_path];
    if load_font() {
        for r in &new {
            let png = base.with_file_name(format!("{date}-scale-{}.png", r.scenario));
            cdf(&png, r)?;
            paths.push(png);
        }
        md.push_str("\nCompletion CDFs: `");
        md.push_str(&format!("{date}-scale-<scenario>.png"));
        md.push_str("`.\n");
    }
    let md_path = base.with_extension("md");
    // The notes written under the table (its `## ` sections) stay.
    let notes = std::fs::read_to_string(&md_path).unwrap_or_default();
    if let Some(at) = notes.find("\n## ") {
        md.push_str(&notes[at..]);
    }
    std::fs::write(&md_path, md)?;
    paths.insert(0, md_path);
    Ok(paths)
}

/// Fraction of peers complete against time / bound.
fn cdf(path: &Path, r: &Report) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let x: Vec<f64> = r.done_s.iter().map(|t| t / r.bound_s).collect();
    let x_max = x.iter().copied().fold(1.0, f64::max) * 1.05;
    let caption = format!(
        "bench scale {}: {} peers, {:.2} GiB, bound {:.2} s",
        r.scenario,
        r.peers,
        r.content_bytes as f64 / (1u64 << 30) as f64,
        r.bound_s
    );
    let mut chart = cdf_axes(&root, &caption, x_max, "completion time / bound")?;
    let pts = cdf_steps(&x, r.peers);
    chart
        .draw_series(LineSeries::new(pts, color(0).stroke_width(2)))
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(
            vec![(1.0, 0.0), (1.0, 1.02)],
            BLACK.stroke_width(1),
        ))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}
