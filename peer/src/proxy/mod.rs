//! The registry mirror and HTTP(S) proxy in front of local container runtimes (hyper).
//!
//! One listener, three ways in:
//! - **Registry mirror**: origin-form requests (`GET /v2/...`), as containerd's `hosts.toml`
//!   mirrors and Docker's `registry-mirrors` send them. The upstream registry comes from
//!   containerd's `ns=` query parameter, else the `proxy.upstream_header` header, else
//!   `proxy.default_upstream` (see [`route::mirror_upstream`]).
//! - **HTTP forward proxy**: absolute-form requests (`GET http://host/...`).
//! - **CONNECT**: tunnelled untouched, unless the host matches `proxy.intercept`; then TLS is
//!   terminated with a per-host leaf certificate from the configured CA, and the requests
//!   inside are handled like the others, with `https://host` as their upstream
//!   (see [`connect`]).
//!
//! - **Hugging Face mirror** (`hf.mirror`): other origin-form requests, as clients with
//!   `HF_ENDPOINT` pointing here send them, go to `hf.endpoint`; LFS files go peer to peer by
//!   their SHA-256 (see [`hf`]).
//!
//! Whichever way a request came in, a GET whose path matches `proxy.rules` (by default OCI
//! blobs by digest) goes peer to peer ([`blob`]); everything else passes through unchanged
//! ([`pass`]): manifests, tags, HEAD, token flows, pushes.

mod blob;
mod connect;
mod hf;
pub mod init;
mod pass;
pub mod route;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::swarm::Swarm;
use route::{Route, Rules};

/// Response bodies: streamed, and aborted with an error when a peer-to-peer blob fails.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// A request head not complete after this long is dropped (slow-loris clients).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on proxy.listen = {addr}: {source}; choose a free address, or set proxy.listen = \"\" to disable the proxy")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("proxy.mitm_ca_cert / proxy.mitm_ca_key: {0}")]
    Mitm(String),
    #[error("proxy upstream client: {0}")]
    Client(#[from] crate::source::SourceError),
    #[error("proxy rules: {0}")]
    Rules(#[from] regex::Error),
}

pub struct Proxy {
    swarm: Arc<Swarm>,
    cfg: ProxyConfig,
    rules: Rules,
    /// Pass-through client: never follows redirects (the client does), never uses a proxy.
    upstream: reqwest::Client,
    mitm: Option<connect::Mitm>,
    metrics: Arc<Metrics>,
    /// The Hugging Face mirror's settings (`[hf]`).
    hf: crate::config::HfConfig,
}

impl Proxy {
    /// Binds `proxy.listen` and serves until the runtime stops. Returns None when the proxy is
    /// disabled (`proxy.listen = ""`).
    pub async fn start(
        swarm: Arc<Swarm>,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, ProxyError> {
        let full = swarm.context().cfg.clone();
        let cfg = full.proxy.clone();
        if cfg.listen.is_empty() {
            return Ok(None);
        }
        let upstream = crate::source::client_builder(&full.source)?
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ProxyError::Mitm(format!("cannot build the upstream client: {e}")))?;
        let mitm = match (&cfg.mitm_ca_cert, &cfg.mitm_ca_key) {
            (Some(c), Some(k)) => Some(connect::Mitm::load(c, k)?),
            _ => None,
        };
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|source| ProxyError::Listen {
                addr: cfg.listen.clone(),
                source,
            })?;
        tracing::info!(addr = %cfg.listen, intercept = cfg.intercept.len(), "registry mirror / proxy listening");
        let proxy = Arc::new(Proxy {
            metrics: swarm.context().metrics.clone(),
            rules: Rules::new(&cfg)?,
            hf: full.hf.clone(),
            swarm,
            cfg,
            upstream,
            mitm,
        });
        let mut guard = crate::accept::Guard::new(
            "proxy",
            crate::accept::within_fd_limit(proxy.cfg.max_connections, 0.5),
            proxy.metrics.clone(),
        );
        Ok(Some(tokio::spawn(async move {
            loop {
                let Some(slot) = guard.slot().await else {
                    return;
                };
                match listener.accept().await {
                    Ok((stream, _)) => {
                        guard.accepted();
                        let _ = stream.set_nodelay(true);
                        let conn = proxy.clone().serve_conn(stream, None);
                        tokio::spawn(async move {
                            conn.await;
                            drop(slot);
                        });
                    }
                    Err(e) => guard.failed(&e).await,
                }
            }
        })))
    }

    /// Serves one client connection (plain, or TLS inside an intercepted CONNECT to
    /// `intercepted`).
    fn serve_conn<IO>(
        self: Arc<Self>,
        io: IO,
        intercepted: Option<String>,
    ) -> futures::future::BoxFuture<'static, ()>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Boxed: an intercepted CONNECT serves a connection from inside a request.
        Box::pin(async move {
            let max = self.cfg.max_header_bytes;
            let this = self.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let p = this.clone();
                let at = intercepted.clone();
                async move { Ok::<_, Infallible>(p.handle(req, at.as_deref()).await) }
            });
            let res = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                // One byte over: a head of exactly `max` bytes arriving in pieces still fits;
                // `handle` measures the parsed head of one that arrived whole.
                .max_buf_size(max + 1)
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .with_upgrades()
                .await;
            if let Err(e) = res {
                tracing::debug!(error = %e, "proxy connection ended");
            }
        })
    }

    async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        intercepted: Option<&str>,
    ) -> Response<Body> {
        let routing = route::Routing {
            cfg: &self.cfg,
            rules: &self.rules,
            hub_mirror: self.hf.mirror,
            can_intercept: self.mitm.is_some(),
        };
        match route::decide(&routing, &req, intercepted) {
            Route::Reject {
                status,
                code,
                message,
            } => self.reject(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                code,
                &message,
            ),
            Route::Connect {
                authority,
                intercept,
            } => connect::handle(self, req, authority, intercept).await,
            Route::Hub => hf::handle(self, req).await,
            Route::Blob { url, digest } => {
                self.metrics.proxy_request("p2p");
                blob::serve(self, req, url, digest).await
            }
            Route::Pass { url } => {
                self.metrics.proxy_request("pass");
                pass::forward(self, req, &url).await
            }
        }
    }

    /// A 4xx from the proxy itself, with an OCI error body.
    fn reject(&self, status: StatusCode, code: &str, message: &str) -> Response<Body> {
        tracing::info!(%status, code, message, "proxy request refused");
        self.metrics.proxy_request("rejected");
        error_response(status, code, message)
    }
}

/// An OCI distribution error response.
pub(crate) fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

pub(crate) fn empty() -> Body {
    full(Bytes::new())
}
