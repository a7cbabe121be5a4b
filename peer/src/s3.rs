//! S3 and S3-compatible object stores as Starling tasks: `s3://BUCKET/KEY`, or every object
//! under `s3://BUCKET/PREFIX/`.
//!
//! - Requests to the store are signed with SigV4 (`aws-sigv4`): listings (`ListObjectsV2`,
//!   followed through continuation tokens) and `HeadObject` with `x-amz-checksum-mode: ENABLED`
//!   in the headers.
//! - An object whose store vouches for a whole-object SHA-256 (`x-amz-checksum-sha256`, not a
//!   multipart composite) becomes a task named by that digest and checked against it end to end.
//!   Any other object is a URL task, named by its normalised URL.
//! - The bytes are fetched by the ordinary origin pipeline from a presigned `GET` URL
//!   (`s3.presign_seconds`), so ranged requests, retries and seeds work unchanged, and the
//!   signature's query parameters are among `source.filtered_query_params`: every node's URL
//!   names the same task.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest,
    SignatureLocation, SigningSettings, UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use base64::Engine as _;
use serde::Deserialize;

use crate::config::{S3Config, SourceConfig};
use crate::core::{Digest, Request};

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{0:?} is not an S3 reference: write s3://BUCKET/KEY, or s3://BUCKET/PREFIX/ for every object under a prefix")]
    BadRef(String),
    #[error("{what}: the store answered {status}{code}: {hint}")]
    Refused {
        what: String,
        status: u16,
        code: String,
        hint: &'static str,
    },
    #[error("{what}: {detail}")]
    Unreachable { what: String, detail: String },
    #[error("{what}: the store's answer is not S3's: {detail}")]
    BadAnswer { what: String, detail: String },
    #[error("{0} holds no object")]
    Empty(String),
    #[error("AWS credentials: {0}")]
    Credentials(String),
    #[error("cannot sign the request for {url}: {detail}")]
    Sign { url: String, detail: String },
}

impl S3Error {
    /// True when retrying cannot help.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            S3Error::BadRef(_) | S3Error::Refused { .. } | S3Error::Empty(_)
        )
    }
}

/// `s3://BUCKET/KEY` (one object) or `s3://BUCKET/PREFIX/` / `s3://BUCKET` (a prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Ref {
    pub bucket: String,
    pub key: String,
}

impl S3Ref {
    /// True when the reference names every object under a prefix.
    pub fn is_prefix(&self) -> bool {
        self.key.is_empty() || self.key.ends_with('/')
    }
}

impl std::str::FromStr for S3Ref {
    type Err = S3Error;

    fn from_str(s: &str) -> Result<S3Ref, S3Error> {
        let bad = || S3Error::BadRef(s.to_string());
        let rest = s.strip_prefix("s3://").ok_or_else(bad)?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok || key.len() > 1024 || key.chars().any(|c| c.is_control()) {
            return Err(bad());
        }
        Ok(S3Ref {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }
}

impl std::fmt::Display for S3Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// One object: its key, size, and the SHA-256 the store vouches for, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub size: u64,
    pub sha256: Option<Digest>,
}

#[derive(Deserialize)]
struct ListBucketResult {
    #[serde(rename = "Contents", default)]
    contents: Vec<Contents>,
    #[serde(rename = "IsTruncated", default)]
    is_truncated: bool,
    #[serde(rename = "NextContinuationToken", default)]
    next_token: Option<String>,
}

#[derive(Deserialize)]
struct Contents {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Size")]
    size: u64,
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(rename = "Code", default)]
    code: String,
}

/// A client for one store: where it is, how to address buckets, and whose credentials sign.
pub struct S3 {
    client: reqwest::Client,
    endpoint: url::Url,
    region: String,
    path_style: bool,
    creds: Option<Credentials>,
    presign: Duration,
}

/// Percent-encodes a key for a URL path: all but RFC 3986's unreserved characters and `/`.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query component, encoded as SigV4's canonical form wants it.
fn encode_query(v: &str) -> String {
    encode_key(v).replace('/', "%2F")
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

/// `[section]` → key → value, from an AWS shared config or credentials file.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
    out
}

fn aws_dir() -> PathBuf {
    env("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".aws")
}

/// Credentials from the environment, else the shared credentials file; None for anonymous.
fn credentials() -> Result<Option<Credentials>, S3Error> {
    if let (Some(ak), Some(sk)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Some(Credentials::new(
            ak,
            sk,
            env("AWS_SESSION_TOKEN"),
            None,
            "environment",
        )));
    }
    let path = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| aws_dir().join("credentials"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(S3Error::Credentials(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let kv = ini_section(&text, &profile);
    let get = |k: &str| kv.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(ak), Some(sk)) => Ok(Some(Credentials::new(
            ak,
            sk,
            get("aws_session_token"),
            None,
            "shared-credentials-file",
        ))),
        _ if env("AWS_PROFILE").is_some() => Err(S3Error::Credentials(format!(
            "profile [{profile}] in {} has no aws_access_key_id and aws_secret_access_key",
            path.display()
        ))),
        _ => Ok(None),
    }
}

/// The region: the config, the environment, the profile's `region` in `~/.aws/config`, else
/// `us-east-1`.
fn region(cfg: &S3Config) -> String {
    if let Some(r) = cfg
        .region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
    {
        return r;
    }
    let path = env("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| aws_dir().join("config"));
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let section = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            ini_section(&t, &section)
                .into_iter()
                .find(|(k, _)| k == "region")
                .map(|(_, v)| v)
        })
        .unwrap_or_else(|| "us-east-1".into())
}

/// The whole-object SHA-256 in a `HeadObject` answer, if the store gives one.
fn checksum_of(h: &http::HeaderMap) -> Option<Digest> {
    let composite = h
        .get("x-amz-checksum-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.eq_ignore_ascii_case("COMPOSITE"));
    if composite {
        return None;
    }
    let v = h.get("x-amz-checksum-sha256")?.to_str().ok()?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .ok()?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    (raw.len() == 32).then(|| Digest::from_hex(&hex)).flatten()
}

impl S3 {
    pub fn new(cfg: &S3Config, source: &SourceConfig) -> Result<S3, S3Error> {
        let region = region(cfg);
        let custom = cfg
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"));
        let path_style = cfg.path_style.unwrap_or(custom.is_some());
        let endpoint = custom.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let endpoint = url::Url::parse(&endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| S3Error::BadRef(format!("endpoint {endpoint}")))?;
        let client = crate::source::client_builder(source)
            .map_err(|e| S3Error::Credentials(e.to_string()))?
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| S3Error::Credentials(format!("cannot build the HTTP client: {e}")))?;
        Ok(S3 {
            client,
            endpoint,
            region,
            path_style,
            creds: credentials()?,
            presign: Duration::from_secs(cfg.presign_seconds),
        })
    }

    /// The same client signing with these credentials (tests and tools).
    pub fn with_credentials(mut self, access_key: &str, secret_key: &str) -> S3 {
        self.creds = Some(Credentials::new(
            access_key, secret_key, None, None, "given",
        ));
        self
    }

    /// The object's (or bucket's, for an empty key) URL, without query.
    pub fn url(&self, bucket: &str, key: &str) -> String {
        let mut base = self.endpoint.clone();
        let path = base.path().trim_end_matches('/').to_string();
        if self.path_style {
            format!(
                "{}{path}/{bucket}/{}",
                base.origin().ascii_serialization(),
                encode_key(key)
            )
        } else {
            let host = format!("{bucket}.{}", base.host_str().unwrap_or_default());
            let _ = base.set_host(Some(&host));
            format!(
                "{}{path}/{}",
                base.origin().ascii_serialization(),
                encode_key(key)
            )
        }
    }

    /// Signs `method url` with `headers`: returns the headers to send (the given ones plus the
    /// signature's) and the URL (with the signature's query parameters when presigning).
    fn sign(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        location: SignatureLocation,
    ) -> Result<(Vec<(String, String)>, String), S3Error> {
        let mut out: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let Some(creds) = &self.creds else {
            return Ok((out, url.to_string()));
        };
        let err = |detail: String| S3Error::Sign {
            url: url.to_string(),
            detail,
        };
        let host = url::Url::parse(url)
            .ok()
            .and_then(|u| {
                u.host_str()
                    .map(|h| u.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
            })
            .ok_or_else(|| err("no host".into()))?;
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.signature_location = location;
        let body = if location == SignatureLocation::QueryParams {
            settings.expires_in = Some(self.presign);
            SignableBody::UnsignedPayload
        } else if method == "PUT" {
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
            SignableBody::UnsignedPayload
        } else {
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
            SignableBody::Bytes(&[])
        };
        let identity = creds.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| err(e.to_string()))?
            .into();
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        all.push(("host", &host));
        let req = SignableRequest::new(method, url, all.into_iter(), body)
            .map_err(|e| err(e.to_string()))?;
        let (instructions, _) = sign(req, &params)
            .map_err(|e| err(e.to_string()))?
            .into_parts();
        let (hs, qs) = instructions.into_parts();
        for h in hs {
            out.push((h.name().to_string(), h.value().to_string()));
        }
        let mut signed = url.to_string();
        for (i, (k, v)) in qs.iter().enumerate() {
            let sep = if i == 0 && !signed.contains('?') {
                '?'
            } else {
                '&'
            };
            signed.push(sep);
            signed.push_str(k);
            signed.push('=');
            signed.push_str(&encode_query(v));
        }
        Ok((out, signed))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: &[(&str, &str)],
        what: &str,
    ) -> Result<reqwest::Response, S3Error> {
        let (hs, url) = self.sign(method.as_str(), url, headers, SignatureLocation::Headers)?;
        let mut rb = self.client.request(method, &url);
        for (k, v) in hs {
            rb = rb.header(k, v);
        }
        let resp = rb.send().await.map_err(|e| S3Error::Unreachable {
            what: what.to_string(),
            detail: format!("{url}: {e}"),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap_or_default();
        let code = quick_xml::de::from_reader::<_, ErrorBody>(&body[..])
            .unwrap_or_default()
            .code;
        let hint = match status {
            301 | 307 | 400 if code.contains("Region") || code == "PermanentRedirect" => {
                "the bucket is in another region: set s3.region (or AWS_REGION)"
            }
            401 | 403 => "access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the profile) and the bucket policy",
            404 => "no such bucket or object: check the name",
            _ => "the store failed; retry later",
        };
        Err(S3Error::Refused {
            what: what.to_string(),
            status,
            code: if code.is_empty() {
                String::new()
            } else {
                format!(" {code}")
            },
            hint,
        })
    }

    /// Size and vouched-for SHA-256 of one object.
    pub async fn head(&self, bucket: &str, key: &str) -> Result<Object, S3Error> {
        let url = self.url(bucket, key);
        let what = format!("s3://{bucket}/{key}");
        let resp = self
            .send(
                reqwest::Method::HEAD,
                &url,
                &[("x-amz-checksum-mode", "ENABLED")],
                &what,
            )
            .await?;
        let size = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| S3Error::BadAnswer {
                what: what.clone(),
                detail: "HeadObject has no Content-Length".into(),
            })?;
        Ok(Object {
            key: key.to_string(),
            size,
            sha256: checksum_of(resp.headers()),
        })
    }

    /// Every object under `prefix` (`ListObjectsV2`, all pages), sorted by key.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, u64)>, S3Error> {
        let what = format!("s3://{bucket}/{prefix}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _page in 0..100_000 {
            let mut q = vec![("list-type", "2".to_string())];
            if !prefix.is_empty() {
                q.push(("prefix", prefix.to_string()));
            }
            if let Some(t) = &token {
                q.push(("continuation-token", t.clone()));
            }
            q.sort();
            let query: Vec<String> = q
                .iter()
                .map(|(k, v)| format!("{k}={}", encode_query(v)))
                .collect();
            let url = format!("{}?{}", self.url(bucket, ""), query.join("&"));
            let resp = self.send(reqwest::Method::GET, &url, &[], &what).await?;
            let body = resp.bytes().await.map_err(|e| S3Error::Unreachable {
                what: what.clone(),
                detail: e.to_string(),
            })?;
            let page: ListBucketResult =
                quick_xml::de::from_reader(&body[..]).map_err(|e| S3Error::BadAnswer {
                    what: what.clone(),
                    detail: e.to_string(),
                })?;
            out.extend(
                page.contents
                    .into_iter()
                    .filter(|c| !c.key.ends_with('/'))
                    .map(|c| (c.key, c.size)),
            );
            match (page.is_truncated, page.next_token) {
                (true, Some(t)) => token = Some(t),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    /// The objects a reference names: one (`HeadObject`), or every one under the prefix, each
    /// with its checksum (8 `HeadObject`s at a time).
    pub async fn objects(&self, r: &S3Ref) -> Result<Vec<Object>, S3Error> {
        use futures::{StreamExt, TryStreamExt};
        if !r.is_prefix() {
            return Ok(vec![self.head(&r.bucket, &r.key).await?]);
        }
        let keys = self.list(&r.bucket, &r.key).await?;
        if keys.is_empty() {
            return Err(S3Error::Empty(r.to_string()));
        }
        futures::stream::iter(keys)
            .map(|(k, _)| async move { self.head(&r.bucket, &k).await })
            .buffered(8)
            .try_collect()
            .await
    }

    /// The download request for an object: a presigned GET, by digest when the store vouches
    /// for one.
    pub fn request(&self, bucket: &str, o: &Object) -> Result<Request, S3Error> {
        let url = self.url(bucket, &o.key);
        let (_, signed) = self.sign("GET", &url, &[], SignatureLocation::QueryParams)?;
        Ok(Request {
            url: signed,
            digest: o.sha256,
            headers: Default::default(),
            piece_length: None,
        })
    }

    /// A signed request with header authentication, for tests and tools (a `PUT` with
    /// `x-amz-checksum-sha256`, for example; its payload is not signed).
    pub fn signed(
        &self,
        method: &str,
        bucket: &str,
        key: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Vec<(String, String)>, String), S3Error> {
        self.sign(
            method,
            &self.url(bucket, key),
            headers,
            SignatureLocation::Headers,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_parse() {
        let r: S3Ref = "s3://models/llama/w.safetensors".parse().unwrap();
        assert_eq!(r.bucket, "models");
        assert!(!r.is_prefix());
        assert!("s3://models/llama/".parse::<S3Ref>().unwrap().is_prefix());
        assert!("s3://models".parse::<S3Ref>().unwrap().is_prefix());
        for bad in ["s3://", "s3://A/b", "http://x/y", "s3://-ab/c", "s3://ab"] {
            assert!(bad.parse::<S3Ref>().is_err(), "{bad}");
        }
    }

    #[test]
    fn shared_files_parse() {
        let text = "[default]\naws_access_key_id = AK\n# comment\n[profile dev]\nregion = eu-west-1\n[other]\nAWS_SECRET_ACCESS_KEY=SK\n";
        assert_eq!(
            ini_section(text, "default"),
            vec![("aws_access_key_id".to_string(), "AK".to_string())]
        );
        assert_eq!(
            ini_section(text, "profile dev"),
            vec![("region".to_string(), "eu-west-1".to_string())]
        );
        assert_eq!(
            ini_section(text, "other"),
            vec![("aws_secret_access_key".to_string(), "SK".to_string())]
        );
    }

    #[test]
    fn keys_are_encoded() {
        assert_eq!(encode_key("a b/c+d~e.f"), "a%20b/c%2Bd~e.f");
    }

    #[test]
    fn checksums() {
        let mut h = http::HeaderMap::new();
        // SHA-256 of "" in base64.
        h.insert(
            "x-amz-checksum-sha256",
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
                .parse()
                .unwrap(),
        );
        assert_eq!(checksum_of(&h), Some(Digest::of(b"")));
        h.insert("x-amz-checksum-type", "COMPOSITE".parse().unwrap());
        assert_eq!(checksum_of(&h), None);
        h.remove("x-amz-checksum-type");
        h.insert("x-amz-checksum-sha256", "abc-3".parse().unwrap());
        assert_eq!(checksum_of(&h), None);
    }

    #[test]
    fn urls_and_presigning() {
        let cfg = S3Config {
            endpoint: Some("http://127.0.0.1:3900".into()),
            region: Some("garage".into()),
            ..S3Config::default()
        };
        let mut s = S3::new(&cfg, &SourceConfig::default()).unwrap();
        assert_eq!(s.url("b", "k/x y"), "http://127.0.0.1:3900/b/k/x%20y");
        s.creds = Some(Credentials::new("AK", "SK", None, None, "test"));
        let req = s
            .request(
                "b",
                &Object {
                    key: "k".into(),
                    size: 1,
                    sha256: None,
                },
            )
            .unwrap();
        assert!(req.url.starts_with("http://127.0.0.1:3900/b/k?"));
        assert!(req.url.contains("X-Amz-Signature="));
        let id = crate::core::TaskId::resolve(
            &req.url,
            None,
            &SourceConfig::default().filtered_query_params,
        )
        .unwrap();
        let plain = crate::core::TaskId::resolve(
            "http://127.0.0.1:3900/b/k",
            None,
            &SourceConfig::default().filtered_query_params,
        )
        .unwrap();
        assert_eq!(id, plain, "the signature must not change the task");
        let aws = S3::new(&S3Config::default(), &SourceConfig::default()).unwrap();
        assert!(aws.url("bkt", "k").starts_with("https://bkt.s3."));
    }
}
