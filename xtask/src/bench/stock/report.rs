//! `bench stock`'s outputs: a line per run on stdout, and under `bench/results/`:
//! `<date>.csv` (one row per scenario, system and run; a later invocation the same day replaces
//! the scenario and system pairs it redid and keeps the others), `<date>.md` (a table per
//! scenario, each system's median over its runs, and the targets),
//! `<date>-<scenario>-cdf.png` (completion-time CDF per system) and `<date>-peers.png` (wall
//! time vs peer count).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::coord::ranged1d::Ranged;
use plotters::prelude::*;
use starling_tests::netlab::Topology;

use super::{Outcome, Scenario};
use crate::bench::MIB;

const GIB: f64 = (1u64 << 30) as f64;

fn median(v: &[f64]) -> f64 {
    v[v.len() / 2]
}

fn sorted_times(o: &Outcome) -> Vec<f64> {
    let mut t: Vec<f64> = o.done.iter().flatten().copied().collect();
    t.sort_by(f64::total_cmp);
    t
}

fn cpu_per_gib(sc: &Scenario, o: &Outcome) -> f64 {
    let delivered = o.done.iter().flatten().count() as f64 * (sc.size_mib * MIB) as f64;
    if delivered > 0.0 {
        o.cpu_secs / (delivered / GIB)
    } else {
        f64::NAN
    }
}

fn rss_max_mib(o: &Outcome) -> f64 {
    o.rss_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0
}

/// One system's runs in one scenario. Wall time and CPU are medians over the runs; the run
/// with the median wall time stands for the system in per-peer figures and plots. A system
/// that failed in any run counts as failed.
pub struct Summary<'a> {
    pub system: &'a str,
    pub runs: Vec<&'a Outcome>,
    /// The median run by wall time (a failed run counts as the slowest).
    pub mid: &'a Outcome,
}

impl<'a> Summary<'a> {
    /// `runs` must hold at least one outcome, all of one system.
    fn new(runs: Vec<&'a Outcome>) -> Summary<'a> {
        let mut by_wall = runs.clone();
        by_wall.sort_by(|a, b| {
            let w = |o: &Outcome| o.wall().filter(|_| o.ok()).unwrap_or(f64::INFINITY);
            w(a).total_cmp(&w(b))
        });
        let mid = by_wall[by_wall.len() / 2];
        Summary {
            system: &mid.system,
            runs,
            mid,
        }
    }

    /// Every run finished and verified everywhere.
    pub fn ok(&self) -> bool {
        self.runs.iter().all(|o| o.ok())
    }

    /// The median wall time, when every run finished.
    pub fn wall(&self) -> Option<f64> {
        self.mid.wall().filter(|_| self.ok())
    }

    fn walls(&self) -> Vec<f64> {
        self.runs.iter().filter_map(|o| o.wall()).collect()
    }

    fn cpus_per_gib(&self, sc: &Scenario) -> Vec<f64> {
        self.runs.iter().map(|o| cpu_per_gib(sc, o)).collect()
    }

    pub fn cpu_per_gib(&self, sc: &Scenario) -> f64 {
        median_of(self.cpus_per_gib(sc))
    }

    fn cpu_secs(&self) -> f64 {
        median_of(self.runs.iter().map(|o| o.cpu_secs).collect())
    }

    fn rss_max_mib(&self) -> f64 {
        self.runs.iter().map(|o| rss_max_mib(o)).fold(0.0, f64::max)
    }

    /// `median` and, with more than one run, the runs' range: "24.04 (23.91–24.40)".
    fn with_range(&self, median: f64, all: &[f64], digits: usize) -> String {
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if self.runs.len() > 1 && lo <= hi {
            format!("{median:.digits$} ({lo:.digits$}–{hi:.digits$})")
        } else {
            format!("{median:.digits$}")
        }
    }

    /// Why it failed: the first failure, and in how many runs.
    fn failure(&self) -> String {
        let failed: Vec<(usize, &&Outcome)> = self
            .runs
            .iter()
            .enumerate()
            .filter(|(_, o)| !o.ok())
            .collect();
        let first = failed
            .first()
            .and_then(|(_, o)| o.failures.first())
            .map_or("", String::as_str);
        if self.runs.len() > 1 {
            format!(
                "failed in {} of {} runs (run {}: {first})",
                failed.len(),
                self.runs.len(),
                failed.first().map_or(0, |(i, _)| i + 1)
            )
        } else {
            first.to_string()
        }
    }
}

/// The middle value (the upper one of an even count); NaN when empty.
fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        median(&v)
    }
}

/// `v`'s outcomes grouped by system, in order of first appearance.
pub fn summaries(v: &[Outcome]) -> Vec<Summary<'_>> {
    let mut names: Vec<&str> = Vec::new();
    for o in v {
        if !names.contains(&o.system.as_str()) {
            names.push(&o.system);
        }
    }
    names
        .into_iter()
        .map(|n| Summary::new(v.iter().filter(|o| o.system == n).collect()))
        .collect()
}

/// One system's runs summed up in one line, for the terminal.
pub fn summary_line(sc: &Scenario, runs: &[Outcome]) -> String {
    let Some(s) = summaries(runs).into_iter().next() else {
        return String::new();
    };
    let wall = match s.wall() {
        Some(w) => format!(
            "wall {} s ({:.2}x T_min)",
            s.with_range(w, &s.walls(), 2),
            w / sc.t_min()
        ),
        None => format!("FAILED: {}", s.failure()),
    };
    format!(
        "{:20} {wall}  CPU/GiB {}",
        s.system,
        s.with_range(s.cpu_per_gib(sc), &s.cpus_per_gib(sc), 2)
    )
}

/// The run in one line, for the terminal.
pub fn line(sc: &Scenario, o: &Outcome) -> String {
    let t = sorted_times(o);
    let spread = if t.is_empty() {
        "-".to_string()
    } else {
        format!("{:.1}/{:.1}/{:.1}", t[0], median(&t), t[t.len() - 1])
    };
    let wall = match o.wall() {
        Some(w) if o.verified => format!("{w:7.2} s {:5.2}x T_min", w / sc.t_min()),
        _ => format!(
            "FAILED ({}/{} done): {}",
            t.len(),
            o.done.len(),
            o.failures.first().map_or("", String::as_str)
        ),
    };
    format!(
        "{:20} {wall}  peers {spread} s  seed sent {:.2}xF  CPU {:.1} s ({:.2}/GiB)  RSS {:.0} MiB",
        o.system,
        o.seed_sent as f64 / (sc.size_mib * MIB) as f64,
        o.cpu_secs,
        cpu_per_gib(sc, o),
        rss_max_mib(o)
    )
}

const HEADER: &str = "scenario,topology,loss,peers,size_mib,mbit,system,wall_s,t_min_s,wall_over_t_min,peer_min_s,peer_median_s,peer_max_s,seed_sent_over_f,cpu_s,cpu_s_per_gib,rss_max_mib,verified,peer_times_s,failures,run";

/// `o` as a CSV row: the `run`-th run (from 1) of its system in `sc`.
fn csv_row(sc: &Scenario, o: &Outcome, run: usize) -> String {
    let t = sorted_times(o);
    let f = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.3}"));
    let wall = o.wall().filter(|_| o.verified);
    let times: Vec<String> = o
        .done
        .iter()
        .map(|d| d.map_or("x".into(), |v| format!("{v:.3}")))
        .collect();
    [
        sc.name.clone(),
        sc.topology.name().into(),
        format!("{}", sc.loss),
        sc.peers.to_string(),
        sc.size_mib.to_string(),
        sc.mbit.to_string(),
        o.system.clone(),
        f(wall),
        format!("{:.3}", sc.t_min()),
        f(wall.map(|w| w / sc.t_min())),
        f(t.first().copied()),
        f((!t.is_empty()).then(|| median(&t))),
        f(t.last().copied()),
        format!("{:.3}", o.seed_sent as f64 / (sc.size_mib * MIB) as f64),
        format!("{:.2}", o.cpu_secs),
        format!("{:.3}", cpu_per_gib(sc, o)),
        format!("{:.1}", rss_max_mib(o)),
        o.verified.to_string(),
        times.join(";"),
        o.failures.join("; ").replace([',', '\n'], " "),
        run.to_string(),
    ]
    .join(",")
}

/// A row written by [`csv_row`], back (per-peer RSS comes back as its maximum). The run number
/// is not kept: a system's runs are its rows in order (rows from before runs were counted
/// have no `run` column and read as one run each).
fn parse_row(line: &str) -> Option<(Scenario, Outcome)> {
    let c: Vec<&str> = line.split(',').collect();
    if c.len() < 20 {
        return None;
    }
    let sc = Scenario {
        name: c[0].into(),
        topology: Topology::parse(c[1])?,
        loss: c[2].parse().ok()?,
        peers: c[3].parse().ok()?,
        size_mib: c[4].parse().ok()?,
        mbit: c[5].parse().ok()?,
    };
    let size = (sc.size_mib * MIB) as f64;
    let o = Outcome {
        system: c[6].into(),
        done: c[18].split(';').map(|t| t.parse().ok()).collect(),
        failures: c[19]
            .split("; ")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        cpu_secs: c[14].parse().ok()?,
        rss_kib: vec![(c[16].parse::<f64>().ok()? * 1024.0) as u64],
        seed_sent: (c[13].parse::<f64>().ok()? * size) as u64,
        verified: c[17] == "true",
        machine: None,
    };
    Some((sc, o))
}

pub(crate) fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "undated".into())
}

/// Merges `results` into today's files under `dir` and rewrites them; returns their paths.
pub fn write(dir: &Path, results: &[(Scenario, Vec<Outcome>)]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let date = today();
    let csv = dir.join(format!("{date}.csv"));
    // Today's earlier rows, in their order, less the scenario and system pairs this invocation
    // redid; then this invocation's.
    let old = std::fs::read_to_string(&csv).unwrap_or_default();
    let redone = |sc: &Scenario, o: &Outcome| {
        results
            .iter()
            .any(|(s, v)| s.name == sc.name && v.iter().any(|x| x.system == o.system))
    };
    let kept = old
        .lines()
        .skip(1)
        .filter_map(parse_row)
        .filter(|(sc, o)| !redone(sc, o));
    let new = results
        .iter()
        .flat_map(|(sc, v)| v.iter().map(move |o| (sc.clone(), o.clone())));
    let mut all: Vec<(Scenario, Vec<Outcome>)> = Vec::new();
    for (sc, o) in kept.chain(new) {
        match all.iter_mut().find(|(s, _)| s.name == sc.name) {
            Some((s, v)) => {
                *s = sc;
                v.push(o);
            }
            None => all.push((sc, vec![o])),
        }
    }
    let mut text = String::from(HEADER);
    text.push('\n');
    for (sc, v) in &all {
        for s in summaries(v) {
            for (i, o) in s.runs.iter().enumerate() {
                text.push_str(&csv_row(sc, o, i + 1));
                text.push('\n');
            }
        }
    }
    std::fs::write(&csv, text)?;
    let mut paths = vec![csv];
    let font = load_font();
    let mut md = format!(
        "# bench stock, {date}\n\n\
         `cargo xtask bench stock` on this machine (2 cores shared by every host, kernel {}). \
         One seed plus N downloaders, each host a network namespace with its link shaped by tbf \
         both ways; the seed host holds the file (Starling: an nginx origin there, fetched by \
         the seed daemon). Wall time runs from the downloaders' start until the last has the \
         whole file; every output is checked with SHA-256. CPU is every process of the system \
         (seed, downloaders, tracker or origin). RSS is each downloader's peak resident set. \
         T_min = max(F/U_seed, F/D_peer, N·F/(U_seed+ΣU_peers)).\n\n",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    for (sc, v) in &all {
        md.push_str(&scenario_md(sc, v));
        if font {
            let png = dir.join(format!("{date}-{}-cdf.png", sc.name));
            cdf_plot(&png, sc, v).with_context(|| format!("plotting {}", png.display()))?;
            md.push_str(&format!(
                "\n![completion CDF, {}]({})\n\n",
                sc.name,
                png.file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into())
            ));
            paths.push(png);
        }
    }
    if font {
        let png = dir.join(format!("{date}-peers.png"));
        if peers_plot(&png, &all)? {
            md.push_str(&format!(
                "## Time vs peer count\n\n![wall time vs N]({})\n",
                png.file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into())
            ));
            paths.push(png);
        }
    }
    let md_path = dir.join(format!("{date}.md"));
    std::fs::write(&md_path, md)?;
    paths.insert(0, md_path);
    Ok(paths)
}

fn scenario_md(sc: &Scenario, v: &[Outcome]) -> String {
    let sums = summaries(v);
    let most = sums.iter().map(|s| s.runs.len()).max().unwrap_or(1);
    let runs_note = if most > 1 {
        " Systems with more than one run ran in alternating order; their wall time and CPU \
         are medians, with the runs' range in brackets, and their per-peer figures are from \
         the run with the median wall time."
    } else {
        ""
    };
    let mut s = format!(
        "## {}\n\nT_min = {:.2} s.{runs_note}\n\n\
         | system | runs | wall s | wall / T_min | per peer min / median / max s | seed sent / F | CPU-s | CPU-s per GiB delivered | peak RSS per peer, max MiB | result |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        sc.describe(),
        sc.t_min()
    );
    for m in &sums {
        let t = sorted_times(m.mid);
        let (wall, ratio) = match m.wall() {
            Some(w) => (
                m.with_range(w, &m.walls(), 2),
                format!("{:.2}", w / sc.t_min()),
            ),
            None => ("-".into(), "-".into()),
        };
        let spread = if t.is_empty() {
            "-".into()
        } else {
            format!("{:.1} / {:.1} / {:.1}", t[0], median(&t), t[t.len() - 1])
        };
        let result = if m.ok() {
            "all verified".to_string()
        } else {
            format!("{}/{} complete; {}", t.len(), m.mid.done.len(), m.failure())
        };
        s.push_str(&format!(
            "| {} | {} | {wall} | {ratio} | {spread} | {:.2} | {:.1} | {} | {:.0} | {result} |\n",
            m.system,
            m.runs.len(),
            m.mid.seed_sent as f64 / (sc.size_mib * MIB) as f64,
            m.cpu_secs(),
            m.with_range(m.cpu_per_gib(sc), &m.cpus_per_gib(sc), 2),
            m.rss_max_mib()
        ));
    }
    s.push_str(&targets(sc, &sums));
    s
}

/// The targets for this scenario, as ratios of figures from the same invocation.
fn targets(sc: &Scenario, sums: &[Summary]) -> String {
    // The seed-imported run, the setup the BitTorrent systems get; else the origin-fed one.
    let Some(st) = ["starling", "starling-origin"]
        .iter()
        .find_map(|name| sums.iter().find(|m| m.system == *name))
    else {
        return String::new();
    };
    let mut s = format!("\nTargets, for {}:\n", st.system);
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let Some(sw) = st.wall() else {
        s.push_str("Starling did not complete: every target is **not met**.\n");
        return s;
    };
    if sc.name == "default" {
        let r = sw / sc.t_min();
        s.push_str(&format!(
            "- Starling / T_min = {r:.2} (target ≤ 1.15: {})\n",
            verdict(r <= 1.15)
        ));
    }
    // "The best stock peer": the stock system that finished fastest in this scenario.
    match sums
        .iter()
        .filter(|m| !m.system.starts_with("starling"))
        .filter_map(|m| m.wall().map(|w| (w, m)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
    {
        Some((w, best)) => {
            let r = sw / w;
            // A stock peer within 4/3 of T_min puts the bar where no system can reach.
            let bar = 0.75 * w;
            let unreachable = if bar < sc.t_min() {
                format!("; the bar, {bar:.2} s, is under T_min: no system can meet it")
            } else {
                String::new()
            };
            s.push_str(&format!(
                "- Starling / best stock peer ({}, {w:.2} s) = {r:.3} (target ≤ 0.75: {}{unreachable})\n",
                best.system,
                verdict(r <= 0.75)
            ));
            let (a, b) = (st.cpu_per_gib(sc), best.cpu_per_gib(sc));
            s.push_str(&format!(
                "- CPU-s per GiB delivered: Starling {a:.2}, {} {b:.2} (target ≤: {})\n",
                best.system,
                verdict(a <= b)
            ));
        }
        None => s.push_str("- No stock system completed: Starling is the only one that did.\n"),
    }
    let rss = st.rss_max_mib();
    s.push_str(&format!(
        "- Starling peak RSS per peer: {rss:.0} MiB (target ≤ 64: {})\n",
        verdict(rss <= 64.0)
    ));
    s
}

/// plotters draws text with ab_glyph from a TTF registered at run time (Debian's
/// fonts-dejavu-core, installed by setup). Without it, no plots.
pub(crate) fn load_font() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        let Ok(bytes) = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf") else {
            eprintln!("bench stock: no DejaVuSans.ttf (fonts-dejavu-core), so no plots");
            return false;
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    })
}

pub(crate) fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

pub(crate) fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

/// The axes of a completion CDF: `x_desc` from 0 to `x_max`, the fraction complete up to 1.
pub(crate) fn cdf_axes<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    x_max: f64,
    x_desc: &str,
) -> Result<
    ChartContext<
        'a,
        BitMapBackend<'b>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
> {
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..1.02)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("fraction of peers complete")
        .draw()
        .map_err(plot_err)?;
    Ok(chart)
}

/// A step line through sorted completion times, out of `n` peers.
pub(crate) fn cdf_steps(sorted: &[f64], n: usize) -> Vec<(f64, f64)> {
    let n = n.max(1) as f64;
    let mut pts = vec![(0.0, 0.0)];
    for (k, x) in sorted.iter().enumerate() {
        pts.push((*x, k as f64 / n));
        pts.push((*x, (k + 1) as f64 / n));
    }
    pts
}

/// Fraction of downloaders complete vs time, a step line per system, T_min marked.
fn cdf_plot(path: &Path, sc: &Scenario, v: &[Outcome]) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    // Each system is drawn from its median run (see [`Summary`]), and so is the axis.
    let sums = summaries(v);
    let x_max = sums
        .iter()
        .flat_map(|m| m.mid.done.iter().flatten().copied())
        .fold(sc.t_min(), f64::max)
        * 1.05;
    let caption = format!("Completion time CDF: {}", sc.describe());
    let mut chart = cdf_axes(&root, &caption, x_max, "seconds since start")?;
    for (i, m) in sums.iter().enumerate() {
        let o = m.mid;
        let pts = cdf_steps(&sorted_times(o), o.done.len());
        let c = color(i);
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(plot_err)?
            .label(o.system.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    t_min_and_legend(&mut chart, vec![(sc.t_min(), 0.0), (sc.t_min(), 1.02)])?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The T_min line through `points`, then the legend of every series.
fn t_min_and_legend<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    points: Vec<(X::ValueType, Y::ValueType)>,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged,
    Y: Ranged,
    X::ValueType: Clone + 'static,
    Y::ValueType: Clone + 'static,
{
    chart
        .draw_series(LineSeries::new(points, BLACK.stroke_width(1)))
        .map_err(plot_err)?
        .label("T_min")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// Wall time vs N for the scenarios that differ from the default job only in N. False when
/// there are fewer than two such peer counts.
fn peers_plot(path: &Path, all: &[(Scenario, Vec<Outcome>)]) -> Result<bool> {
    let Some((base, _)) = all.iter().find(|(s, _)| s.name == "default") else {
        return Ok(false);
    };
    let same: Vec<&(Scenario, Vec<Outcome>)> = all
        .iter()
        .filter(|(s, _)| {
            s.topology == base.topology && s.size_mib == base.size_mib && s.mbit == base.mbit
        })
        .collect();
    let mut by_system: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (sc, v) in &same {
        for m in summaries(v) {
            if let Some(w) = m.wall() {
                by_system
                    .entry(m.system.to_string())
                    .or_default()
                    .push((sc.peers as f64, w));
            }
        }
    }
    let ns: Vec<usize> = {
        let mut n: Vec<usize> = same.iter().map(|(s, _)| s.peers).collect();
        n.sort();
        n.dedup();
        n
    };
    if ns.len() < 2 {
        return Ok(false);
    }
    let x_max = *ns.last().unwrap_or(&1) as f64 * 1.05;
    let y_max = by_system
        .values()
        .flatten()
        .map(|p| p.1)
        .fold(0.0, f64::max)
        * 1.1;
    let y_min = by_system
        .values()
        .flatten()
        .map(|p| p.1)
        .fold(base.t_min(), f64::min)
        * 0.8;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Wall time vs peer count: {} MiB, {} Mbit/s, {} (log scale)",
                base.size_mib,
                base.mbit,
                base.topology.name()
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            0.0..x_max,
            (y_min.max(0.1)..y_max.max(y_min * 2.0)).log_scale(),
        )
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("downloaders N")
        .y_desc("seconds until all complete")
        .draw()
        .map_err(plot_err)?;
    for (i, (name, mut pts)) in by_system.into_iter().enumerate() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = color(i);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))
            .map_err(plot_err)?;
    }
    let tmin: Vec<(f64, f64)> = ns
        .iter()
        .map(|&n| {
            let s = Scenario {
                peers: n,
                ..base.clone()
            };
            (n as f64, s.t_min())
        })
        .collect();
    t_min_and_legend(&mut chart, tmin)?;
    root.present().map_err(plot_err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_read_back_with_failures_and_missing_peers() {
        let sc = Scenario::new("lossy", Topology::Lossy, 3, 64);
        let o = Outcome {
            system: "aria2-4m".into(),
            done: vec![Some(5.5), None, Some(7.25)],
            failures: vec!["peer 2: not complete after 120 s".into()],
            cpu_secs: 12.5,
            rss_kib: vec![1024, 4096, 2048],
            seed_sent: 64 * MIB,
            verified: true,
            machine: None,
        };
        let (sc2, o2) = parse_row(&csv_row(&sc, &o, 1)).expect("row");
        assert_eq!(
            (sc2.name.as_str(), sc2.topology, sc2.peers),
            ("lossy", Topology::Lossy, 3)
        );
        assert_eq!(sc2.loss, 0.01);
        assert_eq!(o2.done, o.done);
        assert_eq!(o2.failures, o.failures);
        assert_eq!(o2.wall(), None);
        assert_eq!(o2.rss_kib, vec![4096]);
        assert_eq!(o2.seed_sent, 64 * MIB);
    }

    fn run(system: &str, walls: &[Option<f64>], cpu: f64) -> Outcome {
        Outcome {
            system: system.into(),
            failures: if walls.iter().all(Option::is_some) {
                Vec::new()
            } else {
                vec!["peer 1: not complete after 120 s".into()]
            },
            done: walls.to_vec(),
            cpu_secs: cpu,
            rss_kib: vec![40 << 10],
            seed_sent: MIB,
            verified: true,
            machine: None,
        }
    }

    #[test]
    fn a_systems_runs_sum_up_to_medians_and_any_failed_run_fails_it() {
        let sc = Scenario::new("default", Topology::Clean, 2, 256);
        let v = vec![
            run("starling", &[Some(20.0), Some(26.0)], 40.0),
            run("aria2-1m", &[Some(30.0), Some(33.0)], 30.0),
            run("starling", &[Some(23.0), Some(24.0)], 30.0),
            run("starling", &[Some(25.0), Some(25.5)], 35.0),
            run("aria2-1m", &[Some(31.0), None], 29.0),
        ];
        let sums = summaries(&v);
        assert_eq!(sums.len(), 2);
        let st = &sums[0];
        assert_eq!((st.system, st.runs.len()), ("starling", 3));
        assert_eq!(st.wall(), Some(25.5), "the run with the median wall time");
        assert_eq!(st.cpu_secs(), 35.0, "the median CPU, from whichever run");
        assert_eq!(st.with_range(25.5, &st.walls(), 1), "25.5 (24.0–26.0)");
        let aria = &sums[1];
        assert!(!aria.ok());
        assert_eq!(aria.wall(), None);
        assert_eq!(
            aria.failure(),
            "failed in 1 of 2 runs (run 2: peer 1: not complete after 120 s)"
        );
        let md = scenario_md(&sc, &v);
        assert!(
            md.contains("| starling | 3 | 25.50 (24.00–26.00) |"),
            "{md}"
        );
        assert!(md.contains("No stock system completed"), "{md}");
    }

    #[test]
    fn a_bar_under_t_min_is_called_unreachable() {
        // 256 MiB at 100 Mbit/s: T_min 21.47 s.
        let sc = Scenario::new("n2", Topology::Clean, 2, 256);
        let md = |aria2: f64| {
            scenario_md(
                &sc,
                &[
                    run("starling", &[Some(23.0), Some(23.2)], 4.0),
                    run("aria2-1m", &[Some(aria2 - 1.0), Some(aria2)], 5.0),
                ],
            )
        };
        let near = md(28.0);
        assert!(
            near.contains("= 0.829 (target ≤ 0.75: **not met**; the bar, 21.00 s, is under T_min"),
            "{near}"
        );
        let far = md(35.0);
        assert!(far.contains("= 0.663 (target ≤ 0.75: met)\n"), "{far}");
    }

    #[test]
    fn a_later_invocation_replaces_every_run_of_what_it_redid_and_keeps_the_rest() {
        let dir = std::env::temp_dir().join(format!("stock-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sc = Scenario::new("n2", Topology::Clean, 2, 64);
        let first = vec![(
            sc.clone(),
            vec![
                run("starling", &[Some(9.0), Some(9.5)], 5.0),
                run("starling", &[Some(8.0), Some(8.5)], 5.0),
                run("aria2-1m", &[Some(12.0), Some(12.5)], 6.0),
            ],
        )];
        write(&dir, &first).expect("first write");
        let second = vec![(
            sc.clone(),
            vec![run("starling", &[Some(7.0), Some(7.5)], 4.0)],
        )];
        let paths = write(&dir, &second).expect("second write");
        let csv = paths
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "csv"))
            .expect("a csv");
        let text = std::fs::read_to_string(csv).expect("read csv");
        let rows: Vec<(Scenario, Outcome)> = text.lines().skip(1).filter_map(parse_row).collect();
        let systems: Vec<&str> = rows.iter().map(|(_, o)| o.system.as_str()).collect();
        assert_eq!(systems, ["aria2-1m", "starling"], "{text}");
        assert_eq!(rows[1].1.wall(), Some(7.5));
        assert!(text
            .lines()
            .all(|l| l.ends_with(",1") || l.ends_with(",run")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
