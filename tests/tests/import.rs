//! `starling import`: a local file becomes a sealed task that a node seeds with no origin
//! behind it. Every test runs the real binary.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use starling_tests::*;

const MIB: usize = 1 << 20;

/// A URL nothing listens on: any request to the origin fails at once.
fn dead_url() -> String {
    format!("http://127.0.0.1:{}/blob", free_port())
}

fn import(s: &Scratch, args: &[&str]) -> Run {
    let mut c = s.starling();
    c.arg("import").args(args);
    Run::of(&mut c)
}

fn printed_digest(r: &Run) -> String {
    let out = String::from_utf8_lossy(&r.stdout).trim().to_string();
    assert!(
        out.starts_with("sha256:"),
        "import printed {out:?}, not a digest"
    );
    out
}

#[test]
fn a_plain_node_that_imports_a_file_spreads_it_like_a_seed() {
    // Node 1 is not a seed (`peer.seed = false`) but is the file's only holder. Every upload is
    // capped alike and each peer has two parent slots, so five children asking at once would
    // share the importer's link; it must send each piece to one child at a time and let the
    // others relay it, as a seed does, not upload the file 1.4-1.8 times over.
    let _cpus = sharing_the_cpus();
    let mut cluster = Cluster::new(6, "max_parents = 2\nupload_limit_mbps = 80", "");
    cluster.start_all();
    let importer = &cluster.nodes[1];
    assert!(!importer.seed);
    let data = random_bytes(48 * MIB, 43);
    let file = importer.scratch.path().join("layer.bin");
    std::fs::write(&file, &data).expect("write the file");
    let sum = sha256_bytes(&data);
    let r = import(&importer.scratch, &[file.to_str().expect("path")]).ok();
    assert_eq!(printed_digest(&r), sum);
    let url = dead_url();
    std::thread::scope(|s| {
        for i in 2..=6 {
            let (node, url, sum) = (&cluster.nodes[i], &url, &sum);
            s.spawn(move || node.scratch.get(url, "out", &["--digest", sum]).ok());
        }
    });
    for i in 2..=6 {
        assert_eq!(
            sha256_file(&cluster.nodes[i].scratch.out("out")),
            sum,
            "peer {i}"
        );
    }
    let sent = importer.metric("starling_bytes_uploaded_total") / data.len() as f64;
    assert!(sent <= 1.25, "the importer sent {sent:.2} x F");
    assert_eq!(
        cluster.nodes[0].metric("starling_bytes_uploaded_total"),
        0.0
    );
}

#[test]
fn a_file_imported_into_a_seed_reaches_the_peers_with_no_origin_at_all() {
    let _cpus = sharing_the_cpus();
    let mut cluster = Cluster::new(3, "", "");
    cluster.start_all();
    let seed = &cluster.nodes[0].scratch;
    let data = random_bytes(24 * MIB + 12_345, 41);
    let file = seed.path().join("model.bin");
    std::fs::write(&file, &data).expect("write the file");
    let sum = sha256_bytes(&data);
    let r = import(seed, &[file.to_str().expect("path")]).ok();
    assert_eq!(printed_digest(&r), sum);
    assert!(r.stderr.contains("the daemon seeds it"), "{}", r.stderr);

    // The peers name the content by digest; the URL leads nowhere.
    let url = dead_url();
    let digest = sum.clone();
    std::thread::scope(|s| {
        for i in 1..=3 {
            let node = &cluster.nodes[i];
            let (url, digest) = (&url, &digest);
            s.spawn(move || node.scratch.get(url, "out", &["--digest", digest]).ok());
        }
    });
    for i in 1..=3 {
        let node = &cluster.nodes[i];
        assert_eq!(
            sha256_file(&node.scratch.out("out")),
            sum,
            "peer {i}'s output"
        );
        let from_parents = node.metric("starling_bytes_downloaded_total{source=\"parent\"}");
        assert!(
            from_parents >= data.len() as f64,
            "peer {i} got {from_parents} bytes from parents"
        );
    }
    assert!(cluster.nodes[0].metric("starling_bytes_uploaded_total") > 0.0);

    // Importing it again keeps the stored copy.
    let again = import(seed, &[file.to_str().expect("path")]).ok();
    assert_eq!(printed_digest(&again), sum);
    assert!(
        again.stderr.contains("already in the store"),
        "{}",
        again.stderr
    );
}

#[test]
fn a_wrong_digest_or_a_bad_path_stores_nothing_and_says_why() {
    let s = Scratch::new();
    s.write_config("");
    let file = s.path().join("layer.tar");
    std::fs::write(&file, random_bytes(3 * MIB, 5)).expect("write");
    let path = file.to_str().expect("path");

    let wrong = format!("sha256:{}", "0".repeat(64));
    let r = import(&s, &["--no-daemon", "--digest", &wrong, path]).fails_with(4);
    assert!(r.stderr.contains("digest mismatch"), "{}", r.stderr);
    assert!(r.stderr.contains(path), "names the file: {}", r.stderr);
    let left: Vec<_> = std::fs::read_dir(s.data_dir().join("tasks"))
        .map(|it| it.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the store kept {left:?}");

    let missing = s.path().join("no-such-file");
    let r = import(&s, &["--no-daemon", missing.to_str().expect("path")]).fails_with(2);
    assert!(r.stderr.contains("no-such-file"), "{}", r.stderr);
    let r = import(&s, &["--no-daemon", s.path().to_str().expect("path")]).fails_with(2);
    assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
    let r = import(&s, &["--no-daemon", "--piece-length", "1000", path]).fails_with(2);
    assert!(r.stderr.contains("piece"), "{}", r.stderr);
}

#[test]
fn an_import_without_a_daemon_is_a_store_hit_for_get_and_a_linked_file_is_rechecked() {
    let s = Scratch::new();
    s.write_config("");
    let data = random_bytes(5 * MIB + 7, 9);
    let sum = sha256_bytes(&data);
    let file = s.path().join("weights.bin");
    std::fs::write(&file, &data).expect("write");
    let path = file.to_str().expect("path");
    let r = import(&s, &["--no-daemon", "--piece-length", "1MiB", path]).ok();
    assert_eq!(printed_digest(&r), sum);
    let digest = sum.clone();
    let r = s
        .get(&dead_url(), "copy", &["--no-daemon", "--digest", &digest])
        .ok();
    assert!(r.stderr.contains("local store"), "{}", r.stderr);
    assert_eq!(sha256_file(&s.out("copy")), sum);

    // --link: the store shares the file's inode, and makes it read-only.
    let other = Scratch::new();
    other.write_config("");
    let linked = other.data_dir().join("linked.bin");
    std::fs::create_dir_all(other.data_dir()).expect("data dir");
    std::fs::write(&linked, &data).expect("write");
    let lpath = linked.to_str().expect("path");
    import(&other, &["--no-daemon", "--link", lpath]).ok();
    let content = other.tasks()[0].join("content");
    assert_eq!(
        std::fs::metadata(&content).expect("content").ino(),
        std::fs::metadata(&linked).expect("file").ino()
    );
    assert_eq!(
        std::fs::metadata(&linked)
            .expect("file")
            .permissions()
            .mode()
            & 0o222,
        0,
        "the linked file is read-only now"
    );
    // Someone changes it anyway: the store must not hand out the changed bytes.
    std::fs::set_permissions(&linked, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut changed = data.clone();
    changed[MIB] ^= 0xff;
    std::fs::write(&linked, &changed).expect("write");
    let www = tempfile::tempdir().expect("www");
    std::fs::write(www.path().join("blob"), &data).expect("write");
    let nginx = Nginx::start(www.path());
    let r = other
        .get(
            &nginx.url("blob"),
            "fresh",
            &["--no-daemon", "--digest", &digest],
        )
        .ok();
    assert!(!r.stderr.contains("local store"), "{}", r.stderr);
    assert_eq!(sha256_file(&other.out("fresh")), sum);
}

#[test]
fn an_import_left_behind_by_a_killed_process_is_removed() {
    let s = Scratch::new();
    s.write_config("");
    let tasks = s.data_dir().join("tasks");
    std::fs::create_dir_all(&tasks).expect("tasks dir");
    // No process has this ID (above the kernel's pid_max); ours is alive.
    let stale = tasks.join(".import-999999999-0");
    let live = tasks.join(format!(".import-{}-0", std::process::id()));
    std::fs::write(&stale, b"half a file").expect("write");
    std::fs::write(&live, b"being imported").expect("write");
    let mut c = s.starling();
    c.arg("gc");
    Run::of(&mut c).ok();
    assert!(!stale.exists(), "the dead process's import is still there");
    assert!(live.exists(), "a live process's import was removed");
}

#[test]
fn a_restarted_seed_serves_what_it_imported_again_without_counting_that_as_a_use() {
    let _cpus = sharing_the_cpus();
    let mut cluster = Cluster::new(1, "", "");
    cluster.start_all();
    let data = random_bytes(6 * MIB + 4321, 46);
    let seed = &cluster.nodes[0].scratch;
    let file = seed.path().join("checkpoint.bin");
    std::fs::write(&file, &data).expect("write the file");
    let sum = printed_digest(&import(seed, &[file.to_str().expect("path")]).ok());
    // Another, last used before serve_idle_seconds (3600 s by default): not served again.
    let old = seed.path().join("old.bin");
    std::fs::write(&old, random_bytes(MIB, 47)).expect("write the file");
    let old_sum = printed_digest(&import(seed, &[old.to_str().expect("path")]).ok());
    let lock_of = |sum: &str| {
        seed.tasks()
            .into_iter()
            .find(|t| {
                t.to_string_lossy()
                    .ends_with(sum.trim_start_matches("sha256:"))
            })
            .expect("the imported task's directory")
            .join("lock")
    };
    let set_used = |lock: &std::path::Path, ago: u64| {
        let at = std::time::SystemTime::now() - Duration::from_secs(ago);
        std::fs::File::options()
            .write(true)
            .open(lock)
            .and_then(|f| f.set_modified(at))
            .expect("set the task's last use");
        at
    };
    let lock = lock_of(&sum);
    // Last used 50 minutes ago: within serve_idle_seconds.
    let used = set_used(&lock, 3000);
    set_used(&lock_of(&old_sum), 7200);

    // kill -9 and start again: the new daemon knows nothing of the import but its store.
    cluster.nodes[0].kill();
    cluster.nodes[0].start();
    wait_until(
        Duration::from_secs(30),
        "the restarted seed serving its stored task again",
        || cluster.nodes[0].metric("starling_tasks_serving") >= 1.0,
    );
    // Re-verifying it to serve it is not a use: GC's order stays.
    let mtime = std::fs::metadata(&lock)
        .and_then(|m| m.modified())
        .expect("lock mtime");
    assert_eq!(mtime, used, "the restart touched the task's last use");
    wait_until(
        Duration::from_secs(30),
        "the restarted seed to finish looking through its store",
        || {
            cluster.nodes[0]
                .log()
                .contains("serving the store's complete tasks again")
        },
    );
    assert_eq!(
        cluster.nodes[0].metric("starling_tasks_serving"),
        1.0,
        "only the recently used task is served again"
    );

    // The peer names the content by digest; the URL leads nowhere, so only the seed can serve.
    let peer = &cluster.nodes[1];
    peer.scratch
        .get(&dead_url(), "out", &["--digest", &sum])
        .ok();
    assert_eq!(sha256_file(&peer.scratch.out("out")), sum);
    assert!(peer.metric("starling_bytes_downloaded_total{source=\"parent\"}") >= data.len() as f64);
}
