//! Real container parts from Debian for the registry tests: the distribution registry
//! (`docker-registry`) with TLS from a test CA, an OCI image written by the test (random layers,
//! nothing pulled from anywhere) and pushed with `skopeo copy`, containerd with `ctr`, and
//! dockerd. Each runs under a temp directory and is killed by PID on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::{kill_pid, poll_until, random_bytes, sha256_file, wait_until, Lab};

/// A CA and one server certificate from it (for the given hosts / IP addresses), as PEM files.
pub struct TestCa {
    /// A directory holding only `ca.crt`: what skopeo's `--*-cert-dir` and Docker's certs.d take.
    pub cert_dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str, hosts: &[&str]) -> TestCa {
        std::fs::create_dir_all(dir.join(format!("{name}-certs"))).expect("cert dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("starling test CA {name}"));
        let ca = p.self_signed(&ca_key).expect("self-sign CA");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let leaf = CertificateParams::new(hosts)
            .expect("leaf params")
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("sign leaf");
        let t = TestCa {
            cert_dir: dir.join(format!("{name}-certs")),
            ca_cert: dir.join(format!("{name}-ca.pem")),
            ca_key: dir.join(format!("{name}-ca.key")),
            server_cert: dir.join(format!("{name}-server.pem")),
            server_key: dir.join(format!("{name}-server.key")),
        };
        let w = |p: &Path, s: String| std::fs::write(p, s).expect("write PEM");
        w(&t.ca_cert, ca.pem());
        w(&t.cert_dir.join("ca.crt"), ca.pem());
        w(&t.ca_key, ca_key.serialize_pem());
        w(&t.server_cert, format!("{}{}", leaf.pem(), ca.pem()));
        w(&t.server_key, leaf_key.serialize_pem());
        t
    }
}

/// Debian's distribution registry, with TLS, in a lab host's namespace.
pub struct Registry {
    child: Child,
    /// `ip:port`.
    pub addr: String,
    pub log: PathBuf,
}

/// A registry with TLS from its own test CA, alone in a lab namespace (`tag`, `subnet`).
pub struct LabRegistry {
    pub registry: Registry,
    pub ca: TestCa,
    pub lab: crate::Lab,
}

impl LabRegistry {
    pub fn start(tag: &str, subnet: u8, dir: &Path) -> LabRegistry {
        let lab = crate::Lab::new(tag, subnet, 1, 0).expect("lab");
        let ip = lab.hosts[0].addr.clone();
        let ca = TestCa::new(dir, "registry", &[&ip]);
        let registry = Registry::start_in(&lab, 0, dir, &ca);
        LabRegistry { registry, ca, lab }
    }

    /// Builds an image of `layers` (sizes, content from `seed`) under `dir` and pushes it as
    /// `repo:v1`.
    pub fn push_image(&self, dir: &Path, layers: &[usize], seed: u64, repo: &str) -> OciImage {
        let image = OciImage::build(dir, layers, seed);
        image.push(&self.registry, &self.ca, repo);
        image
    }
}

/// `ctr images pull` of `image` through the mirror named by `node`'s config: its hosts.toml
/// files come from `starling init containerd --write` into `hosts`. Panics with ctr's output
/// on failure.
pub fn containerd_pull(
    ctd: &Containerd,
    node: &crate::Scratch,
    registry: &str,
    hosts: &Path,
    image: &str,
) {
    run(node
        .starling()
        .args([
            "init",
            "containerd",
            "--write",
            "--registry",
            registry,
            "--hosts-dir",
        ])
        .arg(hosts));
    let out = ctd
        .ctr()
        .args(["images", "pull", "--hosts-dir"])
        .arg(hosts)
        .arg(image)
        .output()
        .expect("run ctr");
    assert!(
        out.status.success(),
        "ctr images pull {image} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Registry {
    pub fn start_in(lab: &Lab, host: usize, dir: &Path, tls: &TestCa) -> Registry {
        let ip = lab.hosts[host].addr.clone();
        let root = dir.join("registry");
        std::fs::create_dir_all(&root).expect("registry dir");
        let cfg = root.join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {ip}:5000\n  tls:\n    certificate: {}\n    key: {}\n",
                root.join("storage").display(),
                tls.server_cert.display(),
                tls.server_key.display(),
            ),
        )
        .expect("registry config");
        let log = root.join("registry.log");
        let out = std::fs::File::create(&log).expect("registry log");
        let err = out.try_clone().expect("registry log");
        let child = lab
            .command(host, "docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start docker-registry (apt install docker-registry)");
        // The guard first: when the registry never listens, the panic drops it, and the
        // process goes with it instead of outliving the test.
        let reg = Registry {
            child,
            addr: format!("{ip}:5000"),
            log,
        };
        let up = poll_until(std::time::Duration::from_secs(15), || {
            std::net::TcpStream::connect((ip.as_str(), 5000)).is_ok()
        });
        assert!(
            up,
            "timed out after 15 s waiting for the registry; its log:\n{}",
            reg.log()
        );
        reg
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Body bytes the registry sent for GETs of the blob `digest` (ranged ones included), from
    /// its access log.
    pub fn blob_bytes_sent(&self, digest: &str) -> u64 {
        let needle = format!("/blobs/{digest} ");
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&needle))
            .filter_map(|l| {
                // ... "GET /v2/... HTTP/2.0" 206 1048576 "" "agent"
                let after = l.split("\" ").nth(1)?;
                let mut f = after.split_whitespace();
                let status: u16 = f.next()?.parse().ok()?;
                let bytes: u64 = f.next()?.parse().ok()?;
                (200..300).contains(&status).then_some(bytes)
            })
            .sum()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        kill_pid(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// An OCI image layout written by the test: random-content layers (gzip'd tars), a config and a
/// manifest, tagged `v1`.
pub struct OciImage {
    pub layout: PathBuf,
    /// Every blob's digest and size: the config first, then the layers.
    pub blobs: Vec<(String, u64)>,
}

impl OciImage {
    pub fn build(dir: &Path, layer_sizes: &[usize], seed: u64) -> OciImage {
        let layout = dir.join("oci");
        let blobs_dir = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs_dir).expect("layout dir");
        let stage = dir.join("stage");
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let d = stage.join(format!("l{i}"));
            std::fs::create_dir_all(&d).expect("stage dir");
            std::fs::write(
                d.join(format!("layer{i}.bin")),
                random_bytes(*size, seed + i as u64),
            )
            .expect("layer file");
            let tar = stage.join(format!("l{i}.tar"));
            run(Command::new("tar")
                .args([
                    "--mtime=@0",
                    "--owner=0",
                    "--group=0",
                    "--numeric-owner",
                    "-C",
                ])
                .arg(&d)
                .arg("-cf")
                .arg(&tar)
                .arg(format!("layer{i}.bin")));
            diff_ids.push(sha256_file(&tar));
            run(Command::new("gzip").args(["-1", "-n", "-f"]).arg(&tar));
            let gz = stage.join(format!("l{i}.tar.gz"));
            layers.push(put_blob(&blobs_dir, &gz));
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let cfg_path = stage.join("config.json");
        std::fs::write(&cfg_path, config.to_string()).expect("config");
        let config_blob = put_blob(&blobs_dir, &cfg_path);
        let desc = |media: &str, (d, n): &(String, u64)| serde_json::json!({"mediaType": media, "digest": d, "size": n});
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": desc("application/vnd.oci.image.config.v1+json", &config_blob),
            "layers": layers.iter().map(|l| desc("application/vnd.oci.image.layer.v1.tar+gzip", l)).collect::<Vec<_>>(),
        });
        let m_path = stage.join("manifest.json");
        std::fs::write(&m_path, manifest.to_string()).expect("manifest");
        let m = put_blob(&blobs_dir, &m_path);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": m.0, "size": m.1,
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }],
        });
        std::fs::write(layout.join("index.json"), index.to_string()).expect("index");
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("oci-layout");
        let _ = std::fs::remove_dir_all(&stage);
        let mut blobs = vec![config_blob];
        blobs.extend(layers);
        OciImage { layout, blobs }
    }

    /// Pushes it to `registry` as `repo:v1` (directly, trusting `ca`).
    pub fn push(&self, registry: &Registry, ca: &TestCa, repo: &str) {
        run(skopeo()
            .arg("copy")
            .arg("--dest-cert-dir")
            .arg(&ca.cert_dir)
            .arg(format!("oci:{}:v1", self.layout.display()))
            .arg(format!("docker://{}/{repo}:v1", registry.addr)));
    }

    /// Where a blob lives in an OCI layout (a pull's output, say).
    pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }
}

fn put_blob(blobs: &Path, file: &Path) -> (String, u64) {
    let d = sha256_file(file);
    let n = std::fs::metadata(file).expect("blob size").len();
    std::fs::copy(file, blobs.join(d.trim_start_matches("sha256:"))).expect("copy blob");
    (d, n)
}

/// `skopeo --insecure-policy` (no signature policy on a test machine).
pub fn skopeo() -> Command {
    let mut c = Command::new("skopeo");
    c.arg("--insecure-policy");
    c
}

#[track_caller]
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// containerd with its own root, state and socket, and the CRI plugin off.
pub struct Containerd {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        let root = dir.join("ctd");
        std::fs::create_dir_all(&root).expect("containerd dir");
        let socket = root.join("c.sock");
        let cfg = root.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\naddress = {:?}\n[ttrpc]\naddress = {:?}\n",
                root.join("root"),
                root.join("state"),
                socket,
                root.join("c.sock.ttrpc"),
            ),
        )
        .expect("containerd config");
        let log = root.join("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("containerd log"))
            .spawn()
            .expect("start containerd (apt install containerd)");
        let c = Containerd { child, socket, log };
        wait_until(Duration::from_secs(20), "containerd's socket", || {
            std::os::unix::net::UnixStream::connect(&c.socket).is_ok()
        });
        c
    }

    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket);
        c
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        kill_pid(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// dockerd (Debian's docker.io) on its own socket and data root, using `containerd`, with
/// `HTTPS_PROXY` / `HTTP_PROXY` set to `proxy` and no networking of its own.
pub struct Dockerd {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Dockerd {
    /// Its daemon.json (written as `{}` by [`Dockerd::start`] unless it exists).
    pub fn config_path(dir: &Path) -> PathBuf {
        dir.join("dkr").join("daemon.json")
    }

    pub fn start(dir: &Path, containerd: &Containerd, proxy: &str) -> Dockerd {
        let root = dir.join("dkr");
        std::fs::create_dir_all(&root).expect("docker dir");
        let socket = root.join("d.sock");
        let log = root.join("dockerd.log");
        if !root.join("daemon.json").exists() {
            std::fs::write(root.join("daemon.json"), "{}").expect("daemon.json");
        }
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(root.join("daemon.json"))
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--containerd")
            .arg(&containerd.socket)
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--storage-driver=vfs",
            ])
            .env("HTTPS_PROXY", proxy)
            .env("HTTP_PROXY", proxy)
            .env("NO_PROXY", "")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("dockerd log"))
            .spawn()
            .expect("start dockerd (apt install docker.io)");
        let d = Dockerd { child, socket, log };
        wait_until(Duration::from_secs(30), "dockerd's socket", || {
            std::os::unix::net::UnixStream::connect(&d.socket).is_ok()
        });
        d
    }

    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(format!("unix://{}", self.socket.display()));
        c
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // dockerd shuts its containerd state down cleanly on SIGTERM; SIGKILL if it hangs.
        kill_pid(self.child.id(), libc::SIGTERM);
        let child = &mut self.child;
        if !poll_until(Duration::from_secs(10), || {
            child.try_wait().ok().flatten().is_some()
        }) {
            kill_pid(self.child.id(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A file under `/etc/docker/certs.d/<registry>/ca.crt` (dockerd reads trust from there only),
/// removed with its directory on drop.
pub struct DockerTrust {
    dir: PathBuf,
}

impl DockerTrust {
    pub fn install(registry: &str, ca_pem: &Path) -> DockerTrust {
        let dir = PathBuf::from("/etc/docker/certs.d").join(registry);
        std::fs::create_dir_all(&dir).expect("certs.d dir");
        std::fs::copy(ca_pem, dir.join("ca.crt")).expect("install ca.crt");
        DockerTrust { dir }
    }
}

impl Drop for DockerTrust {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
