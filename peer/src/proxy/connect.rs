//! CONNECT: a tunnel to `host:port`, untouched, unless `proxy.intercept` matches it. An
//! intercepted CONNECT is answered by this proxy's own TLS server, with a leaf certificate for
//! the host signed by the configured CA (generated once per host and cached); the requests
//! inside are then handled like any other, with `https://host:port` as their upstream.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{empty, Body, Proxy, ProxyError};
use crate::transport::tls::ClusterCa;

/// Leaf certificates kept at most; past this the cache starts over.
const LEAF_CACHE: usize = 1024;
/// Connecting a tunnel's target gives up after this long.
const TUNNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Mitm {
    ca: ClusterCa,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl Mitm {
    pub fn load(cert: &Path, key: &Path) -> Result<Mitm, ProxyError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| ProxyError::Mitm(format!("cannot read {}: {e}", p.display())))
        };
        let ca = ClusterCa::from_pem(&read(cert)?, &read(key)?).map_err(|e| {
            ProxyError::Mitm(format!(
                "{} / {}: {e}; give a PEM CA certificate and its private key",
                cert.display(),
                key.display()
            ))
        })?;
        Ok(Mitm {
            ca,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The TLS server configuration presenting a certificate for `host`.
    fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = leaves.get(host) {
            return Ok(c.clone());
        }
        let id = self.ca.issue_server(host).map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(id.chain, id.key.clone_key())
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        if leaves.len() >= LEAF_CACHE {
            leaves.clear();
        }
        leaves.insert(host.to_string(), cfg.clone());
        Ok(cfg)
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A CONNECT to `authority` (checked by [`super::route::decide`]): tunnelled, or intercepted.
pub async fn handle(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
    authority: String,
    intercept: bool,
) -> Response<Body> {
    let Some(mitm) = p.mitm.as_ref().filter(|_| intercept) else {
        return tunnel(p, req, authority).await;
    };
    let tls = match mitm.server_config(host_of(&authority)) {
        Ok(c) => tokio_rustls::TlsAcceptor::from(c),
        Err(e) => {
            tracing::warn!(%authority, error = %e, "cannot issue an interception certificate");
            return super::error_response(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &e);
        }
    };
    p.metrics.proxy_request("intercept");
    let proxy = p.clone();
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
        };
        match tls.accept(TokioIo::new(upgraded)).await {
            Ok(stream) => proxy.serve_conn(stream, Some(authority)).await,
            Err(e) => {
                tracing::info!(%authority, error = %e, "intercepted client's TLS handshake failed (does it trust proxy.mitm_ca_cert?)")
            }
        }
    });
    Response::new(empty())
}

/// Connects the target first (so a failure is a 502, not a dead tunnel), then splices bytes
/// both ways.
async fn tunnel(p: &Arc<Proxy>, req: Request<Incoming>, authority: String) -> Response<Body> {
    let connect = tokio::net::TcpStream::connect(authority.as_str());
    let mut upstream = match tokio::time::timeout(TUNNEL_CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return super::error_response(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("cannot connect to {authority}: {e}"),
            )
        }
        Err(_) => {
            return super::error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
                &format!("connecting to {authority} timed out"),
            )
        }
    };
    p.metrics.proxy_request("tunnel");
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(u) => {
                let mut client = TokioIo::new(u);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::new(empty())
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_authority() {
        assert_eq!(host_of("registry.test:443"), "registry.test");
        assert_eq!(host_of("198.18.1.1:5000"), "198.18.1.1");
        assert_eq!(host_of("[::1]:443"), "::1");
    }
}
