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

#[test]
fn full_disk_fails_cleanly_and_keeps_what_was_stored() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let s = Scratch::new();
    std::fs::create_dir_all(s.data_dir()).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "starling-test"])
        .arg(s.data_dir())
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(s.data_dir());
    let small = random_bytes(4 * MIB, 34);
    let o_small = FaultOrigin::start(small.clone());
    s.get(&o_small.url("small"), "small", &[]).ok();
    let o_big = FaultOrigin::start(random_bytes(16 * MIB, 35));
    let run = s.get(&o_big.url("big"), "big", &[]).fails_with(6);
    assert!(run.stderr.contains("disk space"), "{}", run.stderr);
    assert!(!s.out("big").exists());
    // What was stored before is intact and still served without the origin.
    let before = o_small.requests();
    s.get(&o_small.url("small"), "small2", &["--no-hardlink"])
        .ok();
    assert_eq!(o_small.requests(), before);
    assert_eq!(sha256_file(&s.out("small2")), sha256_bytes(&small));
}
