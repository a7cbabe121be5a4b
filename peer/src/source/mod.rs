//! Back to source over HTTP(S).
//!
//! - One probe per download (`GET` with `Range: bytes=0-0`) learns the length, whether the
//!   origin honours Range, and its validator (ETag or Last-Modified).
//! - Piece fetches are ranged GETs, each checked for compliance: status 206, a Content-Range
//!   that is exactly the range asked for, a matching Content-Length and validator, and exactly
//!   that many body bytes. An origin that answers 200 to a ranged request is never taken as
//!   having sent the range ([`SourceError::RangeIgnored`]); the caller then reads the whole body
//!   in order instead.
//! - A URL that redirects (a Hub's `resolve`, a registry's blob URL to signed storage) is
//!   asked once; later requests go to where it led for a few minutes, without credentials if
//!   that is another origin, and the URL is asked again when the target refuses.
//! - Errors are classified: what a retry can fix (5xx, resets, short bodies, timeouts) versus
//!   what it cannot (404, 401/403, TLS, DNS), each with a message that says what to do.

mod error;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use reqwest::{Client, Response};

pub use error::SourceError;

use crate::config::SourceConfig;

/// An HTTP client builder with the configured timeouts and extra CA certificates. It never
/// uses the environment's proxy variables: the daemon may itself be the proxy they name.
pub fn client_builder(cfg: &SourceConfig) -> Result<reqwest::ClientBuilder, SourceError> {
    let mut b = Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(cfg.connect_timeout_seconds))
        .read_timeout(Duration::from_secs(cfg.idle_timeout_seconds))
        .pool_max_idle_per_host(cfg.concurrency.max(4))
        .tcp_nodelay(true)
        .user_agent(concat!("starling/", env!("CARGO_PKG_VERSION")));
    for path in &cfg.ca_certs {
        let pem = std::fs::read(path).map_err(|e| SourceError::CaCert {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| SourceError::CaCert {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(SourceError::CaCert {
                path: path.clone(),
                detail: "no PEM certificate in it".into(),
            });
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    Ok(b)
}

/// What the probe learned.
pub struct Probe {
    /// The content length, when the origin said.
    pub content_length: Option<u64>,
    /// True when the origin answered the probe with a well-formed 206.
    pub ranged: bool,
    /// ETag, else Last-Modified, else empty.
    pub validator: String,
    /// The probe's own response when the origin ignored Range (200): it carries the whole body.
    pub full_body: Option<Reply>,
}

/// An HTTP(S) origin client: connection pool, TLS roots, and the user's extra headers.
#[derive(Clone)]
pub struct Origin {
    client: Client,
    headers: HeaderMap,
    redirects: Arc<Redirects>,
    limits: Arc<Limits>,
}

/// This node's limits on origin reads, over every task: requests open at once
/// (`source.max_connections`) and bytes per second (`source.max_mbps`).
#[derive(Default)]
struct Limits {
    slots: Option<Arc<tokio::sync::Semaphore>>,
    pacer: Option<Arc<crate::pace::Pacer>>,
}

/// An origin's answer, holding its request's slot (see [`Limits`]) until the body is read or
/// dropped.
pub struct Reply {
    pub resp: Response,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    pacer: Option<Arc<crate::pace::Pacer>>,
}

/// Where redirects led: a URL that redirects (a Hub's `resolve`, a registry's blob URL) is
/// asked once, and the pieces go straight to where it pointed (a signed storage URL) for
/// [`REDIRECT_TTL`]. Keyed by URL and credentials, so one client's signed target never serves
/// another's request. A target that refuses (an expired signature) is forgotten and the
/// original URL asked again.
#[derive(Default)]
struct Redirects {
    map: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
}

/// True when both URLs have the same scheme, host and port.
fn same_origin(a: &str, b: &str) -> bool {
    match (url::Url::parse(a), url::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// How long a redirect's target is used before the original URL is asked again.
const REDIRECT_TTL: Duration = Duration::from_secs(300);
/// Targets remembered at most (the map is cleared when full).
const REDIRECTS_MAX: usize = 4096;

impl Redirects {
    fn get(&self, key: &str) -> Option<String> {
        let map = self.map.lock().ok()?;
        map.get(key)
            .filter(|(_, at)| at.elapsed() < REDIRECT_TTL)
            .map(|(t, _)| t.clone())
    }

    fn put(&self, key: String, target: String) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= REDIRECTS_MAX {
                map.clear();
            }
            map.insert(key, (target, std::time::Instant::now()));
        }
    }

    fn forget(&self, key: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(key);
        }
    }
}

impl Origin {
    pub fn new(cfg: &SourceConfig) -> Result<Origin, SourceError> {
        let client = client_builder(cfg)?
            .build()
            .map_err(|e| SourceError::CaCert {
                path: Default::default(),
                detail: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(Origin {
            client,
            headers: HeaderMap::new(),
            redirects: Arc::default(),
            limits: Arc::new(Limits {
                slots: (cfg.max_connections > 0)
                    .then(|| Arc::new(tokio::sync::Semaphore::new(cfg.max_connections))),
                pacer: crate::pace::Pacer::mbps(cfg.max_mbps).map(Arc::new),
            }),
        })
    }

    /// The same client (pool, TLS roots) sending `headers` with every request.
    pub fn with_headers(&self, headers: HeaderMap) -> Origin {
        Origin {
            client: self.client.clone(),
            headers,
            redirects: self.redirects.clone(),
            limits: self.limits.clone(),
        }
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.client
            .get(url)
            .headers(self.headers.clone())
            // Byte offsets must refer to the stored bytes, never to a re-encoding.
            .header(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            )
    }

    /// The redirect cache's key: the URL and a digest of the credentials sent with it.
    fn redirect_key(&self, url: &str) -> String {
        let creds: Vec<&[u8]> = [header::AUTHORIZATION, header::COOKIE]
            .iter()
            .filter_map(|h| self.headers.get(h).map(|v| v.as_bytes()))
            .collect();
        format!("{url}\0{}", crate::core::Digest::of(&creds.concat()).hex())
    }

    /// One request, once this node has a free origin slot; the reply holds the slot.
    async fn send(&self, url: &str, range: Option<(u64, u64)>) -> Result<Reply, SourceError> {
        let slot = match &self.limits.slots {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        let resp = self.send_unlimited(url, range).await?;
        Ok(Reply {
            resp,
            slot,
            pacer: self.limits.pacer.clone(),
        })
    }

    async fn send_unlimited(
        &self,
        url: &str,
        range: Option<(u64, u64)>,
    ) -> Result<Response, SourceError> {
        let key = self.redirect_key(url);
        if let Some(target) = self.redirects.get(&key) {
            // As a redirect does: credentials stay with their origin.
            let keep = same_origin(url, &target);
            match self.send_to(&target, range, keep).await {
                Ok(resp) => return Ok(resp),
                // Expired or revoked: ask the original URL again.
                Err(SourceError::Denied { .. })
                | Err(SourceError::NotFound { .. })
                | Err(SourceError::ClientStatus { .. }) => {
                    tracing::debug!(%url, "a redirect's target refused; asking the URL again");
                    self.redirects.forget(&key);
                }
                Err(e) => return Err(e),
            }
        }
        let resp = self.send_to(url, range, true).await?;
        let landed = resp.url().as_str();
        if landed != url {
            self.redirects.put(key, landed.to_string());
        }
        Ok(resp)
    }

    async fn send_to(
        &self,
        url: &str,
        range: Option<(u64, u64)>,
        credentials: bool,
    ) -> Result<Response, SourceError> {
        let mut req = if credentials {
            self.get(url)
        } else {
            let mut h = self.headers.clone();
            for n in [
                header::AUTHORIZATION,
                header::COOKIE,
                header::PROXY_AUTHORIZATION,
            ] {
                h.remove(n);
            }
            self.with_headers(h).get(url)
        };
        if let Some((start, end)) = range {
            req = req.header(header::RANGE, format!("bytes={start}-{end}"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| SourceError::from_reqwest(url, e))?;
        let status = resp.status();
        if status.is_success() || status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(resp);
        }
        Err(SourceError::from_status(url, status))
    }

    /// Learns length, Range support and validator with one small ranged GET.
    pub async fn probe(&self, url: &str) -> Result<Probe, SourceError> {
        let reply = self.send(url, Some((0, 0))).await?;
        let resp = &reply.resp;
        let validator = validator(resp.headers());
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let cr = content_range(url, resp.headers())?;
                match cr {
                    ContentRange::Span {
                        start: 0,
                        end: 0,
                        total: Some(total),
                    } => {
                        // Drain the one byte so the connection returns to the pool.
                        let _ = reply.resp.bytes().await;
                        Ok(Probe {
                            content_length: Some(total),
                            ranged: true,
                            validator,
                            full_body: None,
                        })
                    }
                    // Unknown total or an unexpected span: do not trust its ranges.
                    _ => self.probe_full(url).await,
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => match content_range(url, resp.headers())? {
                ContentRange::Unsatisfied { total: 0 } => Ok(Probe {
                    content_length: Some(0),
                    ranged: true,
                    validator,
                    full_body: None,
                }),
                _ => Err(SourceError::BadRange {
                    url: url.into(),
                    detail: "answered 416 to bytes=0-0 for non-empty content".into(),
                }),
            },
            _ => Ok(Probe {
                content_length: resp.content_length(),
                ranged: false,
                validator,
                full_body: Some(reply),
            }),
        }
    }

    async fn probe_full(&self, url: &str) -> Result<Probe, SourceError> {
        let reply = self.full(url).await?;
        Ok(Probe {
            content_length: reply.resp.content_length(),
            ranged: false,
            validator: validator(reply.resp.headers()),
            full_body: Some(reply),
        })
    }

    /// The whole content, in order, without Range.
    pub async fn full(&self, url: &str) -> Result<Reply, SourceError> {
        let reply = self.send(url, None).await?;
        if reply.resp.status() != StatusCode::OK {
            return Err(SourceError::from_status(url, reply.resp.status()));
        }
        Ok(reply)
    }

    /// Bytes `offset .. offset + len` (len > 0), checked for Range compliance before any body
    /// byte is accepted. The stream yields exactly `len` bytes or ends in an error.
    pub async fn range(
        &self,
        url: &str,
        offset: u64,
        len: u64,
        total: u64,
        want_validator: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, SourceError>> + Send + 'static, SourceError> {
        let end = offset + len - 1;
        let reply = self.send(url, Some((offset, end))).await?;
        let resp = &reply.resp;
        let got_validator = validator(resp.headers());
        if !want_validator.is_empty()
            && !got_validator.is_empty()
            && got_validator != want_validator
        {
            return Err(SourceError::Changed {
                url: url.into(),
                detail: format!("validator was {want_validator}, now {got_validator}"),
            });
        }
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => return Err(SourceError::RangeIgnored { url: url.into() }),
            s => return Err(SourceError::from_status(url, s)),
        }
        match content_range(url, resp.headers())? {
            ContentRange::Span {
                start,
                end: e,
                total: t,
            } if start == offset && e == end => {
                if t.is_some_and(|t| t != total) {
                    return Err(SourceError::Changed {
                        url: url.into(),
                        detail: format!(
                            "length was {total}, Content-Range now says {}",
                            t.unwrap_or(0)
                        ),
                    });
                }
            }
            other => {
                return Err(SourceError::BadRange {
                    url: url.into(),
                    detail: format!("asked for bytes {offset}-{end}, got {other:?}"),
                })
            }
        }
        if let Some(cl) = resp.content_length() {
            if cl != len {
                return Err(SourceError::BadRange {
                    url: url.into(),
                    detail: format!("Content-Length {cl} for a {len}-byte range"),
                });
            }
        }
        Ok(exact_body(url.to_string(), reply, len))
    }
}

/// A response body that must be exactly `len` bytes long: more is an error at once, fewer is
/// a short body (retryable) when the stream ends. It holds the reply's origin slot until it
/// ends or is dropped, and paces its chunks to this node's origin rate.
pub fn exact_body(
    url: String,
    reply: Reply,
    len: u64,
) -> impl Stream<Item = Result<Bytes, SourceError>> + Send + 'static {
    struct St<B> {
        body: B,
        url: String,
        seen: u64,
        ended: bool,
        _slot: Option<tokio::sync::OwnedSemaphorePermit>,
        pacer: Option<Arc<crate::pace::Pacer>>,
    }
    let st = St {
        body: reply.resp.bytes_stream(),
        url,
        seen: 0,
        ended: false,
        _slot: reply.slot,
        pacer: reply.pacer,
    };
    futures::stream::unfold(st, move |mut st| async move {
        if st.ended {
            return None;
        }
        let item = match st.body.next().await {
            Some(Ok(chunk)) => {
                if let Some(p) = &st.pacer {
                    p.after(chunk.len() as u64).await;
                }
                st.seen += chunk.len() as u64;
                if st.seen > len {
                    Err(SourceError::Length {
                        url: st.url.clone(),
                        detail: format!("sent more than the {len} bytes announced"),
                    })
                } else {
                    Ok(chunk)
                }
            }
            Some(Err(e)) => match SourceError::from_reqwest(&st.url, e) {
                SourceError::Transfer { detail, .. }
                    if detail.contains("end of file before message length") =>
                {
                    Err(SourceError::Short {
                        url: st.url.clone(),
                        got: st.seen,
                        want: len,
                    })
                }
                other => Err(other),
            },
            None if st.seen < len => Err(SourceError::Short {
                url: st.url.clone(),
                got: st.seen,
                want: len,
            }),
            None => return None,
        };
        st.ended = item.is_err();
        Some((item, st))
    })
}

fn validator(h: &HeaderMap) -> String {
    let get = |n| {
        h.get(n)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let etag = get(header::ETAG);
    // A weak ETag does not promise byte-identical ranges; Last-Modified is as good then.
    if !etag.is_empty() && !etag.starts_with("W/") {
        return etag;
    }
    get(header::LAST_MODIFIED)
}

#[derive(Debug, PartialEq, Eq)]
enum ContentRange {
    Span {
        start: u64,
        end: u64,
        total: Option<u64>,
    },
    Unsatisfied {
        total: u64,
    },
}

fn content_range(url: &str, h: &HeaderMap) -> Result<ContentRange, SourceError> {
    let bad = |detail: String| SourceError::BadRange {
        url: url.into(),
        detail,
    };
    let raw = h
        .get(header::CONTENT_RANGE)
        .ok_or_else(|| bad("no Content-Range header".into()))?
        .to_str()
        .map_err(|_| bad("Content-Range is not text".into()))?;
    parse_content_range(raw).ok_or_else(|| bad(format!("cannot parse Content-Range {raw:?}")))
}

fn parse_content_range(raw: &str) -> Option<ContentRange> {
    let rest = raw.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if span.trim() == "*" {
        return Some(ContentRange::Unsatisfied { total: total? });
    }
    let (s, e) = span.split_once('-')?;
    let (start, end) = (s.trim().parse::<u64>().ok()?, e.trim().parse::<u64>().ok()?);
    if end < start || total.is_some_and(|t| end >= t) {
        return None;
    }
    Some(ContentRange::Span { start, end, total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-0/100"),
            Some(ContentRange::Span {
                start: 0,
                end: 0,
                total: Some(100)
            })
        );
        assert_eq!(
            parse_content_range("bytes 10-19/*"),
            Some(ContentRange::Span {
                start: 10,
                end: 19,
                total: None
            })
        );
        assert_eq!(
            parse_content_range("bytes */0"),
            Some(ContentRange::Unsatisfied { total: 0 })
        );
        for bad in [
            "bytes 5-4/10",
            "bytes 0-10/10",
            "items 0-1/2",
            "bytes 0-1",
            "bytes a-b/3",
            "bytes */*",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn weak_etags_fall_back_to_last_modified() {
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("W/\"x\""));
        h.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"),
        );
        assert_eq!(validator(&h), "Mon, 01 Jan 2024 00:00:00 GMT");
        h.insert(header::ETAG, HeaderValue::from_static("\"strong\""));
        assert_eq!(validator(&h), "\"strong\"");
    }
}
