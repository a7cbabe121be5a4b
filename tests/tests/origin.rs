//! Protecting the origin, through the real binary: a slow origin (each response trickles at a
//! fixed rate) behind a scheduler that lets only a few tasks read it at once, and a node that
//! holds its own origin requests and rate under its limits. Everyone still completes, every
//! output verified.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use starling_tests::*;

const MIB: usize = 1 << 20;

#[test]
fn fifty_first_pulls_keep_the_origin_under_the_clusters_limit_and_all_complete() {
    let data = random_bytes(MIB, 41);
    let sum = sha256_bytes(&data);
    let origin = FaultOrigin::start(data);
    // A slow origin: 2 MB/s per response.
    origin.set(|f| f.rate = Some(2_000_000));
    let mut cluster = Cluster::new_each(4, "", &|_| {
        "[source]\nconcurrency = 2\nbackoff_ms = 20\nattempts = 6\nidle_timeout_seconds = 5\n"
            .into()
    });
    // At most 3 tasks read from the origin at once, cluster-wide, sharing 64 Mbit/s.
    cluster.configure_scheduler("[scheduler]\nmax_fetchers = 3\nmax_source_mbps = 64.0\n");
    cluster.start_all();
    // 50 distinct files (URL tasks), asked for at once from the 4 peers.
    let urls: Vec<String> = (0..50)
        .map(|i| origin.url(&format!("file-{i}.bin")))
        .collect();
    let started = Instant::now();
    std::thread::scope(|s| {
        let runs: Vec<_> = urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let node = &cluster.nodes[1 + i % 4];
                s.spawn(move || node.scratch.get(url, &format!("out-{i}"), &[]))
            })
            .collect();
        for r in runs {
            r.join().expect("get thread").ok();
        }
    });
    for (i, _) in urls.iter().enumerate() {
        let out = cluster.nodes[1 + i % 4].scratch.out(&format!("out-{i}"));
        assert_eq!(sha256_file(&out), sum, "output {i}");
    }
    for (i, n) in cluster.nodes.iter().enumerate() {
        let log = n.log();
        eprintln!(
            "node {i}: to source {}, no parent {}, pulled on order {}, order failed {}, stalled {}",
            log.matches("fetching back to source").count(),
            log.matches("no parent has this task").count(),
            log.matches("pulled on order").count(),
            log.matches("order failed").count(),
            log.matches("stall").count(),
        );
    }
    // 3 tasks × 2 Range requests each (a probe comes first, alone). The origin counts a
    // request until its thread returns, which can overlap the client's next request by a
    // moment: one over is measurement, not the limit failing (without it, 50 tasks × 2).
    let peak = origin.peak_active();
    assert!(
        peak <= 6 + 1,
        "the origin served {peak} requests at once; the limit allows 6"
    );
    // Each file was read from the origin about once.
    let served = origin.bytes_served() as f64;
    assert!(
        served <= 50.0 * MIB as f64 * 1.1,
        "the origin sent {served} bytes for 50 × 1 MiB"
    );
    eprintln!(
        "50 first pulls through 3 origin slots: {:.1} s, peak {peak} requests at the origin",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_node_keeps_its_origin_requests_and_rate_under_its_own_limits() {
    let data = random_bytes(2 * MIB, 42);
    let sum = sha256_bytes(&data);
    let origin = FaultOrigin::start(data);
    let s = Scratch::new();
    // 2 origin requests at once, 32 Mbit/s (4 MB/s), over every task of this node.
    s.write_config(
        "[source]\nconcurrency = 4\nmax_connections = 2\nmax_mbps = 32.0\nbackoff_ms = 20\nattempts = 6\nidle_timeout_seconds = 10\n",
    );
    let _d = Daemon::start(&s);
    let done = AtomicBool::new(false);
    let (first, last) = std::thread::scope(|sc| {
        // The origin's bytes over time: when the first and the last arrived.
        let sampler = sc.spawn(|| {
            let (mut first, mut last, mut seen) = (None, None, 0);
            while !done.load(Ordering::Relaxed) {
                let now = origin.bytes_served();
                if now > seen {
                    first.get_or_insert((Instant::now(), seen));
                    last = Some((Instant::now(), now));
                    seen = now;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (first, last)
        });
        let runs: Vec<_> = (0..6)
            .map(|i| {
                let (s, url) = (&s, origin.url(&format!("f{i}")));
                sc.spawn(move || s.get(&url, &format!("out-{i}"), &[]))
            })
            .collect();
        for r in runs {
            r.join().expect("get thread").ok();
        }
        done.store(true, Ordering::Relaxed);
        sampler.join().expect("sampler")
    });
    for i in 0..6 {
        assert_eq!(sha256_file(&s.out(&format!("out-{i}"))), sum, "output {i}");
    }
    // (One over is the origin's count lagging the client's next request; see above.)
    let peak = origin.peak_active();
    assert!(
        peak <= 2 + 1,
        "{peak} origin requests at once; source.max_connections = 2"
    );
    let ((t0, b0), (t1, b1)) = (first.expect("bytes"), last.expect("bytes"));
    let rate = (b1 - b0) as f64 / t1.duration_since(t0).as_secs_f64().max(0.001);
    // 4 MB/s, with room for what sits in socket buffers at either end.
    assert!(
        rate <= 4_000_000.0 * 1.3,
        "the node read {rate:.0} B/s from the origin; the limit is 4 MB/s"
    );
}
