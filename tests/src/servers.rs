//! Real origins: nginx (honours Range) and python3 -m http.server (ignores Range).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{free_port, kill_pid, wait_for_addr, wait_for_port};

/// nginx on 127.0.0.1, serving `www` over HTTP (and HTTPS when given a cert), logging each
/// request's status and body bytes.
pub struct Nginx {
    child: Child,
    /// The address it listens on (127.0.0.1, or a lab host's).
    pub host: String,
    pub port: u16,
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(www: &Path) -> Nginx {
        Self::start_with(www, None)
    }

    /// With `tls = Some((cert_pem_path, key_pem_path))`, also serves HTTPS.
    pub fn start_with(www: &Path, tls: Option<(&Path, &Path)>) -> Nginx {
        Self::start_in(www, tls, None, "127.0.0.1")
    }

    /// In a lab host's namespace (`ns`), listening on `host` (reachable from the caller).
    pub fn start_in(
        www: &Path,
        tls: Option<(&Path, &Path)>,
        ns: Option<&str>,
        host: &str,
    ) -> Nginx {
        let dir = tempfile::Builder::new()
            .prefix("starling-nginx-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let port = free_port();
        let tls_port = tls.map(|_| free_port());
        let tls_server = match (tls, tls_port) {
            (Some((cert, key)), Some(p)) => format!(
                "server {{ listen {host}:{p} ssl; server_name localhost; ssl_certificate {}; ssl_certificate_key {}; root {}; }}",
                cert.display(),
                key.display(),
                www.display()
            ),
            _ => String::new(),
        };
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  log_format bytes '$request_method $uri $status $body_bytes_sent $http_range';\n  \
             access_log {d}/access.log bytes;\n  client_body_temp_path {d}/cbt;\n  proxy_temp_path {d}/pt;\n  \
             fastcgi_temp_path {d}/ft;\n  uwsgi_temp_path {d}/ut;\n  scgi_temp_path {d}/st;\n  \
             sendfile on;\n  keepalive_requests 100000;\n  \
             server {{ listen {host}:{port}; root {www}; }}\n  {tls_server}\n}}\n",
            d = d.display(),
            www = www.display(),
        );
        std::fs::write(d.join("nginx.conf"), conf).expect("write nginx.conf");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nginx"]);
                c
            }
            None => Command::new("nginx"),
        };
        let child = cmd
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx (apt-get install nginx-light, or run `cargo xtask setup`)");
        wait_for_addr(host, port, "nginx to listen");
        if let Some(p) = tls_port {
            wait_for_addr(host, p, "nginx to listen on TLS");
        }
        Nginx {
            child,
            host: host.to_string(),
            port,
            tls_port,
            dir,
        }
    }

    /// The master process (its workers are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}/{path}", self.host, self.port)
    }

    fn log(&self) -> Vec<(String, u16, u64)> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((
                    f.get(1)?.to_string(),
                    f.get(2)?.parse().ok()?,
                    f.get(3)?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// Each logged response's first byte (from its Range, else 0) and body bytes sent, in the
    /// order nginx logged them (when each ended).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let sent = f.get(3)?.parse().ok()?;
                let start = f
                    .get(4)
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split(['-', ',']).next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                Some((start, sent))
            })
            .collect()
    }

    /// Requests logged so far.
    pub fn requests(&self) -> usize {
        self.log().len()
    }

    /// Body bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.log().iter().map(|r| r.2).sum()
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        kill_pid(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// `python3 -m http.server`: answers every GET with 200 and the whole file, Range or not.
pub struct PyHttp {
    child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl PyHttp {
    pub fn start(www: &Path) -> PyHttp {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().expect("temp file");
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(www)
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("reopen log"))
            .spawn()
            .expect("start python3 -m http.server");
        wait_for_port(port, "python http.server to listen");
        PyHttp { child, port, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// GET requests it logged (its log goes to stderr, one line per request).
    pub fn gets(&self) -> usize {
        std::fs::read_to_string(self.log.path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET "))
            .count()
    }
}

impl Drop for PyHttp {
    fn drop(&mut self) {
        kill_pid(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}
