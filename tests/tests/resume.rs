//! Crash safety of the real binary: kill -9 mid-download, then resume.

use std::time::Duration;

use starling_tests::*;

const MIB: usize = 1024 * 1024;
const RECORD: u64 = starling::storage::JOURNAL_RECORD as u64;
const PL: u64 = 128 * 1024;

/// A `get` of 8 MiB in 128 KiB pieces, killed with SIGKILL once a quarter of its pieces are
/// journaled. Returns the origin, the scratch dir, the data and how many pieces were journaled.
fn killed_get(seed: u64) -> (FaultOrigin, Scratch, Vec<u8>, u64) {
    let data = random_bytes(8 * MIB, seed);
    let o = FaultOrigin::start(data.clone());
    o.set(|f| f.rate = Some(2 * MIB as u64)); // per connection; 4 connections
    let s = Scratch::new();
    s.write_config("[storage]\ncommit_interval_ms = 20\n");
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
    assert!(
        durable < data.len() as u64 / PL,
        "the kill came too late to test anything"
    );
    o.set(|f| f.rate = None);
    // The killed client's connections drain until the origin's writes fail; count after that.
    wait_until(
        Duration::from_secs(30),
        "the killed client's responses to end",
        || o.active() == 0,
    );
    (o, s, data, durable)
}

#[test]
fn kill_9_mid_download_resumes_without_refetching_verified_pieces() {
    let (o, s, data, durable) = killed_get(21);
    let (pl, total_pieces) = (PL, data.len() as u64 / PL);
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

/// The journal is not synced with the content, so after a power loss it can name pieces whose
/// bytes never reached the disk. Simulated by zeroing the content after the kill: the resume
/// re-hashes every journaled piece, drops them all, and fetches them again.
#[test]
fn journaled_pieces_whose_bytes_are_gone_are_fetched_again() {
    let (o, s, data, durable) = killed_get(22);
    let task = s
        .tasks()
        .into_iter()
        .next()
        .expect("the killed get left its task");
    let content = task.join("content");
    let len = std::fs::metadata(&content).unwrap().len();
    std::fs::write(&content, vec![0u8; len as usize]).unwrap();
    let before = o.bytes_served();
    let run = s
        .get(&o.url("x"), "a.bin", &["--piece-length", "128K"])
        .ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));
    assert!(
        o.bytes_served() - before >= data.len() as u64,
        "every piece must come again, {durable} journaled ones included"
    );
    assert!(
        run.stderr
            .contains("no longer match their journaled chain values"),
        "{}",
        run.stderr
    );
}
