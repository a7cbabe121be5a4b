//! The store through the real binary: GC triggers, tasks in use, and a full disk.

use std::process::Command;
use std::time::Duration;

use starling_tests::*;

const MIB: usize = 1024 * 1024;

#[test]
fn gc_ttl_and_watermarks_never_evict_a_download_in_progress() {
    let a = FaultOrigin::start(random_bytes(2 * MIB, 31));
    let b = FaultOrigin::start(random_bytes(2 * MIB, 32));
    let slow = FaultOrigin::start(random_bytes(4 * MIB, 33));
    slow.set(|f| f.rate = Some(256 * 1024));
    let s = Scratch::new();
    s.get(&a.url("a"), "a", &[]).ok();
    s.get(&b.url("b"), "b", &[]).ok();
    let mut busy = s
        .starling()
        .args(["get", &slow.url("s"), "-O"])
        .arg(s.out("s"))
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the slow download to start",
        || s.tasks().len() == 3,
    );

    // Watermarks: capacity 5 MiB, high 0.5, low 0.3: must get under 1.5 MiB; `a` (least
    // recently used) and then `b` go; the slow one is in use and stays.
    s.write_config("[gc]\nttl_seconds = 100000\ncapacity_bytes = 5242880\nhigh_watermark = 0.5\nlow_watermark = 0.3\n");
    let run = Run::of(s.starling().arg("gc")).ok();
    let out = String::from_utf8_lossy(&run.stdout).to_string();
    assert_eq!(out.matches("(watermark)").count(), 2, "{out}");
    assert!(out.contains("1 in use"), "{out}");
    assert_eq!(s.tasks().len(), 1);

    // TTL 0: everything idle goes, but the download in progress stays.
    s.get(&a.url("a"), "a2", &[]).ok();
    s.write_config("[gc]\nttl_seconds = 0\n");
    let run = Run::of(s.starling().arg("gc")).ok();
    let out = String::from_utf8_lossy(&run.stdout).to_string();
    assert_eq!(out.matches("(ttl)").count(), 1, "{out}");
    assert_eq!(s.tasks().len(), 1);
    let status = busy.wait().unwrap();
    assert!(
        status.success(),
        "the download in progress must finish despite GC"
    );
    assert_eq!(
        sha256_file(&s.out("s")),
        sha256_bytes(&random_bytes(4 * MIB, 33))
    );
}

/// A small tmpfs mounted over `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: std::path::PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "starling-test",
            ])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a tmpfs on {}", dir.display());
        Tmpfs(dir)
    }

    /// Writes `name` until the file system is full (another writer taking the space).
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join(name)).unwrap();
        let block = vec![7u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        // The last partial block: byte by byte up to the very end.
        while f.write_all(&[7]).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `starling get URL -O out/NAME`, running.
fn spawn_get(s: &Scratch, url: &str, name: &str) -> std::process::Child {
    s.starling()
        .args(["get", url, "-O"])
        .arg(s.out(name))
        .spawn()
        .expect("spawn starling get")
}

/// Every file left in the task directories, by task.
fn task_files(s: &Scratch) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = s
        .tasks()
        .iter()
        .map(|d| {
            let mut names: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        })
        .collect();
    out.sort();
    out
}

#[test]
fn full_disk_fails_cleanly_keeps_serving_and_never_loses_verified_pieces() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let s = Scratch::new();
    let disk = Tmpfs::mount(s.data_dir(), "16m");
    // Verified pieces are journaled every 200 ms (for the crash below).
    s.write_config("[storage]\ncommit_interval_ms = 200\n");
    let small = random_bytes(4 * MIB, 34);
    let o_small = FaultOrigin::start(small.clone());
    let d = Daemon::start(&s);
    s.get(&o_small.url("small"), "small", &[]).ok();

    // A get that does not fit: exit code 6, the reason, no output, and no task directory left.
    let o_big = FaultOrigin::start(random_bytes(16 * MIB, 35));
    let run = s.get(&o_big.url("big"), "big", &[]).fails_with(6);
    assert!(run.stderr.contains("disk space"), "{}", run.stderr);
    assert!(!s.out("big").exists());
    assert_eq!(
        s.tasks().len(),
        1,
        "only the small task: {:?}",
        task_files(&s)
    );
    // Other tasks keep being served, without the origin.
    let before = o_small.requests();
    s.get(&o_small.url("small"), "small2", &["--no-hardlink"])
        .ok();
    assert_eq!(o_small.requests(), before);
    assert_eq!(sha256_file(&s.out("small2")), sha256_bytes(&small));

    // The disk fills mid-download (another writer): the task reserved its content, journal and
    // manifest when it started, so it completes, verified and sealed, with no stray files.
    let mid = random_bytes(4 * MIB, 36);
    let o_mid = FaultOrigin::start(mid.clone());
    o_mid.set(|f| f.rate = Some(2 * MIB as u64));
    let mut get = spawn_get(&s, &o_mid.url("mid"), "mid");
    wait_until(Duration::from_secs(20), "the download to start", || {
        o_mid.bytes_served() > 0
    });
    disk.fill("filler");
    assert!(
        get.wait().unwrap().success(),
        "a reserved download must finish on a full disk"
    );
    assert_eq!(sha256_file(&s.out("mid")), sha256_bytes(&mid));
    assert_eq!(
        task_files(&s),
        vec![vec!["content", "header", "journal", "lock", "manifest"]; 2],
        "sealed tasks, nothing left over"
    );

    // A copy onto the full disk fails with exit code 6 and leaves no partial output; the
    // stored task is untouched and serves the retry once there is room.
    let outdir = s.data_dir().join("out");
    std::fs::remove_file(s.data_dir().join("filler")).unwrap();
    std::fs::create_dir_all(&outdir).unwrap();
    disk.fill("filler");
    let out = outdir.join("mid");
    let run = Run::of(
        s.starling()
            .args(["get", &o_mid.url("mid"), "--no-hardlink", "-O"])
            .arg(&out),
    )
    .fails_with(6);
    assert!(run.stderr.contains("space"), "{}", run.stderr);
    let left: Vec<_> = std::fs::read_dir(&outdir).unwrap().flatten().collect();
    assert!(left.is_empty(), "partial output left: {left:?}");
    std::fs::remove_file(s.data_dir().join("filler")).unwrap();
    let served = o_mid.bytes_served();
    Run::of(
        s.starling()
            .args(["get", &o_mid.url("mid"), "--no-hardlink", "-O"])
            .arg(&out),
    )
    .ok();
    assert_eq!(sha256_file(&out), sha256_bytes(&mid));
    assert_eq!(o_mid.bytes_served(), served, "served from the store");
    std::fs::remove_file(&out).unwrap();
    assert!(d.stop(), "the daemon stops cleanly");

    // A crash mid-download, then the disk fills: the retry resumes from the verified pieces
    // on the full disk (their room was reserved), and the origin sends only the rest.
    let late = random_bytes(6 * MIB, 37);
    let o_late = FaultOrigin::start(late.clone());
    o_late.set(|f| f.rate = Some(MIB as u64));
    let mut get = spawn_get(&s, &o_late.url("late"), "late");
    wait_until(Duration::from_secs(20), "a third of the download", || {
        o_late.bytes_served() >= 2 * MIB as u64
    });
    // Past a group commit: the unsealed task has journaled verified pieces.
    let journaled = || {
        s.tasks().iter().any(|t| {
            !t.join("manifest").exists()
                && std::fs::metadata(t.join("journal")).is_ok_and(|m| m.len() > 0)
        })
    };
    wait_until(Duration::from_secs(20), "a journal record", journaled);
    get.kill().unwrap();
    get.wait().unwrap();
    disk.fill("filler");
    let first = o_late.bytes_served();
    o_late.set(|f| f.rate = None);
    s.get(&o_late.url("late"), "late", &[]).ok();
    assert_eq!(sha256_file(&s.out("late")), sha256_bytes(&late));
    let again = o_late.bytes_served() - first;
    assert!(
        again <= 5 * MIB as u64,
        "the retry fetched {again} bytes of 6 MiB after {first} were served: verified pieces were lost"
    );
    drop(disk);
}

/// A daemon serves every task it fetched (a served task holds a lease, so GC skips it) for
/// `peer.serve_idle_seconds`, an hour by default. Over budget, it now stops serving the
/// complete tasks no peer fetched for 10 s, and GC brings the store back under its watermark.
/// Before, a node that pulled more than its budget kept every task for the hour.
#[test]
fn a_daemon_over_its_store_budget_stops_serving_idle_tasks_and_gc_evicts_them() {
    let origins: Vec<FaultOrigin> = (0..4)
        .map(|i| FaultOrigin::start(random_bytes(4 * MIB, 40 + i)))
        .collect();
    let s = Scratch::new();
    // 10 MiB budget, collected every second: four 4 MiB tasks are 16 MiB.
    s.write_config(
        "[gc]\ncapacity_bytes = 10485760\nhigh_watermark = 0.8\nlow_watermark = 0.5\n\
         [daemon]\nmetrics_addr = \"\"\ngc_interval_seconds = 1\n",
    );
    let d = Daemon::start(&s);
    for (i, o) in origins.iter().enumerate() {
        s.get(&o.url("f"), &format!("f{i}"), &[]).ok();
    }
    let stored = || -> u64 {
        s.tasks()
            .iter()
            .filter_map(|t| std::fs::metadata(t.join("content")).ok())
            .map(|m| m.len())
            .sum()
    };
    assert!(stored() > 8 * MIB as u64, "{} bytes stored", stored());
    let log = || std::fs::read_to_string(s.path().join("daemon.log")).unwrap_or_default();
    // GC logs each eviction, then its summary: wait for the summary too, not just the bytes.
    wait_until(
        Duration::from_secs(30),
        "the store back under its high watermark and GC's summary logged",
        || stored() <= 8 * MIB as u64 && log().contains("garbage collected"),
    );
    // The outputs are the user's: untouched.
    for i in 0..4 {
        assert_eq!(
            std::fs::metadata(s.out(&format!("f{i}")))
                .map(|m| m.len())
                .ok(),
            Some(4 * MIB as u64)
        );
    }
    drop(d);
}
