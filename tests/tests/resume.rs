//! Crash safety of the real binary: kill -9 mid-download, then resume.

use std::time::Duration;

use starling_tests::*;

const MIB: usize = 1024 * 1024;
const RECORD: u64 = 40; // bytes per journal record

#[test]
fn kill_9_mid_download_resumes_without_refetching_verified_pieces() {
    let data = random_bytes(8 * MIB, 21);
    let o = FaultOrigin::start(data.clone());
    o.set(|f| f.rate = Some(2 * MIB as u64)); // per connection; 4 connections
    let s = Scratch::new();
    s.write_config("[storage]\ncommit_interval_ms = 20\n");
    let pl = 128 * 1024u64;
    let mut child = s
        .starling()
        .args(["get", &o.url("x"), "-O"])
        .arg(s.out("a.bin"))
        .args(["--piece-length", "128K"])
        .spawn()
        .unwrap();
    let journal = || {
        s.tasks()
            .first()
            .and_then(|t| std::fs::metadata(t.join("journal")).ok())
            .map(|m| m.len())
            .unwrap_or(0)
    };
    wait_until(
        Duration::from_secs(30),
        "a quarter of the pieces to be durable",
        || journal() >= 16 * RECORD,
    );
    kill_pid(child.id(), libc::SIGKILL);
    let _ = child.wait();
    assert!(
        !s.out("a.bin").exists(),
        "no output may appear before the content is verified"
    );
    let durable = journal() / RECORD;
    let total_pieces = data.len() as u64 / pl;
    assert!(
        durable < total_pieces,
        "the kill came too late to test anything"
    );

    o.set(|f| f.rate = None);
    // The killed client's connections drain until the origin's writes fail; count after that.
    wait_until(
        Duration::from_secs(30),
        "the killed client's responses to end",
        || o.active() == 0,
    );
    let before = o.bytes_served();
    let run = s
        .get(&o.url("x"), "a.bin", &["--piece-length", "128K", "-v"])
        .ok();
    let refetched = o.bytes_served() - before;
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));
    // Only the pieces that were not durable come again, plus the 1-byte probe.
    assert!(
        refetched <= (total_pieces - durable) * pl + 1,
        "refetched {refetched} bytes but {durable} of {total_pieces} pieces were durable\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("resuming"), "{}", run.stderr);
}
