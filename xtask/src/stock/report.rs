//! `bench stock`'s outputs: a line per run on stdout, and under `bench/results/`:
//! `<date>.csv` (one row per scenario and system; a later run the same day replaces the rows
//! it redid and keeps the others), `<date>.md` (a table per scenario and the targets),
//! `<date>-<scenario>-cdf.png` (completion-time CDF per system) and `<date>-peers.png` (wall
//! time vs peer count).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::coord::ranged1d::Ranged;
use plotters::prelude::*;
use starling_tests::netlab::Topology;

use super::{Outcome, Scenario};
use crate::swarm::MIB;

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

const HEADER: &str = "scenario,topology,loss,peers,size_mib,mbit,system,wall_s,t_min_s,wall_over_t_min,peer_min_s,peer_median_s,peer_max_s,seed_sent_over_f,cpu_s,cpu_s_per_gib,rss_max_mib,verified,peer_times_s,failures";

fn csv_row(sc: &Scenario, o: &Outcome) -> String {
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
    ]
    .join(",")
}

/// A row written by [`csv_row`], back (per-peer RSS comes back as its maximum).
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
    };
    Some((sc, o))
}

fn today() -> String {
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
    // Earlier scenarios from today, in their order, unless this run redid them.
    let mut all: Vec<(Scenario, Vec<Outcome>)> = Vec::new();
    let old = std::fs::read_to_string(&csv).unwrap_or_default();
    let rows = old.lines().skip(1).filter_map(parse_row);
    let new = results
        .iter()
        .flat_map(|(sc, v)| v.iter().map(move |o| (sc.clone(), o.clone())));
    for (sc, o) in rows.chain(new) {
        match all.iter_mut().find(|(s, _)| s.name == sc.name) {
            Some((s, v)) => {
                *s = sc;
                match v.iter_mut().find(|x| x.system == o.system) {
                    Some(x) => *x = o,
                    None => v.push(o),
                }
            }
            None => all.push((sc, vec![o])),
        }
    }
    let mut text = String::from(HEADER);
    text.push('\n');
    for (sc, v) in &all {
        for o in v {
            text.push_str(&csv_row(sc, o));
            text.push('\n');
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
    let mut s = format!(
        "## {}\n\nT_min = {:.2} s.\n\n\
         | system | wall s | wall / T_min | per peer min / median / max s | seed sent / F | CPU-s | CPU-s per GiB delivered | peak RSS per peer, max MiB | result |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        sc.describe(),
        sc.t_min()
    );
    for o in v {
        let t = sorted_times(o);
        let (wall, ratio) = match o.wall().filter(|_| o.verified) {
            Some(w) => (format!("{w:.2}"), format!("{:.2}", w / sc.t_min())),
            None => ("-".into(), "-".into()),
        };
        let spread = if t.is_empty() {
            "-".into()
        } else {
            format!("{:.1} / {:.1} / {:.1}", t[0], median(&t), t[t.len() - 1])
        };
        let result = if o.ok() {
            "all verified".to_string()
        } else {
            format!(
                "{}/{} complete; {}",
                t.len(),
                o.done.len(),
                o.failures.first().map_or("", String::as_str)
            )
        };
        s.push_str(&format!(
            "| {} | {wall} | {ratio} | {spread} | {:.2} | {:.1} | {:.2} | {:.0} | {result} |\n",
            o.system,
            o.seed_sent as f64 / (sc.size_mib * MIB) as f64,
            o.cpu_secs,
            cpu_per_gib(sc, o),
            rss_max_mib(o)
        ));
    }
    s.push_str(&targets(sc, v));
    s
}

/// The targets for this scenario, as ratios from the same run.
fn targets(sc: &Scenario, v: &[Outcome]) -> String {
    let Some(st) = v.iter().find(|o| o.system == "starling") else {
        return String::new();
    };
    let stock: Vec<&Outcome> = v
        .iter()
        .filter(|o| o.system != "starling" && o.ok())
        .collect();
    let mut s = String::from("\n");
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let Some(sw) = st.wall().filter(|_| st.ok()) else {
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
    match stock
        .iter()
        .filter_map(|o| o.wall().map(|w| (w, o)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
    {
        Some((w, best)) => {
            let r = sw / w;
            s.push_str(&format!(
                "- Starling / best stock peer ({}, {w:.2} s) = {r:.2} (target ≤ 0.75: {})\n",
                best.system,
                verdict(r <= 0.75)
            ));
            let (a, b) = (cpu_per_gib(sc, st), cpu_per_gib(sc, best));
            s.push_str(&format!(
                "- CPU-s per GiB delivered: Starling {a:.2}, {} {b:.2} (target ≤: {})\n",
                best.system,
                verdict(a <= b)
            ));
        }
        None => s.push_str("- No stock system completed: Starling is the only one that did.\n"),
    }
    let rss = rss_max_mib(st);
    s.push_str(&format!(
        "- Starling peak RSS per peer: {rss:.0} MiB (target ≤ 64: {})\n",
        verdict(rss <= 64.0)
    ));
    s
}

/// plotters draws text with ab_glyph from a TTF registered at run time (Debian's
/// fonts-dejavu-core, installed by setup). Without it, no plots.
fn load_font() -> bool {
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

fn color(i: usize) -> RGBColor {
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

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

/// Fraction of downloaders complete vs time, a step line per system, T_min marked.
fn cdf_plot(path: &Path, sc: &Scenario, v: &[Outcome]) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let x_max = v
        .iter()
        .flat_map(|o| o.done.iter().flatten().copied())
        .fold(sc.t_min(), f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Completion time CDF: {}", sc.describe()),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..1.02)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("fraction of peers complete")
        .draw()
        .map_err(plot_err)?;
    for (i, o) in v.iter().enumerate() {
        let t = sorted_times(o);
        let n = o.done.len().max(1) as f64;
        let mut pts = vec![(0.0, 0.0)];
        for (k, x) in t.iter().enumerate() {
            pts.push((*x, k as f64 / n));
            pts.push((*x, (k + 1) as f64 / n));
        }
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
        for o in v {
            if let Some(w) = o.wall().filter(|_| o.verified) {
                by_system
                    .entry(o.system.clone())
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
        };
        let (sc2, o2) = parse_row(&csv_row(&sc, &o)).expect("row");
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
}
