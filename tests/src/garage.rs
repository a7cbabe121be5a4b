//! Garage (<https://garagehq.deuxfleurs.fr>), a real S3-compatible object store, as the tests'
//! S3: one node on loopback, a bucket, a key, and uploads signed with Starling's own SigV4
//! client (optionally with `x-amz-checksum-sha256`, which Garage checks and stores).
//! `cargo xtask setup` installs it (`cargo install garage`); $STARLING_GARAGE overrides.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use base64::Engine as _;

use crate::{free_port, kill_pid, wait_for_port};

pub struct Garage {
    child: Child,
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub s3_port: u16,
    pub key_id: String,
    pub secret: String,
}

/// The garage binary: $STARLING_GARAGE, else `garage` on PATH, else ~/.cargo/bin/garage.
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STARLING_GARAGE") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .find(|c| c.exists())
        })
        .unwrap_or_default();
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let p = on_path.unwrap_or_else(|| home.join(".cargo/bin/garage"));
    assert!(
        p.exists(),
        "garage is not installed: run `cargo xtask setup` (it runs cargo install garage)"
    );
    p
}

impl Garage {
    pub fn start() -> Garage {
        let dir = tempfile::Builder::new()
            .prefix("starling-garage-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let (rpc, s3_port, admin) = (free_port(), free_port(), free_port());
        let secret: String = crate::random_bytes(32, std::process::id() as u64)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let cfg = format!(
            "metadata_dir = {:?}\ndata_dir = {:?}\ndb_engine = \"lmdb\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\nroot_domain = \".s3.garage.localhost\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
            d.join("meta"),
            d.join("data"),
        );
        std::fs::write(d.join("garage.toml"), cfg).expect("write garage.toml");
        let bin = garage_bin();
        let log = std::fs::File::create(d.join("garage.log")).expect("log");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(d.join("garage.toml"))
            .arg("server")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start garage");
        wait_for_port(s3_port, "garage's S3 API");
        let mut g = Garage {
            child,
            dir,
            bin,
            s3_port,
            key_id: String::new(),
            secret: String::new(),
        };
        let id = g.cli(&["node", "id", "-q"]);
        let id = id.trim().split('@').next().unwrap_or_default().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        g.cli(&["layout", "apply", "--version", "1"]);
        let key = g.cli(&["key", "create", "starling-test"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("garage key create printed no {name:?}: {key}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g
    }

    /// Runs the garage CLI against this node; panics (with its output) if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(args)
            .output()
            .expect("run garage");
        assert!(
            out.status.success(),
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn create_bucket(&self, name: &str) {
        self.cli(&["bucket", "create", name]);
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            name,
            "--key",
            "starling-test",
        ]);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The `[s3]` section for nodes.
    pub fn config(&self) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\nregion = \"garage\"\n",
            self.endpoint()
        )
    }

    /// `c` with this store's credentials in its environment.
    pub fn env(&self, mut c: Command) -> Command {
        c.env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE");
        c
    }

    /// PUT `bytes` at `bucket/key`, with its SHA-256 as `x-amz-checksum-sha256` when `checksum`.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8], checksum: bool) {
        let cfg = starling::config::S3Config {
            endpoint: Some(self.endpoint()),
            region: Some("garage".into()),
            ..Default::default()
        };
        let s3 = starling::s3::S3::new(&cfg, &Default::default())
            .expect("s3 client")
            .with_credentials(&self.key_id, &self.secret);
        let sum = ring::digest::digest(&ring::digest::SHA256, bytes);
        let b64 = base64::engine::general_purpose::STANDARD.encode(sum.as_ref());
        let len = bytes.len().to_string();
        let mut hs: Vec<(&str, &str)> = vec![("content-length", &len)];
        if checksum {
            hs.push(("x-amz-checksum-sha256", &b64));
        }
        let (headers, url) = s3.signed("PUT", bucket, key, &hs).expect("sign PUT");
        let path = url.splitn(4, '/').nth(3).unwrap_or_default();
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).expect("connect");
        let mut head = format!(
            "PUT /{path} HTTP/1.1\r\nhost: 127.0.0.1:{}\r\nconnection: close\r\n",
            self.s3_port
        );
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes()).expect("send head");
        conn.write_all(bytes).expect("send body");
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "PUT {key}: {answer}");
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        kill_pid(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}
