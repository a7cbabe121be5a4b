//! The Hugging Face mirror: with `HF_ENDPOINT=http://<proxy.listen>`, `huggingface_hub`,
//! transformers and vLLM download through the swarm with no change to the user's code.
//!
//! Origin-form requests outside `/v2/` come here when `hf.mirror` is on, and go to
//! `hf.endpoint`:
//! - `HEAD` / `GET` of `/[datasets/|spaces/]ORG/REPO/resolve/REV/PATH` is asked of the Hub with
//!   the client's own credentials, redirects not followed. When the Hub answers as it does for
//!   an LFS file (a redirect to storage with `X-Linked-Etag` = the SHA-256, `X-Linked-Size` and
//!   `X-Repo-Commit`), the mirror answers itself: `HEAD` gets 200 with those headers and no
//!   `Location` (so the client's `GET` comes back here, not to the storage backend, and no
//!   Xet headers, so it uses plain HTTP); `GET` is served peer to peer as the task named by
//!   that SHA-256, fetched from `resolve` at the commit, so the last byte leaves only once
//!   the whole file has checked against it ([`super::blob::serve_task`]).
//! - Everything else (the API, small files, errors, a renamed repository's relative redirect)
//!   passes through unchanged.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{blob, empty, error_response, pass, Body, Proxy};
use crate::core::Digest;

/// What the Hub said about an LFS file.
#[derive(Debug, PartialEq, Eq)]
struct Lfs {
    sha256: Digest,
    size: u64,
    commit: String,
}

/// `(prefix "datasets/"|"spaces/"|"", "ORG/REPO", encoded path)` of a resolve path.
fn resolve_parts(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (prefix, rest) = if let Some(r) = rest.strip_prefix("datasets/") {
        ("datasets/", r)
    } else if let Some(r) = rest.strip_prefix("spaces/") {
        ("spaces/", r)
    } else {
        ("", rest)
    };
    let mut it = rest.splitn(5, '/');
    let (org, name, kind, _rev, file) =
        (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    if kind != "resolve" || org.is_empty() || name.is_empty() || file.is_empty() {
        return None;
    }
    let repo = &rest[..org.len() + 1 + name.len()];
    Some((prefix, repo, file))
}

fn unquote(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    Some(s.trim_matches('"'))
}

/// The LFS facts in a Hub's `resolve` answer, if it is an LFS redirect.
fn lfs_of(status: StatusCode, h: &HeaderMap) -> Option<Lfs> {
    if !status.is_redirection() {
        return None;
    }
    let location = h.get(header::LOCATION)?.to_str().ok()?;
    if !(location.starts_with("http://") || location.starts_with("https://")) {
        return None; // a relative redirect: the repository was renamed
    }
    let sha256 = Digest::from_hex(unquote(h.get("x-linked-etag")?)?)?;
    let size = h.get("x-linked-size")?.to_str().ok()?.trim().parse().ok()?;
    let commit = h.get("x-repo-commit")?.to_str().ok()?.trim().to_string();
    if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(Lfs {
        sha256,
        size,
        commit,
    })
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

pub async fn handle(p: &Arc<Proxy>, req: Request<Incoming>) -> Response<Body> {
    let endpoint = p.hf.endpoint.trim_end_matches('/').to_string();
    let path_q = req
        .uri()
        .path_and_query()
        .map(|x| x.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let url = format!("{endpoint}{path_q}");
    let parts = resolve_parts(req.uri().path());
    let Some((prefix, repo, file)) =
        parts.filter(|_| matches!(*req.method(), Method::GET | Method::HEAD))
    else {
        p.metrics.proxy_request("pass");
        return pass::forward(p, req, &url).await;
    };
    let mut creds = HeaderMap::new();
    if let Some(a) = req.headers().get(header::AUTHORIZATION) {
        creds.insert(header::AUTHORIZATION, a.clone());
    }
    let asked = p
        .upstream
        .head(&url)
        .headers(creds.clone())
        .header(header::ACCEPT_ENCODING, "identity")
        .send()
        .await;
    let lfs = match asked {
        Ok(r) => lfs_of(r.status(), r.headers()),
        Err(e) => {
            tracing::warn!(%url, error = %e, "Hub unreachable");
            return error_response(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("upstream {url}: {e}"),
            );
        }
    };
    let Some(lfs) = lfs else {
        p.metrics.proxy_request("pass");
        return pass::forward(p, req, &url).await;
    };
    let mut resp = if req.method() == Method::HEAD {
        p.metrics.proxy_request("pass");
        let mut r = Response::new(empty());
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, value(&lfs.size.to_string()));
        r
    } else {
        p.metrics.proxy_request("p2p");
        // Fetched from the commit, so a branch that moves cannot change the bytes under way.
        let pinned = format!("{endpoint}/{prefix}{repo}/resolve/{}/{file}", lfs.commit);
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        tracing::debug!(%url, task = %lfs.sha256, "Hub LFS file peer to peer");
        blob::serve_task(p, range.as_deref(), pinned, Some(lfs.sha256), creds).await
    };
    if resp.status().is_success() {
        let h = resp.headers_mut();
        h.insert("x-repo-commit", value(&lfs.commit));
        h.insert("x-linked-etag", value(&format!("\"{}\"", lfs.sha256.hex())));
        h.insert("x-linked-size", value(&lfs.size.to_string()));
        h.insert(header::ETAG, value(&format!("\"{}\"", lfs.sha256.hex())));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.remove("docker-content-digest");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_paths() {
        assert_eq!(
            resolve_parts("/org/m/resolve/main/a/b.safetensors"),
            Some(("", "org/m", "a/b.safetensors"))
        );
        assert_eq!(
            resolve_parts("/datasets/org/d/resolve/v1/x.parquet"),
            Some(("datasets/", "org/d", "x.parquet"))
        );
        assert_eq!(resolve_parts("/api/models/org/m"), None);
        assert_eq!(resolve_parts("/org/m/blob/main/x"), None);
        assert_eq!(resolve_parts("/org/m/resolve/main/"), None);
    }

    #[test]
    fn lfs_redirects() {
        let sha = "a".repeat(64);
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, value("https://cdn/x?sig=1"));
        h.insert("x-linked-etag", value(&format!("\"{sha}\"")));
        h.insert("x-linked-size", value("42"));
        h.insert("x-repo-commit", value(&"c".repeat(40)));
        let l = lfs_of(StatusCode::FOUND, &h).expect("an LFS redirect");
        assert_eq!(l.size, 42);
        assert_eq!(l.sha256.hex(), sha);
        assert_eq!(lfs_of(StatusCode::OK, &h), None);
        h.insert(header::LOCATION, value("/org/renamed/resolve/main/x"));
        assert_eq!(lfs_of(StatusCode::TEMPORARY_REDIRECT, &h), None);
        h.insert(header::LOCATION, value("https://cdn/x"));
        h.insert("x-linked-etag", value("\"0123abc\""));
        assert_eq!(
            lfs_of(StatusCode::FOUND, &h),
            None,
            "a git oid is not a digest"
        );
    }
}
