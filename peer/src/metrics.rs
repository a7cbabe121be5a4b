//! Prometheus metrics (prometheus-client), served by the daemon at `/metrics`.
//!
//! Series: bytes downloaded by source (parent, origin, local store) and uploaded; failed origin
//! requests and failed parent pieces by cause; tasks downloading, served and finished;
//! per-parent throughput; parents blacklisted; answers to other peers' news long-polls; the
//! store's usage; failed scheduler calls.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

type Labels2 = Vec<(&'static str, String)>;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Bytes downloaded by source, and uploaded, since the daemon started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    pub parent: u64,
    pub origin: u64,
    pub local: u64,
    pub uploaded: u64,
}

pub struct Metrics {
    registry: Registry,
    bytes: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    downloading: Gauge<i64, std::sync::atomic::AtomicI64>,
    finished: Family<Labels, Counter>,
    uploaded: Counter,
    piece_failures: Family<Labels, Counter>,
    serving: Gauge<i64, std::sync::atomic::AtomicI64>,
    parent_rate: Family<Labels2, Gauge<f64, std::sync::atomic::AtomicU64>>,
    blacklisted: Counter,
    have_answers: Counter,
    declined: Family<Labels, Counter>,
    offered: Counter,
    have_bytes: Counter,
    proxy_requests: Family<Labels, Counter>,
    proxy_bytes: Family<Labels, Counter>,
    proxy_aborts: Family<Labels, Counter>,
    accept_failures: Family<Labels, Counter>,
    store_used: Gauge<i64, std::sync::atomic::AtomicI64>,
    store_capacity: Gauge<i64, std::sync::atomic::AtomicI64>,
    scheduler_errors: Family<Labels, Counter>,
    handshakes_refused: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("starling");
        let bytes = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let downloading = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        let finished = Family::<Labels, Counter>::default();
        registry.register(
            "bytes_downloaded",
            "Content bytes obtained, by source: parent (piece bytes from peers), origin (piece bodies received, retries included) or local (store hits)",
            bytes.clone(),
        );
        registry.register(
            "request_failures",
            "Failed piece or origin requests, by cause (each failed attempt counts)",
            failures.clone(),
        );
        registry.register(
            "tasks_downloading",
            "Tasks being downloaded now",
            downloading.clone(),
        );
        registry.register(
            "tasks_finished",
            "Tasks finished, by result (ok, failed)",
            finished.clone(),
        );
        let uploaded = Counter::default();
        registry.register(
            "bytes_uploaded",
            "Piece bytes sent to other peers",
            uploaded.clone(),
        );
        let piece_failures = Family::<Labels, Counter>::default();
        registry.register(
            "piece_failures",
            "Pieces that failed from a parent, by cause (digest_mismatch, timeout, reset, refused)",
            piece_failures.clone(),
        );
        let serving = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "tasks_serving",
            "Tasks this peer serves to others (downloading or complete)",
            serving.clone(),
        );
        let parent_rate = Family::<Labels2, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "parent_throughput_bytes_per_second",
            "Measured download rate from each parent (by its advertised address), latest task",
            parent_rate.clone(),
        );
        let blacklisted = Counter::default();
        registry.register(
            "parents_blacklisted",
            "Parents blacklisted for serving corrupt pieces",
            blacklisted.clone(),
        );
        let have_answers = Counter::default();
        registry.register(
            "have_answers",
            "Answers to other peers' long-polls for news of the pieces this peer verified",
            have_answers.clone(),
        );
        let have_bytes = Counter::default();
        registry.register(
            "have_answer_bytes",
            "Bytes of those answers (each piece's index and chain value), before QUIC's framing",
            have_bytes.clone(),
        );
        let declined = Family::<Labels, Counter>::default();
        registry.register(
            "piece_requests_declined",
            "Piece requests this peer declined for now (Busy), spreading a task's pieces, by reason: held (sent to another peer, not yet passed on) or no_slot (sending to as many peers as it will)",
            declined.clone(),
        );
        for reason in ["held", "no_slot"] {
            let _ = declined.get_or_create(&vec![("reason", reason)]);
        }
        let offered = Counter::default();
        registry.register(
            "pieces_offered",
            "Pieces offered instead in those answers (pieces no one has been sent yet)",
            offered.clone(),
        );
        let proxy_requests = Family::<Labels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Proxy / mirror requests, by route: p2p (peer to peer), pass (passed through), tunnel (CONNECT, untouched), intercept (CONNECT, TLS terminated), rejected (4xx from the proxy itself)",
            proxy_requests.clone(),
        );
        let proxy_bytes = Family::<Labels, Counter>::default();
        registry.register(
            "proxy_bytes",
            "Response body bytes sent to proxy clients, by route (p2p, pass)",
            proxy_bytes.clone(),
        );
        let proxy_aborts = Family::<Labels, Counter>::default();
        registry.register(
            "proxy_aborts",
            "Peer-to-peer responses aborted before their last byte, by cause (digest_mismatch, fetch_failed)",
            proxy_aborts.clone(),
        );
        let accept_failures = Family::<Labels, Counter>::default();
        registry.register(
            "accept_failures",
            "Failed accepts on a listener (proxy, api, metrics), such as running out of file descriptors",
            accept_failures.clone(),
        );
        let store_used = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "store_used_bytes",
            "Bytes the store uses, as GC last measured it (of gc.capacity_bytes, else of the file system)",
            store_used.clone(),
        );
        let store_capacity = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "store_capacity_bytes",
            "The store's capacity as GC counts it (gc.capacity_bytes, else the file system's size)",
            store_capacity.clone(),
        );
        let scheduler_errors = Family::<Labels, Counter>::default();
        registry.register(
            "scheduler_errors",
            "Scheduler calls that failed (unreachable, timed out, refused), by call (announce, candidates)",
            scheduler_errors.clone(),
        );
        let handshakes_refused = Family::<Labels, Counter>::default();
        registry.register(
            "handshakes_refused",
            "Incoming QUIC connections refused before they were established, by reason (tls: a certificate the cluster CA did not sign, or none; timeout; other)",
            handshakes_refused.clone(),
        );
        // Known label values start at zero, so rate() and increase() see the first event and
        // every series the alerts and the dashboard name exists from the start.
        for s in ["parent", "origin", "local"] {
            let _ = bytes.get_or_create(&vec![("source", s)]);
        }
        for c in [
            "digest_mismatch",
            "timeout",
            "reset",
            "refused",
            "false_values",
        ] {
            let _ = piece_failures.get_or_create(&vec![("cause", c)]);
        }
        for r in ["p2p", "pass", "tunnel", "intercept", "rejected"] {
            let _ = proxy_requests.get_or_create(&vec![("route", r)]);
        }
        for c in ["digest_mismatch", "fetch_failed"] {
            let _ = proxy_aborts.get_or_create(&vec![("cause", c)]);
        }
        for c in ["announce", "candidates"] {
            let _ = scheduler_errors.get_or_create(&vec![("call", c)]);
        }
        for r in ["tls", "timeout", "other"] {
            let _ = handshakes_refused.get_or_create(&vec![("reason", r)]);
        }
        Metrics {
            handshakes_refused,
            store_used,
            store_capacity,
            scheduler_errors,
            accept_failures,
            proxy_requests,
            proxy_bytes,
            proxy_aborts,
            registry,
            bytes,
            failures,
            downloading,
            finished,
            uploaded,
            piece_failures,
            serving,
            parent_rate,
            blacklisted,
            have_answers,
            declined,
            offered,
            have_bytes,
        }
    }

    /// The byte counters so far (the status page works out throughput from them).
    pub fn totals(&self) -> Totals {
        let by = |s: &'static str| self.bytes.get_or_create(&vec![("source", s)]).get();
        Totals {
            parent: by("parent"),
            origin: by("origin"),
            local: by("local"),
            uploaded: self.uploaded.get(),
        }
    }

    pub fn add_bytes(&self, source: &'static str, n: u64) {
        self.bytes
            .get_or_create(&vec![("source", source)])
            .inc_by(n);
    }

    pub fn failure(&self, cause: &'static str) {
        self.failures.get_or_create(&vec![("cause", cause)]).inc();
    }

    pub fn started(&self) {
        self.downloading.inc();
    }

    pub fn finished(&self, ok: bool) {
        self.downloading.dec();
        self.finished
            .get_or_create(&vec![("result", if ok { "ok" } else { "failed" })])
            .inc();
    }

    pub fn uploaded(&self, n: u64) {
        self.uploaded.inc_by(n);
    }

    pub fn piece_failure(&self, cause: &'static str) {
        self.piece_failures
            .get_or_create(&vec![("cause", cause)])
            .inc();
    }

    pub fn set_serving(&self, n: usize) {
        self.serving.set(n as i64);
    }

    pub fn parent_rate(&self, parent: &str, bytes_per_second: f64) {
        self.parent_rate
            .get_or_create(&vec![("parent", parent.to_string())])
            .set(bytes_per_second);
    }

    pub fn have_answered(&self, bytes: usize) {
        self.have_answers.inc();
        self.have_bytes.inc_by(bytes as u64);
    }

    /// A piece request declined (Busy), for want of a slot or offering `offered` pieces
    /// instead.
    pub fn declined(&self, no_slot: bool, offered: usize) {
        let reason = if no_slot { "no_slot" } else { "held" };
        self.declined.get_or_create(&vec![("reason", reason)]).inc();
        self.offered.inc_by(offered as u64);
    }

    pub fn blacklisted(&self) {
        self.blacklisted.inc();
    }

    pub fn proxy_request(&self, route: &'static str) {
        self.proxy_requests
            .get_or_create(&vec![("route", route)])
            .inc();
    }

    pub fn proxy_bytes(&self, route: &'static str, n: u64) {
        self.proxy_bytes
            .get_or_create(&vec![("route", route)])
            .inc_by(n);
    }

    pub fn accept_failure(&self, listener: &'static str) {
        self.accept_failures
            .get_or_create(&vec![("listener", listener)])
            .inc();
    }

    /// The store's usage as a GC pass measured it.
    pub fn store_usage(&self, used: u64, capacity: u64) {
        self.store_used.set(used.min(i64::MAX as u64) as i64);
        self.store_capacity
            .set(capacity.min(i64::MAX as u64) as i64);
    }

    pub fn scheduler_error(&self, call: &'static str) {
        self.scheduler_errors
            .get_or_create(&vec![("call", call)])
            .inc();
    }

    /// An incoming QUIC connection refused during its handshake (see `transport::refusal`).
    pub fn handshake_refused(&self, reason: &'static str) {
        self.handshakes_refused
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub fn proxy_abort(&self, cause: &'static str) {
        self.proxy_aborts
            .get_or_create(&vec![("cause", cause)])
            .inc();
    }

    /// Registers the listener series (refused handshakes, failed accepts) in `registry`: for a
    /// process that renders its own metrics (the scheduler).
    pub fn register_listeners(&self, registry: &mut Registry) {
        registry.register(
            "handshakes_refused",
            "Incoming QUIC connections refused before they were established, by reason",
            self.handshakes_refused.clone(),
        );
        registry.register(
            "accept_failures",
            "Failed accepts on a listener",
            self.accept_failures.clone(),
        );
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::new();
        m.add_bytes("origin", 10);
        m.add_bytes("origin", 5);
        m.failure("server_error");
        m.started();
        m.finished(true);
        m.have_answered(101);
        let text = m.render();
        assert!(
            text.contains("starling_bytes_downloaded_total{source=\"origin\"} 15"),
            "{text}"
        );
        assert!(
            text.contains("starling_request_failures_total{cause=\"server_error\"} 1"),
            "{text}"
        );
        assert!(text.contains("starling_tasks_downloading 0"), "{text}");
        assert!(text.contains("starling_have_answers_total 1"), "{text}");
        assert!(
            text.contains("starling_have_answer_bytes_total 101"),
            "{text}"
        );
        assert!(
            text.contains("starling_tasks_finished_total{result=\"ok\"} 1"),
            "{text}"
        );
    }
}
