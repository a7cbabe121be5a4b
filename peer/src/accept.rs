//! Accept loops that survive running out of file descriptors.
//!
//! - After a failed `accept` (EMFILE, ENFILE, ENOBUFS...) a loop waits, 10 ms doubling to 1 s,
//!   instead of spinning on the same error, and logs at most once every 10 s with the number
//!   of failures it left out (`starling_accept_failures_total{listener}` counts them all).
//! - Each listener holds at most its cap of connections at once (`proxy.max_connections`,
//!   `daemon.max_api_connections`): beyond it, new connections wait in the kernel's backlog, so
//!   a flood on one listener cannot take every descriptor from the others. The caps are also
//!   held under a share of the open-file limit ([`within_fd_limit`]: half for the proxy, a
//!   quarter for the API).
//! - [`raise_nofile_limit`] lifts the soft open-file limit to the hard one at start.
//! - [`serve_http`]: the small HTTP listeners (the daemon's metrics and status page, the
//!   scheduler's health) on such a loop, at most 64 connections each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

const FIRST_WAIT: Duration = Duration::from_millis(10);
const MAX_WAIT: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's back-off and connection slots.
pub struct Guard {
    listener: &'static str,
    wait: Duration,
    logged: Option<Instant>,
    untold: u64,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Guard {
    /// For `listener` (a metric label), with at most `max` connections at once.
    pub fn new(listener: &'static str, max: usize, metrics: Arc<Metrics>) -> Guard {
        Guard {
            listener,
            wait: FIRST_WAIT,
            logged: None,
            untold: 0,
            slots: Arc::new(Semaphore::new(max.max(1))),
            metrics,
        }
    }

    /// A connection slot: waits while the listener holds its cap. Held by the connection's task.
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    /// An accept succeeded.
    pub fn accepted(&mut self) {
        self.wait = FIRST_WAIT;
    }

    /// An accept failed: count it, log it (rate-limited), and wait before the next.
    pub async fn failed(&mut self, e: &std::io::Error) {
        self.metrics.accept_failure(self.listener);
        let due = self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if due {
            tracing::warn!(
                listener = self.listener,
                error = %e,
                more_since_last = self.untold,
                "accept failed; waiting before the next (raise the open-file limit, or lower proxy.max_connections / daemon.max_api_connections)"
            );
            self.logged = Some(Instant::now());
            self.untold = 0;
        } else {
            self.untold += 1;
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(MAX_WAIT);
    }
}

/// An HTTP answer from [`serve_http`]'s handler.
pub type HttpReply = hyper::Response<http_body_util::Full<bytes::Bytes>>;

/// Serves HTTP/1.1 on `listener` (a metric label `name`), each request answered by
/// `handler(request, client address)`, until the task is dropped. A client has 10 s to send
/// its headers.
pub async fn serve_http<F, Fut>(
    listener: tokio::net::TcpListener,
    name: &'static str,
    metrics: Arc<Metrics>,
    handler: F,
) where
    F: Fn(hyper::Request<hyper::body::Incoming>, std::net::SocketAddr) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = HttpReply> + Send + 'static,
{
    let mut guard = Guard::new(name, 64, metrics);
    loop {
        let Some(slot) = guard.slot().await else {
            return;
        };
        let (stream, remote) = match listener.accept().await {
            Ok(s) => {
                guard.accepted();
                s
            }
            Err(e) => {
                drop(slot);
                guard.failed(&e).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let reply = handler(req, remote);
                    async move { Ok::<_, std::convert::Infallible>(reply.await) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// A reply with `status`, `content_type` and `body`, never cached.
pub fn http_reply(status: hyper::StatusCode, content_type: &str, body: bytes::Bytes) -> HttpReply {
    let mut r = hyper::Response::new(http_body_util::Full::new(body));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

/// `max`, but at most `share` of the process's open-file limit: a listener's cap must leave
/// descriptors for everything else.
pub fn within_fd_limit(max: usize, share: f64) -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    match soft {
        Some(l) => max.min(((l as f64 * share) as usize).max(1)),
        None => max,
    }
}

/// Raises the soft open-file limit to the hard limit; returns (old soft, new soft).
pub fn raise_nofile_limit() -> Option<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    let (soft, hard) = (l.current?, l.maximum);
    let target = hard.unwrap_or(1 << 20);
    if soft >= target {
        return Some((soft, soft));
    }
    l.current = Some(target);
    match setrlimit(Resource::Nofile, l) {
        Ok(()) => Some((soft, target)),
        Err(e) => {
            tracing::debug!(error = %e, "cannot raise the open-file limit");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_back_off_and_successes_reset() {
        let m = Arc::new(Metrics::new());
        let mut g = Guard::new("test", 2, m.clone());
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let t = tokio::time::Instant::now();
        for _ in 0..8 {
            g.failed(&e).await;
        }
        // 10 + 20 + ... + 640 ms, capped at 1 s: about 1.27 s, not a spin.
        assert!(
            t.elapsed() >= Duration::from_millis(1270),
            "{:?}",
            t.elapsed()
        );
        assert!(m
            .render()
            .contains("starling_accept_failures_total{listener=\"test\"} 8"));
        g.accepted();
        assert_eq!(g.wait, FIRST_WAIT);
        let a = g.slot().await;
        let b = g.slot().await;
        assert!(a.is_some() && b.is_some());
        assert!(
            tokio::time::timeout(Duration::from_millis(10), g.slot())
                .await
                .is_err(),
            "the cap holds"
        );
    }
}
