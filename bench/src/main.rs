//! `cargo xtask bench get`: Starling's single-peer data path against baselines run in the same
//! command, printed as ratios (absolute times on a shared 2-core machine are noise):
//! - the chained SHA-256 piece check (Starling's path) vs raw `ring::digest` on the same buffers;
//! - the io_uring piece store vs plain `pwrite` of the same pieces;
//! - `starling get` of a file from loopback nginx vs `curl -o` of the same file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use starling::core::{Manifest, PiecePlan, TaskId};
use starling::storage::{LeaseMode, Store, TaskHeader};
use starling_tests::{random_bytes, sha256_file, Nginx};

const MIB: usize = 1024 * 1024;

struct Opts {
    size_mib: usize,
    runs: usize,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Opts {
        size_mib: 1024,
        runs: 5,
    };
    let mut it = args.iter().skip(1);
    if args.first().map(String::as_str) != Some("get") {
        bail!("usage: starling-bench get [--size-mib N] [--runs N]");
    }
    while let Some(a) = it.next() {
        let v = it.next().context("a flag needs a value")?;
        match a.as_str() {
            "--size-mib" => opts.size_mib = v.parse()?,
            "--runs" => opts.runs = v.parse()?,
            _ => bail!("unknown flag {a}"),
        }
    }
    let work = starling_tests::root().join("target/bench-work");
    std::fs::create_dir_all(&work)?;
    println!(
        "bench get: {} MiB, {} runs each, medians; machine: {} cores",
        opts.size_mib,
        opts.runs,
        cores()
    );
    let chain = bench_chain(opts.runs)?;
    let store = bench_store(&work, opts.runs)?;
    let get = bench_get(&work, &opts)?;
    println!();
    println!(
        "{:<40} {:>12} {:>12} {:>8}  target",
        "measure", "starling", "baseline", "ratio"
    );
    println!(
        "{:<40} {:>12.2} {:>12.2} {:>8.3}  >= 0.95 (chain/ring)",
        "SHA-256 piece check (chained), GB/s",
        chain.0,
        chain.1,
        chain.0 / chain.1
    );
    println!(
        "{:<40} {:>12.2} {:>12.2} {:>8.3}  (uring/pwrite throughput)",
        "store write, GB/s (vs pwrite)",
        store.0,
        store.1,
        store.0 / store.1
    );
    println!(
        "{:<40} {:>12.3} {:>12.3} {:>8.3}  <= 1.05 (starling/curl, issue #32)",
        format!("get {} MiB wall, s (vs curl -o)", opts.size_mib),
        get.wall.0,
        get.wall.1,
        get.wall.0 / get.wall.1
    );
    println!(
        "{:<40} {:>12.3} {:>12.3} {:>8.3}  (starling/curl)",
        format!("get {} MiB CPU user+sys, s", opts.size_mib),
        get.cpu.0,
        get.cpu.1,
        get.cpu.0 / get.cpu.1
    );
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// 256 pieces of 1 MiB, each as the 64 KiB chunks a network read delivers.
fn pieces() -> Vec<Vec<Bytes>> {
    (0..256)
        .map(|i| {
            let piece = Bytes::from(random_bytes(MIB, i));
            (0..16)
                .map(|c| piece.slice(c * 64 * 1024..(c + 1) * 64 * 1024))
                .collect()
        })
        .collect()
}

/// (Starling's piece check GB/s, raw ring GB/s) on the same 1 MiB pieces, fed as the 64 KiB
/// chunks a network read delivers: each piece checked from its start value to its end value
/// (`core::Link`, what every download does: one SHA-256 pass, the last piece's end being the
/// content digest), against ring hashing each whole piece.
fn bench_chain(runs: usize) -> Result<(f64, f64)> {
    let ps = pieces();
    let flat: Vec<u8> = ps.iter().flat_map(|cs| cs.concat()).collect();
    let plan = PiecePlan::new(flat.len() as u64, MIB as u64)?;
    let m = Manifest::of_content(plan, &flat)?;
    let bytes = flat.len() as f64;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        for (p, cs) in plan.pieces().zip(&ps) {
            let link = m.link(p.index).context("a piece of the plan")?;
            assert!(link.holds(&p, p.index + 1 == plan.count(), cs));
        }
        ours.push(bytes / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        for p in flat.chunks(MIB) {
            std::hint::black_box(ring::digest::digest(&ring::digest::SHA256, p));
        }
        raw.push(bytes / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok((median(ours), median(raw)))
}

/// (io_uring store GB/s, pwrite GB/s), writing the same 1 MiB pieces to the page cache.
fn bench_store(work: &Path, runs: usize) -> Result<(f64, f64)> {
    let ps: Vec<Bytes> = pieces()
        .into_iter()
        .map(|cs| Bytes::from(cs.concat()))
        .collect();
    let len = (ps.len() * MIB) as u64;
    let rt = tokio::runtime::Runtime::new()?;
    let (mut uring, mut pw) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let dir = tempfile::tempdir_in(work)?;
        let secs = rt.block_on(async {
            let store = Store::open(dir.path(), Duration::from_secs(3600))?;
            let id = TaskId::for_url(&format!("http://bench/{run}"), &[])?;
            let plan = PiecePlan::new(len, MIB as u64)?;
            let header = TaskHeader {
                id,
                plan,
                expected: None,
                validator: String::new(),
                url: String::new(),
            };
            let task = store.create(store.acquire(&id, LeaseMode::Exclusive).await?, header)?;
            let whole: Vec<u8> = ps.iter().flat_map(|p| p.iter().copied()).collect();
            let m = Manifest::of_content(plan, &whole)?;
            drop(whole);
            let t = Instant::now();
            let writes = plan.pieces().map(|p| {
                task.write_piece(
                    p,
                    vec![ps[p.index as usize].clone()],
                    m.link(p.index).expect("a piece of the plan"),
                )
            });
            let results: Vec<_> = futures::stream::iter(writes)
                .buffer_unordered(8)
                .collect()
                .await;
            let secs = t.elapsed().as_secs_f64();
            for r in results {
                r?;
            }
            anyhow::Ok(secs)
        })?;
        uring.push(len as f64 / secs / 1e9);
        let path = dir.path().join("pwrite.bin");
        let f = std::fs::File::create(&path)?;
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len)?;
        let t = Instant::now();
        for (i, p) in ps.iter().enumerate() {
            std::os::unix::fs::FileExt::write_all_at(&f, p, (i * MIB) as u64)?;
        }
        pw.push(len as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    Ok((median(uring), median(pw)))
}

struct GetResult {
    wall: (f64, f64),
    cpu: (f64, f64),
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_CHILDREN covers reaped children.
    let r = unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut r);
        r
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(r.ru_utime) + tv(r.ru_stime)
}

/// Runs a command, returning (wall s, CPU s of the child). Dirty pages left by earlier runs
/// are flushed first (not timed), so no run pays for another's writeback.
fn timed(cmd: &mut Command) -> Result<(f64, f64)> {
    rustix::fs::sync();
    let c0 = children_cpu();
    let t = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let wall = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok((wall, children_cpu() - c0))
}

fn bench_get(work: &Path, opts: &Opts) -> Result<GetResult> {
    let bin = std::env::var_os("STARLING_BIN")
        .map(PathBuf::from)
        .context("STARLING_BIN is not set; run through cargo xtask bench get")?;
    let www = work.join("www");
    std::fs::create_dir_all(&www)?;
    let file = www.join(format!("get-{}.bin", opts.size_mib));
    let len = (opts.size_mib * MIB) as u64;
    if std::fs::metadata(&file)
        .map(|m| m.len() != len)
        .unwrap_or(true)
    {
        let mut data = Vec::with_capacity(len as usize);
        for i in 0..opts.size_mib {
            data.extend_from_slice(&random_bytes(MIB, 1000 + i as u64));
        }
        std::fs::write(&file, data)?;
    }
    let want = sha256_file(&file);
    let nginx = Nginx::start(&www);
    let url = nginx.url(
        file.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default(),
    );
    let data = work.join("data");
    let (out_s, out_c) = (work.join("out-starling.bin"), work.join("out-curl.bin"));
    // Warm the origin's page cache so neither side pays for the first read from disk.
    timed(Command::new("curl").args(["-sS", "-o", "/dev/null", &url]))?;
    let (mut sw, mut sc, mut cw, mut cc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..opts.runs {
        let mut starling = || -> Result<()> {
            let _ = std::fs::remove_dir_all(&data);
            let _ = std::fs::remove_file(&out_s);
            let (w, c) = timed(
                Command::new(&bin)
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["get", &url, "-q", "-O"])
                    .arg(&out_s),
            )?;
            sw.push(w);
            sc.push(c);
            Ok(())
        };
        let mut curl = || -> Result<()> {
            let _ = std::fs::remove_file(&out_c);
            let (w, c) = timed(
                Command::new("curl")
                    .args(["-sS", "-o"])
                    .arg(&out_c)
                    .arg(&url),
            )?;
            cw.push(w);
            cc.push(c);
            Ok(())
        };
        // Alternate who goes first, so page-cache and writeback effects fall on both.
        if run % 2 == 0 {
            starling()?;
            curl()?;
        } else {
            curl()?;
            starling()?;
        }
        println!(
            "  run {run}: starling {:.3} s, curl {:.3} s",
            sw[run], cw[run]
        );
    }
    if sha256_file(&out_s) != want || sha256_file(&out_c) != want {
        bail!("an output does not match {want}");
    }
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_file(&out_s);
    let _ = std::fs::remove_file(&out_c);
    Ok(GetResult {
        wall: (median(sw), median(cw)),
        cpu: (median(sc), median(cc)),
    })
}
