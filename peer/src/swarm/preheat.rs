//! Preheat: put images and files on chosen peers before anyone asks for them.
//!
//! A job (`starling preheat`, or the HTTP API: `/api/v1/preheat`, and Dragonfly's
//! `/oapi/v1/jobs` for Harbor) runs on the daemon that took it:
//! 1. it resolves each image to its platform's blobs (`crate::registry`), each a content task
//!    named by its digest (the one a runtime's pull through the mirror asks for later), and
//!    each file URL to its task;
//! 2. it picks the targets from the peers a scheduler knows: every seed, and `share` of the
//!    other peers (chosen by a hash of the job and the peer, so jobs spread); with neither, this
//!    node itself;
//! 3. it sends each target an order per task (`order`: the target pulls it as a client's get
//!    would, so the origin is read once and the rest moves between peers);
//! 4. it follows each task's holders at its scheduler once a second, per task and per target,
//!    until every target holds every task whole (success), or the deadline (failure).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::Swarm;
use crate::core::{Request, TaskId};
use crate::scheduler::PeerId;
use crate::transport::wire::Request as Wire;

/// What to preheat, and where.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PreheatSpec {
    /// Image references or manifest URLs.
    #[serde(default)]
    pub images: Vec<String>,
    /// Plain file URLs.
    #[serde(default)]
    pub urls: Vec<String>,
    /// The share (0 to 1) of the peers that are not seeds to preheat too; 0: seeds only.
    #[serde(default)]
    pub share: f64,
    /// `os/arch[/variant]` of the images; default this node's.
    #[serde(default)]
    pub platform: Option<String>,
    /// Headers for the registry (Harbor passes its Authorization this way).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Registry credentials.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Give up after this long. Default 3600.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Resolving the images and choosing the targets.
    Pending,
    /// Orders sent; waiting for the targets to hold everything.
    Running,
    Success,
    Failure,
}

/// A preheat job's progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub state: JobState,
    /// Why it failed.
    pub error: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub updated: u64,
    pub spec: PreheatSpec,
    /// The peers it preheats.
    pub targets: Vec<PeerId>,
    pub tasks: Vec<TaskProgress>,
}

/// One blob or file of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskProgress {
    pub task: TaskId,
    /// The image it belongs to (empty for a file).
    pub image: String,
    pub url: String,
    pub size: Option<u64>,
    /// Targets holding it whole.
    pub complete: u32,
    /// Per target: pieces held, and the pieces (0 until the scheduler has heard of it).
    pub peers: Vec<PeerProgress>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerProgress {
    pub peer: PeerId,
    pub have: u32,
    pub pieces: u32,
}

/// This daemon's jobs (the last [`KEEP_JOBS`]).
#[derive(Default)]
pub(super) struct Jobs {
    jobs: Mutex<BTreeMap<u64, Job>>,
}

const KEEP_JOBS: usize = 256;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often a job looks at its tasks' holders.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Jobs {
    fn update(&self, id: u64, f: impl FnOnce(&mut Job)) {
        if let Ok(mut j) = self.jobs.lock() {
            if let Some(job) = j.get_mut(&id) {
                f(job);
                job.updated = now();
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreheatError {
    #[error("nothing to preheat: give image references or URLs")]
    Empty,
    #[error("share must be between 0 and 1, not {0}")]
    Share(f64),
    #[error(transparent)]
    Reference(#[from] crate::registry::RegistryError),
    #[error("{0:?} is not an http(s) URL")]
    Url(String),
}

impl Swarm {
    /// Starts a preheat job; returns its ID at once (the job runs in the background). A bad
    /// reference or URL is refused here.
    pub fn preheat(self: &Arc<Self>, spec: PreheatSpec) -> Result<u64, PreheatError> {
        if spec.images.is_empty() && spec.urls.is_empty() {
            return Err(PreheatError::Empty);
        }
        if !(0.0..=1.0).contains(&spec.share) {
            return Err(PreheatError::Share(spec.share));
        }
        for i in &spec.images {
            i.parse::<crate::registry::ImageRef>()?;
        }
        for u in &spec.urls {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(PreheatError::Url(u.clone()));
            }
        }
        let t = now();
        let id = {
            let Ok(mut jobs) = self.preheats.jobs.lock() else {
                return Err(PreheatError::Empty);
            };
            let id = jobs.keys().next_back().map_or(1, |k| k + 1);
            while jobs.len() >= KEEP_JOBS {
                jobs.pop_first();
            }
            jobs.insert(
                id,
                Job {
                    id,
                    state: JobState::Pending,
                    error: None,
                    created: t,
                    updated: t,
                    spec: PreheatSpec {
                        password: spec.password.as_ref().map(|_| "(hidden)".into()),
                        headers: spec
                            .headers
                            .keys()
                            .map(|k| (k.clone(), "(hidden)".to_string()))
                            .collect(),
                        ..spec.clone()
                    },
                    targets: Vec::new(),
                    tasks: Vec::new(),
                },
            );
            id
        };
        let me = self.clone();
        tokio::spawn(async move {
            let res = me.clone().run_preheat(id, spec).await;
            me.preheats.update(id, |j| match res {
                Ok(()) => j.state = JobState::Success,
                Err(e) => {
                    tracing::warn!(job = id, error = %e, "preheat failed");
                    j.state = JobState::Failure;
                    j.error = Some(e);
                }
            });
        });
        Ok(id)
    }

    /// A job's progress.
    pub fn preheat_job(&self, id: u64) -> Option<Job> {
        self.preheats.jobs.lock().ok()?.get(&id).cloned()
    }

    async fn run_preheat(self: Arc<Self>, id: u64, spec: PreheatSpec) -> Result<(), String> {
        let deadline = Instant::now()
            + spec
                .timeout_seconds
                .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
        // 1. What to fetch.
        let user = spec.username.clone().zip(spec.password.clone());
        let headers = crate::core::parse_headers(
            &spec
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>(),
        )
        .map_err(|e| e.to_string())?;
        let client = crate::registry::Client::new(&self.ctx.cfg, user, headers)
            .map_err(|e| e.to_string())?;
        let platform = spec
            .platform
            .clone()
            .unwrap_or_else(crate::registry::host_platform);
        let mut work: Vec<(String, Request, Option<u64>)> = Vec::new();
        for image in &spec.images {
            let r: crate::registry::ImageRef = image
                .parse()
                .map_err(|e: crate::registry::RegistryError| e.to_string())?;
            let resolved = client
                .resolve(&r, &platform)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(job = id, %image, manifest = %resolved.manifest, blobs = resolved.blobs.len(), "preheat resolved");
            for (b, req) in resolved.blobs.iter().zip(resolved.requests) {
                work.push((image.clone(), req, Some(b.size)));
            }
        }
        for u in &spec.urls {
            work.push((
                String::new(),
                Request {
                    url: u.clone(),
                    digest: None,
                    headers: Default::default(),
                    piece_length: None,
                },
                None,
            ));
        }
        let filtered = &self.ctx.cfg.source.filtered_query_params;
        let mut tasks: Vec<(TaskId, String, Request, Option<u64>)> = Vec::new();
        for (image, req, size) in work {
            let task =
                TaskId::resolve(&req.url, req.digest, filtered).map_err(|e| e.to_string())?;
            if !tasks.iter().any(|t| t.0 == task) {
                tasks.push((task, image, req, size));
            }
        }
        // 2. Where.
        let view = self
            .look(tasks[0].0)
            .await
            .map_err(|e| format!("no scheduler answered: {e}"))?;
        let targets = choose_targets(&view.peers, spec.share, id, &self.me);
        tracing::info!(
            job = id,
            tasks = tasks.len(),
            targets = targets.len(),
            "preheat starts"
        );
        self.preheats.update(id, |j| {
            j.state = JobState::Running;
            j.targets = targets.iter().map(|t| t.0.clone()).collect();
            j.tasks = tasks
                .iter()
                .map(|(task, image, req, size)| TaskProgress {
                    task: *task,
                    image: image.clone(),
                    url: req.url.clone(),
                    size: *size,
                    complete: 0,
                    peers: targets
                        .iter()
                        .map(|t| PeerProgress {
                            peer: t.0.clone(),
                            have: 0,
                            pieces: 0,
                        })
                        .collect(),
                })
                .collect();
        });
        // 3. Orders, every target in parallel.
        let mut sends = tokio::task::JoinSet::new();
        for (peer, addr) in targets.clone() {
            let me = self.clone();
            let orders: Vec<(TaskId, Vec<u8>)> = tasks
                .iter()
                .filter_map(|(t, _, r, _)| Some((*t, serde_json::to_vec(r).ok()?)))
                .collect();
            sends.spawn(async move {
                for (task, body) in orders {
                    me.send_order(&peer, addr, task, &body).await?;
                }
                Ok::<(), String>(())
            });
        }
        while let Some(r) = sends.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        // 4. Follow.
        loop {
            let mut all = true;
            for (i, (task, ..)) in tasks.iter().enumerate() {
                let Ok(v) = self.look(*task).await else {
                    all = false;
                    continue;
                };
                let held: BTreeMap<&str, (u32, u32)> = v
                    .holdings
                    .iter()
                    .map(|(p, h, n)| (p.as_str(), (*h, *n)))
                    .collect();
                let mut complete = 0;
                let peers: Vec<PeerProgress> = targets
                    .iter()
                    .map(|(p, _)| {
                        let (have, pieces) = held.get(p.as_str()).copied().unwrap_or((0, 0));
                        if pieces > 0 && have == pieces {
                            complete += 1;
                        }
                        PeerProgress {
                            peer: p.clone(),
                            have,
                            pieces,
                        }
                    })
                    .collect();
                all &= complete == targets.len() as u32;
                self.preheats.update(id, |j| {
                    if let Some(t) = j.tasks.get_mut(i) {
                        t.complete = complete;
                        t.peers = peers;
                    }
                });
            }
            if all {
                tracing::info!(job = id, "preheat done");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("the targets did not all hold every task before the deadline".into());
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    }

    /// One order to one target (this node takes its own directly), retried a few times.
    async fn send_order(
        self: &Arc<Self>,
        peer: &str,
        addr: std::net::SocketAddr,
        task: TaskId,
        body: &[u8],
    ) -> Result<(), String> {
        if peer == self.me {
            return self
                .clone()
                .take_order(task, body)
                .map(|_| ())
                .map_err(|s| format!("this node refused the order ({s:?})"));
        }
        let mut last = String::new();
        for attempt in 0..3u32 {
            let res = tokio::time::timeout(Duration::from_secs(10), async {
                let conn = self.connect(addr).await?;
                conn.call(|len| Wire::SeedOrder { task, body: len }, body)
                    .await
            })
            .await;
            match res {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        Err(format!("peer {peer} did not take the order: {last}"))
    }
}

/// Every seed, and `share` of the other peers (ordered by a hash of job and peer); with none,
/// `me`. Deterministic for a job.
fn choose_targets(
    peers: &[(PeerId, std::net::SocketAddr, bool)],
    share: f64,
    job: u64,
    me: &str,
) -> Vec<(PeerId, std::net::SocketAddr)> {
    let mut out: Vec<(PeerId, std::net::SocketAddr)> = peers
        .iter()
        .filter(|p| p.2)
        .map(|p| (p.0.clone(), p.1))
        .collect();
    let mut others: Vec<&(PeerId, std::net::SocketAddr, bool)> =
        peers.iter().filter(|p| !p.2).collect();
    others.sort_by_key(|p| crate::core::Digest::of(format!("{job}/{}", p.0).as_bytes()).0);
    let n = (share * others.len() as f64).ceil() as usize;
    out.extend(others.into_iter().take(n).map(|p| (p.0.clone(), p.1)));
    if out.is_empty() {
        if let Ok(addr) = me.parse() {
            out.push((me.to_string(), addr));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_every_seed_and_a_share_of_the_rest() {
        let a = |i: u8| std::net::SocketAddr::from(([10, 0, 0, i], 7950));
        let peers: Vec<(PeerId, std::net::SocketAddr, bool)> =
            (1..=10).map(|i| (a(i).to_string(), a(i), i <= 2)).collect();
        let me = a(9).to_string();
        let seeds = choose_targets(&peers, 0.0, 1, &me);
        assert_eq!(seeds.len(), 2);
        let half = choose_targets(&peers, 0.5, 1, &me);
        assert_eq!(half.len(), 2 + 4);
        assert_eq!(
            half,
            choose_targets(&peers, 0.5, 1, &me),
            "deterministic per job"
        );
        assert_ne!(
            half,
            choose_targets(&peers, 0.5, 2, &me),
            "spread over jobs"
        );
        assert_eq!(choose_targets(&peers, 1.0, 1, &me).len(), 10);
        // No seed and no share: this node.
        let plain: Vec<_> = peers.iter().filter(|p| !p.2).cloned().collect();
        assert_eq!(
            choose_targets(&plain, 0.0, 1, &me),
            vec![(me.clone(), a(9))]
        );
    }
}
