//! Preheat, end to end through the real binary: a registry (TLS, in its own namespace) with two
//! images, a scheduler, a seed and two peers. `starling preheat` puts an image on the seed
//! before anyone asks; a containerd pull through another node then takes every blob from peers
//! and none from the registry. Harbor's way in, Dragonfly's `/oapi/v1/jobs`, preheats the other
//! image on every peer, behind the API token.

use std::time::Duration;

use serde_json::{json, Value};
use starling_tests::registry::*;
use starling_tests::*;

const MIB: usize = 1 << 20;

fn curl_json(args: &[&str]) -> (u16, Value) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[test]
fn preheated_images_are_pulled_without_a_registry_blob_byte_and_harbors_api_preheats_every_peer() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespace for the registry)");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("starling-pre-")
        .tempdir()
        .expect("dir");
    let d = dir.path();
    let lr = LabRegistry::start("h", 216, d);
    let (registry, reg_ca) = (&lr.registry, &lr.ca);
    let app = lr.push_image(d, &[MIB, 16 * MIB, 4 * MIB + 5], 91, "test/app");
    let other = lr.push_image(&d.join("other"), &[2 * MIB, 9 * MIB], 92, "test/other");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut cluster = Cluster::new_each(2, "", &|i| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{}\"\n[source]\nca_certs = [{:?}]\nbackoff_ms = 20\nattempts = 6\nidle_timeout_seconds = 5\n",
            ports[i], reg_ca.ca_cert
        )
    });
    // Node 1's API token, from an included file (the main one has its [daemon] table).
    let s1 = &cluster.nodes[1].scratch;
    let main = std::fs::read_to_string(s1.config_path()).expect("config");
    std::fs::write(
        s1.path().join("token.toml"),
        "[daemon]\napi_token = \"s3cret\"\n",
    )
    .expect("token");
    std::fs::write(
        s1.config_path(),
        format!("include = [\"token.toml\"]\n{main}"),
    )
    .expect("config");
    cluster.start_all();
    let seed = cluster.nodes[0].quic_addr().to_string();
    let blob_bytes = |img: &OciImage| -> Vec<u64> {
        img.blobs
            .iter()
            .map(|(digest, _)| registry.blob_bytes_sent(digest))
            .collect()
    };

    // The CLI, through node 1's daemon: the seed (the only target) reads each blob once.
    let mut c = cluster.nodes[1].scratch.starling();
    c.args([
        "preheat",
        "--json",
        &format!("{}/test/app:v1", registry.addr),
    ]);
    let r = Run::of(&mut c);
    assert_eq!(
        r.code,
        0,
        "preheat failed: {}\nnode 1 log:\n{}",
        r.stderr,
        cluster.nodes[1].log()
    );
    let job: Value = serde_json::from_slice(&r.stdout).expect("job JSON");
    assert_eq!(job["state"], "success");
    assert_eq!(job["targets"], json!([seed]));
    let tasks = job["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), app.blobs.len());
    for (t, (digest, size)) in tasks.iter().zip(&app.blobs) {
        assert_eq!(t["task"], digest.replace(":", "-"));
        assert_eq!(t["size"], *size);
        assert_eq!(t["complete"], 1);
        assert_eq!(t["peers"][0]["have"], t["peers"][0]["pieces"]);
    }
    let after_preheat = blob_bytes(&app);
    for ((digest, size), sent) in app.blobs.iter().zip(&after_preheat) {
        assert!(
            *sent <= size + 1,
            "blob {digest}: the registry sent {sent} of {size} bytes"
        );
    }

    // containerd pulls through node 2's mirror: every blob from peers, none from the registry
    // (the manifest requests still go to the registry: tags are resolved there).
    let ctd = Containerd::start(d);
    let image = format!("{}/test/app:v1", registry.addr);
    containerd_pull(
        &ctd,
        &cluster.nodes[2].scratch,
        &registry.addr,
        &d.join("hosts"),
        &image,
    );
    assert_eq!(
        blob_bytes(&app),
        after_preheat,
        "the pull took blob bytes from the registry"
    );
    let from_peers = cluster.nodes[2].metric("starling_bytes_downloaded_total{source=\"parent\"}");
    let total: u64 = app.blobs.iter().map(|b| b.1).sum();
    assert!(
        from_peers >= total as f64,
        "node 2 took {from_peers} of {total} bytes from peers"
    );

    // Harbor's call (Dragonfly's API) on node 1's HTTP listener: the token is required.
    let port = cluster.nodes[1].metrics_port.to_string();
    let url = format!("http://127.0.0.1:{port}/oapi/v1/jobs");
    // Every field Harbor's Dragonfly driver sends (the registry's Authorization in `headers`;
    // this registry needs none and ignores it).
    let body = json!({"type": "preheat", "args": {
        "type": "image",
        "url": format!("https://{}/v2/test/other/manifests/v1", registry.addr),
        "tag": "v1",
        "filtered_query_params": "",
        "headers": {"Authorization": "Basic aGFyYm9yOnJvYm90"},
        "scope": "all_peers",
        "concurrent_count": 0,
        "timeout": 0,
    }, "scheduler_cluster_ids": null})
    .to_string();
    let (code, _) = curl_json(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        &url,
    ]);
    assert_eq!(code, 401, "no token");
    let auth = "Authorization: Bearer s3cret";
    let (code, created) = curl_json(&[
        "-X",
        "POST",
        "-H",
        auth,
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        &url,
    ]);
    assert_eq!(code, 200, "{created}");
    assert_eq!(created["state"], "PENDING");
    let id = created["id"].as_u64().expect("job id");
    let mut job = Value::Null;
    let done = poll_until(Duration::from_secs(60), || {
        job = curl_json(&["-H", auth, &format!("{url}/{id}")]).1;
        job["state"] == "SUCCESS" || job["state"] == "FAILURE"
    });
    assert!(done && job["state"] == "SUCCESS", "{job}");
    assert_eq!(
        job["result"]["targets"].as_array().map(Vec::len),
        Some(3),
        "{job}"
    );
    // Every node holds the other image's blobs, and the registry sent each once.
    for (digest, size) in &other.blobs {
        assert!(
            registry.blob_bytes_sent(digest) <= size + 1,
            "blob {digest}"
        );
        for n in &cluster.nodes {
            let mut c = n.scratch.starling();
            c.args(["stat", digest, "--json"]);
            let st: Value = serde_json::from_slice(&Run::of(&mut c).ok().stdout).expect("stat");
            assert_eq!(st["state"], "complete", "{}", n.scratch.path().display());
        }
    }
    // A bad reference is refused at once, naming it.
    let (code, err) = curl_json(&[
        "-X",
        "POST",
        "-H",
        auth,
        "-d",
        r#"{"type":"preheat","args":{"type":"image","url":"NOT A REF"}}"#,
        &url,
    ]);
    assert_eq!(code, 400);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or_default()
            .contains("NOT A REF"),
        "{err}"
    );
}
