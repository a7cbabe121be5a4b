//! The daemon's HTTP listener (`daemon.metrics_addr`, hyper, HTTP/1.1):
//! - `GET /metrics`: Prometheus text;
//! - `GET /`: the status page (`status.html`, one self-contained file: no scripts or fonts
//!   from elsewhere, so it works on an air-gapped node);
//! - `GET /api/status`: what the page draws, as JSON ([`Status`]): this peer, byte totals and
//!   the last two minutes of throughput (sampled here once a second, so a page opened now
//!   shows them at once), the most recently used tasks with their piece maps, and the measured
//!   paths (`starling probe`'s report);
//! - `GET /healthy`, `/healthz`: 200 while the daemon runs;
//! - the preheat API (`preheat_api`): `/api/v1/preheat`, and Dragonfly's `/oapi/v1/jobs`.
//!
//! It listens on loopback by default; the page shows task URLs, so expose it only where the
//! metrics are exposed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::accept::{http_reply, HttpReply};
use crate::metrics::Totals;
use crate::netprobe::ProbeReport;
use crate::swarm::inventory::TaskInfo;
use crate::swarm::Swarm;

const PAGE: &str = include_str!("status.html");
/// Tasks the page shows (the most recently used).
const PAGE_TASKS: usize = 50;

/// What `/api/status` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub peer: String,
    pub seed: bool,
    /// Where the scheduler places this node (`peer.zone`, `peer.rack`).
    pub zone: String,
    pub rack: String,
    pub version: String,
    pub uptime_seconds: f64,
    /// `embedded`, or the configured schedulers.
    pub schedulers: Vec<String>,
    pub totals: Totals,
    /// Throughput over the last [`HISTORY`] seconds, oldest first.
    pub history: Vec<Sample>,
    pub tasks: Vec<PageTask>,
    pub paths: ProbeReport,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PageTask {
    #[serde(flatten)]
    pub info: TaskInfo,
    /// Verified pieces as ranges (`0-511,514`) while not complete.
    pub have: Option<String>,
}

/// Throughput in one second, in bytes per second.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the daemon started, at the end of the second.
    pub t: f64,
    pub parent: f64,
    pub origin: f64,
    pub uploaded: f64,
}

/// Seconds of throughput kept.
const HISTORY: usize = 120;

/// The byte totals once a second, for the last [`HISTORY`] seconds.
#[derive(Default)]
struct History(std::sync::Mutex<std::collections::VecDeque<(f64, Totals)>>);

impl History {
    async fn run(self: Arc<Self>, metrics: Arc<crate::metrics::Metrics>, started: Instant) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Ok(mut h) = self.0.lock() {
                h.push_back((started.elapsed().as_secs_f64(), metrics.totals()));
                while h.len() > HISTORY + 1 {
                    h.pop_front();
                }
            }
        }
    }

    fn rates(&self) -> Vec<Sample> {
        let Ok(h) = self.0.lock() else {
            return Vec::new();
        };
        let rate = |a: u64, b: u64, dt: f64| b.saturating_sub(a) as f64 / dt;
        h.iter()
            .zip(h.iter().skip(1))
            .map(|((t0, a), (t1, b))| {
                let dt = (t1 - t0).max(1e-3);
                Sample {
                    t: *t1,
                    parent: rate(a.parent, b.parent, dt),
                    origin: rate(a.origin, b.origin, dt),
                    uploaded: rate(a.uploaded, b.uploaded, dt),
                }
            })
            .collect()
    }
}

/// Serves the listener until the daemon stops.
pub async fn serve(listener: tokio::net::TcpListener, swarm: Arc<Swarm>) {
    let metrics = swarm.context().metrics.clone();
    let started = Instant::now();
    let history = Arc::new(History::default());
    let sampler = tokio::spawn(history.clone().run(metrics.clone(), started));
    let _stop_sampler = AbortOnDrop(sampler);
    let page = Arc::new(Page {
        swarm,
        history,
        started,
    });
    crate::accept::serve_http(listener, "metrics", metrics, move |req, remote| {
        let page = page.clone();
        async move { page.answer(req, remote).await }
    })
    .await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a request may read.
struct Page {
    swarm: Arc<Swarm>,
    history: Arc<History>,
    started: Instant,
}

impl Page {
    async fn answer(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        remote: std::net::SocketAddr,
    ) -> HttpReply {
        let path = req.uri().path().to_string();
        if path.starts_with("/api/v1/preheat") || path.starts_with("/oapi/v1/jobs") {
            return super::preheat_api::answer(&self.swarm, req, remote).await;
        }
        let method = req.method();
        if method != Method::GET && method != Method::HEAD {
            return http_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match path.as_str() {
            "/healthy" | "/healthz" => http_reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/metrics" => http_reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.swarm.context().metrics.render().into(),
            ),
            "/" | "/status" => http_reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from_static(PAGE.as_bytes()),
            ),
            "/api/status" => match serde_json::to_vec(&self.status().await) {
                Ok(body) => http_reply(StatusCode::OK, "application/json", body.into()),
                Err(e) => http_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n").into(),
                ),
            },
            _ => http_reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    async fn status(&self) -> Status {
        let swarm = &self.swarm;
        let ctx = swarm.context();

        let tasks = swarm
            .tasks(PAGE_TASKS)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "status page: cannot list the store");
                Vec::new()
            })
            .into_iter()
            .map(|info| PageTask {
                have: (info.verified < info.pieces)
                    .then(|| swarm.verified_ranges(&info.id))
                    .flatten(),
                info,
            })
            .collect();
        let schedulers = if ctx.cfg.scheduler.addrs.is_empty() {
            vec!["embedded".to_string()]
        } else {
            ctx.cfg.scheduler.addrs.clone()
        };
        Status {
            peer: swarm.id().to_string(),
            seed: ctx.cfg.peer.seed,
            zone: ctx.cfg.peer.zone.clone(),
            rack: ctx.cfg.peer.rack.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            schedulers,
            totals: ctx.metrics.totals(),
            history: self.history.rates(),
            tasks,
            paths: swarm.probe_report(),
        }
    }
}
