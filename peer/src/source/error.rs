//! Origin errors, classified by what a retry can do about them.

use std::error::Error as StdError;
use std::path::PathBuf;

use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{url}: the origin answered 404 Not Found; check the URL")]
    NotFound { url: String },
    #[error("{url}: the origin refused access ({status}); pass credentials with -H 'Authorization: ...'")]
    Denied { url: String, status: StatusCode },
    #[error("{url}: the origin answered {status}")]
    ClientStatus { url: String, status: StatusCode },
    #[error("{url}: the origin answered {status}")]
    ServerStatus { url: String, status: StatusCode },
    #[error("cannot resolve the host of {url}: {detail}; check the host name and DNS")]
    Dns { url: String, detail: String },
    #[error("TLS with the origin of {url} failed: {detail}; if it uses a private CA, trust it with --ca-cert FILE")]
    Tls { url: String, detail: String },
    #[error("cannot connect to {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("{url}: transfer failed: {detail}")]
    Transfer { url: String, detail: String },
    #[error("{url}: the body ended after {got} of {want} bytes (the origin closed early or announced a wrong Content-Length)")]
    Short { url: String, got: u64, want: u64 },
    #[error("{url}: wrong length: {detail}")]
    Length { url: String, detail: String },
    #[error("{url}: the origin ignored a Range request (answered 200)")]
    RangeIgnored { url: String },
    #[error("{url}: the origin answered a Range request wrongly: {detail}")]
    BadRange { url: String, detail: String },
    #[error("{url}: the content changed on the origin during the download ({detail}); run the command again")]
    Changed { url: String, detail: String },
    #[error("{url}: the origin sends neither a Content-Length nor Range support, so the content length cannot be known in advance; Starling needs one of them")]
    UnknownLength { url: String },
    #[error("cannot use CA certificate file {}: {detail}", path.display())]
    CaCert { path: PathBuf, detail: String },
}

impl SourceError {
    /// Whether trying the same request again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SourceError::ServerStatus { .. }
                | SourceError::Connect { .. }
                | SourceError::Transfer { .. }
                | SourceError::Short { .. }
                | SourceError::Length { .. }
                | SourceError::BadRange { .. }
        ) || matches!(self, SourceError::ClientStatus { status, .. } if *status == StatusCode::REQUEST_TIMEOUT || *status == StatusCode::TOO_MANY_REQUESTS)
    }

    pub fn from_status(url: &str, status: StatusCode) -> SourceError {
        let url = url.to_string();
        match status {
            StatusCode::NOT_FOUND | StatusCode::GONE => SourceError::NotFound { url },
            StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::PROXY_AUTHENTICATION_REQUIRED => SourceError::Denied { url, status },
            s if s.is_server_error() => SourceError::ServerStatus { url, status },
            _ => SourceError::ClientStatus { url, status },
        }
    }

    /// Sorts a reqwest error by its cause chain.
    pub fn from_reqwest(url: &str, e: reqwest::Error) -> SourceError {
        let url = url.to_string();
        let detail = chain(&e);
        let mut cause: Option<&(dyn StdError + 'static)> = Some(&e);
        while let Some(c) = cause {
            if let Some(tls) = c.downcast_ref::<rustls::Error>() {
                return SourceError::Tls {
                    url,
                    detail: tls.to_string(),
                };
            }
            cause = c.source();
        }
        let lower = detail.to_lowercase();
        if e.is_connect() {
            if lower.contains("dns error") || lower.contains("failed to lookup address") {
                return SourceError::Dns { url, detail };
            }
            if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
            {
                return SourceError::Tls { url, detail };
            }
            return SourceError::Connect { url, detail };
        }
        if e.is_timeout() {
            return SourceError::Transfer {
                url,
                detail: format!("timed out ({detail})"),
            };
        }
        SourceError::Transfer { url, detail }
    }
}

/// "outer: inner: innermost", skipping repeats.
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    parts.join(": ")
}
