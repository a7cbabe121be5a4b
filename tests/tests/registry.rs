//! The registry mirror and proxy end to end, with real parts from Debian: the distribution
//! registry (TLS from a test CA, in the test's own network namespace), an image written by the
//! test and pushed with skopeo, and three clients pulling through Starling: skopeo (mirror),
//! containerd's `ctr images pull --hosts-dir` (mirror, `ns=`), and dockerd (HTTPS proxy with
//! TLS interception). A seed and two nodes run on loopback; the registry must see each blob
//! fetched at most once.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use starling_tests::registry::*;
use starling_tests::*;

const MIB: usize = 1 << 20;

struct Fixture {
    cluster: Cluster,
    registry: Registry,
    image: OciImage,
    reg_ca: TestCa,
    mitm_ca: TestCa,
    /// Each node's proxy port.
    ports: Vec<u16>,
    dir: tempfile::TempDir,
    _lab: Lab,
}

const REPO: &str = "test/app";

fn fixture(tag: &str, subnet: u8, layers: &[usize], nodes: usize) -> Option<Fixture> {
    if !is_root() {
        eprintln!("skipped: needs root (network namespace for the registry)");
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("starling-reg-")
        .tempdir()
        .expect("temp dir");
    let lab = Lab::new(tag, subnet, 1, 0).expect("lab");
    let reg_ip = lab.hosts[0].addr.clone();
    let reg_ca = TestCa::new(dir.path(), "registry", &[&reg_ip]);
    let mitm_ca = TestCa::new(dir.path(), "mitm", &["unused.test"]);
    let registry = Registry::start_in(&lab, 0, dir.path(), &reg_ca);
    let image = OciImage::build(dir.path(), layers, 42);
    image.push(&registry, &reg_ca, REPO);
    let ports: Vec<u16> = (0..=nodes).map(|_| free_port()).collect();
    let reg = registry.addr.clone();
    let cluster_cfg = |i: usize| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{}\"\ndefault_upstream = \"https://{reg}\"\n\
             intercept = [\"^{}$\"]\nmitm_ca_cert = {:?}\nmitm_ca_key = {:?}\n\
             [source]\nca_certs = [{:?}]\nbackoff_ms = 20\nattempts = 6\nidle_timeout_seconds = 5\n",
            ports[i],
            reg.replace('.', "\\\\."),
            mitm_ca.ca_cert,
            mitm_ca.ca_key,
            reg_ca.ca_cert,
        )
    };
    let mut cluster = Cluster::new_each(nodes, "", &cluster_cfg);
    cluster.start_all();
    Some(Fixture {
        cluster,
        registry,
        image,
        reg_ca,
        mitm_ca,
        ports,
        dir,
        _lab: lab,
    })
}

impl Fixture {
    /// `skopeo copy` of the image through node `i`'s mirror into a fresh OCI layout.
    fn skopeo_pull(&self, i: usize, name: &str) -> std::path::PathBuf {
        let conf = self.dir.path().join(format!("registries-{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "[[registry]]\nlocation = \"{}\"\n[[registry.mirror]]\nlocation = \"127.0.0.1:{}\"\ninsecure = true\n",
                self.registry.addr, self.ports[i]
            ),
        )
        .expect("registries.conf");
        let out = self.dir.path().join(name);
        run(skopeo()
            .arg("--registries-conf")
            .arg(&conf)
            .arg("copy")
            .arg("--src-cert-dir")
            .arg(&self.reg_ca.cert_dir)
            .arg(format!("docker://{}/{REPO}:v1", self.registry.addr))
            .arg(format!("oci:{}:v1", out.display())));
        out
    }

    /// Every blob of the image is in `layout`, with the right content.
    fn check_layout(&self, layout: &Path) {
        for (digest, size) in &self.image.blobs {
            let p = OciImage::blob_path(layout, digest);
            assert_eq!(&sha256_file(&p), digest, "{}", p.display());
            assert_eq!(std::fs::metadata(&p).expect("blob").len(), *size);
        }
    }

    /// The registry sent each blob at most once (its bytes, over however many ranged GETs; the
    /// one-byte probe aside).
    fn check_registry_once(&self) {
        for (digest, size) in &self.image.blobs {
            let sent = self.registry.blob_bytes_sent(digest);
            assert!(
                sent <= size + 1,
                "the registry sent {sent} bytes of blob {digest} ({size} bytes)"
            );
        }
    }

    fn node_log(&self, i: usize) -> String {
        self.cluster.nodes[i].log()
    }
}

#[test]
fn skopeo_containerd_and_docker_pull_through_two_nodes_and_the_registry_sends_each_blob_once() {
    let Some(f) = fixture("r", 210, &[MIB, 24 * MIB, 64 * MIB, 3 * MIB + 17], 2) else {
        return;
    };
    // Node A (1): skopeo through the mirror.
    let a = f.skopeo_pull(1, "pull-a");
    f.check_layout(&a);
    let p2p_a = f.cluster.nodes[1].metric("starling_proxy_requests_total{route=\"p2p\"}");
    assert!(
        p2p_a >= f.image.blobs.len() as f64,
        "every blob, the small config included, went peer to peer through node A ({p2p_a}); log:\n{}",
        f.node_log(1)
    );
    f.check_registry_once();

    // Node B (2): containerd, mirror named in hosts.toml (ns= names the registry).
    let ctd = Containerd::start(f.dir.path());
    // Its hosts.toml comes from `starling init containerd --write`.
    let hosts_dir = f.dir.path().join("hosts");
    let image = format!("{}/{REPO}:v1", f.registry.addr);
    containerd_pull(
        &ctd,
        &f.cluster.nodes[2].scratch,
        &f.registry.addr,
        &hosts_dir,
        &image,
    );
    let hosts = std::fs::read_to_string(hosts_dir.join(&f.registry.addr).join("hosts.toml"))
        .expect("hosts.toml written");
    assert!(
        hosts.contains(&format!("127.0.0.1:{}", f.ports[2])),
        "{hosts}"
    );
    let listed = run(ctd.ctr().args(["images", "ls", "-q"]));
    assert!(
        listed.contains(&format!("{}/{REPO}:v1", f.registry.addr)),
        "{listed}"
    );
    let from_peers =
        f.cluster.nodes[2].metric("starling_bytes_downloaded_total{source=\"parent\"}");
    assert!(
        from_peers > (64 * MIB) as f64,
        "node B took the image from peers ({from_peers} bytes)"
    );
    f.check_registry_once();

    // Node A again, as dockerd's HTTPS proxy with TLS interception: dockerd trusts only the
    // interception CA for this registry, so a pull that bypassed the proxy would fail.
    let _trust = DockerTrust::install(&f.registry.addr, &f.mitm_ca.ca_cert);
    // dockerd's daemon.json from `starling init docker --write` (dockerd refuses a bad one).
    std::fs::create_dir_all(f.dir.path().join("dkr")).expect("docker dir");
    std::fs::write(Dockerd::config_path(f.dir.path()), "{\"debug\": false}").expect("daemon.json");
    run(f.cluster.nodes[1]
        .scratch
        .starling()
        .args(["init", "docker", "--write", "--daemon-json"])
        .arg(Dockerd::config_path(f.dir.path())));
    let dockerd = Dockerd::start(
        f.dir.path(),
        &ctd,
        &format!("http://127.0.0.1:{}", f.ports[1]),
    );
    let out = dockerd
        .docker()
        .arg("pull")
        .arg(format!("{}/{REPO}:v1", f.registry.addr))
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker pull failed:\n{}\n{}\ndockerd log:\n{}\nnode A log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&dockerd.log).unwrap_or_default(),
        f.node_log(1)
    );
    let intercepted =
        f.cluster.nodes[1].metric("starling_proxy_requests_total{route=\"intercept\"}");
    assert!(intercepted >= 1.0, "dockerd's CONNECT was intercepted");
    run(dockerd
        .docker()
        .args(["image", "inspect"])
        .arg(format!("{}/{REPO}:v1", f.registry.addr)));
    f.check_registry_once();
    for i in 1..=2 {
        assert_eq!(
            f.cluster.nodes[i].metric("starling_proxy_aborts_total{cause=\"digest_mismatch\"}"),
            0.0
        );
    }
}

#[test]
fn a_corrupt_stored_blob_on_one_node_never_reaches_a_client_through_the_other() {
    let Some(f) = fixture("c", 211, &[2 * MIB, 40 * MIB], 2) else {
        return;
    };
    let a = f.skopeo_pull(1, "pull-a");
    f.check_layout(&a);
    // Flip bytes all through node A's copy of the big layer (what a bad disk does).
    let (big, size) = f.image.blobs[2].clone();
    let task = f.cluster.nodes[1]
        .scratch
        .tasks()
        .into_iter()
        .find(|t| {
            t.to_string_lossy()
                .ends_with(big.trim_start_matches("sha256:"))
        })
        .expect("node A stored the big layer");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(task.join("content"))
            .expect("open the stored content as root");
        // In every piece.
        let piece = starling::core::default_piece_length(size);
        let mut off = 1000;
        while off < size {
            file.write_all_at(b"\x00\xff\x00", off).expect("corrupt");
            off += piece;
        }
    }
    // Node B pulls; its parents include node A. Every client-visible byte must be right.
    let b = f.skopeo_pull(2, "pull-b");
    f.check_layout(&b);
    let bad = f.cluster.nodes[2].metric("starling_piece_failures_total{cause=\"digest_mismatch\"}");
    let blacklisted = f.cluster.nodes[2].metric("starling_parents_blacklisted_total");
    eprintln!("node B: {bad} corrupt pieces seen, {blacklisted} parents blacklisted");
    f.check_registry_once();
    // Node A itself re-verifies its stored copy on use, finds it damaged and fetches it again:
    // from node B, which holds a verified copy, not from the registry.
    let a2 = f.skopeo_pull(1, "pull-a2");
    f.check_layout(&a2);
    assert!(
        f.node_log(1).contains("damaged"),
        "node A noticed its damaged copy:\n{}",
        f.node_log(1)
    );
    f.check_registry_once();
}

/// Sends raw bytes to the proxy and returns the status line and the whole answer.
fn raw(port: u16, request: &[u8]) -> (u16, String) {
    raw_in(port, request, request.len().max(1))
}

/// As `raw`, sending the request in writes of `chunk` bytes, 5 ms apart, so each arrives as
/// its own read.
fn raw_in(port: u16, request: &[u8], chunk: usize) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect proxy");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    for part in request.chunks(chunk) {
        // The proxy may answer 431 and close before the rest is sent.
        if s.write_all(part).is_err() {
            break;
        }
        if chunk < request.len() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    // Read the head (and whatever body follows) until the proxy closes or goes quiet.
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") && !request.starts_with(b"CONNECT") {
            let text = String::from_utf8_lossy(&buf);
            let want = text.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            let head = text.find("\r\n\r\n").unwrap_or(0) + 4;
            if want.is_some_and(|w| buf.len() >= head + w) {
                break;
            }
        }
        if request.starts_with(b"CONNECT") && buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

fn curl(proxy_port: u16, url: &str, extra: &[&str]) -> std::process::Output {
    std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--noproxy",
            "",
            "-x",
        ])
        .arg(format!("http://127.0.0.1:{proxy_port}"))
        .args(extra)
        .arg(url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("run curl")
}

#[test]
fn blob_auth_range_lying_origin_and_hostile_input() {
    let content = random_bytes(5 * MIB + 123, 9);
    let digest = sha256_bytes(&content);
    let origin = FaultOrigin::start(content.clone());
    origin.set(|f| f.require_auth = Some("Bearer good".into()));
    let port = free_port();
    let mut cluster = Cluster::new_each(0, "", &|_| {
        format!("[proxy]\nlisten = \"127.0.0.1:{port}\"\n")
    });
    cluster.start_all();
    let url = origin.url(&format!("v2/test/app/blobs/{digest}"));

    // The registry's challenge reaches the client unchanged (forwarded, not swallowed).
    let out = curl(port, &url, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("401"),
        "{text}\n{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.nodes[0].log()
    );

    // With the client's token: the blob, peer to peer, whole and right.
    let out = curl(port, &url, &["-H", "Authorization: Bearer good"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = &out.stdout[..out.stdout.len() - 4];
    assert_eq!(&out.stdout[out.stdout.len() - 3..], b"200");
    assert_eq!(sha256_bytes(body), digest);

    // Range: 206 with Content-Range, or 416.
    let out = curl(
        port,
        &url,
        &[
            "-H",
            "Authorization: Bearer good",
            "-H",
            "Range: bytes=1000-1999",
            "-D",
            "-",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("HTTP/1.1 206"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains(&format!("content-range: bytes 1000-1999/{}", content.len())),
        "{text}"
    );
    let body_at = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head")
        + 4;
    assert_eq!(&out.stdout[body_at..body_at + 1000], &content[1000..2000]);
    let out = curl(
        port,
        &url,
        &[
            "-H",
            "Authorization: Bearer good",
            "-H",
            &format!("Range: bytes={}-", content.len()),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("416"));

    // An origin that lies: the path names one digest, the origin sends other bytes. The client
    // must never get a complete body: the response is cut before its last byte.
    let other = sha256_bytes(b"something else");
    let lie = origin.url(&format!("v2/test/app/blobs/{other}"));
    let out = curl(port, &lie, &["-H", "Authorization: Bearer good"]);
    assert!(
        !out.status.success(),
        "curl must see a broken transfer, got {}",
        String::from_utf8_lossy(&out.stdout[out.stdout.len().saturating_sub(4)..])
    );
    assert!(
        out.stdout.len() < content.len(),
        "never a complete wrong body"
    );

    // Hostile input: 4xx from the proxy, and it keeps serving.
    let up = format!("X-Starling-Upstream: http://127.0.0.1:{}\r\n", origin.port);
    let cases: Vec<(String, u16)> = vec![
        (
            format!("GET /v2/test/app/blobs/sha256:zz HTTP/1.1\r\nHost: x\r\n{up}\r\n"),
            400,
        ),
        (
            format!("GET /v2/../../etc/passwd/blobs/{digest} HTTP/1.1\r\nHost: x\r\n{up}\r\n"),
            400,
        ),
        (
            format!("GET /v2/a/%2e%2e/b/manifests/x HTTP/1.1\r\nHost: x\r\n{up}\r\n"),
            400,
        ),
        (
            format!("GET /v2/a/blobs/{digest}?ns=evil.com/x HTTP/1.1\r\nHost: x\r\n\r\n"),
            400,
        ),
        (
            format!(
                "GET /v2/a/manifests/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(200 * 1024)
            ),
            431,
        ),
        (
            "CONNECT nohost HTTP/1.1\r\nHost: nohost\r\n\r\n".to_string(),
            400,
        ),
        (
            "CONNECT evil.com/x:443 HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            400,
        ),
    ];
    // proxy.max_header_bytes is exact (65536 here), whether the head arrives in one write or
    // in 8 KiB writes: over it is 431, under it is served.
    let sized = |total: usize| {
        let start = "GET /v2/a/manifests/x HTTP/1.1\r\nHost: x\r\nX-Pad: ";
        let end = "\r\n\r\n";
        format!(
            "{start}{}{end}",
            "a".repeat(total - start.len() - end.len())
        )
    };
    for (total, over) in [
        (65536, false),
        (65537, true),
        (66_000, true),
        (90_000, true),
    ] {
        let req = sized(total);
        assert_eq!(req.len(), total);
        for chunk in [total, 8192] {
            let (code, text) = raw_in(port, req.as_bytes(), chunk);
            assert_eq!(
                code == 431,
                over,
                "a {total}-byte head in {chunk}-byte writes got {code}:\n{}",
                &text[..text.len().min(300)]
            );
            assert_ne!(code, 0, "the proxy answered a {total}-byte head");
        }
    }
    for (req, want) in &cases {
        let (code, text) = raw(port, req.as_bytes());
        assert_eq!(
            code,
            *want,
            "request {:?} got:\n{text}",
            &req[..req.len().min(80)]
        );
    }
    // A CONNECT to a host that is not intercepted is tunnelled untouched: the origin itself
    // answers through it.
    {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(
            s,
            "CONNECT 127.0.0.1:{0} HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\n\r\n",
            origin.port
        )
        .expect("send");
        let mut head = [0u8; 19];
        s.read_exact(&mut head).expect("CONNECT answer");
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut rest = Vec::new();
        let mut b = [0u8; 1];
        while !rest.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).expect("head");
            rest.push(b[0]);
        }
        write!(s, "GET /tunnelled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n").expect("send");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 206"),
            "the origin answered through the tunnel:\n{answer}"
        );
    }
    assert!(cluster.nodes[0].metric("starling_proxy_requests_total{route=\"rejected\"}") >= 4.0);
    assert!(cluster.nodes[0].metric("starling_proxy_requests_total{route=\"tunnel\"}") >= 1.0);
    // Still serving after all that.
    let out = curl(port, &url, &["-H", "Authorization: Bearer good"]);
    assert!(out.status.success());
    assert_eq!(sha256_bytes(&out.stdout[..out.stdout.len() - 4]), digest);
    assert!(
        cluster.nodes[0].metric("starling_proxy_aborts_total{cause=\"digest_mismatch\"}") >= 1.0
            || cluster.nodes[0].log().contains("digest mismatch")
    );
}
