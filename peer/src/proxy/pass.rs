//! Pass-through: the request goes upstream unchanged (method, headers, streamed body) and the
//! response comes back unchanged (status, headers, streamed body), hop-by-hop headers aside.
//! Redirects and auth challenges reach the client as they are.

use std::sync::Arc;

use futures::StreamExt;
use http::{header, HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyDataStream, BodyExt, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};

use super::{error_response, Body, Proxy};

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1), plus those the
/// `Connection` header names.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

pub async fn forward(p: &Arc<Proxy>, req: Request<Incoming>, url: &str) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(p.cfg.upstream_header.as_str());
    let mut rb = p
        .upstream
        .request(parts.method.clone(), url)
        .headers(headers);
    if body.size_hint().exact() != Some(0) {
        let data = BodyDataStream::new(body);
        rb = rb.body(reqwest::Body::wrap_stream(data));
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%url, error = %e, "proxy upstream request failed");
            return error_response(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("upstream {url} failed: {e}"),
            );
        }
    };
    response_from(p, resp)
}

/// An upstream response, streamed back as it is.
pub(crate) fn response_from(p: &Arc<Proxy>, resp: reqwest::Response) -> Response<Body> {
    let status = resp.status();
    let mut headers = resp.headers().clone();
    strip_hop_by_hop(&mut headers);
    let metrics = p.metrics.clone();
    let stream = resp.bytes_stream().map(move |r| match r {
        Ok(b) => {
            metrics.proxy_bytes("pass", b.len() as u64);
            Ok(Frame::data(b))
        }
        Err(e) => Err(std::io::Error::other(e)),
    });
    let mut out = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}
