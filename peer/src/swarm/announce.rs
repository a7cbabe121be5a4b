//! Announcements: every `peer.announce_interval_ms`, each scheduler that owns some of this
//! peer's tasks hears what changed (pieces verified since the last announcement, or the whole
//! bitmap when it asks again or the task is new to it), plus this peer's upload capacity, load
//! and measured links. Every scheduler also gets a heartbeat, so it knows the peer (and
//! whether it is a seed) before it holds anything. A scheduler that fails to answer gets full
//! bitmaps next time: it may have restarted. While nothing changes (no piece, no task gone,
//! no origin read, no upload), the heartbeat goes every [`IDLE_HEARTBEAT`] only.
//!
//! Announcements also say which tasks this node reads from their origins; a scheduler that
//! chose another node meanwhile (this one was silent: a stalled process) says so in its
//! reply, and this node's readers of those tasks give way ([`Fetching::give_way`]). After a
//! stall of the process, a reader waits for that answer before reading on, so it does not
//! race it ([`crate::fetch::GiveWay::check_in`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::schedulers::Schedulers;
use super::Swarm;
use crate::core::TaskId;
use crate::fetch::{GiveWay, Heard};
use crate::scheduler::service::AnnounceReply;
use crate::scheduler::{Announce, Holding, Place};
use crate::stall::StallClock;
use crate::transport::wire::Request as Wire;

pub(super) struct State {
    inner: Mutex<Inner>,
    /// One announcement round at a time (the periodic one, or one asked for at once), so a
    /// scheduler hears each peer's rounds in order.
    round: tokio::sync::Mutex<()>,
    /// Tasks this node reads from their origins now, by how many readers: announced, so a
    /// restarted scheduler learns who fetches (and nobody else is sent to fetch the same).
    /// Each with the request to stop, set when a scheduler says another node fetches it.
    fetching: Arc<Mutex<HashMap<TaskId, (usize, GiveWay)>>>,
    /// When the schedulers last answered a round: a reader whose process stalled for
    /// [`UNHEARD`] checks in before reading on ([`GiveWay::check_in`]).
    heard: Heard,
}

impl Default for State {
    fn default() -> State {
        State {
            inner: Mutex::default(),
            round: tokio::sync::Mutex::default(),
            fetching: Arc::default(),
            heard: Heard::new(StallClock::new(), UNHEARD, HEARD_WAIT),
        }
    }
}

/// A stall of this process this long makes an origin reader check in with the schedulers
/// before reading on: a scheduler takes a fetcher unheard for 5 s for gone
/// (`scheduler::FETCHER_SILENT`), and announcements go every 500 ms (or the 2 s heartbeat).
const UNHEARD: Duration = Duration::from_secs(3);
/// How long such a reader waits for the answer at most: a scheduler unreachable for good must
/// not stop the download (it reads on; the schedulers' answers are then a peer's own timers).
const HEARD_WAIT: Duration = Duration::from_secs(5);

/// Counts one reader of a task's origin while alive (see [`State::fetching`]).
pub(super) struct Fetching {
    task: TaskId,
    of: Arc<Mutex<HashMap<TaskId, (usize, GiveWay)>>>,
    give_way: GiveWay,
}

impl Fetching {
    /// Asked when a scheduler answers this node's announcement that another live node was
    /// chosen to fetch the task.
    pub(super) fn give_way(&self) -> &GiveWay {
        &self.give_way
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        if let Ok(mut m) = self.of.lock() {
            if let Some((n, _)) = m.get_mut(&self.task) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.task);
                }
            }
        }
    }
}

impl State {
    /// Marks `task` as read from its origin by this node until the guard drops.
    pub(super) fn fetching(&self, task: TaskId) -> Fetching {
        let give_way = match self.fetching.lock() {
            Ok(mut m) => {
                let (n, g) = m
                    .entry(task)
                    .or_insert_with(|| (0, GiveWay::heard_by(&self.heard)));
                // A reader starting after the last one was told to stop starts afresh: the
                // scheduler chose it again.
                if g.asked() {
                    *g = GiveWay::heard_by(&self.heard);
                }
                *n += 1;
                g.clone()
            }
            Err(_) => GiveWay::default(),
        };
        Fetching {
            task,
            of: self.fetching.clone(),
            give_way,
        }
    }

    fn fetching_now(&self) -> Vec<TaskId> {
        self.fetching
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// A scheduler chose another node to fetch `tasks`: this node's readers stop.
    fn superseded(&self, tasks: &[TaskId]) {
        let Ok(m) = self.fetching.lock() else {
            return;
        };
        for t in tasks {
            if let Some((_, g)) = m.get(t) {
                if !g.asked() {
                    tracing::info!(task = %t, "the scheduler chose another node to read this origin");
                }
                g.ask();
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Per task: (log epoch, log position) announced so far.
    sent: HashMap<TaskId, (u32, u32)>,
    /// Tasks to announce in full next time.
    resend: HashSet<TaskId>,
    /// When the last round went out.
    last_round: Option<Instant>,
}

/// While a peer has nothing new to say, how often it still announces: a scheduler takes a
/// peer silent for 5 s for gone (`scheduler::FETCHER_SILENT`), so two heartbeats fit in that.
/// Every `announce_interval_ms` (500 ms) cost an idle daemon about a tenth of its CPU, and
/// the scheduler four times the calls for an idle fleet.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(2);

pub(super) async fn run(swarm: Arc<Swarm>) {
    let mut tick = tokio::time::interval(Duration::from_millis(
        swarm.ctx.cfg.peer.announce_interval_ms,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeat = IDLE_HEARTBEAT.max(Duration::from_millis(
        swarm.ctx.cfg.peer.announce_interval_ms,
    ));
    loop {
        tick.tick().await;
        announce_once(&swarm, Some(heartbeat)).await;
    }
}

/// Announces what changed now, without waiting for the next tick: an import returns only once
/// the scheduler knows this node holds the file, so peers asked right after find it.
pub(super) async fn now(swarm: &Arc<Swarm>) {
    announce_once(swarm, None).await;
}

/// One round. With `idle_every`, a round with nothing new in it is sent only that long after
/// the last one.
async fn announce_once(swarm: &Arc<Swarm>, idle_every: Option<Duration>) {
    let _round = swarm.announcer.round.lock().await;
    let views = swarm.served.views();
    let mut tasks: Vec<(TaskId, Holding)> = Vec::new();
    {
        let Ok(mut st) = swarm.announcer.inner.lock() else {
            return;
        };
        let current: HashSet<TaskId> = views.iter().map(|(id, _)| *id).collect();
        let gone: Vec<TaskId> = st
            .sent
            .keys()
            .filter(|t| !current.contains(t))
            .copied()
            .collect();
        for t in gone {
            st.sent.remove(&t);
            tasks.push((t, Holding::Gone));
        }
        for (id, view) in &views {
            let full = st.resend.remove(id);
            let (epoch, pos) = st.sent.get(id).copied().unwrap_or((u32::MAX, 0));
            let slice = view.log_since(epoch, pos);
            let holding = if full || slice.epoch != epoch {
                Holding::Full {
                    pieces: view.plan().count(),
                    have: view.bitmap(),
                }
            } else {
                Holding::Added(
                    slice
                        .entries
                        .iter()
                        .filter(|e| e.held)
                        .map(|e| e.index)
                        .collect(),
                )
            };
            st.sent.insert(*id, (slice.epoch, slice.end));
            tasks.push((*id, holding));
        }
    }
    let links = swarm
        .links
        .lock()
        .map(|l| l.iter().map(|(k, v)| (k.clone(), *v)).collect())
        .unwrap_or_default();
    // Each view held is a reference that makes `starling rm` and GC's withdrawal refuse the
    // task as in use: let go of them before the call to the scheduler waits on the network.
    drop(views);
    let fetching = swarm.announcer.fetching_now();
    let uploads = swarm.served.take_load();
    let quiet = fetching.is_empty()
        && uploads == 0
        && tasks
            .iter()
            .all(|(_, h)| matches!(h, Holding::Added(v) if v.is_empty()));
    {
        let Ok(mut st) = swarm.announcer.inner.lock() else {
            return;
        };
        let recent = |every| st.last_round.is_some_and(|t| t.elapsed() < every);
        if quiet && idle_every.is_some_and(recent) {
            return;
        }
        st.last_round = Some(Instant::now());
    }
    let base = Announce {
        fetching: Vec::new(),
        peer: swarm.me.clone(),
        addr: swarm.addr,
        seed: swarm.ctx.cfg.peer.seed,
        upload_capacity: swarm.ctx.cfg.peer.upload_mbps * 125_000.0,
        uploads,
        tasks: Vec::new(),
        links,
        place: Place {
            zone: swarm.ctx.cfg.peer.zone.clone(),
            rack: swarm.ctx.cfg.peer.rack.clone(),
        },
    };
    let sent = Instant::now();
    match &swarm.schedulers {
        Schedulers::Embedded(s) => {
            let mut a = base;
            a.tasks = tasks;
            a.fetching = fetching;
            let reply = s.announce(a);
            swarm.announcer.superseded(&reply.superseded);
            resend(swarm, reply.resend);
            swarm.announcer.heard.answered(sent);
        }
        Schedulers::Remote { ring, .. } => {
            let mut by_owner: HashMap<String, Vec<(TaskId, Holding)>> = ring
                .members()
                .into_iter()
                .map(|a| (a, Vec::new()))
                .collect();
            for (id, h) in tasks {
                if let Some(owner) = ring.owner(&id) {
                    by_owner.entry(owner).or_default().push((id, h));
                }
            }
            let mut all_answered = true;
            for (owner, tasks) in by_owner {
                let mut a = base.clone();
                let ids: Vec<TaskId> = tasks
                    .iter()
                    .filter(|(_, h)| *h != Holding::Gone)
                    .map(|(t, _)| *t)
                    .collect();
                a.tasks = tasks;
                a.fetching = fetching
                    .iter()
                    .filter(|t| ring.owner(t).as_ref() == Some(&owner))
                    .copied()
                    .collect();
                let Ok(body) = serde_json::to_vec(&a) else {
                    continue;
                };
                let reply = swarm
                    .remote(&owner, |len| Wire::Announce { body: len }, &body)
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<AnnounceReply>(&b).ok());
                match reply {
                    Some(r) => {
                        swarm.announcer.superseded(&r.superseded);
                        resend(swarm, r.resend)
                    }
                    None => {
                        all_answered = false;
                        swarm.ctx.metrics.scheduler_error("announce");
                        tracing::debug!(scheduler = %owner, "announcement failed; full bitmaps next time");
                        resend(swarm, ids);
                    }
                }
            }
            // After what the answers said was applied: a reader waiting to check in
            // (`GiveWay::check_in`) sees a request to give way before it reads on.
            if all_answered {
                swarm.announcer.heard.answered(sent);
            }
        }
    }
}

fn resend(swarm: &Swarm, tasks: Vec<TaskId>) {
    if tasks.is_empty() {
        return;
    }
    if let Ok(mut st) = swarm.announcer.inner.lock() {
        st.resend.extend(tasks);
    }
}
