//! `starling get` end to end: the real binary against real and fault-injecting origins.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use starling_tests::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn www_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("starling-www-")
        .tempdir()
        .unwrap();
    for (name, data) in files {
        std::fs::write(d.path().join(name), data).unwrap();
    }
    d
}

#[test]
fn nginx_download_is_verified_and_the_second_get_never_reaches_the_origin() {
    let data = random_bytes(40 * MIB + 12_345, 1);
    let www = www_with(&[("blob.bin", &data)]);
    let nginx = Nginx::start(www.path());
    let s = Scratch::new();

    let run = s.get(&nginx.url("blob.bin"), "a.bin", &[]).ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));
    assert!(
        run.stderr.contains(&sha256_bytes(&data)),
        "summary names the digest: {}",
        run.stderr
    );
    // One probe plus one ranged GET per piece; every body byte sent once (+1 probe byte).
    let piece = starling::core::default_piece_length(data.len() as u64) as usize;
    assert_eq!(nginx.requests(), 1 + data.len().div_ceil(piece));
    assert_eq!(nginx.bytes_sent(), data.len() as u64 + 1);

    let before = nginx.requests();
    let run = s.get(&nginx.url("blob.bin"), "b.bin", &[]).ok();
    assert_eq!(
        nginx.requests(),
        before,
        "the second get must not reach the origin"
    );
    assert!(run.stderr.contains("local store"), "{}", run.stderr);
    assert_eq!(sha256_file(&s.out("b.bin")), sha256_bytes(&data));
    // Hard-linked to the store (ext4/tmpfs have no reflink): several names, one inode.
    let meta = std::fs::metadata(s.out("b.bin")).unwrap();
    assert!(
        meta.nlink() >= 2,
        "output should be linked to the store, nlink = {}",
        meta.nlink()
    );

    // --no-hardlink gives an independent copy.
    s.get(&nginx.url("blob.bin"), "c.bin", &["--no-hardlink"])
        .ok();
    assert_eq!(std::fs::metadata(s.out("c.bin")).unwrap().nlink(), 1);
    assert_eq!(sha256_file(&s.out("c.bin")), sha256_bytes(&data));
}

#[test]
fn edge_sizes_with_small_pieces() {
    let pl = 16 * KIB;
    let sizes = [0, 1, pl - 1, pl, pl + 1, 5 * pl + 4095];
    let files: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .map(|&n| (format!("f{n}"), random_bytes(n, n as u64)))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let www = www_with(&refs);
    let nginx = Nginx::start(www.path());
    let s = Scratch::new();
    for (name, data) in &files {
        s.get(&nginx.url(name), name, &["--piece-length", "16K"])
            .ok();
        let got = std::fs::read(s.out(name)).unwrap();
        assert!(got == *data, "{name}: content differs");
    }
}

#[test]
fn range_ignoring_origin_is_read_once_in_order() {
    let data = random_bytes(20 * MIB + 7, 2);
    let www = www_with(&[("blob.bin", &data)]);
    let py = PyHttp::start(www.path());
    let s = Scratch::new();
    let digest = sha256_bytes(&data);
    s.get(&py.url("blob.bin"), "a.bin", &["--digest", &digest])
        .ok();
    assert_eq!(sha256_file(&s.out("a.bin")), digest);
    wait_until(Duration::from_secs(5), "python to log", || py.gets() >= 1);
    assert_eq!(
        py.gets(),
        1,
        "the probe's own 200 body must be used, not thrown away"
    );
}

#[test]
fn origin_that_stops_honouring_range_falls_back_to_one_stream() {
    let data = random_bytes(6 * MIB, 3);
    let o = FaultOrigin::start(data.clone());
    o.set(|f| f.ignore_range_after_probe = true);
    let s = Scratch::new();
    s.get(&o.url("x"), "a.bin", &[]).ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));
}

#[test]
fn wrong_content_range_is_never_accepted() {
    let data = random_bytes(3 * MIB, 4);
    let o = FaultOrigin::start(data.clone());
    o.set(|f| f.wrong_content_range = true);
    let s = Scratch::new();
    s.get(&o.url("x"), "a.bin", &[]).ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));
}

#[test]
fn range_that_lies_about_its_bytes_is_caught_by_the_digest() {
    let data = random_bytes(3 * MIB, 5);
    let o = FaultOrigin::start(data.clone());
    o.set(|f| f.wrong_range_bytes = true);
    let s = Scratch::new();
    let digest = sha256_bytes(&data);
    let run = s.get(&o.url("x"), "a.bin", &["--digest", &digest]).ok();
    assert_eq!(sha256_file(&s.out("a.bin")), digest, "{}", run.stderr);
}

#[test]
fn server_errors_then_success() {
    let data = random_bytes(2 * MIB, 6);
    let o = FaultOrigin::start(data.clone());
    o.set(|f| f.status_500 = 3);
    let s = Scratch::new();
    s.get(&o.url("x"), "a.bin", &[]).ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));
    assert!(o.requests() >= 4);
}

#[test]
fn persistent_server_errors_fail_cleanly() {
    let o = FaultOrigin::start(random_bytes(MIB, 7));
    o.set(|f| f.status_500 = 1000);
    let s = Scratch::new();
    let run = s.get(&o.url("x"), "a.bin", &[]).fails_with(5);
    assert!(run.stderr.contains("500"), "{}", run.stderr);
    assert!(!s.out("a.bin").exists());
}

#[test]
fn connection_resets_mid_body_are_retried() {
    let data = random_bytes(4 * MIB, 8);
    let o = FaultOrigin::start(data.clone());
    o.set(|f| f.reset_after = Some((3, 100_000)));
    let s = Scratch::new();
    s.get(&o.url("x"), "a.bin", &[]).ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));
}

#[test]
fn short_bodies_are_retried_and_a_persistent_lie_fails_cleanly() {
    let data = random_bytes(4 * MIB, 9);
    let o = FaultOrigin::start(data.clone());
    o.set(|f| f.short_body = Some((2, 1000)));
    let s = Scratch::new();
    s.get(&o.url("x"), "a.bin", &[]).ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));

    let o = FaultOrigin::start(data);
    o.set(|f| f.short_body = Some((10_000, 1000)));
    let s = Scratch::new();
    let run = s.get(&o.url("x"), "a.bin", &[]).fails_with(5);
    assert!(
        run.stderr.contains("ended after") || run.stderr.contains("bytes"),
        "{}",
        run.stderr
    );
    assert!(!s.out("a.bin").exists());
}

#[test]
fn slow_trickle_completes() {
    let data = random_bytes(3 * MIB, 10);
    let o = FaultOrigin::start(data.clone());
    o.set(|f| f.rate = Some(2 * MIB as u64));
    let s = Scratch::new();
    s.get(&o.url("x"), "a.bin", &["--piece-length", "256K"])
        .ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));
}

#[test]
fn wrong_digest_names_both_and_leaves_nothing() {
    let data = random_bytes(MIB + 3, 11);
    let www = www_with(&[("blob.bin", &data)]);
    let nginx = Nginx::start(www.path());
    let s = Scratch::new();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let run = s
        .get(&nginx.url("blob.bin"), "a.bin", &["--digest", &wrong])
        .fails_with(4);
    assert!(run.stderr.contains(&wrong), "{}", run.stderr);
    assert!(run.stderr.contains(&sha256_bytes(&data)), "{}", run.stderr);
    assert_eq!(
        std::fs::read_dir(s.out_dir()).unwrap().count(),
        0,
        "no output, no temp file"
    );
    // And the store kept nothing under that digest.
    assert!(s.tasks().iter().all(|t| !t.join("content").exists()));
}

#[test]
fn origin_refusals_and_name_errors_have_clear_exit_codes() {
    let o = FaultOrigin::start(random_bytes(1000, 12));
    let www = www_with(&[]);
    let nginx = Nginx::start(www.path());
    let s = Scratch::new();
    let run = s.get(&nginx.url("missing"), "a", &[]).fails_with(3);
    assert!(run.stderr.contains("404"), "{}", run.stderr);

    o.set(|f| f.require_auth = Some("Bearer sesame".into()));
    let run = s.get(&o.url("x"), "a", &[]).fails_with(3);
    assert!(
        run.stderr.contains("401") && run.stderr.contains("Authorization"),
        "{}",
        run.stderr
    );
    s.get(&o.url("x"), "a", &["-H", "Authorization: Bearer sesame"])
        .ok();

    o.set(|f| {
        f.require_auth = None;
        f.forbidden = true;
    });
    let s2 = Scratch::new();
    let run = s2.get(&o.url("x"), "a", &[]).fails_with(3);
    assert!(run.stderr.contains("403"), "{}", run.stderr);

    let run = s
        .get("http://no-such-host.invalid/x", "b", &[])
        .fails_with(5);
    assert!(run.stderr.contains("resolve"), "{}", run.stderr);
    let closed = free_port();
    let run = s
        .get(&format!("http://127.0.0.1:{closed}/x"), "b", &[])
        .fails_with(5);
    assert!(run.stderr.contains("connect"), "{}", run.stderr);
}

#[test]
fn bad_input_is_a_usage_error_naming_the_input() {
    let s = Scratch::new();
    let cases: &[(&[&str], &str)] = &[
        (
            &["get", "http://h/x", "-O", "o", "--digest", "md5:abc"],
            "md5:abc",
        ),
        (
            &["get", "http://h/x", "-O", "o", "--digest", "sha256:XYZ"],
            "sha256:XYZ",
        ),
        (&["get", "not a url", "-O", "o"], "not a url"),
        (&["get", "ftp://h/x", "-O", "o"], "ftp"),
        (
            &["get", "http://h/x", "-O", "/nonexistent-dir/o"],
            "/nonexistent-dir",
        ),
        (
            &["get", "http://h/x", "-O", "o", "-H", "no colon"],
            "no colon",
        ),
        (
            &["get", "http://h/x", "-O", "o", "--piece-length", "12345"],
            "12345",
        ),
    ];
    for (args, needle) in cases {
        let mut c = s.starling();
        c.current_dir(s.out_dir()).args(*args);
        let run = Run::of(&mut c);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(needle),
            "{args:?} should name {needle:?}: {}",
            run.stderr
        );
    }
    s.write_config("[gc]\nttl_secondz = 1\n");
    let run = s.get("http://h/x", "o", &[]).fails_with(2);
    assert!(run.stderr.contains("ttl_secondz"), "{}", run.stderr);
}

#[test]
fn https_needs_a_trusted_ca() {
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, ca.cert.pem()).unwrap();
    std::fs::write(&key, ca.key_pair.serialize_pem()).unwrap();
    let data = random_bytes(3 * MIB, 13);
    let www = www_with(&[("blob.bin", &data)]);
    let nginx = Nginx::start_with(www.path(), Some((&cert, &key)));
    let url = format!("https://localhost:{}/blob.bin", nginx.tls_port.unwrap());
    let s = Scratch::new();
    let run = s.get(&url, "a.bin", &[]).fails_with(5);
    assert!(
        run.stderr.contains("TLS") && run.stderr.contains("--ca-cert"),
        "{}",
        run.stderr
    );
    assert!(!s.out("a.bin").exists());
    s.get(&url, "a.bin", &["--ca-cert", cert.to_str().unwrap()])
        .ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&data));
}

#[test]
fn stdout_output() {
    let data = random_bytes(MIB / 2, 14);
    let o = FaultOrigin::start(data.clone());
    let s = Scratch::new();
    let mut c = s.starling();
    c.args(["get", &o.url("x"), "-O", "-", "-q"]);
    let run = Run::of(&mut c).ok();
    assert!(run.stdout == data);
}

#[test]
fn damaged_store_content_is_fetched_again_never_served() {
    let data = random_bytes(4 * MIB, 15);
    let o = FaultOrigin::start(data.clone());
    let s = Scratch::new();
    s.get(&o.url("x"), "a.bin", &["--no-hardlink"]).ok();
    let content = s.tasks()[0].join("content");
    let mut bytes = std::fs::read(&content).unwrap();
    bytes[MIB + 5] ^= 0x01;
    let mut perms = std::fs::metadata(&content).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&content, perms).unwrap();
    std::fs::write(&content, bytes).unwrap();
    let served = o.bytes_served();
    s.get(&o.url("x"), "b.bin", &[]).ok();
    assert_eq!(sha256_file(&s.out("b.bin")), sha256_bytes(&data));
    assert!(
        o.bytes_served() - served >= data.len() as u64,
        "the damaged content must be refetched"
    );
}

#[test]
fn origin_content_change_under_a_partial_download_starts_over() {
    let old = random_bytes(4 * MIB, 16);
    let o = FaultOrigin::start(old);
    let s = Scratch::new();
    // A partial download, killed once a few pieces are durable (short commit interval).
    s.write_config("[storage]\ncommit_interval_ms = 20\n");
    o.set(|f| f.rate = Some(MIB as u64));
    let mut child = s
        .starling()
        .args(["get", &o.url("x"), "-O"])
        .arg(s.out("a.bin"))
        .args(["--piece-length", "256K"])
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "some pieces to be journaled",
        || {
            s.tasks()
                .first()
                .and_then(|t| std::fs::metadata(t.join("journal")).ok())
                .is_some_and(|m| m.len() >= 80)
        },
    );
    kill_pid(child.id(), libc::SIGKILL);
    let _ = child.wait();
    // The origin now serves different content of another length.
    let new = random_bytes(3 * MIB, 17);
    o.replace_content(new.clone());
    o.set(|f| f.rate = None);
    s.get(&o.url("x"), "a.bin", &["--piece-length", "256K"])
        .ok();
    assert_eq!(sha256_file(&s.out("a.bin")), sha256_bytes(&new));
}
