//! The operator's view of a node, through the real binary: `starling tasks`, `stat` and `rm`
//! against daemons in a live swarm (a scheduler, a seed, two peers, nginx as the origin).

use std::os::fd::AsRawFd;
use std::time::Duration;

use serde_json::Value;
use starling_tests::*;

const MIB: usize = 1 << 20;

fn json(run: Run) -> Value {
    serde_json::from_slice(&run.ok().stdout).expect("JSON output")
}

fn tasks(node: &Node) -> Vec<Value> {
    let mut c = node.scratch.starling();
    c.args(["tasks", "--json"]);
    json(Run::of(&mut c))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn starling(node: &Node, args: &[&str]) -> Run {
    let mut c = node.scratch.starling();
    c.args(args);
    Run::of(&mut c)
}

/// A seed and two peers uploading at 40 Mbit/s, and nginx serving a blob of `mib` MiB.
struct Swarm {
    data: Vec<u8>,
    sum: String,
    url: String,
    cluster: Cluster,
    _nginx: Nginx,
    _www: tempfile::TempDir,
}

impl Swarm {
    fn start(mib: usize, seed: u64) -> Swarm {
        let www = tempfile::tempdir().expect("www");
        let data = random_bytes(mib * MIB, seed);
        std::fs::write(www.path().join("blob"), &data).expect("write blob");
        let nginx = Nginx::start(www.path());
        let mut cluster = Cluster::new(2, "upload_limit_mbps = 40", "");
        cluster.start_all();
        Swarm {
            sum: sha256_bytes(&data),
            url: nginx.url("blob"),
            data,
            cluster,
            _nginx: nginx,
            _www: www,
        }
    }
}

#[test]
fn tasks_stat_and_rm_show_and_evict_what_a_node_holds() {
    // Uploads at 40 Mbit/s: node 2's download lasts a few seconds.
    let sw = Swarm::start(24, 11);
    let (data, sum, url, cluster) = (&sw.data, sw.sum.clone(), sw.url.clone(), &sw.cluster);
    let (n1, n2) = (&cluster.nodes[1], &cluster.nodes[2]);

    // Before anything is fetched: an empty list.
    assert!(tasks(n1).is_empty());
    n1.scratch.get(&url, "out", &["--digest", &sum]).ok();

    // The list: one complete task, every piece verified, served, and known to the scheduler
    // as held in full by the seed and node 1.
    let mut list = Vec::new();
    wait_until(
        Duration::from_secs(20),
        "the scheduler to count 2 holders",
        || {
            list = tasks(n1);
            list.len() == 1 && list[0]["holders"]["complete"].as_u64() == Some(2)
        },
    );
    let t = &list[0];
    assert_eq!(t["state"], "complete");
    assert_eq!(t["digest"], sum.as_str());
    assert_eq!(t["size"], data.len() as u64);
    assert_eq!(t["verified"], t["pieces"]);
    assert_eq!(t["serving"], true);
    assert_eq!(t["url"], url.as_str());
    let id = t["id"].as_str().expect("id").to_string();
    let table = String::from_utf8(starling(n1, &["tasks"]).ok().stdout).expect("utf-8");
    assert!(
        table.contains("complete") && table.contains(&sum),
        "{table}"
    );

    // Stat by a short prefix of the ID: the pieces, the parent it came from, the paths.
    let hex = id.trim_start_matches("sha256-");
    let d = json(starling(n1, &["stat", &hex[..8], "--json"]));
    let pieces = d["pieces"].as_u64().expect("pieces");
    assert_eq!(d["have"], format!("0-{}", pieces - 1));
    let parents = d["parents"].as_array().expect("parents");
    assert!(!parents.is_empty(), "node 1 downloaded from the seed: {d}");
    let from_parents: u64 = parents
        .iter()
        .map(|p| p["pieces"].as_u64().unwrap_or(0))
        .sum();
    assert!(from_parents > 0 && from_parents <= pieces, "{d}");
    let content = d["content"].as_str().expect("content path");
    assert_eq!(sha256_file(std::path::Path::new(content)), sum);
    // Also by digest and by URL; a prefix that matches nothing is a usage error naming it.
    json(starling(n1, &["stat", &sum, "--json"]));
    json(starling(n1, &["stat", &url, "--json"]));
    let r = starling(n1, &["stat", "ffff0000"]).fails_with(2);
    assert!(
        r.stderr.contains("ffff0000") && r.stderr.contains("starling tasks"),
        "{}",
        r.stderr
    );

    // While node 2 downloads from node 1: node 2 lists it as downloading, its stat shows the
    // live parents, and rm is refused on node 2 (it downloads) and on node 1 (it uploads).
    std::thread::scope(|s| {
        let getter = s.spawn(|| n2.scratch.get(&url, "out", &["--digest", &sum]));
        let mut live = Value::Null;
        let seen = poll_until(Duration::from_secs(30), || {
            let r = starling(n2, &["stat", &sum, "--json"]);
            if r.code != 0 {
                return false;
            }
            live = serde_json::from_slice(&r.stdout).unwrap_or(Value::Null);
            live["from_peers_now"] == true
                && live["parents"].as_array().is_some_and(|p| !p.is_empty())
        });
        if seen {
            assert_eq!(live["state"], "downloading", "{live}");
            let r = starling(n2, &["rm", &sum]).fails_with(6);
            assert!(r.stderr.contains("in use"), "{}", r.stderr);
        }
        let r = getter.join().expect("get thread").ok();
        assert!(
            seen,
            "node 2's stat never showed a live download; get: {}",
            r.stderr
        );
    });
    assert_eq!(sha256_file(&n2.scratch.out("out")), sum);

    // A client holding the task (a shared lease, as a reader copying it out does): rm is
    // refused, nothing is lost, and node 1 serves it again.
    let task_dir = n1.scratch.data_dir().join("tasks").join(&id);
    let lock = std::fs::File::open(task_dir.join("lock")).expect("lock file");
    // SAFETY: flock on a file descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH) }, 0);
    let r = starling(n1, &["rm", &id]).fails_with(6);
    assert!(
        r.stderr.contains("in use") && r.stderr.contains("not removed"),
        "{}",
        r.stderr
    );
    assert_eq!(sha256_file(&task_dir.join("content")), sum);
    // (The re-serve re-verifies under an exclusive lease: it waits for the reader.)
    drop(lock);
    wait_until(
        Duration::from_secs(20),
        "node 1 to serve the task again",
        || tasks(n1).first().is_some_and(|t| t["serving"] == true),
    );

    // Idle: rm removes it, the store no longer has it, and the scheduler hears it is gone.
    let out = String::from_utf8(starling(n1, &["rm", &id]).ok().stdout).expect("utf-8");
    assert!(out.contains("removed") && out.contains("MiB"), "{out}");
    assert!(!task_dir.exists());
    assert!(tasks(n1).is_empty());
    wait_until(
        Duration::from_secs(20),
        "the scheduler to forget node 1's copy",
        || {
            tasks(n2)
                .first()
                .is_some_and(|t| t["holders"]["complete"].as_u64() == Some(2))
        },
    );
    starling(n1, &["rm", &id]).fails_with(2);
    // node 2's copy is untouched.
    assert_eq!(
        sha256_file(
            &n2.scratch
                .data_dir()
                .join("tasks")
                .join(&id)
                .join("content")
        ),
        sum
    );
}

#[test]
fn the_operator_commands_need_a_daemon_and_say_so() {
    let s = Scratch::new();
    s.write_config("");
    for args in [&["tasks"][..], &["stat", "abcd"], &["rm", "abcd"]] {
        let mut c = s.starling();
        c.args(args);
        let r = Run::of(&mut c).fails_with(7);
        assert!(r.stderr.contains("starling daemon"), "{}", r.stderr);
    }
}

/// Headless Chromium from apt (`chromium-headless-shell`, or the full `chromium`).
fn chromium() -> std::path::PathBuf {
    for name in ["chromium-headless-shell", "chromium"] {
        if let Ok(out) = std::process::Command::new("which").arg(name).output() {
            if out.status.success() {
                return std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            }
        }
    }
    panic!("no headless Chromium: run `cargo xtask setup` (apt: chromium-headless-shell)");
}

fn browse(url: &str, what: &[&str]) -> Run {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut c = std::process::Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,1100",
        // Virtual time runs the page's one-second polls without waiting for them.
        "--virtual-time-budget=6000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(what)
    .arg(url);
    Run::of(&mut c)
}

/// Pixels of `png` within a small distance of the colour `rgb`.
fn pixels_of(png_path: &std::path::Path, rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).expect("screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG frame");
    let step = info.color_type.samples();
    buf[..info.buffer_size()]
        .chunks(step)
        .filter(|p| (0..3).all(|i| (p[i] as i32 - rgb[i] as i32).abs() <= 12))
        .count()
}

#[test]
fn the_status_page_draws_a_live_swarm_in_a_real_browser() {
    // Uploads at 40 Mbit/s: node 2's download lasts about 5 s, long enough to look at it.
    let sw = Swarm::start(48, 12);
    let (sum, url, cluster) = (sw.sum.clone(), sw.url.clone(), &sw.cluster);
    let (n1, n2) = (&cluster.nodes[1], &cluster.nodes[2]);
    n1.scratch.get(&url, "out", &["--digest", &sum]).ok();
    let page = format!("http://{}:{}/", n2.metrics_host, n2.metrics_port);
    let shot_dir = root().join("target").join("test-output");
    std::fs::create_dir_all(&shot_dir).expect("test-output dir");
    let shot = shot_dir.join("status-page.png");
    let _ = std::fs::remove_file(&shot);

    std::thread::scope(|s| {
        let getter = s.spawn(|| n2.scratch.get(&url, "out", &["--digest", &sum]));
        wait_until(
            Duration::from_secs(30),
            "node 2 to receive from peers",
            || n2.metric("starling_bytes_downloaded_total{source=\"parent\"}") >= 12.0 * MIB as f64,
        );
        // The DOM after the page's script has drawn a few updates: this node, the task being
        // downloaded, and its parents' paths.
        let dom = String::from_utf8(browse(&page, &["--dump-dom"]).ok().stdout).expect("utf-8");
        let updates: u32 = dom
            .split("data-updates=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            updates >= 2,
            "the page's script did not render twice: {dom}"
        );
        assert!(dom.contains(&sum), "the task's digest is not on the page");
        assert!(
            dom.contains("downloading") || dom.contains("complete"),
            "{dom}"
        );
        let n1_addr = n1.quic_addr().to_string();
        assert!(
            dom.contains(&n1_addr),
            "parent {n1_addr} is not among the paths: {dom}"
        );
        browse(&page, &[&format!("--screenshot={}", shot.display())]).ok();
        getter.join().expect("get thread").ok();
    });
    assert_eq!(sha256_file(&n2.scratch.out("out")), sum);
    // The pictures were drawn: bytes from peers in the throughput chart (blue), verified
    // pieces in the task's piece map (green).
    assert!(
        pixels_of(&shot, [0x4e, 0xa1, 0xff]) > 3000,
        "no throughput area in {}",
        shot.display()
    );
    assert!(
        pixels_of(&shot, [0x3f, 0xcf, 0x8e]) > 200,
        "no piece map in {}",
        shot.display()
    );
    eprintln!("status page screenshot: {}", shot.display());
}
