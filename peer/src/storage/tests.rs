//! Store tests on a real file system with the real io_uring storage thread.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::*;
use crate::core::{Digest, Manifest, PiecePlan, Sha256Stream};

const PL: u64 = 64 * 1024;

fn header(len: u64) -> TaskHeader {
    TaskHeader {
        id: TaskId::for_url("http://origin/file", &[]).unwrap(),
        plan: PiecePlan::new(len, PL).unwrap(),
        expected: None,
        validator: "\"v1\"".into(),
        url: "http://origin/file".into(),
    }
}

fn content(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// Writes the given pieces, as two chunks each (as they would come off the network), with
/// their values from `data`'s manifest.
async fn put(t: &TaskHandle, data: &[u8], pieces: &[u32]) {
    let m = Manifest::of_content(t.plan(), data).unwrap();
    for &i in pieces {
        let p = t.plan().piece(i).unwrap();
        let bytes = Bytes::copy_from_slice(&data[p.offset as usize..p.end() as usize]);
        let half = bytes.len() / 2;
        let chunks = vec![bytes.slice(..half), bytes.slice(half..)];
        t.write_piece(p, chunks, m.link(i).unwrap()).await.unwrap();
    }
}

/// Which pieces `t` counts verified.
fn verified(t: &TaskHandle) -> Vec<bool> {
    t.bitmap()
}

fn store(dir: &std::path::Path) -> Store {
    Store::open(dir, Duration::from_millis(20)).unwrap()
}

/// A fresh task for `h` under an exclusive lease.
async fn fresh(s: &Store, h: &TaskHeader) -> TaskHandle {
    let lease = s.acquire(&h.id, LeaseMode::Exclusive).await.unwrap();
    s.create(lease, h.clone()).unwrap()
}

async fn reopen(s: &Store, id: &TaskId) -> Option<TaskHandle> {
    let lease = s.acquire(id, LeaseMode::Exclusive).await.unwrap();
    s.load(lease).unwrap().ok()
}

#[tokio::test]
async fn durable_pieces_survive_reopen_and_reads_match() {
    let d = tempfile::tempdir().unwrap();
    let len = 5 * PL + 123;
    let data = content(len);
    let s = store(d.path());
    let h = header(len);
    let id = h.id;
    let t = s
        .create(
            s.acquire(&id, LeaseMode::Exclusive).await.unwrap(),
            h.clone(),
        )
        .unwrap();
    put(&t, &data, &[4, 1, 5]).await;
    t.flush().await.unwrap();
    assert_eq!(*t.journaled_watch().borrow(), 3);
    let p5 = t.plan().piece(5).unwrap();
    assert_eq!(
        &t.read_piece(p5).await.unwrap()[..],
        &data[p5.offset as usize..]
    );
    drop(t);

    let t = reopen(&s, &id).await.expect("task must reload");
    assert_eq!(t.header(), &h);
    // Journaled pieces count only once re-hashed.
    assert_eq!(t.verified_count(), 0);
    assert_eq!(t.verify_journaled().await.unwrap(), 0);
    let have = verified(&t);
    assert_eq!(have, vec![false, true, false, false, true, true]);
    put(&t, &data, &[0, 2, 3]).await;
    let m = t.complete(Digest::of(&data)).unwrap();
    assert_eq!(t.hash_content().await.unwrap(), Digest::of(&data));
    drop(t);

    // Pieces written just before the end may not be journaled yet; a sealed task is vouched
    // for by its manifest, re-checked against the stored bytes.
    let t = reopen(&s, &id).await.unwrap();
    assert_eq!(t.manifest(), Some(m));
    assert_eq!(t.verify_sealed().await.unwrap(), Some(true));
    assert!(t.is_complete());
    drop(t);
    // One flipped byte and the sealed task no longer verifies.
    let path = s.task_dir(&id).join("content");
    let mut b = std::fs::read(&path).unwrap();
    b[PL as usize + 7] ^= 1;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&path, b).unwrap();
    let t = reopen(&s, &id).await.unwrap();
    assert_eq!(t.verify_sealed().await.unwrap(), Some(false));
}

#[tokio::test]
async fn unflushed_pieces_are_not_reported_after_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let len = 4 * PL;
    let data = content(len);
    let h = header(len);
    {
        // A long commit interval: only the flush journals anything before the "crash".
        let s = Store::open(d.path(), Duration::from_secs(60)).unwrap();
        let t = fresh(&s, &h).await;
        put(&t, &data, &[0, 1]).await;
        t.flush().await.unwrap();
        put(&t, &data, &[2]).await;
        // Simulate the crash: the journal on disk is what a killed process leaves.
        let journal = std::fs::read(t.dir().join("journal")).unwrap();
        let dir = t.dir().to_path_buf();
        drop(t);
        // Put the crash-time journal back by rename, so a commit still in flight from the
        // closing handle lands on the old, unlinked file.
        std::fs::write(dir.join("journal.crash"), journal).unwrap();
        std::fs::rename(dir.join("journal.crash"), dir.join("journal")).unwrap();
    }
    let s = store(d.path());
    let t = reopen(&s, &h.id).await.unwrap();
    assert_eq!(t.verify_journaled().await.unwrap(), 0);
    let have = verified(&t);
    assert_eq!(have, vec![true, true, false, false]);
}

/// The periodic commit journals pieces without syncing their data, so after a power loss the
/// journal may name pieces whose bytes never reached the disk: a resume re-hashes them and
/// fetches those again, keeping the rest.
#[tokio::test]
async fn journaled_pieces_whose_bytes_were_lost_are_dropped_on_resume() {
    let d = tempfile::tempdir().unwrap();
    let len = 4 * PL;
    let data = content(len);
    let h = header(len);
    let dir = {
        // A short interval: the periodic commit journals the pieces, unsynced.
        let s = store(d.path());
        let t = fresh(&s, &h).await;
        put(&t, &data, &[0, 1, 3]).await;
        let mut journaled = t.journaled_watch();
        journaled.wait_for(|n| *n == 3).await.unwrap();
        t.dir().to_path_buf()
    };
    // The "power loss": piece 1's bytes are zeros on disk, piece 3's half written.
    let mut b = std::fs::read(dir.join("content")).unwrap();
    b[PL as usize..2 * PL as usize].fill(0);
    b[3 * PL as usize + 100] ^= 0x55;
    std::fs::write(dir.join("content"), b).unwrap();

    let s = store(d.path());
    let t = reopen(&s, &h.id).await.unwrap();
    assert_eq!(t.verify_journaled().await.unwrap(), 2);
    let have = verified(&t);
    assert_eq!(have, vec![true, false, false, false]);
    // The dropped pieces are stored again and the task completes intact.
    put(&t, &data, &[1, 2, 3]).await;
    t.complete(Digest::of(&data)).unwrap();
    assert_eq!(t.hash_content().await.unwrap(), Digest::of(&data));
}

#[tokio::test]
async fn damaged_metadata_discards_the_task() {
    let d = tempfile::tempdir().unwrap();
    let len = 3 * PL;
    let data = content(len);
    let s = store(d.path());
    let h = header(len);
    for damage in [
        "header-flip",
        "journal-flip",
        "content-truncated",
        "manifest-truncated",
    ] {
        let t = fresh(&s, &h).await;
        put(&t, &data, &[0, 1, 2]).await;
        t.flush().await.unwrap();
        if damage == "manifest-truncated" {
            t.complete(Digest::of(&data)).unwrap();
        }
        let dir = t.dir().to_path_buf();
        drop(t);
        let flip = |name: &str, at: usize| {
            let mut b = std::fs::read(dir.join(name)).unwrap();
            b[at] ^= 0xff;
            std::fs::write(dir.join(name), b).unwrap();
        };
        match damage {
            "header-flip" => flip("header", 10),
            "journal-flip" => flip("journal", 3),
            "content-truncated" => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("content"))
                    .unwrap();
                f.set_len(len - 1).unwrap();
            }
            _ => {
                let m = std::fs::read(dir.join("manifest")).unwrap();
                std::fs::write(dir.join("manifest"), &m[..m.len() - 3]).unwrap();
            }
        }
        assert!(
            reopen(&s, &h.id).await.is_none(),
            "{damage}: a damaged task must not load"
        );
        assert!(
            !dir.join("content").exists(),
            "{damage}: its data must be removed"
        );
    }
}

#[tokio::test]
async fn piece_that_disagrees_with_manifest_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let len = 2 * PL;
    let data = content(len);
    let s = store(d.path());
    let h = header(len);
    let t = fresh(&s, &h).await;
    put(&t, &data, &[0, 1]).await;
    t.complete(Digest::of(&data)).unwrap();
    let p = t.plan().piece(0).unwrap();
    let bad = Bytes::from(vec![0u8; p.length as usize]);
    let link = crate::core::Link {
        index: 0,
        start: crate::core::ChainValue::START,
        end: crate::core::Link::end_of(crate::core::ChainValue::START, &p, false, &[&bad]),
    };
    let err = t.write_piece(p, vec![bad.clone()], link).await.unwrap_err();
    assert!(
        matches!(err, StoreError::PieceMismatch { index: 0, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn gc_ttl_and_watermarks_spare_tasks_in_use() {
    let d = tempfile::tempdir().unwrap();
    let s = store(d.path());
    let mut ids = Vec::new();
    for n in 0..4u64 {
        let mut h = header(2 * PL);
        h.id = TaskId::for_url(&format!("http://origin/{n}"), &[]).unwrap();
        let t = fresh(&s, &h).await;
        put(&t, &content(2 * PL), &[0, 1]).await;
        // Distinct last-use times, oldest first.
        let age = Duration::from_secs(1000 - n * 100);
        let lock = std::fs::File::options()
            .write(true)
            .open(t.dir().join("lock"))
            .unwrap();
        lock.set_modified(SystemTime::now() - age).unwrap();
        ids.push(h.id);
    }
    // Task 0 (the oldest) is in use by a reader.
    let busy = s.acquire(&ids[0], LeaseMode::Shared).await.unwrap();
    let lock = std::fs::File::options()
        .write(true)
        .open(busy.dir().join("lock"))
        .unwrap();
    lock.set_modified(SystemTime::now() - Duration::from_secs(5000))
        .unwrap();

    // Watermarks: capacity = what the 4 equal tasks take, so usage is 1.0 > 0.9; getting to
    // <= 0.6 takes evicting two, the least recently used idle ones.
    let total: u64 = ids.iter().map(|id| dir_bytes(&s.task_dir(id))).sum();
    let cfg = GcConfig {
        ttl_seconds: 100_000,
        capacity_bytes: total,
        high_watermark: 0.9,
        low_watermark: 0.6,
    };
    let r = s.gc(&cfg, SystemTime::now()).unwrap();
    let evicted: Vec<&str> = r.evicted.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(evicted, vec![ids[1].dir_name(), ids[2].dir_name()]);
    assert!(r.evicted.iter().all(|e| e.2 == GcReason::Watermark));
    assert_eq!(r.in_use, 1);
    assert!(s.task_dir(&ids[0]).join("content").exists());

    // TTL: everything idle for more than 10 s goes, except the one in use.
    let cfg = GcConfig {
        ttl_seconds: 10,
        ..cfg
    };
    let r = s.gc(&cfg, SystemTime::now()).unwrap();
    assert_eq!(r.evicted.len(), 1);
    assert_eq!(r.evicted[0].0, ids[3].dir_name());
    assert_eq!(r.evicted[0].2, GcReason::Expired);
    assert!(s.task_dir(&ids[0]).join("content").exists());
    drop(busy);
    let r = s.gc(&cfg, SystemTime::now()).unwrap();
    assert_eq!(r.evicted.len(), 1);
    assert!(!s.task_dir(&ids[0]).exists());
}

#[test]
fn empty_content_has_no_pieces_and_completes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path());
        let h = header(0);
        let t = s
            .create(s.acquire(&h.id, LeaseMode::Exclusive).await.unwrap(), h)
            .unwrap();
        let m = t.complete(Sha256Stream::new().finish()).unwrap();
        assert_eq!(m.plan().count(), 0);
        assert!(t.is_complete());
    });
}

/// Pieces stored from the origin out of order get their values from the in-order chain, which
/// ends at the content's digest; each is served only once chained.
#[tokio::test]
async fn the_chain_gives_origin_pieces_their_values_and_the_digest() {
    let d = tempfile::tempdir().unwrap();
    let len = 5 * PL + 1000;
    let data = content(len);
    let s = store(d.path());
    let t = fresh(&s, &header(len)).await;
    let m = Manifest::of_content(t.plan(), &data).unwrap();
    let chainer = t.chainer().unwrap();
    let feed = chainer.feed();
    let view = t.upload_view().unwrap();
    // Piece 2 from a parent (values known); the rest from the origin, out of order, some fed.
    put(&t, &data, &[2]).await;
    for i in [4u32, 1, 5, 0, 3] {
        let p = t.plan().piece(i).unwrap();
        let bytes = Bytes::copy_from_slice(&data[p.offset as usize..p.end() as usize]);
        if i % 2 == 0 {
            feed.feed(i, std::slice::from_ref(&bytes));
        }
        t.store_unchecked(p, vec![bytes]).await.unwrap();
        if i == 4 {
            assert!(
                view.piece(4).is_none(),
                "not served before the chain reaches it"
            );
        }
    }
    assert_eq!(chainer.finish().await, ChainEnd::Done(Digest::of(&data)));
    assert_eq!(verified(&t), vec![true; 6]);
    // The chained pieces were journaled with their values: a reopened task resumes them all.
    t.flush().await.unwrap();
    drop(view);
    drop(t);
    let t = reopen(&s, &header(len).id).await.unwrap();
    assert_eq!(t.verify_journaled().await.unwrap(), 0);
    assert_eq!(verified(&t), vec![true; 6]);
    let m2 = t.complete(Digest::of(&data)).unwrap();
    assert_eq!(m2, m, "the chain's values are the content's");
}

/// A reader that took over from a stalled one holds the values of pieces it does not have yet
/// (its predecessor published them): its chain goes past them to the origin pieces behind, and
/// ends only once they are verified, whether they come checked (from a parent) or unchecked (a
/// request sent before the values were known).
#[tokio::test]
async fn the_chain_goes_past_missing_pieces_whose_values_are_known() {
    let d = tempfile::tempdir().unwrap();
    let len = 7 * PL;
    let data = content(len);
    let s = store(d.path());
    let t = fresh(&s, &header(len)).await;
    let m = Manifest::of_content(t.plan(), &data).unwrap();
    // Values known for pieces 0..4 (0..=3 end values), none of their bytes here.
    for (i, v) in m.piece_values().iter().enumerate().take(4) {
        t.learn(i as u32, *v);
    }
    let chainer = t.chainer().unwrap();
    let piece = |i: u32| {
        let p = t.plan().piece(i).unwrap();
        (
            p,
            Bytes::copy_from_slice(&data[p.offset as usize..p.end() as usize]),
        )
    };
    for i in [4u32, 5, 6] {
        let (p, bytes) = piece(i);
        t.store_unchecked(p, vec![bytes]).await.unwrap();
    }
    wait_for(|| t.bitmap()[4..] == [true; 3]).await;
    assert_eq!(t.bitmap()[..4], [false; 4], "nothing before them is here");
    // One from a parent, checked on arrival; one from the origin, unchecked.
    put(&t, &data, &[1]).await;
    let (p, bytes) = piece(2);
    t.store_unchecked(p, vec![bytes]).await.unwrap();
    wait_for(|| t.bitmap()[2]).await;
    put(&t, &data, &[0, 3]).await;
    assert_eq!(chainer.finish().await, ChainEnd::Done(Digest::of(&data)));
    assert_eq!(verified(&t), vec![true; 7]);
}

/// A skipped piece stored unchecked with other bytes than its known values: the chain ends
/// there, the piece unverified.
#[tokio::test]
async fn a_skipped_piece_that_contradicts_its_known_values_ends_the_chain() {
    let d = tempfile::tempdir().unwrap();
    let len = 4 * PL;
    let data = content(len);
    let s = store(d.path());
    let t = fresh(&s, &header(len)).await;
    let m = Manifest::of_content(t.plan(), &data).unwrap();
    for (i, v) in m.piece_values().iter().enumerate().take(2) {
        t.learn(i as u32, *v);
    }
    let chainer = t.chainer().unwrap();
    for i in [2u32, 3] {
        let p = t.plan().piece(i).unwrap();
        let bytes = Bytes::copy_from_slice(&data[p.offset as usize..p.end() as usize]);
        t.store_unchecked(p, vec![bytes]).await.unwrap();
    }
    wait_for(|| t.bitmap()[2..] == [true; 2]).await;
    let p = t.plan().piece(1).unwrap();
    let mut other = data[p.offset as usize..p.end() as usize].to_vec();
    other[9] ^= 1;
    t.store_unchecked(p, vec![Bytes::from(other)])
        .await
        .unwrap();
    assert_eq!(chainer.finish().await, ChainEnd::Conflict { index: 1 });
    assert!(!verified(&t)[1]);
}

async fn wait_for(done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s");
}

/// An origin piece that ends at another value than the swarm gave for it: the chain stops
/// there and leaves it unverified.
#[tokio::test]
async fn the_chain_reports_an_origin_piece_that_contradicts_the_swarm() {
    let d = tempfile::tempdir().unwrap();
    let len = 3 * PL;
    let data = content(len);
    let s = store(d.path());
    let t = fresh(&s, &header(len)).await;
    let m = Manifest::of_content(t.plan(), &data).unwrap();
    for (i, v) in m.piece_values().iter().enumerate() {
        t.learn(i as u32, *v);
    }
    let chainer = t.chainer().unwrap();
    let mut other = data.clone();
    other[PL as usize + 7] ^= 1;
    for i in 0..3 {
        let p = t.plan().piece(i).unwrap();
        let bytes = Bytes::copy_from_slice(&other[p.offset as usize..p.end() as usize]);
        t.store_unchecked(p, vec![bytes]).await.unwrap();
    }
    assert_eq!(chainer.finish().await, ChainEnd::Conflict { index: 1 });
    assert_eq!(verified(&t), vec![true, false, false]);
}
