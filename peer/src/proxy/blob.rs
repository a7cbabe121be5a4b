//! A blob GET that goes peer to peer.
//!
//! 1. The registry is asked, with the client's own credentials, whether this client may have the
//!    blob (`HEAD`). A challenge, a denial or a 404 goes back to the client exactly as the
//!    registry answers the GET, so the token flow works as without the proxy; an allowed client
//!    never makes the registry send the blob again once the swarm holds it.
//! 2. The swarm fetches the task (its ID is the digest, so the same blob through any registry,
//!    tag or mirror is one task), in the background: a client that hangs up does not stop it.
//! 3. Bytes stream to the client in order as pieces verify. The last piece leaves only once the
//!    swarm has checked the whole blob against its digest (its pull ends well, and the sealed
//!    content digest is the one asked for): the proxy does not hash the blob a third time. On
//!    a mismatch (or a failed pull) the response is aborted, so the client sees a broken
//!    connection and retries, and never a complete wrong body.
//! 4. A Range request is served once the whole blob is verified: 206 with Content-Range, or 416.

use std::sync::Arc;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::SinkExt;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::watch;

use super::route::{self, Range};
use super::{error_response, pass, Body, Proxy};
use crate::core::Request as FetchRequest;
use crate::core::{Digest, TaskId};
use crate::fetch::{exit, FetchError, Progress};
use crate::storage::UploadView;
use crate::swarm::PullError;

/// A background fetch's end, as an HTTP answer.
#[derive(Clone, Debug)]
struct Failure {
    status: StatusCode,
    message: String,
    /// Why a streamed response is aborted (`starling_proxy_aborts_total{cause}`).
    cause: &'static str,
}

impl From<&PullError> for Failure {
    fn from(e: &PullError) -> Failure {
        let status = match e.exit_code() {
            exit::ORIGIN_REFUSED => StatusCode::NOT_FOUND,
            exit::USAGE => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        let cause = match e {
            PullError::Fetch(FetchError::DigestMismatch { .. }) => "digest_mismatch",
            _ => "fetch_failed",
        };
        Failure {
            status,
            message: e.to_string(),
            cause,
        }
    }
}

/// What a response waits on: the background fetch's end, and the swarm registering a (new)
/// view of a task.
struct Done {
    fetch: watch::Receiver<Option<Result<(), Failure>>>,
    views: watch::Receiver<u64>,
}

fn outcome(done: &Done) -> Option<Result<(), Failure>> {
    match done.fetch.borrow().clone() {
        Some(r) => Some(r),
        // The fetch task ended without a word (it panicked).
        None if done.fetch.has_changed().is_err() => Some(Err(Failure {
            status: StatusCode::BAD_GATEWAY,
            message: "the fetch stopped unexpectedly; retry".into(),
            cause: "fetch_failed",
        })),
        None => None,
    }
}

/// Waits until the fetch ends or a view is registered.
async fn tick(done: &mut Done) {
    if outcome(done).is_some() {
        let _ = done.views.changed().await;
        return;
    }
    tokio::select! {
        _ = done.fetch.changed() => {}
        _ = done.views.changed() => {}
    }
}

pub async fn serve(
    p: &Arc<Proxy>,
    req: Request<Incoming>,
    url: String,
    digest: Option<Digest>,
) -> Response<Body> {
    let mut creds = HeaderMap::new();
    if let Some(a) = req.headers().get(header::AUTHORIZATION) {
        creds.insert(header::AUTHORIZATION, a.clone());
    }
    match p.upstream.head(&url).headers(creds.clone()).send().await {
        Ok(r) if r.status().is_success() || r.status().is_redirection() => {}
        Ok(r) => {
            tracing::debug!(%url, status = %r.status(), "registry refused the blob; passing its answer on");
            return pass::forward(p, req, &url).await;
        }
        Err(e) => {
            tracing::warn!(%url, error = %e, "registry unreachable");
            return error_response(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("upstream {url}: {e}"),
            );
        }
    }
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    serve_task(p, range.as_deref(), url, digest, creds).await
}

/// Serves the task for `url` (named by `digest` when given) through the swarm: the whole
/// content streamed as it verifies, or `range` once all of it is verified. `creds` go to the
/// origin if the swarm has to go back to source.
pub(super) async fn serve_task(
    p: &Arc<Proxy>,
    range: Option<&str>,
    url: String,
    digest: Option<Digest>,
    creds: HeaderMap,
) -> Response<Body> {
    let filtered = &p.swarm.context().cfg.source.filtered_query_params;
    let id = match TaskId::resolve(&url, digest, filtered) {
        Ok(id) => id,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "UNSUPPORTED", &e.to_string()),
    };
    let mut done = start_fetch(p, &url, digest, creds);
    let view = match wait_view(p, &id, &mut done).await {
        Ok(v) => v,
        Err(f) => return error_response(f.status, "UNAVAILABLE", &f.message),
    };
    let len = view.plan().content_length();
    let range = route::parse_range(range, len);
    let mut resp = match range {
        Range::Unsatisfiable => {
            let mut r = error_response(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
                &format!("the blob has {len} bytes"),
            );
            r.headers_mut()
                .insert(header::CONTENT_RANGE, value(&format!("bytes */{len}")));
            return r;
        }
        Range::Part { start, end } => match ranged(p, &id, &mut done, start, end).await {
            Ok(body) => {
                let mut r = Response::new(body);
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                r.headers_mut().insert(
                    header::CONTENT_RANGE,
                    value(&format!("bytes {start}-{end}/{len}")),
                );
                r.headers_mut().insert(
                    header::CONTENT_LENGTH,
                    value(&(end - start + 1).to_string()),
                );
                r
            }
            Err(f) => return error_response(f.status, "UNAVAILABLE", &f.message),
        },
        Range::Full => {
            let mut r = Response::new(stream(p, id, view, digest, done, url));
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, value(&len.to_string()));
            r
        }
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(d) = digest {
        h.insert("docker-content-digest", value(&d.to_string()));
        h.insert(header::ETAG, value(&format!("\"{d}\"")));
    }
    resp
}

fn value(s: &str) -> HeaderValue {
    // Only ASCII we formatted ourselves goes here.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Starts the swarm fetch in the background and returns its end.
fn start_fetch(p: &Arc<Proxy>, url: &str, digest: Option<Digest>, headers: HeaderMap) -> Done {
    let (tx, rx) = watch::channel(None);
    let views = p.swarm.view_changes();
    let swarm = p.swarm.clone();
    let req = FetchRequest {
        url: url.to_string(),
        digest,
        piece_length: None,
        headers,
    };
    tokio::spawn(async move {
        let progress = Arc::new(Progress::default());
        let r = swarm.pull(&req, &progress).await;
        if let Err(e) = &r {
            tracing::warn!(url = %req.url, error = %e, "blob fetch failed");
        }
        let _ = tx.send(Some(r.map(|_| ()).map_err(|e| Failure::from(&e))));
    });
    Done { fetch: rx, views }
}

/// The view to stream from: a download in progress, or a complete task once its fetch (which
/// re-verifies stored content) has succeeded.
async fn wait_view(p: &Proxy, id: &TaskId, done: &mut Done) -> Result<Arc<UploadView>, Failure> {
    loop {
        let end = outcome(done);
        if let Some(Err(f)) = end {
            return Err(f);
        }
        if let Some(v) = p.swarm.view(id) {
            if !v.is_complete() || end.is_some() {
                return Ok(v);
            }
        } else if end.is_some() {
            return Err(Failure {
                status: StatusCode::BAD_GATEWAY,
                message: format!("task {id} finished but is not served; retry"),
                cause: "fetch_failed",
            });
        }
        tick(done).await;
    }
}

/// The bytes `start..=end` of a task whose whole content has been verified.
async fn ranged(
    p: &Proxy,
    id: &TaskId,
    done: &mut Done,
    start: u64,
    end: u64,
) -> Result<Body, Failure> {
    while outcome(done).is_none() {
        tick(done).await;
    }
    if let Some(Err(f)) = outcome(done) {
        return Err(f);
    }
    let view = wait_view(p, id, done).await?;
    let plan = view.plan();
    let mut parts = Vec::new();
    let mut at = start;
    while at <= end {
        let piece = plan.piece_at(at).ok_or_else(|| Failure {
            status: StatusCode::BAD_GATEWAY,
            message: format!("offset {at} is outside task {id}"),
            cause: "fetch_failed",
        })?;
        let bytes = view.piece(piece.index).ok_or_else(|| Failure {
            status: StatusCode::BAD_GATEWAY,
            message: format!("piece {} of task {id} is not verified; retry", piece.index),
            cause: "fetch_failed",
        })?;
        let from = (at - piece.offset) as usize;
        let to = (end.min(piece.end() - 1) - piece.offset + 1) as usize;
        parts.push(Ok(Frame::data(bytes.slice(from..to))));
        at = piece.offset + to as u64;
    }
    p.metrics.proxy_bytes("p2p", end - start + 1);
    Ok(StreamBody::new(futures::stream::iter(parts)).boxed())
}

/// The whole blob, streamed in order as pieces verify (see the module comment).
fn stream(
    p: &Arc<Proxy>,
    id: TaskId,
    view: Arc<UploadView>,
    digest: Option<Digest>,
    done: Done,
    url: String,
) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    let p = p.clone();
    tokio::spawn(async move {
        let mut out = tx;
        if let Err(e) = feed(&p, id, view, digest, done, &mut out).await {
            tracing::warn!(%url, task = %id, error = %e, "blob response aborted");
            let _ = out.send(Err(e)).await;
        }
    });
    StreamBody::new(rx).boxed()
}

async fn feed(
    p: &Proxy,
    id: TaskId,
    mut view: Arc<UploadView>,
    digest: Option<Digest>,
    mut done: Done,
    out: &mut mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
) -> Result<(), std::io::Error> {
    let count = view.plan().count();
    let mut changes = view.subscribe();
    let mut next = 0u32;
    let aborted = |cause: &'static str, why: String| {
        p.metrics.proxy_abort(cause);
        std::io::Error::other(why)
    };
    while next < count {
        let Some(bytes) = view.piece(next) else {
            if let Some(Err(f)) = outcome(&done) {
                return Err(aborted(f.cause, f.message));
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tick(&mut done) => {}
            }
            // A retried download serves the task from a new view.
            if let Some(v) = p.swarm.view(&id) {
                if !Arc::ptr_eq(&v, &view) {
                    view = v;
                    changes = view.subscribe();
                }
            }
            continue;
        };
        if next + 1 == count {
            check_end(&mut done, &view, digest, &id)
                .await
                .map_err(|(c, w)| aborted(c, w))?;
        }
        let n = bytes.len() as u64;
        if out.send(Ok(Frame::data(bytes))).await.is_err() {
            return Ok(()); // the client hung up; the fetch goes on
        }
        p.metrics.proxy_bytes("p2p", n);
        next += 1;
    }
    if count == 0 {
        check_end(&mut done, &view, digest, &id)
            .await
            .map_err(|(c, w)| aborted(c, w))?;
    }
    Ok(())
}

/// Before the last bytes leave: the swarm's pull must have ended well, which means it checked
/// the whole content end to end (against `digest` when there is one, and a stored copy against
/// its manifest), and the sealed content digest must be the one asked for.
async fn check_end(
    done: &mut Done,
    view: &UploadView,
    digest: Option<Digest>,
    id: &TaskId,
) -> Result<(), (&'static str, String)> {
    loop {
        match outcome(done) {
            Some(Ok(())) => break,
            Some(Err(f)) => return Err((f.cause, f.message)),
            None => tick(done).await,
        }
    }
    match (digest, view.content_digest()) {
        (Some(want), Some(got)) if got != want => {
            tracing::error!(task = %id, expected = %want, actual = %got, "blob digest mismatch before the last byte; response aborted, the client will retry");
            Err((
                "digest_mismatch",
                format!("blob content hashes to {got}, not {want}"),
            ))
        }
        (Some(_), None) => Err((
            "fetch_failed",
            format!("task {id} ended without a sealed content digest; retry"),
        )),
        _ => Ok(()),
    }
}
