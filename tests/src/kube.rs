//! A stand-in Kubernetes API server (`tests/kube/fake_apiserver.py`: HTTPS, bearer token,
//! nodes and Secrets, posted objects checked against the Kubernetes schema), and the
//! service-account files a pod would have.

use std::path::PathBuf;
use std::process::{Child, Command};

use crate::registry::TestCa;

pub struct FakeApi {
    child: Child,
    pub port: u16,
    /// The service account directory (`token`, `ca.crt`, `namespace`).
    pub sa_dir: PathBuf,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

pub const TOKEN: &str = "starling-test-token";

impl FakeApi {
    /// `nodes`: JSON object of node name to its labels. The pod's namespace is `namespace`.
    pub fn start(nodes: &serde_json::Value, namespace: &str) -> FakeApi {
        let dir = tempfile::tempdir().expect("api dir");
        let ca = TestCa::new(dir.path(), "apiserver", &["127.0.0.1", "localhost"]);
        let sa_dir = dir.path().join("serviceaccount");
        std::fs::create_dir_all(&sa_dir).expect("sa dir");
        std::fs::write(sa_dir.join("token"), format!("{TOKEN}\n")).expect("token");
        std::fs::write(sa_dir.join("namespace"), namespace).expect("namespace");
        std::fs::copy(&ca.ca_cert, sa_dir.join("ca.crt")).expect("ca.crt");
        let record = dir.path().join("requests.jsonl");
        let nodes = nodes.to_string();
        let args: Vec<&std::ffi::OsStr> = vec![
            "--cert".as_ref(),
            ca.server_cert.as_os_str(),
            "--key".as_ref(),
            ca.server_key.as_os_str(),
            "--token".as_ref(),
            TOKEN.as_ref(),
            "--nodes".as_ref(),
            nodes.as_ref(),
            "--record".as_ref(),
            record.as_os_str(),
        ];
        let (child, ports) = crate::start_ready(
            "tests/kube/fake_apiserver.py",
            &args,
            "python3 with kubernetes-validate: cargo xtask setup",
        );
        let port = ports[0];
        FakeApi {
            child,
            port,
            sa_dir,
            record,
            _dir: dir,
        }
    }

    /// Makes `cmd` a process inside this "cluster".
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", self.port.to_string())
            .env("STARLING_KUBE_SA_DIR", &self.sa_dir);
    }

    /// Every request so far: `{method, path, body}`.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        crate::kill_pid(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}
