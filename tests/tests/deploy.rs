//! Running where the users are, short of a cluster: the in-cluster API client against a
//! stand-in API server that checks every object against the Kubernetes schema.

use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use starling_tests::kube::FakeApi;
use starling_tests::*;

const MIB: usize = 1 << 20;

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

/// Values that turn every switch the other way from the defaults.
fn other_values() -> serde_json::Value {
    json!({
        "ebpf": {"enabled": false},
        "proxy": {"enabled": false},
        "seed": {"replicas": 0},
        "scheduler": {"replicas": 1},
        "topology": {"fromNodeLabels": false},
        "ca": {"existingSecret": "my-ca"},
        "registries": ["registry.example:5000", "docker.io"],
        "containerd": {"strict": true},
        "bandwidth": {"uploadMbps": 10000, "uploadLimitMbps": 8000},
        "metrics": {
            "serviceMonitor": {"enabled": true},
            "prometheusRule": {"enabled": true},
            "grafanaDashboard": {"enabled": true},
        },
        "extraConfig": "[source]\nconcurrency = 8\n",
        "tracing": {"otlpEndpoint": "http://otel-collector:4317", "protocol": "grpc", "sampleRatio": 1},
        "originLimits": {"nodeConnections": 8, "nodeMbps": 2000, "clusterFetchers": 3, "clusterMbps": 10000},
    })
}

#[test]
fn the_chart_lints_and_every_object_passes_two_kubernetes_versions_schemas() {
    let mut c = std::process::Command::new("python3");
    c.arg(root().join("deploy/helm/check.py")).arg("verify");
    for v in [
        json!({}),
        other_values(),
        json!({"containerd": {"configure": false}}),
    ] {
        c.arg("--values").arg(v.to_string());
    }
    c.args(["--kube-versions", "1.32.0,1.37.0"]);
    let out = String::from_utf8(Run::of(&mut c).ok().stdout).expect("utf-8");
    assert_eq!(out.matches("ok: ").count(), 3, "{out}");
    // CRD objects cannot be schema-checked here; the test below checks their metric names.
    assert!(
        out.contains("unchecked (a CRD, no schema here): monitoring.coreos.com/v1/PrometheusRule"),
        "{out}"
    );
}

#[test]
fn the_rendered_daemonset_runs_each_node_as_the_readme_says() {
    let objects = starling_tests::chart::render(&json!({}));
    use starling_tests::chart::{find, has, strings};
    let ds = find(&objects, "DaemonSet", "starling");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    let c = &pod["containers"][0];
    assert_eq!(strings(&c["command"]), ["/usr/local/bin/starling"]);
    assert_eq!(
        strings(&c["args"]),
        ["--config", "/etc/starling/config/peer.toml", "daemon"]
    );
    let sc = &c["securityContext"];
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"]
    );
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["httpGet"],
            json!({"path": "/metrics", "port": "metrics"}),
            "{probe}"
        );
    }
    let env: Vec<_> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
        .collect();
    assert_eq!(env, [json!("status.podIP"), json!("spec.nodeName")]);
    let data = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "data")
        .expect("data volume");
    assert_eq!(data["hostPath"]["path"], "/var/lib/starling");
    let mounts = c["volumeMounts"].as_array().expect("mounts");
    for (name, path) in [
        ("data", "/var/lib/starling"),
        ("config", "/etc/starling/config"),
        ("ca", "/etc/starling/ca"),
    ] {
        assert!(
            mounts
                .iter()
                .any(|m| m["name"] == name && m["mountPath"] == path),
            "{name} at {path}"
        );
    }
    // The init container writes hosts.toml for every registry, with containerd's config checked.
    let init = &pod["initContainers"][0];
    let args = strings(&init["args"]).join(" ");
    assert!(args.contains("init containerd --write --hosts-dir /etc/containerd/certs.d --containerd-config /host/containerd-config/config.toml --registry _default"), "{args}");
    assert!(init["securityContext"]["capabilities"]["add"].is_null());
    // The daemons find every scheduler replica through the headless Service.
    let svc = find(&objects, "Service", "starling-scheduler");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    let cm = find(&objects, "ConfigMap", "starling");
    let peer = cm["data"]["peer.toml"].as_str().expect("peer.toml");
    assert!(
        peer.contains("addrs = [\"starling-scheduler.starling.svc.cluster.local:7960\"]"),
        "{peer}"
    );
    assert!(peer.contains("node_name = \"${NODE_NAME}\""));
    let sched = find(&objects, "Deployment", "starling-scheduler");
    assert_eq!(sched["spec"]["replicas"], 2);
    let sc0 = &sched["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(sc0["readinessProbe"]["httpGet"]["path"], "/healthz");
    let seed = find(&objects, "StatefulSet", "starling-seed");
    assert_eq!(
        strings(&seed["spec"]["template"]["spec"]["containers"][0]["args"])[1],
        "/etc/starling/config/seed.toml"
    );
    assert_eq!(
        seed["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "100Gi"
    );
    assert!(has(&objects, "Job", "starling-ca-init"));
    assert!(has(&objects, "ClusterRole", "starling-node-reader"));

    // The other way round: no eBPF (no capability at all), no proxy, the user's CA, no seeds.
    let objects = starling_tests::chart::render(&other_values());
    let pod = &find(&objects, "DaemonSet", "starling")["spec"]["template"]["spec"];
    assert!(pod["containers"][0]["securityContext"]["capabilities"]["add"].is_null());
    let ca = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "ca")
        .expect("ca");
    assert_eq!(ca["secret"]["secretName"], "my-ca");
    let args = strings(&pod["initContainers"][0]["args"]).join(" ");
    assert!(
        args.contains("--registry registry.example:5000 --registry docker.io --strict"),
        "{args}"
    );
    assert!(!has(&objects, "Job", "starling-ca-init"));
    assert!(!has(&objects, "StatefulSet", "starling-seed"));
    assert!(!has(&objects, "PodDisruptionBudget", "starling-scheduler"));
    assert!(!has(&objects, "ClusterRole", "starling-node-reader"));
    let peer = find(&objects, "ConfigMap", "starling")["data"]["peer.toml"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        peer.contains("[netprobe]\nenabled = false") && peer.contains("listen = \"\""),
        "{peer}"
    );
    assert!(peer.contains("upload_limit_mbps = 8000.0"), "{peer}");
}

/// Writes the chart's ConfigMap files into `dir`, as the pod sees them.
fn write_config_map(objects: &[serde_json::Value], dir: &std::path::Path) {
    let cm = starling_tests::chart::find(objects, "ConfigMap", "starling");
    std::fs::create_dir_all(dir).expect("config dir");
    for (name, text) in cm["data"].as_object().expect("data") {
        std::fs::write(dir.join(name), text.as_str().expect("text")).expect("write config");
    }
}

#[test]
fn the_real_binary_takes_every_config_file_the_chart_writes() {
    for values in [json!({}), other_values()] {
        let objects = starling_tests::chart::render(&values);
        let dir = tempfile::tempdir().expect("dir");
        write_config_map(&objects, dir.path());
        for f in ["peer.toml", "seed.toml", "scheduler.toml"] {
            // The chart's include points at /etc/starling/config: read the files where they are.
            let text = std::fs::read_to_string(dir.path().join(f)).expect("config");
            let here = text.replace(
                "/etc/starling/config/extra.toml",
                &dir.path().join("extra.toml").display().to_string(),
            );
            let data = dir.path().join("data");
            let here = here.replace(
                "data_dir = \"/var/lib/starling\"",
                &format!("data_dir = {:?}", data),
            );
            std::fs::write(dir.path().join(f), here).expect("config");
            // `tasks` loads the configuration, then finds no daemon: exit 7, not 2.
            let r = Run::of(
                std::process::Command::new(starling_bin())
                    .arg("--config")
                    .arg(dir.path().join(f))
                    .arg("tasks")
                    .env("POD_IP", "10.1.2.3")
                    .env("NODE_NAME", "node-a"),
            );
            assert_eq!(r.code, 7, "{f} with {values}: {}", r.stderr);
        }
    }
}

/// Metric names (`starling_...`) in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("starling_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn every_metric_the_alerts_and_the_dashboard_use_is_exported() {
    let objects = starling_tests::chart::render(&other_values());
    use starling_tests::chart::find;
    let rules = find(&objects, "PrometheusRule", "starling");
    let alerts: Vec<&str> = rules["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for a in [
        "StarlingOriginEgressHigh",
        "StarlingDigestMismatch",
        "StarlingPeersBlacklisted",
        "StarlingStoreNearWatermark",
        "StarlingSchedulerUnreachable",
        "StarlingHandshakesRefused",
        "StarlingSchedulerDown",
    ] {
        assert!(alerts.contains(&a), "{a} in {alerts:?}");
    }
    let dash = find(&objects, "ConfigMap", "starling-dashboard");
    let dash: serde_json::Value =
        serde_json::from_str(dash["data"]["starling.json"].as_str().expect("json"))
            .expect("dashboard JSON");
    assert!(dash["panels"].as_array().expect("panels").len() >= 10);
    let mut used = metric_names(&rules.to_string());
    used.extend(metric_names(&dash.to_string()));

    // What a live daemon and a live scheduler export, after a download and a GC pass.
    let www = tempfile::tempdir().expect("www");
    std::fs::write(www.path().join("f"), random_bytes(1 << 20, 3)).expect("file");
    let nginx = Nginx::start(www.path());
    let mut cluster = Cluster::new(1, "", "");
    cluster.start_all();
    let node = &cluster.nodes[1];
    node.scratch.get(&nginx.url("f"), "out", &[]).ok();
    let sched = cluster.scheduler.as_ref().expect("a scheduler");
    let health = Run::of(std::process::Command::new("curl").args([
        "-sf",
        &format!("http://127.0.0.1:{}/healthz", sched.metrics_port),
    ]));
    assert_eq!(String::from_utf8_lossy(&health.ok().stdout), "ok\n");
    let mut exported = std::collections::BTreeSet::new();
    for text in [node.metrics(), scrape(sched.metrics_port)] {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (name, kind) = (it.next().unwrap_or_default(), it.next().unwrap_or_default());
                exported.insert(if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_string()
                });
            }
        }
    }
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "the alerts or the dashboard use {missing:?}, which nothing exports; exported: {exported:?}");
    let sched_metrics = scrape(sched.metrics_port);
    assert!(
        sched_metrics.contains("starling_scheduler_peers 2"),
        "{sched_metrics}"
    );
}

/// A container task under the test's containerd, killed and removed on drop.
struct Task<'a> {
    ctd: &'a starling_tests::registry::Containerd,
    name: String,
    child: std::process::Child,
}

impl Drop for Task<'_> {
    fn drop(&mut self) {
        let _ = self
            .ctd
            .ctr()
            .args(["task", "kill", "-s", "SIGKILL", &self.name])
            .output();
        let _ = self.child.wait();
        let _ = self
            .ctd
            .ctr()
            .args(["task", "rm", "-f", &self.name])
            .output();
        let _ = self
            .ctd
            .ctr()
            .args(["container", "rm", &self.name])
            .output();
    }
}

/// Whether this process's bounding set has CAP_`name` (BPF, PERFMON, NET_ADMIN, SYS_RESOURCE).
fn host_has_capability(name: &str) -> bool {
    let bit = match name {
        "NET_ADMIN" => 12,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("unknown capability {other}"),
    };
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .expect("CapBnd")
        .trim();
    u64::from_str_radix(bnd, 16).expect("hex") & (1 << bit) != 0
}

/// `ctr run` arguments for one of the chart's containers, as the kubelet has containerd run it
/// on a node: host network, its security context (capabilities, read-only root, the runtime's
/// default seccomp profile), its env (the downward API's values given), each volume mounted
/// from `host[volume name]` (emptyDirs are tmpfs), the image, then its command and args.
/// (ctr 1.6 has no --user or no-new-privileges: the image's user is root, as the chart asks.)
fn ctr_run_args(
    c: &serde_json::Value,
    pod: &serde_json::Value,
    host: &std::collections::HashMap<&str, std::path::PathBuf>,
    image: &str,
    id: &str,
) -> Vec<String> {
    use starling_tests::chart::strings;
    let mut a: Vec<String> = vec!["--net-host".into()];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsUser"], 0, "the image runs as root");
    assert!(!sc["privileged"].as_bool().unwrap_or(false));
    for cap in strings(&sc["capabilities"]["drop"]) {
        // ctr 1.6 takes no ALL: drop each of containerd's default capabilities.
        let all = [
            "CHOWN",
            "DAC_OVERRIDE",
            "FSETID",
            "FOWNER",
            "MKNOD",
            "NET_RAW",
            "SETGID",
            "SETUID",
            "SETFCAP",
            "SETPCAP",
            "NET_BIND_SERVICE",
            "SYS_CHROOT",
            "KILL",
            "AUDIT_WRITE",
        ];
        let caps: Vec<&str> = if cap == "ALL" {
            all.to_vec()
        } else {
            vec![cap.as_str()]
        };
        for c in caps {
            a.push(format!("--cap-drop=CAP_{c}"));
        }
    }
    for cap in strings(&sc["capabilities"]["add"]) {
        if !host_has_capability(&cap) {
            // runc cannot grant what the host itself lacks (this VM's root has no
            // CAP_SYS_RESOURCE, which aya needs only on kernels before 5.11).
            assert_eq!(cap, "SYS_RESOURCE", "the host lacks CAP_{cap}");
            eprintln!("note: this host's bounding set lacks CAP_{cap}; running without it");
            continue;
        }
        a.push(format!("--cap-add=CAP_{cap}"));
    }
    if sc["readOnlyRootFilesystem"] == true {
        a.push("--read-only".into());
    }
    if sc["seccompProfile"]["type"] == "RuntimeDefault" {
        a.push("--seccomp".into());
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name");
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            // Host network: the pod's address is the node's.
            Some("status.podIP") => "127.0.0.1".to_string(),
            Some("spec.nodeName") => "test-node".to_string(),
            Some(other) => panic!("no value for fieldRef {other}"),
            None => e["value"].as_str().unwrap_or_default().to_string(),
        };
        a.push(format!("--env={name}={value}"));
    }
    let volumes = pod["volumes"].as_array().expect("volumes");
    for m in c["volumeMounts"].as_array().expect("volumeMounts") {
        let name = m["name"].as_str().expect("mount name");
        let path = m["mountPath"].as_str().expect("mountPath");
        let v = volumes
            .iter()
            .find(|v| v["name"] == name)
            .expect("the mount's volume");
        if v.get("emptyDir").is_some() {
            a.push(format!(
                "--mount=type=tmpfs,src=tmpfs,dst={path},options=nosuid:nodev"
            ));
            continue;
        }
        let src = host
            .get(name)
            .unwrap_or_else(|| panic!("no host directory for volume {name}"));
        let mode = if m["readOnly"] == true { "ro" } else { "rw" };
        a.push(format!(
            "--mount=type=bind,src={},dst={path},options=rbind:{mode}",
            src.display()
        ));
    }
    a.push(image.into());
    a.push(id.into());
    a.extend(strings(&c["command"]));
    a.extend(strings(&c["args"]));
    a
}

#[test]
fn the_image_runs_as_the_charts_daemonset_and_serves_a_containerd_pull() {
    use starling_tests::registry::*;
    if !is_root() {
        eprintln!("skipped: needs root (network namespace, dockerd)");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("starling-img-")
        .tempdir()
        .expect("dir");
    let d = dir.path();
    // The image, by the real command.
    let image_dir = d.join("image");
    Run::of(
        std::process::Command::new("cargo")
            .current_dir(root())
            .args(["xtask", "image", "--debug", "--out"])
            .arg(&image_dir),
    )
    .ok();
    // A registry (TLS from a test CA) with an image to pull.
    let lr = LabRegistry::start("k", 215, d);
    let (registry, reg_ca) = (&lr.registry, &lr.ca);
    let app = lr.push_image(d, &[MIB, 12 * MIB, 5 * MIB + 3], 77, "test/app");
    // The chart, with this host's free ports, the registry, and its CA mounted for origins.
    let (peer, metrics, proxy) = (free_udp_port(), free_port(), free_port());
    let values = json!({
        "ports": {"peer": peer, "metrics": metrics},
        "proxy": {"port": proxy},
        "registries": [registry.addr],
        "topology": {"fromNodeLabels": false},
        "extraConfig": "[source]\nca_certs = [\"/etc/starling/registry-ca/ca.crt\"]\n[scheduler]\naddrs = []\n",
        "extraVolumes": [{"name": "registry-ca", "hostPath": {"path": "/etc/ssl/registry-ca"}}],
        "extraVolumeMounts": [{"name": "registry-ca", "mountPath": "/etc/starling/registry-ca", "readOnly": true}],
    });
    let objects = starling_tests::chart::render(&values);
    let ds = starling_tests::chart::find(&objects, "DaemonSet", "starling");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    // The node's files: the ConfigMap, the CA Secret (made as the chart's Job makes it), the
    // store, containerd's hosts directory and config (config_path names the hosts directory).
    write_config_map(&objects, &d.join("config"));
    let s = Scratch::new();
    s.write_config("");
    Run::of(s.starling().arg("ca").arg(d.join("ca"))).ok();
    std::fs::create_dir_all(d.join("data")).expect("data");
    std::fs::create_dir_all(d.join("hosts")).expect("hosts");
    std::fs::create_dir_all(d.join("containerd")).expect("containerd dir");
    std::fs::write(
        d.join("containerd/config.toml"),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
    )
    .expect("containerd config");
    let host: std::collections::HashMap<&str, std::path::PathBuf> = [
        ("config", d.join("config")),
        ("ca", d.join("ca")),
        ("data", d.join("data")),
        ("containerd-hosts", d.join("hosts")),
        ("containerd-config", d.join("containerd")),
        ("registry-ca", reg_ca.cert_dir.clone()),
    ]
    .into_iter()
    .collect();

    // The image loads into dockerd and containerd.
    let ctd = Containerd::start(d);
    let dockerd = Dockerd::start(d, &ctd, "http://127.0.0.1:9");
    let tar = image_dir.join("starling-image.tar");
    Run::of(dockerd.docker().arg("load").arg("-i").arg(&tar)).ok();
    let image = pod["containers"][0]["image"]
        .as_str()
        .expect("image")
        .to_string();
    assert_eq!(image, format!("starling:{}", env!("CARGO_PKG_VERSION")));
    let inspect = Run::of(dockerd.docker().args([
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}}",
        &image,
    ]))
    .ok();
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "[\"/usr/local/bin/starling\"]"
    );
    drop(dockerd);
    Run::of(ctd.ctr().args(["images", "import"]).arg(&tar)).ok();
    let image = format!("docker.io/library/{image}");

    // The init container: hosts.toml for the registry, and no warning about containerd's config.
    let init = &pod["initContainers"][0];
    let r = Run::of(ctd.ctr().args(["run", "--rm"]).args(ctr_run_args(
        init,
        pod,
        &host,
        &image,
        "starling-init",
    )));
    assert_eq!(
        r.code,
        0,
        "the init container failed:\n{}{}",
        String::from_utf8_lossy(&r.stdout),
        r.stderr
    );
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    let hosts_toml =
        std::fs::read_to_string(d.join("hosts").join(&registry.addr).join("hosts.toml"))
            .expect("hosts.toml written by the init container");
    assert!(
        hosts_toml.contains(&format!("http://127.0.0.1:{proxy}")),
        "{hosts_toml}"
    );

    // The daemon container; ready when its readiness probe's URL answers.
    let c = &pod["containers"][0];
    let name = format!("starling-ds-{}", std::process::id());
    let log = d.join("container.log");
    let child = ctd
        .ctr()
        .arg("run")
        .args(ctr_run_args(c, pod, &host, &image, &name))
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(
            std::fs::File::options()
                .append(true)
                .open(&log)
                .expect("log"),
        )
        .spawn()
        .expect("ctr run");
    let _task = Task {
        ctd: &ctd,
        name: name.clone(),
        child,
    };
    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!(probe["port"], "metrics");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = poll_until(Duration::from_secs(30), || {
        Run::of(std::process::Command::new("curl").args([
            "-sf",
            &format!(
                "http://127.0.0.1:{metrics}{}",
                probe["path"].as_str().unwrap()
            ),
        ]))
        .code
            == 0
    });
    assert!(
        ready,
        "the daemon container never became ready; its log:\n{}",
        logs()
    );
    // Its process holds exactly the chart's capabilities: BPF, PERFMON, NET_ADMIN, SYS_RESOURCE.
    let tasks =
        String::from_utf8(Run::of(ctd.ctr().args(["task", "ls"])).ok().stdout).expect("utf-8");
    let pid: u32 = tasks
        .lines()
        .find(|l| l.starts_with(&name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no task {name} in {tasks}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the task's status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim();
    let mut want: u64 = (1 << 39) | (1 << 38) | (1 << 12);
    if host_has_capability("SYS_RESOURCE") {
        want |= 1 << 24;
    }
    assert_eq!(
        u64::from_str_radix(eff, 16).expect("hex"),
        want,
        "CapEff {eff}"
    );

    // containerd pulls through the container's mirror.
    let out = ctd
        .ctr()
        .args(["images", "pull", "--hosts-dir"])
        .arg(d.join("hosts"))
        .arg(format!("{}/test/app:v1", registry.addr))
        .output()
        .expect("ctr");
    assert!(
        out.status.success(),
        "ctr images pull failed:\n{}\ncontainer log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    let text = scrape(metrics);
    let p2p = metric_value(&text, "starling_proxy_requests_total{route=\"p2p\"}");
    assert!(
        p2p >= app.blobs.len() as f64,
        "every blob went through the mirror ({p2p}); log:\n{}",
        logs()
    );
    for (digest, size) in &app.blobs {
        assert!(
            registry.blob_bytes_sent(digest) <= size + 1,
            "blob {digest}"
        );
    }
    // The blobs are in the host-path store, and the eBPF probes loaded with the chart's
    // capabilities alone.
    assert!(
        std::fs::read_dir(d.join("data/tasks"))
            .expect("tasks")
            .count()
            >= app.blobs.len()
    );
    let status: serde_json::Value =
        serde_json::from_str(&http_get(metrics, "/api/status")).expect("status");
    let ebpf = poll_until(Duration::from_secs(20), || {
        serde_json::from_str::<serde_json::Value>(&http_get(metrics, "/api/status"))
            .is_ok_and(|s| s["paths"]["ebpf"] == true)
    });
    assert!(
        ebpf,
        "eBPF did not load with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN: {}\nlog:\n{}",
        status["paths"]["detail"],
        logs()
    );
}
