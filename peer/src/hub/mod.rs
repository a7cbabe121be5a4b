//! Hugging Face Hub repositories as Starling tasks: `hf://ORG/REPO[@REVISION][/PATH]`.
//!
//! - [`HubRef`] parses the reference (models by default, `hf://datasets/...` for datasets).
//! - [`Hub::snapshot`] pins the revision to its commit (`/api/{kind}s/{repo}/revision/{rev}`)
//!   and lists the files at that commit (`/api/{kind}s/{repo}/tree/{commit}?recursive=true`,
//!   following `Link: rel="next"` pages). Every file is then fetched from the commit, never from
//!   the branch, so a branch that moves mid-download cannot mix two revisions.
//! - [`Hub::request`] turns a file into a [`Request`]: an LFS file's task is named by the SHA-256
//!   the Hub lists (so a file unchanged between revisions, or repositories, is one task
//!   cluster-wide) and checked against it end to end; a small file is a URL task, checked after
//!   download against its git blob ID ([`git_blob_id`]). The URL is the `resolve` URL; the origin
//!   client follows its redirect to the storage backend, and does not send the token there.
//! - [`cache`] writes the Hugging Face cache layout, which transformers and vLLM read offline.

pub mod cache;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use serde::Deserialize;

use crate::config::{HfConfig, SourceConfig};
use crate::core::{Digest, Request};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{0:?} is not a Hugging Face reference: write hf://ORG/REPO[@REVISION][/PATH], or hf://datasets/ORG/REPO...")]
    BadRef(String),
    #[error("{what}: the Hub answered {status}: {hint}")]
    Refused {
        what: String,
        status: u16,
        hint: &'static str,
    },
    #[error("{what}: {detail}")]
    Unreachable { what: String, detail: String },
    #[error("{what}: the Hub's answer is not what its API documents: {detail}")]
    BadAnswer { what: String, detail: String },
    #[error("{0} names no file in the repository at this revision")]
    NoSuchPath(String),
    #[error("hf.token_file {path}: {detail}")]
    Token { path: PathBuf, detail: String },
    #[error("cannot build the Hub client: {0}")]
    Client(String),
}

impl HubError {
    /// True when retrying cannot help (the reference, the repository or the token is wrong).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            HubError::BadRef(_) | HubError::Refused { .. } | HubError::NoSuchPath(_)
        )
    }
}

/// Repository kinds, as the Hub's URLs spell them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
    Space,
}

impl RepoKind {
    /// The API path segment: `models`, `datasets`, `spaces`.
    pub fn api(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
            RepoKind::Space => "spaces",
        }
    }

    /// The prefix of `resolve` URLs (`""` for models) and of cache folders.
    fn url_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
            RepoKind::Space => "spaces/",
        }
    }
}

/// `hf://[datasets/|spaces/]ORG/REPO[@REVISION][/PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubRef {
    pub kind: RepoKind,
    /// `ORG/REPO`.
    pub repo: String,
    /// A branch, tag or commit; `main` when not given. Percent-decoded (`refs%2Fpr%2F1`).
    pub revision: String,
    /// A file, or a folder (every file under it); None for the whole repository.
    pub path: Option<String>,
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl std::str::FromStr for HubRef {
    type Err = HubError;

    fn from_str(s: &str) -> Result<HubRef, HubError> {
        let bad = || HubError::BadRef(s.to_string());
        let rest = s.strip_prefix("hf://").ok_or_else(bad)?;
        let (kind, rest) = if let Some(r) = rest.strip_prefix("datasets/") {
            (RepoKind::Dataset, r)
        } else if let Some(r) = rest.strip_prefix("spaces/") {
            (RepoKind::Space, r)
        } else {
            (RepoKind::Model, rest)
        };
        let mut parts = rest.splitn(3, '/');
        let org = parts.next().ok_or_else(bad)?;
        let name_rev = parts.next().ok_or_else(bad)?;
        let path = parts.next();
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) => {
                let r = url::form_urlencoded::parse(format!("r={r}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .ok_or_else(bad)?;
                if r.is_empty() || r.contains("..") || r.chars().any(|c| c.is_control()) {
                    return Err(bad());
                }
                (n, r)
            }
            None => (name_rev, "main".to_string()),
        };
        if !name_ok(org) || !name_ok(name) {
            return Err(bad());
        }
        let path = match path.map(|p| p.trim_end_matches('/')) {
            None | Some("") => None,
            Some(p) => {
                if p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
                    || p.starts_with('/')
                    || p.contains('\\')
                    || p.chars().any(|c| c.is_control())
                {
                    return Err(bad());
                }
                Some(p.to_string())
            }
        };
        Ok(HubRef {
            kind,
            repo: format!("{org}/{name}"),
            revision,
            path,
        })
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hf://{}{}", self.kind.url_prefix(), self.repo)?;
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        if let Some(p) = &self.path {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

/// One file of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubFile {
    /// Path inside the repository.
    pub path: String,
    pub size: u64,
    /// The git blob ID (of the LFS pointer, for an LFS file).
    pub blob_id: String,
    /// The content's SHA-256, for LFS files.
    pub sha256: Option<Digest>,
}

impl HubFile {
    /// The name the Hugging Face cache gives the file's blob (its ETag): the SHA-256 for LFS
    /// files, else the git blob ID.
    pub fn etag(&self) -> String {
        match &self.sha256 {
            Some(d) => d.hex(),
            None => self.blob_id.clone(),
        }
    }
}

/// A revision pinned to its commit, and the files asked for.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub commit: String,
    pub files: Vec<HubFile>,
}

impl Snapshot {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    oid: String,
    #[serde(default)]
    lfs: Option<TreeLfs>,
}

#[derive(Deserialize)]
struct TreeLfs {
    oid: String,
    size: u64,
}

/// A Hub client: the endpoint, the token, and an HTTP client (redirects followed; the token is
/// not sent across hosts).
pub struct Hub {
    client: reqwest::Client,
    endpoint: String,
    token: Option<String>,
}

/// The access token: `HF_TOKEN`, else `hf.token_file`, else `$HF_HOME/token` (or
/// `~/.cache/huggingface/token`) when it exists.
pub fn token(cfg: &HfConfig) -> Result<Option<String>, HubError> {
    if let Some(t) = std::env::var("HF_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
    {
        return Ok(Some(t));
    }
    let (path, required) = match &cfg.token_file {
        Some(p) => (p.clone(), true),
        None => (hf_home().join("token"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        Ok(_) if required => Err(HubError::Token {
            path,
            detail: "is empty; put the token (hf_...) in it".into(),
        }),
        Ok(_) => Ok(None),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HubError::Token {
            path,
            detail: e.to_string(),
        }),
    }
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    let env = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(h) = env("HF_HOME") {
        return h;
    }
    if let Some(x) = env("XDG_CACHE_HOME") {
        return x.join("huggingface");
    }
    env("HOME")
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/huggingface")
}

/// A path segment or path for a URL: each component percent-encoded.
fn encode_path(p: &str) -> String {
    p.split('/')
        .map(|c| url::form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>())
        .map(|c| c.replace('+', "%20"))
        .collect::<Vec<_>>()
        .join("/")
}

fn encode_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// The `next` target of a `Link` header.
fn next_link(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::LINK)?.to_str().ok()?;
    v.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim().trim_start_matches("rel=").trim_matches('"') == "next")
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

impl Hub {
    pub fn new(cfg: &HfConfig, source: &SourceConfig) -> Result<Hub, HubError> {
        let client = crate::source::client_builder(source)
            .map_err(|e| HubError::Client(e.to_string()))?
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| HubError::Client(e.to_string()))?;
        Ok(Hub {
            client,
            endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
            token: token(cfg)?,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Headers for the Hub: the token, when there is one.
    pub fn auth_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = self
            .token
            .as_deref()
            .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok())
        {
            let mut v = v;
            v.set_sensitive(true);
            h.insert(header::AUTHORIZATION, v);
        }
        h
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        what: &str,
    ) -> Result<(T, HeaderMap), HubError> {
        let resp = self
            .client
            .get(url)
            .headers(self.auth_headers())
            .send()
            .await
            .map_err(|e| HubError::Unreachable {
                what: what.to_string(),
                detail: format!("{url}: {e}"),
            })?;
        let status = resp.status();
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => "the repository does not exist, or is private or gated: check the name, and set HF_TOKEN (or hf.token_file) to a token that may read it",
                404 => "no such repository or revision: check the name and the @revision",
                429 => "rate-limited by the Hub: wait, or use a token",
                _ => "the Hub failed; retry later",
            };
            return Err(HubError::Refused {
                what: what.to_string(),
                status: status.as_u16(),
                hint,
            });
        }
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| HubError::Unreachable {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
        let v = serde_json::from_slice(&body).map_err(|e| HubError::BadAnswer {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
        Ok((v, headers))
    }

    /// The commit `r.revision` points at now.
    pub async fn commit_of(&self, r: &HubRef) -> Result<String, HubError> {
        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.endpoint,
            r.kind.api(),
            r.repo,
            encode_segment(&r.revision)
        );
        let what = format!("{} revision {}", r.repo, r.revision);
        let (info, _): (RevisionInfo, _) = self.get_json(&url, &what).await?;
        if info.sha.len() != 40 || !info.sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HubError::BadAnswer {
                what,
                detail: format!("commit {:?} is not a 40-digit hex ID", info.sha),
            });
        }
        Ok(info.sha)
    }

    /// Pins the revision and lists the files `r` names (all, one, or those under a folder),
    /// sorted by path, so every node fetches them in the same order.
    pub async fn snapshot(&self, r: &HubRef) -> Result<Snapshot, HubError> {
        let commit = self.commit_of(r).await?;
        let mut url = format!(
            "{}/api/{}/{}/tree/{}?recursive=true",
            self.endpoint,
            r.kind.api(),
            r.repo,
            commit
        );
        let what = format!("{} file list at {commit}", r.repo);
        let mut files = Vec::new();
        for _page in 0..10_000 {
            let (entries, headers): (Vec<TreeEntry>, _) = self.get_json(&url, &what).await?;
            for e in entries.into_iter().filter(|e| e.kind == "file") {
                files.push(file_of(e, &what)?);
            }
            match next_link(&headers) {
                Some(next) => url = next,
                None => break,
            }
        }
        if let Some(p) = &r.path {
            let dir = format!("{p}/");
            files.retain(|f| f.path == *p || f.path.starts_with(&dir));
            if files.is_empty() {
                return Err(HubError::NoSuchPath(r.to_string()));
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Snapshot { commit, files })
    }

    /// The URL a file is fetched from: `resolve` at the pinned commit.
    pub fn resolve_url(&self, r: &HubRef, commit: &str, path: &str) -> String {
        resolve_url(&self.endpoint, r, commit, path)
    }

    /// The download request for one file: by SHA-256 for LFS files, by URL otherwise.
    pub fn request(&self, r: &HubRef, commit: &str, f: &HubFile) -> Request {
        Request {
            url: self.resolve_url(r, commit, &f.path),
            digest: f.sha256,
            headers: self.auth_headers(),
            piece_length: None,
        }
    }
}

/// `{endpoint}/[datasets/]{repo}/resolve/{revision}/{path}`.
pub fn resolve_url(endpoint: &str, r: &HubRef, revision: &str, path: &str) -> String {
    format!(
        "{}/{}{}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        r.kind.url_prefix(),
        r.repo,
        encode_segment(revision),
        encode_path(path)
    )
}

fn file_of(e: TreeEntry, what: &str) -> Result<HubFile, HubError> {
    let bad = |detail: String| HubError::BadAnswer {
        what: what.to_string(),
        detail,
    };
    if e.path.is_empty()
        || e.path.starts_with('/')
        || e.path.contains('\\')
        || e.path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad(format!("file path {:?} is unsafe", e.path)));
    }
    let sha256 = match &e.lfs {
        Some(l) => Some(
            Digest::from_hex(&l.oid)
                .ok_or_else(|| bad(format!("LFS oid {:?} of {} is not SHA-256", l.oid, e.path)))?,
        ),
        None => None,
    };
    let size = e.lfs.as_ref().map_or(e.size, |l| l.size);
    if sha256.is_none() && (e.oid.len() != 40 || !e.oid.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(bad(format!(
            "blob ID {:?} of {} is not a git ID",
            e.oid, e.path
        )));
    }
    Ok(HubFile {
        path: e.path,
        size,
        blob_id: e.oid.to_ascii_lowercase(),
        sha256,
    })
}

/// The git blob ID of a file: SHA-1 over `blob <len>\0` and the content.
pub fn git_blob_id(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(format!("blob {len}\0").as_bytes());
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_parse() {
        let r: HubRef = "hf://org/model".parse().unwrap();
        assert_eq!(r.kind, RepoKind::Model);
        assert_eq!(r.repo, "org/model");
        assert_eq!(r.revision, "main");
        assert_eq!(r.path, None);
        let r: HubRef = "hf://datasets/org/d@v1.0/data/train".parse().unwrap();
        assert_eq!(r.kind, RepoKind::Dataset);
        assert_eq!(r.revision, "v1.0");
        assert_eq!(r.path.as_deref(), Some("data/train"));
        let r: HubRef = "hf://org/m@refs%2Fpr%2F3/a.json".parse().unwrap();
        assert_eq!(r.revision, "refs/pr/3");
        assert_eq!(r.to_string(), "hf://org/m@refs/pr/3/a.json");
        for bad in [
            "hf://org",
            "hf://org/",
            "http://org/m",
            "hf://org/m/../x",
            "hf://o rg/m",
            "hf://org/m@",
            "hf://org/m@..",
            "hf://org/m//x",
        ] {
            assert!(bad.parse::<HubRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_encoded() {
        let r: HubRef = "hf://datasets/org/d".parse().unwrap();
        assert_eq!(
            resolve_url("http://h/", &r, "refs/pr/1", "a b/c#d.txt"),
            "http://h/datasets/org/d/resolve/refs%2Fpr%2F1/a%20b/c%23d.txt"
        );
    }

    #[test]
    fn link_next() {
        let mut h = HeaderMap::new();
        h.insert(
            header::LINK,
            HeaderValue::from_static("<https://h/api/x?cursor=2>; rel=\"next\""),
        );
        assert_eq!(next_link(&h).as_deref(), Some("https://h/api/x?cursor=2"));
    }

    #[test]
    fn tree_entries_are_checked() {
        let e = |path: &str, oid: &str| TreeEntry {
            kind: "file".into(),
            path: path.into(),
            size: 3,
            oid: oid.into(),
            lfs: None,
        };
        let oid = "a".repeat(40);
        assert!(file_of(e("ok/x.json", &oid), "w").is_ok());
        assert!(file_of(e("../x", &oid), "w").is_err());
        assert!(file_of(e("/etc/x", &oid), "w").is_err());
        assert!(file_of(e("x", "zz"), "w").is_err());
    }

    #[test]
    fn blob_ids_match_git() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            git_blob_id(&p).unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }
}
