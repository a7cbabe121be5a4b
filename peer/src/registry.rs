//! An image reference turned into the blobs a pull needs, as `Request`s (for preheat): the
//! OCI distribution API's manifest fetch, the registry token dance, and the choice of one
//! platform from an index.
//!
//! - A reference is `[host[:port]/]repo[:tag|@sha256:...]` (Docker Hub's defaults:
//!   `registry-1.docker.io`, `library/`, `latest`), or a manifest URL
//!   `https://host/v2/<repo>/manifests/<ref>` (what Harbor and Dragonfly send).
//! - A registry answering 401 with `WWW-Authenticate: Bearer realm=...` is asked for a token
//!   (anonymously, or with the given user and password), as docker and containerd do; Basic
//!   challenges get the user and password directly.
//! - An index (OCI, or a Docker manifest list) is resolved to the manifest of the wanted
//!   platform; every manifest fetched by digest is checked against it.
//!
//! Each blob's `Request` names its digest, so its task is the one the mirror serves when a
//! runtime pulls the blob later, through any registry name.

use std::str::FromStr;

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use serde::Deserialize;

use crate::config::Config;
use crate::core::{Digest, Request};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0:?} is not an image reference (expected [host/]repo[:tag|@sha256:...]) or a manifest URL (https://host/v2/REPO/manifests/REF)")]
    BadReference(String),
    #[error("{url}: {detail}")]
    Http { url: String, detail: String },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("the manifest at {url} is not valid: {detail}")]
    BadManifest { url: String, detail: String },
    #[error("the manifest at {url} hashes to {got}, not {want}: refused")]
    DigestMismatch {
        url: String,
        want: Digest,
        got: Digest,
    },
    #[error("{image} has no manifest for {platform} (it has: {have})")]
    NoPlatform {
        image: String,
        platform: String,
        have: String,
    },
}

/// `host/repo` and a tag or digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry's host[:port] as the API is reached (`registry-1.docker.io` for Docker Hub).
    pub registry: String,
    pub repo: String,
    /// A tag, or `sha256:...`.
    pub reference: String,
    /// From a manifest URL: its scheme.
    pub scheme: Option<String>,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        write!(f, "{}/{}{sep}{}", self.registry, self.repo, self.reference)
    }
}

impl FromStr for ImageRef {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<ImageRef, RegistryError> {
        let bad = || RegistryError::BadReference(s.to_string());
        if let Some((scheme, rest)) = s.split_once("://") {
            let (host, path) = rest.split_once("/v2/").ok_or_else(bad)?;
            let (repo, reference) = path.rsplit_once("/manifests/").ok_or_else(bad)?;
            if host.is_empty() || repo.is_empty() || reference.is_empty() {
                return Err(bad());
            }
            return Ok(ImageRef {
                registry: host.to_string(),
                repo: repo.to_string(),
                reference: reference.to_string(),
                scheme: Some(scheme.to_string()),
            });
        }
        let (name, reference) = match s.split_once('@') {
            Some((n, d)) => (n, d.to_string()),
            None => match s.rsplit_once(':') {
                // A colon after the last slash is a tag; before it, a port.
                Some((n, t)) if !t.contains('/') => (n, t.to_string()),
                _ => (s, "latest".to_string()),
            },
        };
        if name.is_empty() || name.ends_with('/') || name.contains("//") {
            return Err(bad());
        }
        let first = name.split('/').next().unwrap_or_default();
        let has_host = name.contains('/')
            && (first.contains('.') || first.contains(':') || first == "localhost");
        let (registry, repo) = if has_host {
            let (h, r) = name.split_once('/').ok_or_else(bad)?;
            (h.to_string(), r.to_string())
        } else if name.contains('/') {
            ("registry-1.docker.io".to_string(), name.to_string())
        } else {
            (
                "registry-1.docker.io".to_string(),
                format!("library/{name}"),
            )
        };
        let registry = if registry == "docker.io" || registry == "index.docker.io" {
            "registry-1.docker.io".to_string()
        } else {
            registry
        };
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
        if repo.is_empty() || !repo.chars().all(valid) || reference.is_empty() {
            return Err(bad());
        }
        if reference.starts_with("sha256:") && reference.parse::<Digest>().is_err() {
            return Err(bad());
        }
        Ok(ImageRef {
            registry,
            repo,
            reference,
            scheme: None,
        })
    }
}

/// A blob of an image (its config or a layer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// What to fetch for one image: its blobs, and the requests that fetch them.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub image: ImageRef,
    /// The platform manifest's digest.
    pub manifest: Digest,
    pub blobs: Vec<Blob>,
    pub requests: Vec<Request>,
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// A registry client for one image's manifests, with the credentials to use.
pub struct Client {
    http: reqwest::Client,
    insecure: Vec<String>,
    user: Option<(String, String)>,
    /// Headers sent with every request (Harbor passes the registry's Authorization this way).
    headers: HeaderMap,
}

impl Client {
    /// A client with a user and password for the registry's token service or Basic auth, and
    /// `headers` for every request (a given Authorization is used as it is).
    pub fn new(
        cfg: &Config,
        user: Option<(String, String)>,
        headers: HeaderMap,
    ) -> Result<Client, RegistryError> {
        let client_err = |detail: String| RegistryError::Http {
            url: "(the registry client)".into(),
            detail,
        };
        let http = crate::source::client_builder(&cfg.source)
            .map_err(|e| client_err(e.to_string()))?
            .build()
            .map_err(|e| client_err(e.to_string()))?;
        Ok(Client {
            http,
            insecure: cfg.proxy.insecure_registries.clone(),
            user,
            headers,
        })
    }

    fn base(&self, r: &ImageRef) -> String {
        let scheme = r.scheme.clone().unwrap_or_else(|| {
            if self.insecure.iter().any(|h| h == &r.registry) {
                "http".into()
            } else {
                "https".into()
            }
        });
        format!("{scheme}://{}/v2/{}", r.registry, r.repo)
    }

    /// The blobs of `image` for `platform` (`os/arch[/variant]`), config first.
    pub async fn resolve(
        &self,
        image: &ImageRef,
        platform: &str,
    ) -> Result<Resolved, RegistryError> {
        let mut auth = None;
        let url = format!("{}/manifests/{}", self.base(image), image.reference);
        let (body, media) = self.manifest(&url, image, &mut auth).await?;
        if let Ok(want) = image.reference.parse::<Digest>() {
            check_digest(&url, want, &body)?;
        }
        let m = parse(&url, &body)?;
        let (url, body, digest) = match m.manifests {
            Some(list) => {
                let (want_os, want_arch, want_variant) = split_platform(platform);
                let pick = list.iter().find(|d| {
                    d.platform.as_ref().is_some_and(|p| {
                        p.os == want_os
                            && p.architecture == want_arch
                            && want_variant.is_none_or(|v| p.variant.as_deref() == Some(v))
                    })
                });
                let Some(d) = pick else {
                    let have: Vec<String> = list
                        .iter()
                        .filter_map(|d| d.platform.as_ref())
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                        .collect();
                    return Err(RegistryError::NoPlatform {
                        image: image.to_string(),
                        platform: platform.to_string(),
                        have: have.join(", "),
                    });
                };
                let url = format!("{}/manifests/{}", self.base(image), d.digest);
                let want = d
                    .digest
                    .parse::<Digest>()
                    .map_err(|e| RegistryError::BadManifest {
                        url: url.clone(),
                        detail: e.to_string(),
                    })?;
                let (body, _) = self.manifest(&url, image, &mut auth).await?;
                check_digest(&url, want, &body)?;
                (url, body, want)
            }
            None => {
                let _ = media;
                let d = Digest::of(&body);
                (url, body, d)
            }
        };
        let m = parse(&url, &body)?;
        let bad = |detail: &str| RegistryError::BadManifest {
            url: url.clone(),
            detail: detail.to_string(),
        };
        let config = m.config.ok_or_else(|| bad("no config"))?;
        let mut blobs = Vec::new();
        for d in std::iter::once(config).chain(m.layers.unwrap_or_default()) {
            let digest = d
                .digest
                .parse::<Digest>()
                .map_err(|e| bad(&e.to_string()))?;
            if !blobs.iter().any(|b: &Blob| b.digest == digest) {
                blobs.push(Blob {
                    digest,
                    size: d.size,
                    media_type: d.media_type,
                });
            }
        }
        let mut headers = self.headers.clone();
        if let Some(a) = &auth {
            headers.insert(AUTHORIZATION, a.clone());
        }
        let requests = blobs
            .iter()
            .map(|b| Request {
                url: format!("{}/blobs/{}", self.base(image), b.digest),
                digest: Some(b.digest),
                headers: headers.clone(),
                piece_length: None,
            })
            .collect();
        Ok(Resolved {
            image: image.clone(),
            manifest: digest,
            blobs,
            requests,
        })
    }

    /// GETs a manifest, answering an auth challenge once.
    async fn manifest(
        &self,
        url: &str,
        image: &ImageRef,
        auth: &mut Option<HeaderValue>,
    ) -> Result<(Vec<u8>, String), RegistryError> {
        let http_err = |e: reqwest::Error| RegistryError::Http {
            url: url.to_string(),
            detail: e.to_string(),
        };
        for attempt in 0..2 {
            let mut req = self
                .http
                .get(url)
                .headers(self.headers.clone())
                .header(ACCEPT, MANIFEST_TYPES);
            if let Some(a) = auth.as_ref() {
                req = req.header(AUTHORIZATION, a.clone());
            }
            let resp = req.send().await.map_err(http_err)?;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                *auth = Some(self.authorise(url, &challenge, image).await?);
                continue;
            }
            let status = resp.status();
            let media = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = resp.bytes().await.map_err(http_err)?;
            if !status.is_success() {
                return Err(RegistryError::Status {
                    url: url.to_string(),
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
                });
            }
            if body.len() > 4 << 20 {
                return Err(RegistryError::BadManifest {
                    url: url.to_string(),
                    detail: format!("{} bytes; manifests are far smaller", body.len()),
                });
            }
            return Ok((body.to_vec(), media));
        }
        Err(RegistryError::Status {
            url: url.to_string(),
            status: 401,
            body: "refused the credentials".into(),
        })
    }

    /// The Authorization value for a 401's challenge: a bearer token from the realm, or Basic.
    async fn authorise(
        &self,
        url: &str,
        challenge: &str,
        image: &ImageRef,
    ) -> Result<HeaderValue, RegistryError> {
        let basic = self.user.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let value = |s: String| {
            HeaderValue::from_str(&s).map_err(|e| RegistryError::Http {
                url: url.to_string(),
                detail: e.to_string(),
            })
        };
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            return match basic {
                Some(b) if challenge.starts_with("Basic") => value(b),
                _ => Err(RegistryError::Status {
                    url: url.to_string(),
                    status: 401,
                    body: format!(
                        "needs credentials ({challenge}); give --username and --password-stdin"
                    ),
                }),
            };
        };
        let param = |k: &str| {
            params.split(',').find_map(|kv| {
                let (key, v) = kv.trim().split_once('=')?;
                (key == k).then(|| v.trim_matches('"').to_string())
            })
        };
        let realm = param("realm").ok_or_else(|| RegistryError::Http {
            url: url.to_string(),
            detail: format!("a Bearer challenge without a realm: {challenge}"),
        })?;
        let scope = param("scope").unwrap_or_else(|| format!("repository:{}:pull", image.repo));
        let mut req = self.http.get(&realm).query(&[("scope", scope.as_str())]);
        if let Some(service) = param("service") {
            req = req.query(&[("service", service.as_str())]);
        }
        if let Some(b) = basic {
            req = req.header(AUTHORIZATION, b);
        }
        let resp = req.send().await.map_err(|e| RegistryError::Http {
            url: realm.clone(),
            detail: e.to_string(),
        })?;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if !status.is_success() {
            return Err(RegistryError::Status {
                url: realm,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            });
        }
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| RegistryError::Http {
            url: realm.clone(),
            detail: format!("token answer: {e}"),
        })?;
        let token = t
            .token
            .or(t.access_token)
            .ok_or_else(|| RegistryError::Http {
                url: realm,
                detail: "the token answer has no token".into(),
            })?;
        value(format!("Bearer {token}"))
    }
}

fn parse(url: &str, body: &[u8]) -> Result<Manifest, RegistryError> {
    let m: Manifest = serde_json::from_slice(body).map_err(|e| RegistryError::BadManifest {
        url: url.to_string(),
        detail: e.to_string(),
    })?;
    let _ = &m.media_type;
    Ok(m)
}

fn check_digest(url: &str, want: Digest, body: &[u8]) -> Result<(), RegistryError> {
    let got = Digest::of(body);
    if got != want {
        return Err(RegistryError::DigestMismatch {
            url: url.to_string(),
            want,
            got,
        });
    }
    Ok(())
}

/// `linux/amd64/v3` → ("linux", "amd64", Some("v3")).
fn split_platform(p: &str) -> (&str, &str, Option<&str>) {
    let mut it = p.splitn(3, '/');
    (
        it.next().unwrap_or("linux"),
        it.next().unwrap_or("amd64"),
        it.next(),
    )
}

/// This machine's platform, as OCI names it.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        "riscv64" => "riscv64",
        other => other,
    };
    format!("linux/{arch}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ImageRef {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn references_are_read_as_docker_and_containerd_read_them() {
        let a = r("alpine");
        assert_eq!(
            (a.registry.as_str(), a.repo.as_str(), a.reference.as_str()),
            ("registry-1.docker.io", "library/alpine", "latest")
        );
        let b = r("docker.io/acme/app:1.2");
        assert_eq!(
            (b.registry.as_str(), b.repo.as_str(), b.reference.as_str()),
            ("registry-1.docker.io", "acme/app", "1.2")
        );
        let c = r("10.0.0.5:5000/test/app:v1");
        assert_eq!(
            (c.registry.as_str(), c.repo.as_str(), c.reference.as_str()),
            ("10.0.0.5:5000", "test/app", "v1")
        );
        let d = r("localhost:5000/app");
        assert_eq!(
            (d.registry.as_str(), d.reference.as_str()),
            ("localhost:5000", "latest")
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let e = r(&format!("ghcr.io/o/app@{digest}"));
        assert_eq!(e.reference, digest);
        assert_eq!(e.to_string(), format!("ghcr.io/o/app@{digest}"));
        let f = r("https://index.docker.io/v2/library/redis/manifests/7");
        assert_eq!(
            (
                f.registry.as_str(),
                f.repo.as_str(),
                f.reference.as_str(),
                f.scheme.as_deref()
            ),
            ("index.docker.io", "library/redis", "7", Some("https"))
        );
        for bad in [
            "",
            "UPPER/case",
            "app@sha256:short",
            "https://host/no-v2-path",
            "app:",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn platforms_split_into_os_arch_and_variant() {
        assert_eq!(
            split_platform("linux/arm64/v8"),
            ("linux", "arm64", Some("v8"))
        );
        assert_eq!(split_platform("linux/amd64"), ("linux", "amd64", None));
        assert!(host_platform().starts_with("linux/"));
    }
}
