//! `cargo xtask bench throughput`: how fast one seed feeds its peers when the link is fast, and
//! what each GiB costs in CPU, side by side with kernel TCP (nginx with sendfile → curl) and aria2
//! in the same topology and the same command.
//!
//! Shapes (every host a network namespace; a netlab topology, so a router sits between the seed
//! and the peers):
//! - `pair`: 1 → 1, 2 GiB, unshaped; `pair-jumbo`: the same at MTU 9000;
//! - `fan-1g`, `fan-10g`: 1 → 4, 1 GiB, every link shaped (tbf) to 1 or 10 Gbit/s.
//!
//! Starling runs twice per shape, with `daemon.runtime_threads` 1 and 2 (`starling-t1`,
//! `starling-t2`); the seed imports the file before the timer (as mktorrent hashes it for aria2)
//! and the peers name it by digest. Systems run in alternating order per round.
//!
//! Per run: wall time, GB/s delivered (N × F / wall), wall / T_min where the links are shaped,
//! and CPU-seconds per GiB delivered, for the whole machine (/proc/stat: user, system, softirq;
//! every process and the kernel's work for them) and for the system's own processes (user +
//! system). It writes `bench/results/<date>-throughput.{md,csv}` and a PNG per figure.
//!
//! `--warm-memory`: this VM's balloon hands free memory back to the host (free page
//! reporting), so the first write to a page the guest freed a while ago costs a host fault. A
//! download's page-cache pages are such pages: on this machine that made the page-cache copy
//! cost about 2.4 CPU-s per GiB instead of 0.2, a third of a peer's CPU, and it varied with
//! which system ran after which. With the option, reporting is off for the bench's duration
//! (restored after, on error too) and the memory the runs will use is touched once first, so
//! every system writes warm pages, as on a host without a balloon. Its results go to
//! `<date>-throughput-warm.*`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use starling_tests::netlab::{self, Topology};
use starling_tests::{is_root, sha256_file};

use super::memory::warm_up_to;
use super::procs::MachineCpu;
use super::stock::report::{color, load_font, plot_err, today};
use super::stock::{self, bt, Outcome};
use super::{make_file, release_build, MIB};
use crate::{root, setup};

/// One transfer shape.
#[derive(Clone, Copy, Debug)]
struct Shape {
    name: &'static str,
    topology: Topology,
    peers: usize,
    size_mib: u64,
    /// Every host link's rate; 0: unshaped.
    mbit: u32,
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "pair",
        topology: Topology::Clean,
        peers: 1,
        size_mib: 2048,
        mbit: 0,
    },
    Shape {
        name: "pair-jumbo",
        topology: Topology::Jumbo,
        peers: 1,
        size_mib: 2048,
        mbit: 0,
    },
    Shape {
        name: "fan-1g",
        topology: Topology::Clean,
        peers: 4,
        size_mib: 1024,
        mbit: 1000,
    },
    Shape {
        name: "fan-10g",
        topology: Topology::Clean,
        peers: 4,
        size_mib: 1024,
        mbit: 10_000,
    },
];

const SYSTEMS: [&str; 4] = ["starling-t1", "starling-t2", "http", "aria2"];

impl Shape {
    fn describe(&self) -> String {
        let rate = match self.mbit {
            0 => "unshaped".to_string(),
            m => format!("{m} Mbit/s"),
        };
        format!(
            "{}: 1 → {}, {} MiB, {rate}, {} (path MTU {})",
            self.name,
            self.peers,
            self.size_mib,
            self.topology.name(),
            self.topology.path_mtu()
        )
    }

    /// The links' bound, where they are shaped.
    fn t_min(&self) -> Option<f64> {
        (self.mbit > 0).then(|| super::run::t_min(self.size_mib * MIB, self.peers, self.mbit))
    }

    fn delivered_gib(&self) -> f64 {
        (self.peers as u64 * self.size_mib) as f64 / 1024.0
    }
}

/// `cargo xtask bench throughput` (bench/README.md).
#[derive(clap::Args)]
pub struct Args {
    /// Shapes to run (repeatable): pair, pair-jumbo, fan-1g, fan-10g. Default: all.
    #[arg(long)]
    shape: Vec<String>,
    /// Systems to run: starling-t1, starling-t2, http, aria2. Default: all.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// Rounds per shape, in alternating order; medians are reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Turn the VM's free page reporting off while the bench runs and touch the memory first,
    /// so no system pays host faults on its page-cache writes (see the module doc).
    #[arg(long)]
    warm_memory: bool,
}

/// One run's figures.
struct Row {
    shape: Shape,
    system: String,
    round: usize,
    /// Until the last downloader had the file; None when any failed or did not verify.
    wall: Option<f64>,
    machine: MachineCpu,
    /// The system's own processes' CPU seconds.
    own: f64,
    /// Why it failed, if it did.
    failure: Option<String>,
}

impl Row {
    fn new(shape: Shape, system: &str, round: usize, out: &Outcome) -> Row {
        Row {
            shape,
            system: system.to_string(),
            round,
            wall: out.ok().then(|| out.wall()).flatten(),
            // While the downloaders ran: the outputs' checks come after.
            machine: out.machine.unwrap_or_default(),
            own: out.cpu_secs,
            failure: (!out.ok()).then(|| {
                out.failures
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "failed".into())
            }),
        }
    }

    /// A row of an earlier invocation's CSV (see [`write`]).
    fn parse(line: &str) -> Option<Row> {
        let c: Vec<&str> = line.split(',').collect();
        let name = *c.first()?;
        let shape = *SHAPES.iter().find(|s| s.name == name)?;
        let num = |i: usize| c.get(i).and_then(|v| v.parse::<f64>().ok());
        let ok = *c.get(11)? == "true";
        Some(Row {
            shape,
            system: c.get(1)?.to_string(),
            round: c.get(2)?.parse().ok()?,
            wall: num(3).filter(|_| ok),
            machine: MachineCpu {
                busy: num(6)?,
                user: num(7)?,
                system: num(8)?,
                softirq: num(9)?,
                total: 0.0,
            },
            own: num(10)?,
            failure: (!ok).then(|| "failed (an earlier run)".to_string()),
        })
    }

    fn wall(&self) -> Option<f64> {
        self.wall
    }

    fn gbps(&self) -> Option<f64> {
        let bytes = self.shape.delivered_gib() * (1u64 << 30) as f64;
        self.wall().map(|w| bytes / w / 1e9)
    }

    fn per_gib(&self, secs: f64) -> f64 {
        secs / self.shape.delivered_gib()
    }
}

pub fn run(args: Args) -> Result<()> {
    let shapes: Vec<Shape> = if args.shape.is_empty() {
        SHAPES.to_vec()
    } else {
        args.shape
            .iter()
            .map(|n| {
                SHAPES
                    .iter()
                    .find(|s| s.name == n)
                    .copied()
                    .with_context(|| {
                        format!("unknown shape {n:?}: use pair, pair-jumbo, fan-1g or fan-10g")
                    })
            })
            .collect::<Result<_>>()?
    };
    let systems: Vec<&str> = if args.systems.is_empty() {
        SYSTEMS.to_vec()
    } else {
        for s in &args.systems {
            if !SYSTEMS.contains(&s.as_str()) {
                bail!("unknown system {s:?}: use {}", SYSTEMS.join(", "));
            }
        }
        SYSTEMS
            .iter()
            .copied()
            .filter(|s| args.systems.iter().any(|w| w == s))
            .collect()
    };
    if !is_root() {
        bail!("bench throughput builds network namespaces: run it as root");
    }
    setup::ensure_stock_peers(false)?;
    release_build(true)?;
    let dir = root().join("target/bench-throughput");
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    // Every downloader's page cache (its copy and its output) plus headroom, within what the
    // machine has free.
    let _warm = if args.warm_memory {
        let need: u64 = shapes
            .iter()
            .map(|s| (s.peers as u64 + 1) * s.size_mib * MIB * 2)
            .max()
            .unwrap_or(0)
            + (2 << 30);
        Some(warm_up_to(need)?)
    } else {
        None
    };
    let mut rows: Vec<Row> = Vec::new();
    for (k, shape) in shapes.iter().enumerate() {
        println!("\n== {}", shape.describe());
        let file = www.join(format!("artifact-{}m.bin", shape.size_mib));
        make_file(&file, shape.size_mib * MIB)?;
        let want = sha256_file(&file);
        let lab = netlab::build_with_loss(
            &format!("t{k}"),
            120 + 2 * k as u8,
            shape.peers + 1,
            shape.mbit,
            shape.topology,
            0.0,
        )
        .map_err(anyhow::Error::msg)?;
        let limit = shape.t_min().unwrap_or(20.0).max(20.0) * 10.0;
        let job = stock::Job {
            lab: &lab,
            peers: shape.peers,
            file: &file,
            want: &want,
            limit: Duration::from_secs_f64(limit),
        };
        let announce = format!("http://{}:{}/announce", lab.hosts[0].addr, bt::TRACKER_PORT);
        let torrent = if systems.contains(&"aria2") {
            let path = dir.join(format!("{}.torrent", shape.name));
            Some(bt::make_torrent(&file, &announce, 1, &path)?)
        } else {
            None
        };
        for round in 0..args.runs as usize {
            let mut order = systems.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for system in order {
                let work = dir.join("run").join(system);
                let out = match (system, &torrent) {
                    ("starling-t1", _) => stock::starling(&job, true, "runtime_threads = 1"),
                    ("starling-t2", _) => stock::starling(&job, true, "runtime_threads = 2"),
                    ("http", _) => stock::http(&job, &work),
                    ("aria2", Some(t)) => bt::run(bt::Client::Aria2, &job, t, &work),
                    _ => bail!("no way to run {system}"),
                };
                let out = out.unwrap_or_else(|e| Outcome::failed(system, shape.peers, e));
                let row = Row::new(*shape, system, round, &out);
                println!("  {}", line(&row));
                if out.seed_sent > 0 {
                    // Above 1: headers, control traffic, and resends of what was lost.
                    println!(
                        "    the seed's link carried {:.3} x F",
                        out.seed_sent as f64 / (shape.size_mib << 20) as f64
                    );
                }
                rows.push(row);
            }
        }
        drop(lab);
    }
    let name = if args.warm_memory {
        "throughput-warm"
    } else {
        "throughput"
    };
    for p in write(&root().join("bench/results"), name, rows)? {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn line(r: &Row) -> String {
    let Some(wall) = r.wall() else {
        return format!(
            "{:<12} failed: {}",
            r.system,
            r.failure.as_deref().unwrap_or("")
        );
    };
    let vs = r
        .shape
        .t_min()
        .map_or(String::new(), |t| format!(" ({:.2} × T_min)", wall / t));
    let m = &r.machine;
    format!(
        "{:<12} {wall:>7.2} s{vs}  {:.2} GB/s  CPU-s/GiB machine {:.2} (user {:.2}, sys {:.2}, softirq {:.2}), own {:.2}",
        r.system,
        r.gbps().unwrap_or(f64::NAN),
        r.per_gib(m.busy),
        r.per_gib(m.user),
        r.per_gib(m.system),
        r.per_gib(m.softirq),
        r.per_gib(r.own),
    )
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| {
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    })
}

/// Medians per (shape, system), over runs that finished and verified.
struct Summary {
    shape: Shape,
    system: String,
    runs: usize,
    ok: usize,
    wall: Option<f64>,
    gbps: Option<f64>,
    machine: [Option<f64>; 4],
    own: Option<f64>,
}

fn summaries(rows: &[Row]) -> Vec<Summary> {
    let mut groups: BTreeMap<(usize, usize), Vec<&Row>> = BTreeMap::new();
    for r in rows {
        let s = SHAPES
            .iter()
            .position(|s| s.name == r.shape.name)
            .unwrap_or(0);
        let y = SYSTEMS.iter().position(|y| *y == r.system).unwrap_or(0);
        groups.entry((s, y)).or_default().push(r);
    }
    groups
        .into_values()
        .map(|g| {
            let ok: Vec<&&Row> = g.iter().filter(|r| r.wall().is_some()).collect();
            let med = |f: &dyn Fn(&Row) -> f64| median(ok.iter().map(|r| f(r)).collect());
            Summary {
                shape: g[0].shape,
                system: g[0].system.clone(),
                runs: g.len(),
                ok: ok.len(),
                wall: med(&|r| r.wall().unwrap_or(f64::NAN)),
                gbps: med(&|r| r.gbps().unwrap_or(f64::NAN)),
                machine: [
                    med(&|r| r.per_gib(r.machine.busy)),
                    med(&|r| r.per_gib(r.machine.user)),
                    med(&|r| r.per_gib(r.machine.system)),
                    med(&|r| r.per_gib(r.machine.softirq)),
                ],
                own: med(&|r| r.per_gib(r.own)),
            }
        })
        .collect()
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// Writes today's report (md, csv, PNGs) from `new` and the rows of today's earlier
/// invocations whose shape and system `new` did not run again; returns the paths.
fn write(dir: &Path, name: &str, new: Vec<Row>) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let date = today();
    let base = dir.join(format!("{date}-{name}"));
    let earlier = std::fs::read_to_string(base.with_extension("csv")).unwrap_or_default();
    let mut rows: Vec<Row> = earlier
        .lines()
        .skip(1)
        .filter_map(Row::parse)
        .filter(|old| {
            !new.iter()
                .any(|r| r.shape.name == old.shape.name && r.system == old.system)
        })
        .collect();
    rows.extend(new);
    // Shapes, then systems, in their listed order; each pair's runs in order.
    rows.sort_by_key(|r| {
        (
            SHAPES.iter().position(|s| s.name == r.shape.name),
            SYSTEMS.iter().position(|y| *y == r.system),
            r.round,
        )
    });
    let rows = &rows[..];
    let mut csv = String::from(
        "shape,system,round,wall_s,gb_per_s,t_min_s,machine_cpu_s,machine_user_s,machine_system_s,machine_softirq_s,own_cpu_s,verified\n",
    );
    for r in rows {
        csv.push_str(&csv_line(r));
        csv.push('\n');
    }
    let csv_path = base.with_extension("csv");
    std::fs::write(&csv_path, csv)?;
    let sums = summaries(rows);
    let mut md = format!(
        "# bench {name}, {date}\n\n`cargo xtask bench {}` on this machine (2 cores shared by every host). \
         GB/s is bytes delivered (N × F) over the wall time. CPU-s per GiB delivered: machine-wide \
         from /proc/stat (every process and the kernel's work, softirq included: what the whole \
         machine spent), and the system's own processes (user + system). Medians over the runs that \
         finished and verified.{}\n",
        if name.ends_with("warm") {
            "throughput --warm-memory"
        } else {
            "throughput"
        },
        if name.ends_with("warm") {
            " With `--warm-memory`: the VM's free page reporting off and memory touched first, so no \
             system's page-cache writes pay host faults (a host without a balloon)."
        } else {
            ""
        }
    );
    let mut current = "";
    for s in &sums {
        if s.shape.name != current {
            current = s.shape.name;
            md.push_str(&format!(
                "\n## {}\n\n{}\n\n| system | runs ok | wall s | GB/s | wall / T_min | machine CPU-s/GiB | user | system | softirq | own CPU-s/GiB |\n|---|---|---|---|---|---|---|---|---|---|\n",
                s.shape.name,
                s.shape.describe()
            ));
        }
        let vs = match (s.wall, s.shape.t_min()) {
            (Some(w), Some(t)) => format!("{:.2}", w / t),
            _ => "–".into(),
        };
        md.push_str(&format!(
            "| {} | {} of {} | {} | {} | {vs} | {} | {} | {} | {} | {} |\n",
            s.system,
            s.ok,
            s.runs,
            fmt(s.wall, 2),
            fmt(s.gbps, 2),
            fmt(s.machine[0], 2),
            fmt(s.machine[1], 2),
            fmt(s.machine[2], 2),
            fmt(s.machine[3], 2),
            fmt(s.own, 2),
        ));
    }
    let mut paths = vec![csv_path];
    if load_font() {
        let gbps = base.with_file_name(format!("{date}-{name}-gbps.png"));
        plot(&gbps, &sums, "GB/s delivered (higher is better)", |s| {
            s.gbps
        })?;
        let cpu = base.with_file_name(format!("{date}-{name}-cpu.png"));
        plot(
            &cpu,
            &sums,
            "machine CPU-s per GiB delivered (lower is better)",
            |s| s.machine[0],
        )?;
        md.push_str(&format!(
            "\n![GB/s per shape]({date}-{name}-gbps.png)\n\n![CPU per GiB per shape]({date}-{name}-cpu.png)\n"
        ));
        paths.push(gbps);
        paths.push(cpu);
    }
    let md_path = base.with_extension("md");
    std::fs::write(&md_path, md)?;
    paths.insert(0, md_path);
    Ok(paths)
}

/// A row as the CSV holds it (and [`Row::parse`] reads it back).
fn csv_line(r: &Row) -> String {
    format!(
        "{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{}",
        r.shape.name,
        r.system,
        r.round,
        fmt(r.wall(), 3),
        fmt(r.gbps(), 3),
        fmt(r.shape.t_min(), 3),
        r.machine.busy,
        r.machine.user,
        r.machine.system,
        r.machine.softirq,
        r.own,
        r.wall.is_some()
    )
}

/// One value per shape and system: a point per system at each shape, joined by a line.
fn plot(
    path: &Path,
    sums: &[Summary],
    what: &str,
    value: impl Fn(&Summary) -> Option<f64>,
) -> Result<()> {
    let shapes: Vec<&str> = {
        let mut v: Vec<&str> = sums.iter().map(|s| s.shape.name).collect();
        v.dedup();
        v
    };
    let y_max = sums.iter().filter_map(&value).fold(0.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("bench throughput: {what}"), ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..shapes.len() as f64 - 0.5, 0.0..y_max.max(0.1))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_labels(shapes.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            shapes
                .get(i as usize)
                .filter(|_| (x - i).abs() < 0.01)
                .map_or(String::new(), |s| s.to_string())
        })
        .y_desc(what)
        .draw()
        .map_err(plot_err)?;
    for (i, system) in SYSTEMS.iter().enumerate() {
        let pts: Vec<(f64, f64)> = shapes
            .iter()
            .enumerate()
            .filter_map(|(x, name)| {
                let s = sums
                    .iter()
                    .find(|s| s.shape.name == *name && s.system == *system)?;
                Some((x as f64, value(s)?))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let c = color(i);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(*system)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csv_row_reads_back() {
        let r = Row {
            shape: SHAPES[2],
            system: "aria2".into(),
            round: 1,
            wall: Some(12.5),
            machine: MachineCpu {
                user: 1.0,
                system: 2.0,
                softirq: 0.5,
                busy: 3.5,
                total: 9.0,
            },
            own: 3.25,
            failure: None,
        };
        let line = csv_line(&r);
        let back = Row::parse(&line).expect("parses");
        assert_eq!(
            (back.shape.name, back.system.as_str(), back.round),
            ("fan-1g", "aria2", 1)
        );
        assert_eq!(back.wall, Some(12.5));
        assert_eq!((back.machine.busy, back.own), (3.5, 3.25));
        let failed = line.replace(",true", ",false");
        assert_eq!(Row::parse(&failed).expect("parses").wall, None);
        assert!(Row::parse("nope,aria2,0").is_none());
    }
}
