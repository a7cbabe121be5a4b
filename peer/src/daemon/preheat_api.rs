//! The preheat API over HTTP, on the daemon's HTTP listener:
//! - `POST /api/v1/preheat` (a [`PreheatSpec`] as JSON) answers `202` with the job's ID;
//!   `GET /api/v1/preheat/ID` answers the [`Job`];
//! - Dragonfly's manager API, which Harbor's P2P preheat drives (Harbor's providers are
//!   Dragonfly and Kraken; the fields follow Harbor's Dragonfly driver): `POST /oapi/v1/jobs`
//!   with `{"type": "preheat", "args": {"type": "image"|"file", "url", "headers", "scope",
//!   "username", "password", "platform", "percentage"}}`, and `GET /oapi/v1/jobs/ID`, whose
//!   `state` is `PENDING`, `SUCCESS` or `FAILURE` and whose `result.job_states` lists the blobs
//!   each target holds. Scopes: `single_peer` (Harbor's default), `single_seed_peer` and
//!   `all_seed_peers` preheat the seeds; `all_peers` the seeds and `percentage` (default 100)
//!   of the other peers. `headers` (the registry's Authorization, from Harbor) go with every
//!   registry request.
//!
//! Every call needs `Authorization: Bearer <daemon.api_token>`; without a token configured,
//! only clients on this host are served. Bodies are at most 1 MiB.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::accept::{http_reply, HttpReply};
use crate::swarm::preheat::{Job, JobState, PreheatSpec};
use crate::swarm::Swarm;

const MAX_BODY: usize = 1 << 20;

pub async fn answer(
    swarm: &Arc<Swarm>,
    req: hyper::Request<hyper::body::Incoming>,
    remote: SocketAddr,
) -> HttpReply {
    if let Some(refused) = refusal(swarm, &req, remote) {
        return refused;
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let id_of = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|s| s.parse::<u64>().ok())
    };
    match (method, path.as_str()) {
        (Method::POST, "/api/v1/preheat") => {
            let spec: PreheatSpec = match body_json(req).await {
                Ok(s) => s,
                Err(r) => return *r,
            };
            match swarm.preheat(spec) {
                Ok(id) => json_reply(
                    StatusCode::ACCEPTED,
                    &json!({"id": id, "state": "pending", "status": format!("/api/v1/preheat/{id}")}),
                ),
                Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
            }
        }
        (Method::GET, p) if p.starts_with("/api/v1/preheat/") => {
            match id_of("/api/v1/preheat/").and_then(|id| swarm.preheat_job(id)) {
                Some(job) => json_reply(StatusCode::OK, &job),
                None => error(StatusCode::NOT_FOUND, "no such preheat job"),
            }
        }
        (Method::POST, "/oapi/v1/jobs") => {
            let call: DragonflyJob = match body_json(req).await {
                Ok(c) => c,
                Err(r) => return *r,
            };
            let spec = match call.spec() {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            };
            match swarm.preheat(spec) {
                Ok(id) => match swarm.preheat_job(id) {
                    Some(job) => json_reply(StatusCode::OK, &dragonfly_view(&job, &call.args)),
                    None => error(StatusCode::INTERNAL_SERVER_ERROR, "the job vanished"),
                },
                Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
            }
        }
        (Method::GET, p) if p.starts_with("/oapi/v1/jobs/") => {
            match id_of("/oapi/v1/jobs/").and_then(|id| swarm.preheat_job(id)) {
                Some(job) => {
                    let args = serde_json::to_value(&job.spec).unwrap_or_default();
                    json_reply(StatusCode::OK, &dragonfly_view(&job, &args))
                }
                None => error(StatusCode::NOT_FOUND, "no such job"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such preheat call"),
    }
}

/// The answer to a caller without the bearer token (or, without one configured, not on this
/// host); None for one who may call.
fn refusal(
    swarm: &Swarm,
    req: &hyper::Request<hyper::body::Incoming>,
    remote: SocketAddr,
) -> Option<HttpReply> {
    let token = &swarm.context().cfg.daemon.api_token;
    if token.is_empty() {
        if remote.ip().is_loopback() {
            return None;
        }
        return Some(error(
            StatusCode::FORBIDDEN,
            "the preheat API serves only this host; set daemon.api_token to serve others",
        ));
    }
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared by their hashes, so the time taken says nothing about the token.
    let hash = |s: &str| crate::core::Digest::of(s.as_bytes());
    match given {
        Some(g) if hash(g) == hash(token) => None,
        _ => Some(error(
            StatusCode::UNAUTHORIZED,
            "give Authorization: Bearer <daemon.api_token>",
        )),
    }
}

async fn body_json<T: serde::de::DeserializeOwned>(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<T, Box<HttpReply>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let body = tokio::time::timeout(Duration::from_secs(10), limited.collect())
        .await
        .map_err(|_| error(StatusCode::REQUEST_TIMEOUT, "the body took too long"))?
        .map_err(|e| error(StatusCode::PAYLOAD_TOO_LARGE, &format!("body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("not the expected JSON: {e}"),
        ))
    })
}

fn json_reply<T: serde::Serialize>(status: StatusCode, v: &T) -> HttpReply {
    match serde_json::to_vec(v) {
        Ok(b) => http_reply(status, "application/json", Bytes::from(b)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error(status: StatusCode, message: &str) -> HttpReply {
    json_reply_raw(
        status,
        &json!({"message": message, "code": status.as_u16()}),
    )
}

fn json_reply_raw(status: StatusCode, v: &serde_json::Value) -> HttpReply {
    http_reply(status, "application/json", Bytes::from(v.to_string()))
}

/// Dragonfly's job call, as Harbor sends it.
#[derive(Deserialize)]
struct DragonflyJob {
    #[serde(rename = "type")]
    kind: String,
    args: serde_json::Value,
}

#[derive(Deserialize, Default)]
struct DragonflyArgs {
    #[serde(rename = "type", default)]
    kind: String,
    url: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    platform: Option<String>,
    /// Headers for the registry: Harbor sends the pull's Authorization here.
    #[serde(default)]
    headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    percentage: Option<f64>,
}

impl DragonflyJob {
    fn spec(&self) -> Result<PreheatSpec, String> {
        if self.kind != "preheat" {
            return Err(format!(
                "job type {:?}: only \"preheat\" is supported",
                self.kind
            ));
        }
        let a: DragonflyArgs =
            serde_json::from_value(self.args.clone()).map_err(|e| format!("args: {e}"))?;
        let share = match a.scope.as_deref() {
            // Harbor's default is `single_peer`.
            None
            | Some("")
            | Some("single_peer")
            | Some("single_seed_peer")
            | Some("all_seed_peers") => 0.0,
            Some("all_peers") => a.percentage.map_or(1.0, |p| (p / 100.0).clamp(0.0, 1.0)),
            Some(other) => return Err(format!("scope {other:?} is not supported")),
        };
        let (images, urls) = match a.kind.as_str() {
            "" | "image" => (vec![a.url], Vec::new()),
            "file" => (Vec::new(), vec![a.url]),
            other => return Err(format!("args.type {other:?}: image or file")),
        };
        Ok(PreheatSpec {
            images,
            urls,
            share,
            platform: a.platform.filter(|p| !p.is_empty()),
            headers: a.headers.unwrap_or_default(),
            username: a.username.filter(|u| !u.is_empty()),
            password: a.password.filter(|p| !p.is_empty()),
            timeout_seconds: None,
        })
    }
}

/// Per task and target holding it whole: its URL and the target, as Harbor lists them.
fn success_tasks(job: &Job) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for t in &job.tasks {
        for p in t
            .peers
            .iter()
            .filter(|p| p.pieces > 0 && p.have == p.pieces)
        {
            let ip = p
                .peer
                .rsplit_once(':')
                .map_or(p.peer.as_str(), |(ip, _)| ip);
            out.push(json!({"url": t.url, "hostname": p.peer, "ip": ip}));
        }
    }
    out
}

/// A job as Dragonfly's manager answers it.
fn dragonfly_view(job: &Job, args: &serde_json::Value) -> serde_json::Value {
    let state = match job.state {
        JobState::Pending | JobState::Running => "PENDING",
        JobState::Success => "SUCCESS",
        JobState::Failure => "FAILURE",
    };
    let time = |t: u64| {
        humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(t))
            .to_string()
    };
    let mut args = args.clone();
    if let Some(a) = args.as_object_mut() {
        a.remove("password");
    }
    json!({
        "id": job.id,
        "task_id": format!("starling-preheat-{}", job.id),
        "type": "preheat",
        "state": state,
        "status": state,
        "args": args,
        // `job_states` is the shape Harbor's Dragonfly driver reads (one state, with the
        // blobs each target holds whole); the rest is Starling's own detail.
        "result": {
            "job_states": [{
                "error": job.error.clone().unwrap_or_default(),
                "results": [{
                    "success_tasks": success_tasks(job),
                    "failure_tasks": [],
                    "scheduler_cluster_id": 0,
                }],
            }],
            "targets": job.targets,
            "tasks": job.tasks,
            "error": job.error,
        },
        "created_at": time(job.created),
        "updated_at": time(job.updated),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harbors_dragonfly_calls_become_preheat_specs() {
        let job = |args: serde_json::Value| DragonflyJob {
            kind: "preheat".into(),
            args,
        };
        let s = job(json!({"type": "image", "url": "https://r.example/v2/a/b/manifests/v1", "username": "u", "password": "p", "scope": "single_seed_peer"})).spec().unwrap();
        assert_eq!(s.images, ["https://r.example/v2/a/b/manifests/v1"]);
        assert_eq!(
            (s.share, s.username.as_deref(), s.password.as_deref()),
            (0.0, Some("u"), Some("p"))
        );
        let s =
            job(json!({"type": "image", "url": "x/y:1", "scope": "all_peers", "percentage": 30}))
                .spec()
                .unwrap();
        assert!((s.share - 0.3).abs() < 1e-9);
        let s = job(json!({"type": "file", "url": "https://o.example/f.bin"}))
            .spec()
            .unwrap();
        assert_eq!(s.urls, ["https://o.example/f.bin"]);
        assert!(job(json!({"type": "image", "url": "x", "scope": "galaxy"}))
            .spec()
            .is_err());
        assert!(DragonflyJob {
            kind: "sync_peers".into(),
            args: json!({})
        }
        .spec()
        .is_err());
    }

    #[test]
    fn harbors_own_request_and_reading_of_the_answer_fit() {
        // What Harbor's Dragonfly driver sends (its default scope, the registry's
        // Authorization in `headers`, fields Starling does not use).
        let call: DragonflyJob = serde_json::from_value(json!({
            "type": "preheat",
            "args": {"type": "image", "url": "https://harbor.example/v2/library/app/manifests/sha256:abc",
                     "tag": "v1", "filtered_query_params": "", "headers": {"Authorization": "Basic dTpw"},
                     "scope": "single_peer", "concurrent_count": 0, "timeout": 0},
            "scheduler_cluster_ids": null
        }))
        .unwrap();
        let spec = call.spec().unwrap();
        assert_eq!(spec.share, 0.0);
        assert_eq!(
            spec.headers.get("Authorization").map(String::as_str),
            Some("Basic dTpw")
        );
        // What it reads back: a numeric id, the state, RFC 3339 times, and job_states.
        let job = Job {
            id: 7,
            state: JobState::Success,
            error: None,
            created: 1_700_000_000,
            updated: 1_700_000_060,
            spec,
            targets: vec!["10.0.0.1:7950".into()],
            tasks: vec![crate::swarm::preheat::TaskProgress {
                task: crate::core::TaskId::for_content(crate::core::Digest::of(b"x")),
                image: "app".into(),
                url: "https://harbor.example/v2/library/app/blobs/sha256:x".into(),
                size: Some(1),
                complete: 1,
                peers: vec![crate::swarm::preheat::PeerProgress {
                    peer: "10.0.0.1:7950".into(),
                    have: 1,
                    pieces: 1,
                }],
            }],
        };
        let v = dragonfly_view(&job, &json!({}));
        assert_eq!(v["id"], 7);
        assert_eq!(v["state"], "SUCCESS");
        assert_eq!(v["created_at"], "2023-11-14T22:13:20Z");
        let ok = &v["result"]["job_states"][0]["results"][0]["success_tasks"][0];
        assert_eq!(ok["ip"], "10.0.0.1");
        assert_eq!(
            ok["url"],
            "https://harbor.example/v2/library/app/blobs/sha256:x"
        );
    }
}
