//! The swarm, multi-process: a `starling scheduler`, a seed daemon and peer daemons on
//! loopback, with nginx as the origin. Every test checks each output against the digest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use starling_tests::*;

const MIB: usize = 1 << 20;

struct Setup {
    cluster: Cluster,
    nginx: Nginx,
    url: String,
    sum: String,
    len: u64,
    _www: tempfile::TempDir,
}

fn setup(peers: usize, mib: usize, extra_peer: &str, extra: &str) -> Setup {
    let mut cluster = Cluster::new(peers, extra_peer, extra);
    cluster.start_all();
    with_origin(cluster, mib, 7)
}

/// `cluster` (started) with an nginx origin serving `mib` MiB of random bytes from `seed`.
fn with_origin(cluster: Cluster, mib: usize, seed: u64) -> Setup {
    let www = tempfile::tempdir().expect("www");
    let data = random_bytes(mib * MIB, seed);
    std::fs::write(www.path().join("blob"), &data).expect("write blob");
    let nginx = Nginx::start(www.path());
    Setup {
        cluster,
        url: nginx.url("blob"),
        nginx,
        sum: sha256_bytes(&data),
        len: data.len() as u64,
        _www: www,
    }
}

impl Setup {
    /// `get` on node `i` through its daemon.
    fn get(&self, i: usize, name: &str) -> Run {
        self.cluster.nodes[i].scratch.get(&self.url, name, &[])
    }

    fn out_sum(&self, i: usize, name: &str) -> String {
        sha256_file(&self.cluster.nodes[i].scratch.out(name))
    }

    /// Gets on the given nodes at once; each must succeed with the right content.
    fn get_all(&self, nodes: &[usize]) {
        std::thread::scope(|s| {
            let runs: Vec<_> = nodes
                .iter()
                .map(|&i| s.spawn(move || self.get(i, "out")))
                .collect();
            for r in runs {
                r.join().expect("get thread").ok();
            }
        });
        for &i in nodes {
            assert_eq!(self.out_sum(i, "out"), self.sum, "node {i}'s output");
        }
    }

    fn origin_bytes(&self) -> u64 {
        self.nginx.bytes_sent()
    }

    /// The origin served the content about once (at most 1.05 x); a failure prints who went
    /// to the origin and why (each node's log).
    fn assert_origin_about_once(&self) {
        let origin = self.origin_bytes() as f64 / self.len as f64;
        assert!(
            origin <= 1.05,
            "the origin served {origin:.3} x F; who went to it:\n{}",
            self.cluster.source_story()
        );
    }
}

/// The fault: process `pid` cannot run for `how_long` (SIGSTOP, then SIGCONT, by PID), as
/// under a CPU quota's throttling or a paused VM. The sleep is the stall itself.
fn stall(pid: u32, how_long: Duration) {
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|st| st.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    std::thread::sleep(how_long);
    signal("-CONT");
}

#[test]
fn a_seed_and_six_peers_read_the_origin_about_once() {
    let _cpus = sharing_the_cpus();
    let s = setup(6, 64, "", "");
    s.get_all(&[1, 2, 3, 4, 5, 6]);
    s.assert_origin_about_once();
    // The peers got it from each other and the seed, not from the origin.
    let from_parents: f64 = (1..=6)
        .map(|i| s.cluster.nodes[i].metric("starling_bytes_downloaded_total{source=\"parent\"}"))
        .sum();
    assert!(from_parents >= 6.0 * s.len as f64, "{from_parents}");
    let seed_up = s.cluster.nodes[0].metric("starling_bytes_uploaded_total");
    let peers_up: f64 = (1..=6)
        .map(|i| s.cluster.nodes[i].metric("starling_bytes_uploaded_total"))
        .sum();
    assert!(
        seed_up > 0.0 && peers_up > 0.0,
        "seed {seed_up}, peers {peers_up}: a mesh, not a star"
    );
}

#[test]
fn thirty_two_peers_starting_together_read_the_origin_once_and_the_seed_sends_it_once() {
    // 33 daemons on 2 cores, alone: run beside two other swarms (47 daemons) the origin once
    // served 3.0 x F here; alone it passed every time (cause under overload not yet traced).
    let _cpus = cpus_to_itself();
    // A swarm past the size the rules were first tuned on (8-16 peers): 32 daemons and a seed
    // started at the same moment, all asking at once. Every copy must verify; the origin must
    // serve the content about once, and the seed (reading it) must send it about once, not
    // duplicates to peers that could have had it from each other.
    let mut cluster = Cluster::new(32, "", "");
    let ready = cluster.start_all_at_once();
    assert_eq!(ready.len(), 33);
    let s = with_origin(cluster, 8, 11);
    let peers: Vec<usize> = (1..=32).collect();
    s.get_all(&peers);
    s.assert_origin_about_once();
    let seed = s.cluster.nodes[0].metric("starling_bytes_uploaded_total") / s.len as f64;
    assert!(seed <= 1.15, "the seed sent {seed:.3} x F to 32 peers");
    let from_parents: f64 = peers
        .iter()
        .map(|i| s.cluster.nodes[*i].metric("starling_bytes_downloaded_total{source=\"parent\"}"))
        .sum();
    assert!(
        from_parents >= 32.0 * s.len as f64,
        "peers got {from_parents} bytes from parents, want all of 32 copies"
    );
}

#[test]
fn in_racks_one_member_takes_each_piece_in_and_the_others_pass_it_around() {
    let _cpus = sharing_the_cpus();
    // The seed alone in rack r0, three peers in rack ra and three in rb (`peer.rack`), all
    // asking at once. The scheduler makes one member per rack its gateway; the others take
    // parents in their rack only. So the pieces a rack's members got from outside it add up
    // to about one copy (the spine carries each piece into a rack once), and the members
    // still got most of the content from each other.
    let rack = |i: usize| match i {
        0 => "r0",
        1..=3 => "ra",
        _ => "rb",
    };
    let mut cluster =
        Cluster::new_each_peer(6, &|i| format!("zone = \"z\"\nrack = \"{}\"", rack(i)));
    cluster.start_all();
    let s = with_origin(cluster, 16, 13);
    s.get_all(&[1, 2, 3, 4, 5, 6]);
    s.assert_origin_about_once();
    let addr: Vec<String> = s
        .cluster
        .nodes
        .iter()
        .map(|n| n.quic_addr().to_string())
        .collect();
    for (name, members) in [("ra", [1, 2, 3]), ("rb", [4, 5, 6])] {
        let inside: Vec<&String> = members.iter().map(|i| &addr[*i]).collect();
        let (mut from_outside, mut from_inside, mut pieces) = (0u64, 0u64, 0u64);
        for i in members {
            let mut c = s.cluster.nodes[i].scratch.starling();
            c.args(["stat", &s.url, "--json"]);
            let d: serde_json::Value =
                serde_json::from_slice(&Run::of(&mut c).ok().stdout).expect("stat JSON");
            pieces = d["pieces"].as_u64().expect("pieces");
            for p in d["parents"].as_array().expect("parents") {
                let n = p["pieces"].as_u64().unwrap_or(0);
                if inside.contains(&&p["peer"].as_str().unwrap_or("").to_string()) {
                    from_inside += n;
                } else {
                    from_outside += n;
                }
            }
        }
        let got = from_inside + from_outside;
        assert!(
            got >= 2 * pieces,
            "rack {name}: the parents' records cover {got} of 3 x {pieces} pieces"
        );
        assert!(
            from_outside as f64 <= 1.1 * pieces as f64,
            "rack {name} took {from_outside} pieces from outside it ({pieces} in the content)"
        );
        assert!(
            from_inside as f64 >= 1.5 * pieces as f64,
            "rack {name}'s members got only {from_inside} pieces from each other"
        );
    }
}

#[test]
fn with_fewer_parent_slots_than_peers_every_peer_still_uploads() {
    let _cpus = sharing_the_cpus();
    // Eight peers, two parent slots each: the peers that start together must spread over
    // each other, not all take the one or two that announced first (which left the others
    // with no children and the seed sending several copies).
    let s = setup(8, 64, "max_parents = 2", "");
    s.get_all(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let up: Vec<f64> = (0..=8)
        .map(|i| s.cluster.nodes[i].metric("starling_bytes_uploaded_total") / s.len as f64)
        .collect();
    let idle = (1..=8).filter(|i| up[*i] < 0.05).count();
    assert!(
        idle <= 1,
        "{idle} of 8 peers uploaded under 5% of the file (uploads in F, seed first: {up:.2?})"
    );
    assert!(up[0] < 3.0, "the seed sent {:.2} x F: {up:.2?}", up[0]);
}

#[test]
fn a_seed_slower_per_child_than_the_peers_is_kept_and_sends_each_piece_about_once() {
    let _cpus = sharing_the_cpus();
    // Every node's upload is capped alike, so the seed, whose link all eight children share,
    // gives each child far less than its other parent does. The children must not drop it as
    // their slowest parent while it is their only way to most pieces (that cancelled what it
    // was sending: the job took 13.6-14.1 s here against 9.5-9.9 s), and the seed must not
    // send a piece to a second peer while the first copy is still on its way, nor free a piece
    // for others because its receiver stopped the stream after reading it all (an earlier
    // version of this change did: 1.35 x F in one run of two).
    let s = setup(8, 64, "max_parents = 2\nupload_limit_mbps = 80", "");
    s.get_all(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let seed = s.cluster.nodes[0].metric("starling_bytes_uploaded_total") / s.len as f64;
    assert!(seed <= 1.25, "the seed sent {seed:.2} x F");
    s.assert_origin_about_once();
}

#[test]
fn a_peer_mixing_a_slow_parent_and_the_origin_checks_both_against_one_chain() {
    let _cpus = sharing_the_cpus();
    // The seed uploads at 16 Mbit/s and the peer wants 200: after 300 ms the peer sends the
    // rest to the origin. The seed's log gave every piece's chain values, so the origin's
    // pieces are checked against them as they arrive, like the seed's, and the copy is one
    // chain from the first byte to the digest.
    let s = setup(
        1,
        16,
        "upload_limit_mbps = 16\nsource_min_mbps = 200\nsource_wait_ms = 300",
        "",
    );
    s.cluster.nodes[0].scratch.get(&s.url, "seed-out", &[]).ok();
    s.get(1, "out").ok();
    assert_eq!(s.out_sum(1, "out"), s.sum);
    let peer = &s.cluster.nodes[1];
    let from_parent = peer.metric("starling_bytes_downloaded_total{source=\"parent\"}");
    let from_origin = peer.metric("starling_bytes_downloaded_total{source=\"origin\"}");
    assert!(
        from_parent > 0.0 && from_origin > 0.0,
        "parent {from_parent} and origin {from_origin} bytes: the job must mix both"
    );
}

#[test]
fn origin_pieces_ahead_of_the_swarms_values_wait_for_the_chain_and_still_verify() {
    let _cpus = sharing_the_cpus();
    // A slow origin (1 MiB/s per connection) read at once by the seed and by the peer, which
    // goes to source after 200 ms because its parent is slower than it wants. The peer's origin
    // pieces run ahead of the values the seed has published (the seed's chain is at its own
    // slowest piece), so they are stored unchecked and the peer's own in-order chain gives them
    // their values; the copy must still be one chain to the digest.
    let data = random_bytes(6 * MIB, 11);
    let sum = sha256_bytes(&data);
    let origin = FaultOrigin::start(data);
    origin.set(|f| f.rate = Some(MIB as u64));
    let mut cluster = Cluster::new(1, "source_min_mbps = 500\nsource_wait_ms = 200", "");
    cluster.start_all();
    let url = origin.url("blob");
    let peer = &cluster.nodes[1];
    let r = peer.scratch.get(&url, "out", &["--piece-length", "256K"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sha256_file(&peer.scratch.out("out")), sum);
    let from_origin = peer.metric("starling_bytes_downloaded_total{source=\"origin\"}");
    assert!(from_origin > 0.0, "the peer read the origin");
    assert!(
        peer.log().contains("origin pieces chained"),
        "the peer's chain hashed origin pieces the swarm had no values for"
    );
}

#[test]
fn news_of_verified_pieces_is_gathered_not_sent_one_answer_per_piece() {
    let _cpus = sharing_the_cpus();
    // Four peers fetching 512 pieces from each other, every upload capped so the job lasts
    // a few seconds: each peer verifies a piece every few tens of milliseconds. A child asks a
    // parent for news at most once per `policy::have_every` (about four pieces' time at its
    // rate; 20 ms until first measured) until its last 16 pieces, so the answers per parent
    // and child are about the job's length over that interval plus 16, not one per piece
    // (each answer a stream opened and answered: CPU spent on news, not data).
    use starling::swarm::policy::{have_every, HAVE_EVERY_FIRST};
    let s = setup(4, 64, "upload_limit_mbps = 200", "");
    let start = std::time::Instant::now();
    s.get_all(&[1, 2, 3, 4]);
    let secs = start.elapsed().as_secs_f64();
    let answers: f64 = (1..=4)
        .map(|i| s.cluster.nodes[i].metric("starling_have_answers_total"))
        .sum();
    let piece = starling::core::default_piece_length(s.len);
    let pieces = s.len.div_ceil(piece) as f64;
    // 4 peers, each a parent of the 3 others.
    let per_pair = answers / 12.0;
    // The first second at the first interval, the rest at the one the measured rate gives,
    // the last 16 pieces one by one, and a few to spare (the bound grows with the job's
    // length, so a slow machine does not fail it).
    let every = have_every(piece, s.len as f64 / secs).as_secs_f64();
    let first = HAVE_EVERY_FIRST.as_secs_f64();
    let bound = 1.0 / first + (secs - 1.0).max(0.0) / every + 16.0 + 8.0;
    assert!(
        per_pair <= bound && per_pair <= pieces / 2.0,
        "{per_pair:.1} news answers per parent and child in {secs:.1} s for {pieces} pieces (at most {bound:.0}, and half the pieces)"
    );
}

/// Flips a byte in every piece of a node's stored copy (what a bad disk does).
fn corrupt_store(node: &Node, len: u64, piece: u64) {
    use std::os::unix::fs::FileExt;
    let tasks = node.scratch.tasks();
    let content = tasks
        .iter()
        .map(|t| t.join("content"))
        .find(|c| c.exists())
        .expect("a stored task");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&content)
        .expect("open the stored content (as root, despite mode 0444)");
    let mut off = 100;
    while off < len {
        f.write_all_at(b"\xff\x00\xff", off).expect("corrupt");
        off += piece;
    }
}

#[test]
fn a_peer_serving_corrupt_pieces_is_detected_refetched_around_and_blacklisted() {
    let _cpus = sharing_the_cpus();
    if !is_root() {
        eprintln!("skipped: needs root to write the read-only stored content");
        return;
    }
    let s = setup(2, 32, "", "");
    s.get_all(&[1]);
    // Node 1 now serves every piece from its (corrupted) store.
    corrupt_store(&s.cluster.nodes[1], s.len, MIB as u64);
    s.get_all(&[2]);
    let n2 = &s.cluster.nodes[2];
    assert!(
        n2.metric("starling_piece_failures_total{cause=\"digest_mismatch\"}") >= 1.0,
        "{}",
        n2.metrics()
    );
    assert!(n2.metric("starling_parents_blacklisted_total") >= 1.0);
    assert!(n2.log().contains("blacklisted"), "{}", n2.log());
    s.assert_origin_about_once();
}

#[test]
fn a_parent_killed_mid_transfer_leaves_its_children_to_finish_from_others() {
    let _cpus = sharing_the_cpus();
    // 80 Mbit/s uploads: the second download takes a few seconds.
    let mut s = setup(2, 48, "upload_limit_mbps = 80", "");
    s.get_all(&[1]);
    let n1_port = s.cluster.nodes[1].metrics_port;
    let n1_pid = s.cluster.nodes[1].pid().expect("node 1 runs");
    let uploaded_at_kill = std::thread::scope(|sc| {
        let getter = sc.spawn(|| s.get(2, "out"));
        let mut up = 0.0;
        wait_until(
            Duration::from_secs(30),
            "node 1 to upload to node 2",
            || {
                up = metric_value(&scrape(n1_port), "starling_bytes_uploaded_total");
                up >= 4.0 * MIB as f64
            },
        );
        kill_pid(n1_pid, libc::SIGKILL);
        getter.join().expect("get thread").ok();
        up
    });
    s.cluster.nodes[1].kill();
    // Node 1 was killed mid-transfer; node 2 got the rest from the seed.
    assert!(uploaded_at_kill < s.len as f64, "{uploaded_at_kill}");
    assert_eq!(s.out_sum(2, "out"), s.sum);
    let seed_up = s.cluster.nodes[0].metric("starling_bytes_uploaded_total");
    assert!(seed_up + uploaded_at_kill >= 2.0 * s.len as f64 - 4.0 * MIB as f64);
    s.assert_origin_about_once();
}

/// Pieces durable in a node's journal.
fn durable_pieces(node: &Node) -> u64 {
    node.scratch
        .tasks()
        .iter()
        .filter_map(|t| std::fs::metadata(t.join("journal")).ok())
        .map(|m| m.len() / starling::storage::JOURNAL_RECORD as u64)
        .sum()
}

/// Node 1 downloads from the seed (uploading at 64 Mbit/s) and is killed with a third of the
/// pieces or more durable: (pieces durable, piece length, pieces).
fn kill_downloader_mid_transfer(s: &mut Setup) -> (u64, u64, u64) {
    s.cluster.nodes[0].scratch.get(&s.url, "seed-out", &[]).ok();
    let piece = starling::core::default_piece_length(s.len);
    let pieces = s.len.div_ceil(piece);
    let pid = s.cluster.nodes[1].pid().expect("node 1 runs");
    std::thread::scope(|sc| {
        let getter = sc.spawn(|| s.get(1, "out"));
        wait_until(
            Duration::from_secs(30),
            "a third of the pieces durable at node 1",
            || durable_pieces(&s.cluster.nodes[1]) >= pieces / 3,
        );
        kill_pid(pid, libc::SIGKILL);
        // The client sees its daemon die.
        let r = getter.join().expect("get thread");
        assert_ne!(r.code, 0);
    });
    s.cluster.nodes[1].kill();
    let durable = durable_pieces(&s.cluster.nodes[1]);
    assert!(
        (pieces / 3..pieces).contains(&durable),
        "{durable} pieces durable"
    );
    (durable, piece, pieces)
}

#[test]
fn a_downloader_killed_mid_transfer_resumes_without_refetching_verified_pieces() {
    let _cpus = sharing_the_cpus();
    // Pieces become durable every 100 ms.
    let mut s = setup(
        1,
        48,
        "upload_limit_mbps = 64",
        "[storage]\ncommit_interval_ms = 100",
    );
    let (durable, piece, pieces) = kill_downloader_mid_transfer(&mut s);
    s.cluster.nodes[1].start();
    s.get(1, "out").ok();
    assert_eq!(s.out_sum(1, "out"), s.sum);
    let refetched = s.cluster.nodes[1].metric("starling_bytes_downloaded_total{source=\"parent\"}");
    let missing = (pieces - durable) * piece;
    // Only what was missing, give or take endgame duplicates.
    assert!(
        refetched <= (missing + 4 * MIB as u64) as f64,
        "refetched {refetched} bytes; {missing} were missing"
    );
    assert!(s.cluster.nodes[1].log().contains("resuming from peers"));
}

#[test]
fn a_download_begun_from_peers_resumes_from_the_origin_once_they_are_gone() {
    let _cpus = sharing_the_cpus();
    let mut s = setup(
        1,
        48,
        "upload_limit_mbps = 64",
        "[storage]\ncommit_interval_ms = 100",
    );
    let (durable, piece, pieces) = kill_downloader_mid_transfer(&mut s);
    // The seed dies too, and the scheduler notices (5 s without its announcements).
    s.cluster.nodes[0].kill();
    std::thread::sleep(Duration::from_secs(6));
    let origin0 = s.origin_bytes();
    s.cluster.nodes[1].start();
    s.get(1, "out").ok();
    assert_eq!(s.out_sum(1, "out"), s.sum);
    // The pieces verified from the seed stay: the origin sends only the rest. (A task begun
    // from peers has no origin validator; it was discarded and fetched whole.)
    let sent = s.origin_bytes() - origin0;
    let missing = (pieces - durable) * piece;
    assert!(
        sent <= missing + 4 * MIB as u64,
        "the origin sent {sent} bytes; {missing} were missing"
    );
}

#[test]
fn an_idle_swarm_announces_every_two_seconds_not_every_half_second() {
    let _cpus = sharing_the_cpus();
    // A seed and a peer holding a finished task, nothing to do: each sends a heartbeat every
    // 2 s, not a round every 500 ms (`peer.announce_interval_ms`), which cost an idle daemon
    // about a tenth of its CPU and the scheduler 4 x the calls of an idle fleet.
    let s = setup(1, 4, "", "");
    s.get_all(&[1]);
    let port = s
        .cluster
        .scheduler
        .as_ref()
        .expect("a scheduler")
        .metrics_port;
    let announces = || {
        metric_value(
            &scrape(port),
            "starling_scheduler_calls_total{kind=\"announce\"}",
        )
    };
    // The download's last rounds end: wait for a 2 s window with at most a heartbeat from
    // each daemon.
    let mut last = announces();
    wait_until(Duration::from_secs(30), "the daemons to go quiet", || {
        std::thread::sleep(Duration::from_secs(2));
        let now = announces();
        let quiet = now - last <= 2.0;
        last = now;
        quiet
    });
    let before = announces();
    std::thread::sleep(Duration::from_secs(8));
    let idle = announces() - before;
    // 2 daemons x 8 s: 8 heartbeats (at most 10 with the window's edges); with a round
    // every 500 ms it was 21 here.
    assert!((4.0..=10.0).contains(&idle), "{idle} announcements in 8 s");
}

#[test]
fn a_scheduler_stopped_for_seven_seconds_in_a_flash_crowd_leaves_the_origin_read_once() {
    let _cpus = sharing_the_cpus();
    // A scheduler process that cannot run for a while (a CPU quota's throttling, a paused VM;
    // here SIGSTOP) just as 16 peers first ask. It judged every peer silent on waking and
    // made each asker in turn the fetcher, peers without a plan went to the origin on their
    // own 14 s timers, and first calls that timed out went straight to it: 13-28 x F.
    let s = setup(16, 8, "", "");
    let pid = s
        .cluster
        .scheduler
        .as_ref()
        .expect("a scheduler")
        .child
        .id();
    let log = s
        .cluster
        .scheduler
        .as_ref()
        .expect("a scheduler")
        .log
        .clone();
    let peers: Vec<usize> = (1..=16).collect();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            // Stopped right after its first decision: the first asker's answer (order the
            // seed) may never leave, and the others' calls wait in its queue.
            wait_until(
                Duration::from_secs(30),
                "the scheduler's first decision",
                || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("choosing who fetches")),
            );
            stall(pid, Duration::from_secs(7));
        });
        s.get_all(&peers);
    });
    s.assert_origin_about_once();
}

#[test]
fn a_seed_stopped_for_seven_seconds_mid_fetch_gives_way_to_the_peer_that_took_over() {
    let _cpus = sharing_the_cpus();
    // The seed reads the origin at 24 Mbit/s (24 MiB: about 8 s) and cannot run for 7 s a
    // quarter of the way in (SIGSTOP: a throttled or paused host). The scheduler takes it for
    // gone after 5 s and sends a peer to the origin for the rest. On waking the seed read on
    // what that peer was reading (1.9 x F); now the scheduler's answer to its announcement
    // tells it to give way, and it takes the rest from the swarm. It asks for nothing more
    // until that answer comes: reading on, it raced it (1.060 x F under CI's load).
    let mut cluster = Cluster::new_each(8, "", &|_| "[source]\nmax_mbps = 24\n".to_string());
    cluster.start_all();
    let s = with_origin(cluster, 24, 11);
    let pid = s.cluster.nodes[0].pid().expect("the seed runs");
    let peers: Vec<usize> = (1..=8).collect();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            wait_until(
                Duration::from_secs(60),
                "a quarter of the file read",
                || s.origin_bytes() >= s.len / 4,
            );
            stall(pid, Duration::from_secs(7));
        });
        s.get_all(&peers);
    });
    eprintln!("origin {:.3} x F", s.origin_bytes() as f64 / s.len as f64);
    s.assert_origin_about_once();
    let seed_log = s.cluster.nodes[0].log();
    assert!(
        seed_log.contains("taking the rest from the swarm"),
        "the seed did not give way:\n{}",
        s.cluster.source_story()
    );
    // It gave way before asking for more: on waking it waited for its scheduler's answer
    // instead of racing it (a 1.060 x F run in CI).
    assert!(
        seed_log.contains("waiting for their answer before reading more of the origin"),
        "the woken seed did not check in with its scheduler:\n{seed_log}"
    );
}

#[test]
fn a_scheduler_restart_mid_swarm_does_not_stop_the_downloads() {
    let _cpus = sharing_the_cpus();
    let mut s = setup(3, 48, "upload_limit_mbps = 80", "");
    let seed_port = s.cluster.nodes[0].metrics_port;
    let old = s.cluster.scheduler.take().expect("a scheduler");
    let shared = &s;
    let restarted = std::thread::scope(|sc| {
        let getters: Vec<_> = [1usize, 2, 3]
            .iter()
            .map(|&i| sc.spawn(move || shared.get(i, "out")))
            .collect();
        wait_until(Duration::from_secs(30), "the swarm to be under way", || {
            metric_value(&scrape(seed_port), "starling_bytes_uploaded_total") >= 8.0 * MIB as f64
        });
        old.kill();
        let c = &shared.cluster;
        let fresh = SchedulerProc::start(c.dir.path(), &c.ca, c.scheduler_port);
        for g in getters {
            g.join().expect("get thread").ok();
        }
        fresh
    });
    s.cluster.scheduler = Some(restarted);
    for i in 1..=3 {
        assert_eq!(s.out_sum(i, "out"), s.sum, "node {i}");
    }
    s.assert_origin_about_once();
    // The restarted scheduler rebuilt its state from announcements: a newcomer finds parents.
    let before = s.origin_bytes();
    let late = &s.cluster.nodes[1];
    late.scratch.get(&s.url, "again", &[]).ok();
    assert_eq!(s.origin_bytes(), before);
}

#[test]
fn a_peer_without_the_cluster_ca_is_refused_no_piece_no_manifest() {
    let _cpus = sharing_the_cpus();
    let s = setup(1, 8, "", "");
    s.get_all(&[1]);
    // An outsider: its own CA (generated in its data dir), pointed at the cluster.
    let outsider = Scratch::new();
    outsider.write_config(&format!(
        "[peer]\nlisten = \"127.0.0.1:0\"\nsource_fallback = false\n[scheduler]\naddrs = [\"127.0.0.1:{}\"]\n",
        s.cluster.scheduler_port
    ));
    let d = Daemon::start(&outsider);
    let r = outsider.get(&s.url, "out", &[]);
    // Its own failure, named as such (not an origin error), with the network exit code.
    assert_eq!(r.code, 5, "{}", r.stderr);
    let scheduler = format!(
        "the scheduler 127.0.0.1:{} is unreachable",
        s.cluster.scheduler_port
    );
    assert!(r.stderr.contains(&scheduler), "{}", r.stderr);
    assert!(
        r.stderr.contains("peer.source_fallback = false"),
        "{}",
        r.stderr
    );
    assert!(!outsider.out("out").exists());
    drop(d);
    // Straight at the seed's QUIC port with a foreign certificate: refused before any request.
    let seed_addr = s.cluster.nodes[0].quic_addr();
    let refused = foreign_fetch(seed_addr, &s.cluster.ca, url_task(&s.url));
    assert!(refused.is_err(), "a foreign peer got {refused:?}");
    assert_eq!(
        s.cluster.nodes[0].metric("starling_bytes_uploaded_total") as u64,
        s.len
    );
    // Both refusals are counted where they happened, not only logged.
    let tls = "starling_handshakes_refused_total{reason=\"tls\"}";
    assert!(s.cluster.nodes[0].metric(tls) >= 1.0, "the seed counted it");
    let port = s
        .cluster
        .scheduler
        .as_ref()
        .expect("scheduler")
        .metrics_port;
    let text = scrape(port);
    assert!(
        metric_value(&text, tls) >= 1.0,
        "the scheduler counted the outsider's calls:\n{text}"
    );
    assert_eq!(
        s.cluster.nodes[1].metric(tls),
        0.0,
        "a node nobody foreign reached counted nothing"
    );
}

/// The daemon's QUIC address, from its start-up log line.
fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn url_task(url: &str) -> starling::core::TaskId {
    let defaults = starling::config::Config::default();
    starling::core::TaskId::for_url(url, &defaults.source.filtered_query_params).expect("task id")
}

/// A member of the cluster (certificate from its CA), as the tests' own client or rogue.
fn member(ca_dir: &std::path::Path) -> starling::transport::tls::Identity {
    let read = |f: &str| std::fs::read_to_string(ca_dir.join(f)).expect("read the cluster CA");
    starling::transport::tls::ClusterCa::from_pem(&read("ca.pem"), &read("ca.key"))
        .and_then(|ca| ca.issue("test"))
        .expect("issue a member certificate")
}

/// A peer whose certificate is from another CA, but which trusts the cluster CA (it copied
/// ca.pem): it must get neither a manifest nor a piece.
fn foreign_fetch(
    addr: std::net::SocketAddr,
    ca_dir: &std::path::Path,
    task: starling::core::TaskId,
) -> Result<(), String> {
    use starling::transport::{tls::ClusterCa, Node};
    rt().block_on(async {
        let mut id = ClusterCa::generate().unwrap().issue("intruder").unwrap();
        id.ca = member(ca_dir).ca;
        let node = Node::bind(loopback(), &id).map_err(|e| e.to_string())?;
        let parent = node.connect(addr).await.map_err(|e| e.to_string())?;
        match parent.manifest(task).await {
            Ok(_) => return Ok(()),
            Err(e) => eprintln!("manifest refused: {e}"),
        }
        parent
            .piece(task, 0, 0)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

#[test]
fn malformed_and_oversized_frames_get_errors_and_no_peer_crashes() {
    let _cpus = sharing_the_cpus();
    use starling::transport::wire::{self, Request, Status, REQUEST_LEN};
    use starling::transport::Node;
    let s = setup(1, 8, "", "");
    s.get_all(&[1]);
    let seed = s.cluster.nodes[0].quic_addr();
    let task = url_task(&s.url);
    let id = member(&s.cluster.ca);
    rt().block_on(async {
        let node = Node::bind(loopback(), &id).unwrap();
        let parent = node.connect(seed).await.expect("a member connects");
        let good = Request::Have {
            task,
            epoch: 0,
            since: 0,
        }
        .encode();
        let mut bad_kind = good;
        bad_kind[5] = 99;
        let mut huge_body = Request::Announce { body: 0 }.encode();
        huge_body[47..51].copy_from_slice(&(wire::MAX_BODY + 1).to_le_bytes());
        let mut short_body = Request::SeedOrder { task, body: 100 }.encode().to_vec();
        short_body.extend_from_slice(b"{");
        let mut junk_order = Request::SeedOrder { task, body: 5 }.encode().to_vec();
        junk_order.extend_from_slice(b"nope!");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", vec![0xAB; REQUEST_LEN]),
            ("truncated", good[..20].to_vec()),
            ("unknown kind", bad_kind.to_vec()),
            ("oversized body", huge_body.to_vec()),
            ("short body", short_body),
            ("junk seed order", junk_order),
        ];
        for (what, frame) in cases {
            let got = parent.raw_exchange(&frame).await;
            assert!(
                matches!(got, Ok((Status::BadRequest, 0))),
                "{what}: {got:?}"
            );
        }
        // Still serving, to this very connection.
        let have = parent
            .have(task, u32::MAX, 0)
            .await
            .expect("a good request after the bad");
        assert_eq!(have.content_length, s.len);
    });
    assert!(s.cluster.nodes[0].pid().is_some());
    // The seed still serves a newcomer.
    s.cluster.nodes[1].scratch.get(&s.url, "again", &[]).ok();
}

/// What a [`Rogue`] does wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lie {
    /// Honest log (right values); every piece answered with an oversized frame header.
    Oversized,
    /// Honest log claiming every piece; every piece request answered "not found".
    Phantom,
    /// Honest log; each piece answered with its header and half its bytes, then nothing.
    Stall,
    /// Honest log claiming every piece; every piece request answered Busy.
    Busy,
    /// From piece `from` on, false values and bytes that match them: the content XOR 0x5A,
    /// chained from the true value before `from`. With `last`, it also names a (false) value
    /// for the last piece; without, it never mentions the last piece.
    Forged { from: u32, last: bool },
}

/// A rogue cluster member (a real cluster certificate, the real wire protocol): announces to
/// the scheduler that it holds the whole task as a seed, and answers as its [`Lie`] says.
struct Rogue {
    _rt: tokio::runtime::Runtime,
    pieces_asked: Arc<std::sync::atomic::AtomicU64>,
    /// Announcements the scheduler accepted.
    announced: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Rogue {
    fn start(
        ca: &std::path::Path,
        scheduler: u16,
        task: starling::core::TaskId,
        data: Vec<u8>,
        lie: Lie,
    ) -> Rogue {
        use starling::core::{Digest, Manifest, PiecePlan};
        use starling::scheduler::{Announce, Holding};
        use starling::storage::LogEntry;
        use starling::transport::wire::{self, HaveReply, Request, Status, REQUEST_LEN};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let id = member(ca);
        let plan = PiecePlan::with_default(data.len() as u64);
        let n = plan.count();
        // What it serves and the values it names: the truth, or from `from` on a forgery
        // whose values chain from the true value before it.
        let served = match lie {
            Lie::Forged { from, .. } => {
                let at = plan.piece(from).expect("a piece").offset as usize;
                let mut f = data.clone();
                f[at..].iter_mut().for_each(|b| *b ^= 0x5A);
                f
            }
            _ => data.clone(),
        };
        let values = Manifest::of_content(plan, &served)
            .expect("manifest")
            .piece_values()
            .to_vec();
        let named: Vec<u32> = match lie {
            Lie::Forged { last: false, .. } => (0..n - 1).collect(),
            _ => (0..n).collect(),
        };
        let content = Digest::of(&data);
        let (served, values, named) = (Arc::new(served), Arc::new(values), Arc::new(named));
        let pieces_asked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let server = starling::transport::tls::server_config(&id).expect("server config");
        let endpoint = rt
            .block_on(async { quinn::Endpoint::server(server, loopback()) })
            .expect("bind");
        let addr = endpoint.local_addr().expect("addr");
        let asked = pieces_asked.clone();
        rt.spawn(async move {
            while let Some(inc) = endpoint.accept().await {
                let (served, values, named, asked) =
                    (served.clone(), values.clone(), named.clone(), asked.clone());
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let (served, values, named, asked) =
                            (served.clone(), values.clone(), named.clone(), asked.clone());
                        tokio::spawn(async move {
                            let mut b = [0u8; REQUEST_LEN];
                            if recv.read_exact(&mut b).await.is_err() {
                                return;
                            }
                            let (status, len, payload) = match Request::decode(&b) {
                                Ok(Request::Have { since, .. }) => {
                                    let entries = if since < n {
                                        named
                                            .iter()
                                            .map(|&i| LogEntry {
                                                index: i,
                                                value: values[i as usize],
                                                held: true,
                                            })
                                            .collect()
                                    } else {
                                        // Nothing new: hold the long poll a while, as a
                                        // parent does.
                                        tokio::time::sleep(Duration::from_millis(500)).await;
                                        Vec::new()
                                    };
                                    let r = HaveReply {
                                        content_length: plan.content_length(),
                                        piece_length: plan.piece_length(),
                                        content: Some(content),
                                        epoch: 0,
                                        end: n,
                                        entries,
                                    }
                                    .encode();
                                    (Status::Ok, r.len() as u64, r)
                                }
                                Ok(Request::Piece { index, .. }) => {
                                    asked.fetch_add(1, Ordering::Relaxed);
                                    let piece = plan.piece(index);
                                    match (lie, piece) {
                                        (Lie::Oversized, _) => (
                                            Status::Ok,
                                            starling::core::MAX_PIECE_LENGTH + 1,
                                            vec![0u8; 4096],
                                        ),
                                        (Lie::Phantom, _) | (_, None) => {
                                            (Status::NotFound, 0, Vec::new())
                                        }
                                        (Lie::Busy, _) => (Status::Busy, 0, Vec::new()),
                                        (_, Some(_)) if !named.contains(&index) => {
                                            (Status::NotFound, 0, Vec::new())
                                        }
                                        (Lie::Stall, Some(p)) => {
                                            let half = &served[p.offset as usize..]
                                                [..p.length as usize / 2];
                                            let _ = send
                                                .write_all(&wire::encode_response_header(
                                                    Status::Ok,
                                                    p.length,
                                                ))
                                                .await;
                                            let _ = send.write_all(half).await;
                                            // Slowloris: the rest never comes.
                                            tokio::time::sleep(Duration::from_secs(3600)).await;
                                            return;
                                        }
                                        (Lie::Forged { .. }, Some(p)) => (
                                            Status::Ok,
                                            p.length,
                                            served[p.offset as usize..p.end() as usize].to_vec(),
                                        ),
                                    }
                                }
                                _ => (Status::NotFound, 0, Vec::new()),
                            };
                            let _ = send
                                .write_all(&wire::encode_response_header(status, len))
                                .await;
                            let _ = send.write_all(&payload).await;
                            let _ = send.finish();
                        });
                    }
                });
            }
        });
        // Keep announcing, like a real peer: a seed holding everything.
        let stop2 = stop.clone();
        let announced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let announced2 = announced.clone();
        rt.spawn(async move {
            let node = starling::transport::Node::bind(loopback(), &id).expect("client node");
            let sched: std::net::SocketAddr = format!("127.0.0.1:{scheduler}").parse().unwrap();
            let mut every = tokio::time::interval(Duration::from_millis(300));
            while !stop2.load(Ordering::Relaxed) {
                every.tick().await;
                if let Ok(p) = node.connect(sched).await {
                    let a = Announce {
                        peer: addr.to_string(),
                        addr,
                        seed: true,
                        upload_capacity: 1e10,
                        uploads: 0,
                        tasks: vec![(
                            task,
                            Holding::Full {
                                pieces: n,
                                have: vec![true; n as usize],
                            },
                        )],
                        links: vec![],
                        place: Default::default(),
                        fetching: vec![],
                    };
                    let body = serde_json::to_vec(&a).unwrap();
                    if p.call(|len| Request::Announce { body: len }, &body)
                        .await
                        .is_ok()
                    {
                        announced2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Rogue {
            _rt: rt,
            pieces_asked,
            announced,
            stop,
        }
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_parent_sending_oversized_frames_is_dropped_and_the_download_completes() {
    let _cpus = sharing_the_cpus();
    let s = setup(1, 16, "", "");
    // The seed holds it.
    s.cluster.nodes[0].scratch.get(&s.url, "seed-out", &[]).ok();
    let data = std::fs::read(s.cluster.nodes[0].scratch.out("seed-out")).expect("read");
    let rogue = Rogue::start(
        &s.cluster.ca,
        s.cluster.scheduler_port,
        url_task(&s.url),
        data,
        Lie::Oversized,
    );
    wait_until(
        Duration::from_secs(10),
        "the rogue to announce itself",
        || rogue.announced.load(Ordering::Relaxed) >= 1,
    );
    s.get_all(&[1]);
    let n1 = &s.cluster.nodes[1];
    assert!(
        rogue.pieces_asked.load(Ordering::Relaxed) >= 1,
        "the rogue was never asked"
    );
    assert!(
        n1.metric("starling_piece_failures_total{cause=\"malformed\"}") >= 1.0,
        "{}",
        n1.metrics()
    );
    assert!(n1.pid().is_some());
}

#[test]
fn two_schedulers_split_the_tasks_by_consistent_hashing() {
    let _cpus = sharing_the_cpus();
    use starling::scheduler::ring::Ring;
    let (mut cluster, extra) = Cluster::with_schedulers(2, 2);
    cluster.start_all();
    let addrs = [
        format!("127.0.0.1:{}", cluster.scheduler_port),
        format!("127.0.0.1:{}", extra[0].port),
    ];
    let ring = Ring::new(&addrs);
    let www = tempfile::tempdir().expect("www");
    let nginx = Nginx::start(www.path());
    // Files named so that each scheduler owns two of the tasks.
    let (mut names, mut owned) = (Vec::new(), [0; 2]);
    for k in 0..1000 {
        let name = format!("f{k}");
        let owner = ring.owner(&url_task(&nginx.url(&name))).expect("an owner");
        let i = usize::from(owner == addrs[1]);
        if owned[i] < 2 {
            owned[i] += 1;
            names.push(name);
        }
        if owned == [2, 2] {
            break;
        }
    }
    assert_eq!(owned, [2, 2]);
    let mut total = 0;
    for (k, name) in names.iter().enumerate() {
        let data = random_bytes(4 * MIB, 100 + k as u64);
        total += data.len();
        std::fs::write(www.path().join(name), &data).expect("write");
        let sum = sha256_bytes(&data);
        let url = nginx.url(name);
        std::thread::scope(|s| {
            for i in [1, 2] {
                let node = &cluster.nodes[i];
                let url = &url;
                s.spawn(move || node.scratch.get(url, name, &[]).ok());
            }
        });
        for i in [1, 2] {
            assert_eq!(sha256_file(&cluster.nodes[i].scratch.out(name)), sum);
        }
    }
    assert!(nginx.bytes_sent() as f64 <= 1.05 * total as f64);
    // Each scheduler placed the tasks it owns (and only those).
    let logs = [
        cluster
            .scheduler
            .as_ref()
            .map(|s| s.log.clone())
            .expect("scheduler"),
        extra[0].log.clone(),
    ];
    for (i, log) in logs.iter().enumerate() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let placed = text.matches("no live peer holds some of this task").count();
        assert_eq!(placed, 2, "scheduler {i}:\n{text}");
    }
}

/// One member of the cluster (its certificate is valid) names false chain values from piece
/// `from` on and serves bytes that match them. `last`: it also names a false last value (which
/// the content digest contradicts at once); without, only bytes from an honest parent can
/// prove it lied. The honest seed joins once the child holds forged pieces.
fn forged_chain_case(last: bool) {
    use starling::core::{Digest, PiecePlan, TaskId};
    let s = setup(1, 16, "source_fallback = false", "");
    let data = random_bytes(16 * MIB, 7);
    let digest = Digest::of(&data);
    let plan = PiecePlan::with_default(data.len() as u64);
    let (n, from) = (plan.count(), plan.count() / 2);
    let rogue = Rogue::start(
        &s.cluster.ca,
        s.cluster.scheduler_port,
        TaskId::for_content(digest),
        data.clone(),
        Lie::Forged { from, last },
    );
    wait_until(Duration::from_secs(10), "the rogue to announce", || {
        rogue.announced.load(Ordering::Relaxed) >= 1
    });
    let file = s.cluster.nodes[0].scratch.path().join("truth");
    std::fs::write(&file, &data).expect("write");
    let import = || {
        Run::of(
            s.cluster.nodes[0]
                .scratch
                .starling()
                .arg("import")
                .arg(&file),
        )
        .ok();
    };
    if last {
        import();
    }
    let child = &s.cluster.nodes[1];
    let d = digest.to_string();
    let started = std::time::Instant::now();
    std::thread::scope(|sc| {
        let get = sc.spawn(|| child.scratch.get(&s.url, "out", &["--digest", &d]));
        if !last {
            wait_until(Duration::from_secs(30), "forged pieces to arrive", || {
                rogue.pieces_asked.load(Ordering::Relaxed) >= u64::from(n - from - 1)
            });
            import();
        }
        get.join().expect("get thread").ok();
    });
    let took = started.elapsed();
    // The right content, in bounded time, and the rogue identified and banned.
    assert_eq!(s.out_sum(1, "out"), s.sum);
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let false_values = "starling_piece_failures_total{cause=\"false_values\"}";
    assert!(child.metric(false_values) >= 1.0, "{}", child.metrics());
    assert!(child.metric("starling_parents_blacklisted_total") >= 1.0);
    assert!(
        child.log().contains("named false chain values"),
        "{}",
        child.log()
    );
    let uploaded = s.cluster.nodes[0].metric("starling_bytes_uploaded_total") as u64;
    if last {
        // Caught at its first answer, before a piece was asked of it.
        assert_eq!(rogue.pieces_asked.load(Ordering::Relaxed), 0);
    } else {
        // Only the forged pieces (and the last) came again, not the whole task.
        let forged = (n - from) as u64 * plan.piece_length();
        assert!(
            uploaded <= forged + plan.piece_length(),
            "the seed sent {uploaded} bytes; the forged pieces are {forged}"
        );
        assert!(
            uploaded >= forged - plan.piece_length(),
            "{uploaded} < {forged}"
        );
    }
    // Nothing came from the origin.
    assert_eq!(s.nginx.bytes_sent(), 0);
}

#[test]
fn a_member_naming_false_values_is_proved_wrong_by_an_honest_parents_bytes() {
    let _cpus = sharing_the_cpus();
    forged_chain_case(false);
}

#[test]
fn a_member_contradicting_the_content_digest_is_banned_at_its_first_answer() {
    let _cpus = sharing_the_cpus();
    forged_chain_case(true);
}

/// Members that claim every piece and serve none, or stall mid-piece, cost time, not the
/// download: it completes from the honest seed within a bound, and both are shed.
#[test]
fn phantom_and_stalling_members_are_shed_and_the_download_completes() {
    let _cpus = sharing_the_cpus();
    let s = setup(1, 16, "", "");
    s.cluster.nodes[0].scratch.get(&s.url, "seed-out", &[]).ok();
    let data = std::fs::read(s.cluster.nodes[0].scratch.out("seed-out")).expect("read");
    let rogues: Vec<Rogue> = [Lie::Phantom, Lie::Stall]
        .into_iter()
        .map(|lie| {
            Rogue::start(
                &s.cluster.ca,
                s.cluster.scheduler_port,
                url_task(&s.url),
                data.clone(),
                lie,
            )
        })
        .collect();
    wait_until(Duration::from_secs(10), "the rogues to announce", || {
        rogues
            .iter()
            .all(|r| r.announced.load(Ordering::Relaxed) >= 1)
    });
    let started = std::time::Instant::now();
    s.get_all(&[1]);
    let took = started.elapsed();
    assert_eq!(s.out_sum(1, "out"), s.sum);
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let n1 = &s.cluster.nodes[1];
    let asked: Vec<u64> = rogues
        .iter()
        .map(|r| r.pieces_asked.load(Ordering::Relaxed))
        .collect();
    eprintln!("rogues asked {asked:?} pieces; took {took:?}");
    // The origin served the file once (to the seed), whatever the rogues did.
    assert!(s.nginx.bytes_sent() as f64 <= 1.05 * s.len as f64);
    assert!(n1.pid().is_some());
}

/// A member that claims every piece and answers every request Busy (as a seed spreading its
/// uploads does for a moment) is banned after `BUSY_LIMIT` (20 s); the scheduler then has the
/// download fetch what only it held from the origin. Before, the download asked again forever
/// (Busy was no failure, so no stall deadline ran), at two thirds of a core.
#[test]
fn a_member_answering_only_busy_is_banned_and_the_download_goes_to_the_origin() {
    let _cpus = sharing_the_cpus();
    let s = setup(1, 16, "", "");
    let rogue = Rogue::start(
        &s.cluster.ca,
        s.cluster.scheduler_port,
        url_task(&s.url),
        random_bytes(16 * MIB, 7),
        Lie::Busy,
    );
    wait_until(Duration::from_secs(10), "the rogue to announce", || {
        rogue.announced.load(Ordering::Relaxed) >= 1
    });
    let n1 = &s.cluster.nodes[1];
    let pid = n1.pid().expect("node 1 runs");
    let cpu0 = cpu_seconds(pid);
    let started = std::time::Instant::now();
    s.get_all(&[1]);
    let took = started.elapsed();
    let cpu = cpu_seconds(pid) - cpu0;
    eprintln!(
        "took {took:?}, {cpu:.1} CPU-s; the rogue was asked {} pieces",
        rogue.pieces_asked.load(Ordering::Relaxed)
    );
    assert_eq!(s.out_sum(1, "out"), s.sum);
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(n1.log().contains("answered only Busy"), "{}", n1.log());
    assert!(n1.metric("starling_parents_blacklisted_total") >= 1.0);
    // The origin sent the file once, to node 1.
    assert!(s.nginx.bytes_sent() as f64 <= 1.05 * s.len as f64);
}

/// Resident memory of a process, in bytes (VmRSS).
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A member floods the seed with requests (pieces, logs, manifests, garbage frames) over 8
/// connections (8 identities) of 64 streams each, while an honest peer downloads from it: the download
/// completes, and the seed's memory stays bounded and returns close to where it was.
#[test]
fn a_request_flood_from_a_member_leaves_the_seed_serving_in_bounded_memory() {
    let _cpus = sharing_the_cpus();
    use starling::transport::wire::REQUEST_LEN;
    use starling::transport::Node;
    let s = setup(1, 16, "", "");
    s.cluster.nodes[0].scratch.get(&s.url, "seed-out", &[]).ok();
    let seed = &s.cluster.nodes[0];
    let pid = seed.pid().expect("seed pid");
    let task = url_task(&s.url);
    let before = rss(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let id = member(&s.cluster.ca);
    let addr = seed.quic_addr();
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut conns = Vec::new();
                for _ in 0..8 {
                    let node = Node::bind(loopback(), &id).expect("bind");
                    if let Ok(p) = node.connect(addr).await {
                        conns.push((node, p));
                    }
                }
                let mut all = tokio::task::JoinSet::new();
                for (_, p) in &conns {
                    for k in 0..64u32 {
                        let (p, stop, sent) = (p.clone(), stop.clone(), sent.clone());
                        all.spawn(async move {
                            let mut i = k;
                            while !stop.load(Ordering::Relaxed) {
                                i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                                let ask = async {
                                    match i % 4 {
                                        0 => p.piece(task, i % 64, 0).await.map(|_| ()),
                                        1 => p.have(task, 0, 0).await.map(|_| ()),
                                        2 => p.manifest(task).await.map(|_| ()),
                                        _ => p.raw_exchange(&[0xAB; REQUEST_LEN]).await.map(|_| ()),
                                    }
                                };
                                let _ = tokio::time::timeout(Duration::from_secs(5), ask).await;
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                }
                while all.join_next().await.is_some() {}
                drop(conns);
            });
        })
    };
    wait_until(Duration::from_secs(20), "the flood to start", || {
        sent.load(Ordering::Relaxed) >= 1000
    });
    let mut peak = 0;
    let started = std::time::Instant::now();
    std::thread::scope(|sc| {
        let get = sc.spawn(|| s.get(1, "out"));
        while !get.is_finished() {
            peak = peak.max(rss(pid));
            std::thread::sleep(Duration::from_millis(100));
        }
        get.join().expect("get thread").ok();
    });
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    flood.join().expect("flood thread");
    assert_eq!(s.out_sum(1, "out"), s.sum);
    let requests = sent.load(Ordering::Relaxed);
    // The flood's connections close and their buffers go.
    poll_until(Duration::from_secs(10), || rss(pid) < before + (64 << 20));
    let after = rss(pid);
    eprintln!(
        "flood: {requests} requests; download {took:?}; seed RSS {} MiB before, {} MiB peak, {} MiB after",
        before >> 20,
        peak >> 20,
        after >> 20
    );
    assert!(
        took < Duration::from_secs(60),
        "took {took:?} under the flood"
    );
    assert!(
        peak < before + (256 << 20),
        "seed RSS grew from {before} to {peak} under the flood"
    );
    assert!(
        after < before + (64 << 20),
        "seed RSS stayed at {after} after the flood (from {before})"
    );
    assert!(seed.pid().is_some(), "the seed is still running");
}

/// Open descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// 10,000 short-lived API clients and 1,000 QUIC handshakes from clients of another CA: the
/// daemon answers every client, refuses (and counts) every handshake, keeps serving, and its
/// descriptors and memory return to where they were.
#[test]
fn ten_thousand_api_clients_and_a_thousand_foreign_handshakes_leave_nothing_behind() {
    let _cpus = sharing_the_cpus();
    use starling::transport::{tls::ClusterCa, Node};
    use std::io::{BufRead, Write};
    let s = setup(1, 4, "", "");
    s.get_all(&[1]);
    let node = &s.cluster.nodes[1];
    let pid = node.pid().expect("pid");
    let socket = node.scratch.data_dir().join("starling.sock");
    let ask = || {
        let mut c = std::os::unix::net::UnixStream::connect(&socket).expect("connect the API");
        c.write_all(b"\"tasks\"\n").expect("send");
        let mut line = String::new();
        std::io::BufReader::new(c)
            .read_line(&mut line)
            .expect("read");
        assert!(line.contains("tasks"), "{line}");
    };
    ask();
    // Its eBPF probes (maps, programs, links: about 16 descriptors) load in the background
    // after it serves; counted before they load, they looked like a leak under load.
    node.scratch.probe_report();
    let (fds0, rss0) = (fd_count(pid), rss(pid));
    std::thread::scope(|sc| {
        for _ in 0..8 {
            sc.spawn(|| {
                for _ in 0..1250 {
                    ask();
                }
            });
        }
    });
    let addr = node.quic_addr();
    let ca = s.cluster.ca.clone();
    let refused = rt().block_on(async move {
        let mut id = ClusterCa::generate().unwrap().issue("intruder").unwrap();
        id.ca = member(&ca).ca;
        let mut tries = tokio::task::JoinSet::new();
        let mut refused = 0;
        for k in 0..1000 {
            let id = id.clone();
            tries.spawn(async move {
                let node = Node::bind(loopback(), &id).expect("bind");
                match node.connect(addr).await {
                    // The server's refusal may reach the client after its handshake ends.
                    Ok(p) => p.have(url_task("http://x/"), 0, u32::MAX).await.is_err(),
                    Err(_) => true,
                }
            });
            if k % 50 == 49 {
                while let Some(r) = tries.join_next().await {
                    refused += u32::from(r.unwrap_or(false));
                }
            }
        }
        while let Some(r) = tries.join_next().await {
            refused += u32::from(r.unwrap_or(false));
        }
        refused
    });
    assert_eq!(refused, 1000, "every foreign client was refused");
    let counted = node.metric("starling_handshakes_refused_total{reason=\"tls\"}");
    assert!(counted >= 1000.0, "{counted} refusals counted");
    // Still serving: the API and a download.
    ask();
    node.scratch.get(&s.url, "again", &["--no-hardlink"]).ok();
    assert_eq!(s.out_sum(1, "again"), s.sum);
    let settled = poll_until(Duration::from_secs(30), || fd_count(pid) <= fds0 + 8);
    assert!(
        settled,
        "descriptors: {} after, {fds0} before",
        fd_count(pid)
    );
    let rss1 = rss(pid);
    eprintln!("RSS {} MiB before, {} MiB after", rss0 >> 20, rss1 >> 20);
    assert!(
        rss1 < rss0 + (32 << 20),
        "RSS grew from {rss0} to {rss1} and stayed"
    );
}
