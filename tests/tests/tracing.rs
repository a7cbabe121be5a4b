//! OTLP tracing through the real binary: a scheduler, a seed and two peers, each daemon
//! exporting to a real OTLP receiver (`tests/otel/receiver.py`, which decodes the protobuf with
//! the protocol's own generated classes), the seed and one peer over OTLP/HTTP, the other peer
//! over gRPC. One swarm download, then its spans: per task, per parent, per back-to-source
//! request, with the attributes an operator needs and the parent links that make one trace.

use std::time::Duration;

use serde_json::Value;
use starling_tests::*;

const MIB: usize = 1 << 20;

struct Receiver {
    child: std::process::Child,
    http: u16,
    grpc: u16,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().expect("dir");
        let out = dir.path().join("spans.jsonl");
        let (child, ports) = start_ready(
            "tests/otel/receiver.py",
            &["--out".as_ref(), out.as_os_str()],
            "python3 with opentelemetry-proto and grpcio: cargo xtask setup",
        );
        assert_eq!(ports.len(), 2, "the receiver's ports: {ports:?}");
        Receiver {
            child,
            http: ports[0],
            grpc: ports[1],
            out,
            _dir: dir,
        }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        kill_pid(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

fn attr<'a>(s: &'a Value, k: &str) -> &'a Value {
    &s["attributes"][k]
}

fn num(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .or_else(|| v.as_i64().map(|i| i as u64))
        .unwrap_or(0)
}

#[test]
fn a_swarm_download_is_traced_per_task_parent_and_origin_request_over_http_and_grpc() {
    let rx = Receiver::start();
    let www = tempfile::tempdir().expect("www");
    let data = random_bytes(24 * MIB, 21);
    std::fs::write(www.path().join("blob"), &data).expect("blob");
    let sum = sha256_bytes(&data);
    let nginx = Nginx::start(www.path());
    let url = nginx.url("blob");
    let (http, grpc) = (rx.http, rx.grpc);
    let mut cluster = Cluster::new_each(2, "", &|i| {
        let (endpoint, protocol) = if i == 1 {
            (format!("http://127.0.0.1:{grpc}"), "grpc")
        } else {
            (format!("http://127.0.0.1:{http}"), "http")
        };
        format!(
            "[tracing]\notlp_endpoint = \"{endpoint}\"\nprotocol = \"{protocol}\"\nservice_name = \"starling-test\"\n"
        )
    });
    cluster.start_all();
    let seed = cluster.nodes[0].quic_addr().to_string();
    cluster.nodes[1]
        .scratch
        .get(&url, "out", &["--digest", &sum])
        .ok();
    cluster.nodes[2]
        .scratch
        .get(&url, "out", &["--digest", &sum])
        .ok();
    // Stopping the daemons flushes what their exporters hold.
    for n in &mut cluster.nodes {
        if let Some(d) = n.daemon.take() {
            assert!(d.stop(), "a daemon did not stop cleanly");
        }
    }
    let mut spans = Vec::new();
    let got = poll_until(Duration::from_secs(20), || {
        spans = rx.spans();
        spans.iter().filter(|s| s["name"] == "task").count() >= 3
    });
    assert!(got, "spans received: {spans:?}");
    let size = data.len() as u64;
    assert!(spans.iter().all(|s| s["service"] == "starling-test"));
    let tasks: Vec<&Value> = spans.iter().filter(|s| s["name"] == "task").collect();
    for t in &tasks {
        assert_eq!(attr(t, "id"), sum.as_str(), "{t}");
        assert_eq!(attr(t, "result"), "ok", "{t}");
        assert_eq!(num(attr(t, "bytes")), size, "{t}");
    }
    // Both protocols delivered spans.
    assert!(spans
        .iter()
        .any(|s| s["protocol"] == "grpc" && s["name"] == "task"));
    assert!(spans
        .iter()
        .any(|s| s["protocol"] == "http" && s["name"] == "task"));

    // The seed read the origin: its requests are `source` spans inside its task's trace.
    let sources: Vec<&Value> = spans.iter().filter(|s| s["name"] == "source").collect();
    assert!(!sources.is_empty(), "no source spans: {spans:?}");
    let source_bytes: u64 = sources.iter().map(|s| num(attr(s, "bytes"))).sum();
    assert!(
        source_bytes >= size,
        "{source_bytes} bytes from the origin in spans, of {size}"
    );
    for s in &sources {
        assert_eq!(attr(s, "url"), url.as_str());
        assert_eq!(attr(s, "result"), "ok");
        let owner = tasks
            .iter()
            .find(|t| t["span_id"] == s["parent_span_id"])
            .unwrap_or_else(|| panic!("source span without its task: {s}"));
        assert_eq!(owner["trace_id"], s["trace_id"]);
    }

    // Peer 1 (gRPC) downloaded from the seed: `parent` spans inside its task, whose bytes add
    // up to what the task took from peers.
    let t1 = tasks
        .iter()
        .find(|t| t["protocol"] == "grpc")
        .expect("peer 1's task span");
    let parents1: Vec<&Value> = spans
        .iter()
        .filter(|s| s["name"] == "parent" && s["parent_span_id"] == t1["span_id"])
        .collect();
    assert!(
        parents1.iter().any(|p| attr(p, "peer") == seed.as_str()),
        "peer 1's parents: {parents1:?}"
    );
    let from_parents: u64 = parents1.iter().map(|p| num(attr(p, "bytes"))).sum();
    assert_eq!(from_parents, num(attr(t1, "parent_bytes")), "{t1}");
    assert!(from_parents > 0);
    for p in &parents1 {
        assert_eq!(p["trace_id"], t1["trace_id"]);
        assert!(
            ["ok", "dropped"].contains(&attr(p, "result").as_str().unwrap_or("")),
            "{p}"
        );
        assert!(num(&p["end"]) >= num(&p["start"]));
    }
}
