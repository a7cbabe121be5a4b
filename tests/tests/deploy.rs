//! Running where the users are, short of a cluster: the in-cluster API client against a
//! stand-in API server that checks every object against the Kubernetes schema.

use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use starling_tests::kube::FakeApi;
use starling_tests::*;

#[test]
fn the_daemon_takes_its_zone_and_rack_from_its_nodes_labels() {
    let api = FakeApi::start(
        &json!({"node-a": {
            "topology.kubernetes.io/zone": "eu-west-1b",
            "topology.kubernetes.io/rack": "r17",
            "kubernetes.io/hostname": "node-a",
        }}),
        "starling",
    );
    let s = Scratch::new();
    let port = free_port();
    s.write_config(&format!(
        "[kubernetes]\nnode_name = \"${{NODE_NAME}}\"\n[daemon]\nmetrics_addr = \"127.0.0.1:{port}\"\n"
    ));
    let _d = Daemon::start_with(&s, |c| {
        api.env(c);
        c.env("NODE_NAME", "node-a");
    });
    let status: serde_json::Value =
        serde_json::from_str(&http_get(port, "/api/status")).expect("status JSON");
    assert_eq!(status["zone"], "eu-west-1b", "{status}");
    assert_eq!(status["rack"], "r17");
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .any(|r| r["method"] == "GET" && r["path"] == "/api/v1/nodes/node-a"),
        "{reqs:?}"
    );
}

#[test]
fn a_node_the_api_does_not_know_leaves_the_daemon_running_without_a_place() {
    let api = FakeApi::start(&json!({}), "starling");
    let s = Scratch::new();
    let port = free_port();
    s.write_config(&format!(
        "[kubernetes]\nnode_name = \"node-x\"\n[daemon]\nmetrics_addr = \"127.0.0.1:{port}\"\n"
    ));
    let _d = Daemon::start_with(&s, |c| api.env(c));
    let status: serde_json::Value =
        serde_json::from_str(&http_get(port, "/api/status")).expect("status JSON");
    assert_eq!(status["zone"], "");
    let log = std::fs::read_to_string(s.path().join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("cannot read the node's topology labels") && log.contains("404"),
        "{log}"
    );
}

#[test]
fn the_ca_job_creates_the_secret_once_and_never_replaces_it() {
    let api = FakeApi::start(&json!({}), "infra");
    let s = Scratch::new();
    s.write_config("");
    let ca_dir = s.path().join("ca");
    let run = |dir: &std::path::Path| {
        let mut c = s.starling();
        c.arg("ca").arg(dir).args(["--kube-secret", "starling-ca"]);
        api.env(&mut c);
        Run::of(&mut c).ok()
    };
    let first = String::from_utf8(run(&ca_dir).stdout).expect("utf-8");
    assert!(
        first.contains("created Secret infra/starling-ca"),
        "{first}"
    );
    // The posted Secret passed the schema check (else 422) and holds the pair `starling ca`
    // wrote.
    let posts: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "POST")
        .collect();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0]["path"], "/api/v1/namespaces/infra/secrets");
    let data = &posts[0]["body"]["data"];
    let b64 = base64::engine::general_purpose::STANDARD;
    for f in ["ca.pem", "ca.key"] {
        let sent = b64.decode(data[f].as_str().expect(f)).expect("base64");
        assert_eq!(sent, std::fs::read(ca_dir.join(f)).expect(f), "{f}");
    }
    // A second install (another CA in another directory) keeps the cluster's CA.
    let second = String::from_utf8(run(&s.path().join("ca2")).stdout).expect("utf-8");
    assert!(second.contains("exists; kept as it is"), "{second}");
    // Outside a cluster: a usage error that says so.
    let mut c = s.starling();
    c.arg("ca").arg(&ca_dir).args(["--kube-secret", "x"]);
    c.env_remove("KUBERNETES_SERVICE_HOST");
    let r = Run::of(&mut c).fails_with(2);
    assert!(
        r.stderr.contains("not inside a Kubernetes pod"),
        "{}",
        r.stderr
    );
}

/// GET `path` from 127.0.0.1:`port` (curl), retried for a few seconds while it starts.
fn http_get(port: u16, path: &str) -> String {
    let url = format!("http://127.0.0.1:{port}{path}");
    let mut out = String::new();
    wait_until(Duration::from_secs(10), &url, || {
        let r = Run::of(std::process::Command::new("curl").args(["-sf", &url]));
        out = String::from_utf8_lossy(&r.stdout).into_owned();
        r.code == 0
    });
    out
}
