//! A local Hugging Face Hub: the documented endpoints that Starling and `huggingface_hub` use,
//! over repositories kept as folders. No machine here reaches the real Hub.
//!
//! Layout under the root: `ORG/REPO/commits/<40-hex commit>/<files>`, `ORG/REPO/refs/<name>`
//! (a file holding a commit), and optionally `ORG/REPO/token` (the repository is private: the
//! API and `resolve` want `Authorization: Bearer <token>`) and `ORG/REPO/lies.json`
//! (`{"path": "<sha256 hex>"}`: the listing and headers claim that SHA-256 for the file while
//! its real bytes are served; a lying Hub).
//!
//! Endpoints:
//! - `GET /api/models/ORG/REPO/revision/REV`: `{"id", "sha", "siblings": [{"rfilename"}]}`.
//! - `GET /api/models/ORG/REPO/tree/REV[/PATH]?recursive=true`: files and folders, with
//!   `oid`, `size` and for LFS files `lfs: {oid (sha256), size, pointerSize}`; pages of
//!   `page_size` entries linked by `Link: <...>; rel="next"`.
//! - `HEAD|GET /ORG/REPO/resolve/REV/PATH`: a small file is answered 200 (`X-Repo-Commit`,
//!   `ETag` = its git blob ID); an LFS file (64 KiB or more, or `.safetensors`/`.bin`) is a 302
//!   to the storage backend, `/cdn/...?X-Amz-Signature=...`, with `X-Linked-Etag` (its
//!   SHA-256) and `X-Linked-Size`, as the Hub answers.
//! - `GET|HEAD /cdn/ORG/REPO/COMMIT/PATH`: the bytes, with Range.
//! - `GET /_hub/stats`: bytes and requests served, as JSON.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters, served at `/_hub/stats`.
#[derive(Default)]
pub struct Stats {
    pub lfs_bytes: AtomicU64,
    pub small_bytes: AtomicU64,
    pub api_requests: AtomicU64,
    pub resolves: AtomicU64,
    pub cdn_requests: AtomicU64,
    /// CDN requests that carried an Authorization header (a client leaking the token).
    pub cdn_auth_seen: AtomicU64,
}

#[derive(Clone)]
struct Meta {
    size: u64,
    mtime: std::time::SystemTime,
    sha256: String,
    oid: String,
    lfs: bool,
}

pub struct Hub {
    root: PathBuf,
    /// `host:port` that storage-backend redirects point at.
    cdn: String,
    page_size: usize,
    /// Storage-backend body bytes per second per response (0: unlimited).
    rate: u64,
    pub stats: Stats,
    metas: Mutex<HashMap<PathBuf, Meta>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hash_file(
    path: &Path,
    alg: &'static ring::digest::Algorithm,
    prefix: &[u8],
) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(alg);
    ctx.update(prefix);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

fn is_lfs(path: &str, size: u64) -> bool {
    size >= 64 * 1024 || path.ends_with(".safetensors") || path.ends_with(".bin")
}

/// The LFS pointer file git stores for an LFS file.
pub fn lfs_pointer(sha256: &str, size: u64) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")
}

fn git_oid(content: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(format!("blob {}\0", content.len()).as_bytes());
    ctx.update(content);
    hex(ctx.finish().as_ref())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode(s: &str) -> String {
    starling::s3::encode_key(s)
}

struct Req {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

enum Body {
    Bytes(Vec<u8>),
    File {
        path: PathBuf,
        start: u64,
        len: u64,
        lfs: bool,
    },
}

impl Resp {
    fn json(status: u16, v: serde_json::Value) -> Resp {
        Resp {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Body::Bytes(v.to_string().into_bytes()),
        }
    }

    fn error(status: u16, msg: &str) -> Resp {
        let mut r = Resp::json(status, serde_json::json!({ "error": msg }));
        r.headers.push(("X-Error-Message".into(), msg.into()));
        r
    }
}

impl Hub {
    pub fn new(root: PathBuf, cdn: String, page_size: usize, rate: u64) -> Hub {
        Hub {
            root,
            cdn,
            page_size: page_size.max(1),
            rate,
            stats: Stats::default(),
            metas: Mutex::default(),
        }
    }

    /// Serves `listener` (and more listeners with more calls) on threads, forever.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) {
        let hub = self.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let hub = hub.clone();
                std::thread::spawn(move || hub.connection(conn));
            }
        });
    }

    fn connection(&self, conn: TcpStream) {
        let _ = conn.set_nodelay(true);
        let Ok(w) = conn.try_clone() else { return };
        let mut r = BufReader::new(conn);
        let mut w = std::io::BufWriter::with_capacity(256 * 1024, w);
        loop {
            let Some(req) = read_request(&mut r) else {
                return;
            };
            let close = req
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let resp = self.handle(&req);
            if self.write(&mut w, &req, resp).is_err() || close {
                return;
            }
        }
    }

    fn write(&self, w: &mut impl Write, req: &Req, resp: Resp) -> std::io::Result<()> {
        let reason = match resp.status {
            200 => "OK",
            206 => "Partial Content",
            302 => "Found",
            401 => "Unauthorized",
            404 => "Not Found",
            416 => "Range Not Satisfiable",
            _ => "Other",
        };
        let len = match &resp.body {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", resp.status);
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
        w.write_all(head.as_bytes())?;
        if req.method == "HEAD" {
            return w.flush();
        }
        match resp.body {
            Body::Bytes(b) => w.write_all(&b)?,
            Body::File {
                path,
                start,
                len,
                lfs,
            } => {
                use std::io::Seek;
                let mut f = std::fs::File::open(&path)?;
                f.seek(std::io::SeekFrom::Start(start))?;
                let mut left = len;
                let mut buf = vec![0u8; 256 * 1024];
                let started = std::time::Instant::now();
                while left > 0 {
                    let n = f.read(&mut buf[..left.min(256 * 1024) as usize])?;
                    if n == 0 {
                        break;
                    }
                    w.write_all(&buf[..n])?;
                    left -= n as u64;
                    let counter = if lfs {
                        &self.stats.lfs_bytes
                    } else {
                        &self.stats.small_bytes
                    };
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    if lfs && self.rate > 0 {
                        let due = std::time::Duration::from_secs_f64(
                            (len - left) as f64 / self.rate as f64,
                        );
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
            }
        }
        w.flush()
    }

    fn stats_json(&self) -> serde_json::Value {
        let s = &self.stats;
        serde_json::json!({
            "lfs_bytes": s.lfs_bytes.load(Ordering::Relaxed),
            "small_bytes": s.small_bytes.load(Ordering::Relaxed),
            "api_requests": s.api_requests.load(Ordering::Relaxed),
            "resolves": s.resolves.load(Ordering::Relaxed),
            "cdn_requests": s.cdn_requests.load(Ordering::Relaxed),
            "cdn_auth_seen": s.cdn_auth_seen.load(Ordering::Relaxed),
        })
    }

    fn handle(&self, req: &Req) -> Resp {
        let path = req.path.clone();
        if path == "/_hub/stats" {
            return Resp::json(200, self.stats_json());
        }
        if let Some(rest) = path.strip_prefix("/api/models/") {
            self.stats.api_requests.fetch_add(1, Ordering::Relaxed);
            return self.api(req, rest);
        }
        if let Some(rest) = path.strip_prefix("/cdn/") {
            return self.cdn(req, rest);
        }
        // /ORG/REPO/resolve/REV/PATH
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if parts.len() == 5 && parts[2] == "resolve" {
            self.stats.resolves.fetch_add(1, Ordering::Relaxed);
            return self.resolve(
                req,
                parts[0],
                parts[1],
                &percent_decode(parts[3]),
                &percent_decode(parts[4]),
            );
        }
        Resp::error(404, "no such endpoint")
    }

    fn repo_dir(&self, org: &str, repo: &str) -> Option<PathBuf> {
        let ok = |s: &str| !s.is_empty() && !s.contains("..") && !s.contains('/');
        let d = self.root.join(org).join(repo);
        (ok(org) && ok(repo) && d.is_dir()).then_some(d)
    }

    /// 401 unless the request carries the repository's token (when it has one).
    fn authorised(&self, req: &Req, repo: &Path) -> bool {
        match std::fs::read_to_string(repo.join("token")) {
            Ok(t) => req.header("authorization") == Some(&format!("Bearer {}", t.trim())),
            Err(_) => true,
        }
    }

    fn commit_of(&self, repo: &Path, rev: &str) -> Option<String> {
        if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
            return repo
                .join("commits")
                .join(rev)
                .is_dir()
                .then(|| rev.to_string());
        }
        if rev.contains("..") {
            return None;
        }
        let c = std::fs::read_to_string(repo.join("refs").join(rev)).ok()?;
        let c = c.trim().to_string();
        repo.join("commits").join(&c).is_dir().then_some(c)
    }

    fn meta(&self, repo: &Path, commit: &str, rel: &str) -> Option<Meta> {
        let p = repo.join("commits").join(commit).join(rel);
        let md = std::fs::metadata(&p).ok().filter(|m| m.is_file())?;
        let mtime = md.modified().ok()?;
        if let Some(m) = self.metas.lock().ok()?.get(&p) {
            if m.size == md.len() && m.mtime == mtime {
                return Some(self.lie(repo, rel, m.clone()));
            }
        }
        let size = md.len();
        let lfs = is_lfs(rel, size);
        let sha256 = hash_file(&p, &ring::digest::SHA256, b"").ok()?;
        let oid = if lfs {
            git_oid(lfs_pointer(&sha256, size).as_bytes())
        } else {
            hash_file(
                &p,
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                format!("blob {size}\0").as_bytes(),
            )
            .ok()?
        };
        let m = Meta {
            size,
            mtime,
            sha256,
            oid,
            lfs,
        };
        self.metas.lock().ok()?.insert(p, m.clone());
        Some(self.lie(repo, rel, m))
    }

    /// Applies `lies.json`: the SHA-256 the Hub claims for a file.
    fn lie(&self, repo: &Path, rel: &str, mut m: Meta) -> Meta {
        let lies: serde_json::Value = std::fs::read(repo.join("lies.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(s) = lies.get(rel).and_then(|v| v.as_str()) {
            m.sha256 = s.to_string();
            m.oid = git_oid(lfs_pointer(s, m.size).as_bytes());
        }
        m
    }

    /// Every file under `commits/<commit>/<under>`, relative to the commit, sorted.
    fn files(&self, repo: &Path, commit: &str) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else if let Ok(rel) = p.strip_prefix(base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        let base = repo.join("commits").join(commit);
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out.sort();
        out
    }

    fn api(&self, req: &Req, rest: &str) -> Resp {
        // ORG/REPO/(revision|tree)/REV[/PATH]
        let parts: Vec<&str> = rest.splitn(5, '/').collect();
        if parts.len() < 4 {
            return Resp::error(404, "no such endpoint");
        }
        let Some(repo) = self.repo_dir(parts[0], parts[1]) else {
            return Resp::error(401, "Repository not found");
        };
        if !self.authorised(req, &repo) {
            return Resp::error(401, "Invalid credentials");
        }
        let rev = percent_decode(parts[3]);
        let Some(commit) = self.commit_of(&repo, &rev) else {
            return Resp::error(404, &format!("Revision Not Found: {rev}"));
        };
        let files = self.files(&repo, &commit);
        match parts[2] {
            "revision" => Resp::json(
                200,
                serde_json::json!({
                    "id": format!("{}/{}", parts[0], parts[1]),
                    "sha": commit,
                    "siblings": files.iter().map(|f| serde_json::json!({"rfilename": f})).collect::<Vec<_>>(),
                }),
            ),
            "tree" => {
                let under = parts.get(4).map(|p| percent_decode(p)).unwrap_or_default();
                let recursive = req
                    .query
                    .split('&')
                    .any(|kv| kv.eq_ignore_ascii_case("recursive=true"));
                let mut entries = Vec::new();
                let mut dirs = std::collections::BTreeSet::new();
                for f in &files {
                    let rel = if under.is_empty() {
                        f.as_str()
                    } else if let Some(r) = f.strip_prefix(&format!("{under}/")) {
                        r
                    } else {
                        continue;
                    };
                    let depth = rel.matches('/').count();
                    // Folders on the way.
                    let mut at = String::new();
                    for (i, c) in rel.split('/').enumerate().take(depth) {
                        if !at.is_empty() {
                            at.push('/');
                        }
                        at.push_str(c);
                        if recursive || i == 0 {
                            let full = if under.is_empty() {
                                at.clone()
                            } else {
                                format!("{under}/{at}")
                            };
                            dirs.insert(full);
                        }
                    }
                    if !recursive && depth > 0 {
                        continue;
                    }
                    let Some(m) = self.meta(&repo, &commit, f) else {
                        continue;
                    };
                    let mut e = serde_json::json!({"type": "file", "oid": m.oid, "size": if m.lfs { 134 } else { m.size }, "path": f});
                    if m.lfs {
                        e["lfs"] = serde_json::json!({"oid": m.sha256, "size": m.size, "pointerSize": 134});
                    }
                    entries.push(e);
                }
                for d in dirs {
                    entries.push(serde_json::json!({"type": "directory", "oid": "0".repeat(40), "size": 0, "path": d}));
                }
                let cursor: usize = req
                    .query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("cursor="))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let page: Vec<_> = entries
                    .iter()
                    .skip(cursor)
                    .take(self.page_size)
                    .cloned()
                    .collect();
                let mut resp = Resp::json(200, serde_json::Value::Array(page));
                if cursor + self.page_size < entries.len() {
                    let host = req.header("host").unwrap_or("localhost");
                    let q: Vec<&str> = req
                        .query
                        .split('&')
                        .filter(|kv| !kv.is_empty() && !kv.starts_with("cursor="))
                        .collect();
                    resp.headers.push((
                        "Link".into(),
                        format!(
                            "<http://{host}{}?{}{}cursor={}>; rel=\"next\"",
                            encode(&req.path),
                            q.join("&"),
                            if q.is_empty() { "" } else { "&" },
                            cursor + self.page_size
                        ),
                    ));
                }
                resp
            }
            _ => Resp::error(404, "no such endpoint"),
        }
    }

    fn resolve(&self, req: &Req, org: &str, name: &str, rev: &str, rel: &str) -> Resp {
        let Some(repo) = self.repo_dir(org, name) else {
            return Resp::error(401, "Repository not found");
        };
        if !self.authorised(req, &repo) {
            return Resp::error(401, "Invalid credentials");
        }
        let Some(commit) = self.commit_of(&repo, rev) else {
            return Resp::error(404, &format!("Revision Not Found: {rev}"));
        };
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return Resp::error(404, "Entry not found");
        }
        let Some(m) = self.meta(&repo, &commit, rel) else {
            let mut r = Resp::error(404, "Entry not found");
            r.headers.push(("X-Repo-Commit".into(), commit));
            r.headers
                .push(("X-Error-Code".into(), "EntryNotFound".into()));
            return r;
        };
        let mut headers = vec![
            ("X-Repo-Commit".to_string(), commit.clone()),
            ("Accept-Ranges".to_string(), "bytes".to_string()),
        ];
        if m.lfs {
            let sig: u64 = rand_u64();
            headers.push(("ETag".into(), format!("\"{}\"", m.oid)));
            headers.push(("X-Linked-Etag".into(), format!("\"{}\"", m.sha256)));
            headers.push(("X-Linked-Size".into(), m.size.to_string()));
            headers.push((
                "Location".into(),
                format!(
                    "http://{}/cdn/{org}/{name}/{commit}/{}?X-Amz-Expires=3600&X-Amz-Signature={sig:016x}",
                    self.cdn,
                    encode(rel)
                ),
            ));
            return Resp {
                status: 302,
                headers,
                body: Body::Bytes(Vec::new()),
            };
        }
        headers.push(("ETag".into(), format!("\"{}\"", m.oid)));
        let p = repo.join("commits").join(&commit).join(rel);
        ranged(req, headers, p, m.size, false)
    }

    fn cdn(&self, req: &Req, rest: &str) -> Resp {
        self.stats.cdn_requests.fetch_add(1, Ordering::Relaxed);
        if req.header("authorization").is_some() {
            self.stats.cdn_auth_seen.fetch_add(1, Ordering::Relaxed);
        }
        if !req.query.contains("X-Amz-Signature=") {
            return Resp::error(403, "missing signature");
        }
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        if parts.len() != 4 {
            return Resp::error(404, "no such object");
        }
        let Some(repo) = self.repo_dir(parts[0], parts[1]) else {
            return Resp::error(404, "no such object");
        };
        let rel = percent_decode(parts[3]);
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return Resp::error(404, "no such object");
        }
        let p = repo.join("commits").join(parts[2]).join(&rel);
        let Ok(md) = std::fs::metadata(&p) else {
            return Resp::error(404, "no such object");
        };
        ranged(
            req,
            vec![("Accept-Ranges".into(), "bytes".into())],
            p,
            md.len(),
            true,
        )
    }
}

fn ranged(req: &Req, mut headers: Vec<(String, String)>, p: PathBuf, size: u64, lfs: bool) -> Resp {
    let range = req
        .header("range")
        .and_then(|v| crate::fault::parse_range(v, size));
    match range {
        Some((s, e)) => {
            headers.push(("Content-Range".into(), format!("bytes {s}-{e}/{size}")));
            Resp {
                status: 206,
                headers,
                body: Body::File {
                    path: p,
                    start: s,
                    len: e - s + 1,
                    lfs,
                },
            }
        }
        None if req.header("range").is_some() && size > 0 => {
            headers.push(("Content-Range".into(), format!("bytes */{size}")));
            Resp {
                status: 416,
                headers,
                body: Body::Bytes(Vec::new()),
            }
        }
        None => Resp {
            status: 200,
            headers,
            body: Body::File {
                path: p,
                start: 0,
                len: size,
                lfs,
            },
        },
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

fn read_request(r: &mut impl BufRead) -> Option<Req> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut it = line.split_whitespace();
    let method = it.next()?.to_string();
    let target = it.next()?.to_string();
    let mut headers = Vec::new();
    let mut total = line.len();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        total += h.len();
        if total > 64 * 1024 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    // Request bodies are not expected; drain a declared one.
    let body_len: u64 = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if body_len > 0 {
        std::io::copy(&mut r.take(body_len), &mut std::io::sink()).ok()?;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Some(Req {
        method,
        path,
        query,
        headers,
    })
}

/// The hub binary (`starling-hub`), started and killed by PID.
pub struct HubProc {
    child: std::process::Child,
    pub addr: String,
}

impl HubProc {
    /// Serves `root` on `host:port` (in the lab namespace `ns`, if any), and its storage
    /// backend on another port (another origin, as the Hub's CDN is); `page_size` tree entries
    /// per page.
    pub fn start(
        bin: &Path,
        root: &Path,
        ns: Option<&str>,
        host: &str,
        page_size: usize,
    ) -> HubProc {
        Self::start_paced(bin, root, ns, host, page_size, 0)
    }

    /// As [`HubProc::start`], with the storage backend sending at most `rate` bytes per second
    /// per response.
    pub fn start_paced(
        bin: &Path,
        root: &Path,
        ns: Option<&str>,
        host: &str,
        page_size: usize,
        rate: u64,
    ) -> HubProc {
        let port = crate::free_port();
        let cdn_port = crate::free_port();
        let addr = format!("{host}:{port}");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => std::process::Command::new(bin),
        };
        cmd.arg("--root")
            .arg(root)
            .arg("--listen")
            .arg(&addr)
            .arg("--cdn")
            .arg(format!("{host}:{cdn_port}"))
            .arg("--page-size")
            .arg(page_size.to_string())
            .arg("--rate")
            .arg(rate.to_string())
            .stdout(std::process::Stdio::null());
        let child = cmd.spawn().expect("start starling-hub");
        crate::wait_for_addr(host, port, "starling-hub");
        crate::wait_for_addr(host, cdn_port, "starling-hub's storage backend");
        HubProc { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `/_hub/stats` as JSON.
    pub fn stats(&self) -> serde_json::Value {
        let (host, port) = self.addr.rsplit_once(':').expect("host:port");
        let mut s =
            TcpStream::connect((host, port.parse::<u16>().expect("port"))).expect("connect to hub");
        let _ = write!(
            s,
            "GET /_hub/stats HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("{}");
        serde_json::from_str(body).unwrap_or_default()
    }

    pub fn stat(&self, key: &str) -> u64 {
        self.stats()[key].as_u64().unwrap_or(0)
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        crate::kill_pid(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Builds a repository under a hub root.
pub struct RepoBuilder {
    pub dir: PathBuf,
}

impl RepoBuilder {
    pub fn new(root: &Path, repo: &str) -> RepoBuilder {
        let dir = root.join(repo);
        std::fs::create_dir_all(dir.join("commits")).expect("repo dir");
        std::fs::create_dir_all(dir.join("refs")).expect("refs dir");
        RepoBuilder { dir }
    }

    /// A commit holding `files` (path, bytes); returns its ID.
    pub fn commit(&self, files: &[(&str, Vec<u8>)]) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        for (p, b) in files {
            ctx.update(p.as_bytes());
            ctx.update(&(b.len() as u64).to_le_bytes());
            ctx.update(&b[..b.len().min(4096)]);
        }
        ctx.update(&rand_u64().to_le_bytes());
        let id = hex(ctx.finish().as_ref());
        for (p, b) in files {
            let at = self.dir.join("commits").join(&id).join(p);
            std::fs::create_dir_all(at.parent().expect("parent")).expect("mkdir");
            std::fs::write(at, b).expect("write file");
        }
        id
    }

    /// A commit whose files are written by `write(path_of_file)` (for large files).
    pub fn commit_with(&self, paths: &[&str], mut write: impl FnMut(&str, &Path)) -> String {
        let id = format!(
            "{:016x}{:016x}{:08x}",
            rand_u64(),
            rand_u64() ^ 0x5a5a,
            paths.len()
        );
        for p in paths {
            let at = self.dir.join("commits").join(&id).join(p);
            std::fs::create_dir_all(at.parent().expect("parent")).expect("mkdir");
            write(p, &at);
        }
        id
    }

    pub fn set_ref(&self, name: &str, commit: &str) {
        std::fs::write(self.dir.join("refs").join(name), commit).expect("write ref");
    }

    pub fn remove_commit(&self, commit: &str) {
        std::fs::remove_dir_all(self.dir.join("commits").join(commit)).expect("remove commit");
    }

    pub fn set_token(&self, token: &str) {
        std::fs::write(self.dir.join("token"), token).expect("write token");
    }

    /// The Hub claims `sha256` for `path` while serving its real bytes.
    pub fn lie(&self, path: &str, sha256: &str) {
        std::fs::write(
            self.dir.join("lies.json"),
            serde_json::json!({ path: sha256 }).to_string(),
        )
        .expect("write lies");
    }
}

/// Bytes laid out like a safetensors file: an 8-byte little-endian header length, a JSON
/// header naming one F32 tensor, and `len` bytes in all.
pub fn safetensors_like(len: usize, seed: u64) -> Vec<u8> {
    let data_len = len.saturating_sub(8 + 128) / 4 * 4;
    let mut header = format!(
        "{{\"weight\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[0,{}]}}}}",
        data_len / 4,
        data_len
    );
    while header.len() < len - 8 - data_len {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&crate::random_bytes(data_len, seed));
    out.truncate(len);
    out
}
