//! The simulated swarm: nodes running the real engine and asking the real scheduler, and the
//! event loop that moves time.
//!
//! Each node mirrors what a daemon does for each task (see `swarm/download.rs` and
//! `swarm/jobs.rs`, whose rules it takes from `starling::swarm::policy`):
//! - it asks its task's scheduler for parents on arrival, then as the ask loop does (soon
//!   while short of parents, backing off; every few seconds once it has enough), and follows
//!   the advice (`AskSeed` orders the seed to fetch from the origin; `Source` with no parent
//!   makes it fetch from the origin itself);
//! - per parent it connects (two round trips), then long-polls its log: news arrives when the
//!   parent verifies a piece, at most once per `HAVE_EVERY` until the download is closing;
//! - it steps its [`Engine`] after every event and every 50 ms, and turns the engine's
//!   requests into transfers (a parent that spreads its uploads may answer `Busy`), its
//!   cancels into stopped transfers, and its retired parents into dropped ones;
//! - once a second it feeds the engine each parent's round trip, records link rates for its
//!   announcements, and replaces a slow parent as the driver does;
//! - every `announce_interval_ms` it announces what it verified since the last one.
//!
//! Origin pieces whose chain values nobody knows yet are stored unchecked and verified in
//! order (the `Chainer`); a piece verified anywhere makes its values known everywhere (values
//! travel with the bitmaps). A killed node's connections go quiet: its children notice after
//! QUIC's idle timeout, and the scheduler forgets it after its TTL.
//!
//! `STARLING_SIM_DEBUG=1` traces source requests, origin arrivals and `Source` advice on
//! stderr, and dumps every unfinished download (its engine's view of its parents) at the end;
//! `STARLING_SIM_DUMP_AT=SECONDS` dumps them at that simulated time instead of waiting for the
//! end. A racked node's rack tag goes with its piece requests, and a gateway's reply turns on
//! its spread, as in the daemon.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use starling::config::Config;
use starling::core::{Digest, PiecePlan, TaskId};
use starling::engine::{Action, Engine, EngineConfig, Failure, ParentId, Peer};
use starling::scheduler::ring::Ring;
use starling::scheduler::service::CandidatesReply;
use starling::scheduler::{
    Advice, Announce, Holding, LinkReport, Place, Scheduler, SchedulerConfig,
};
use starling::swarm::policy::{
    engine_config, have_every, rack_group, Spread, ASK_FULL_EVERY, ASK_SHORT_AT_MOST, ASK_SOON,
    CLOSING_PIECES, HAVE_EVERY_FIRST, REDIAL_AFTER, REPLACE_WINDOW,
};
use starling::transport::wire::MAX_OFFER;

use crate::net::{Arrival, End, Net, NetSpec};
use crate::scenario::{Scenario, Shape};

/// QUIC's idle timeout: a parent that vanished is noticed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection attempt to a node that is gone fails after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Whether a declining parent offers other pieces (`STARLING_SIM_NO_OFFER` set: not, as
/// before offers, to compare).
fn offers() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("STARLING_SIM_NO_OFFER").is_none())
}

/// The driver's tick.
const TICK: Duration = Duration::from_millis(50);

#[derive(Clone, Debug)]
enum Ev {
    Arrive(u32),
    Ask {
        n: u32,
        t: u32,
        gen: u64,
    },
    Reply {
        n: u32,
        t: u32,
        reply: CandidatesReply,
    },
    Connected {
        n: u32,
        t: u32,
        pid: ParentId,
    },
    Poll {
        n: u32,
        t: u32,
        pid: ParentId,
    },
    Down {
        n: u32,
        t: u32,
        pid: ParentId,
    },
    Failed {
        n: u32,
        t: u32,
        pid: ParentId,
        piece: u32,
        why: Failure,
        /// What a parent that declined (`Busy`) offered instead.
        offer: Vec<u32>,
    },
    Announce(u32),
    Order {
        seed: u32,
        t: u32,
    },
    Links(u32),
    Kill(u32),
}

struct Par {
    node: u32,
    connected: bool,
    in_engine: bool,
    since: usize,
}

/// One task's download at one node (the driver's state).
struct Dl {
    engine: Engine,
    parents: BTreeMap<ParentId, Par>,
    by_node: HashMap<u32, ParentId>,
    down_at: HashMap<u32, Duration>,
    next_pid: ParentId,
    ask_gen: u64,
    ask_at: Duration,
    short_every: Duration,
    wanted: usize,
    alternative: bool,
    /// Made its rack's gateway (the driver's `gateway`).
    gateway: bool,
    ordered: HashSet<u32>,
    have_every: Duration,
}

/// One task at one node.
struct Hold {
    /// Served to others (a view is registered).
    serving: bool,
    have: Vec<bool>,
    /// Pieces in the order they were verified: the log children poll and announces send.
    log: Vec<u32>,
    announced: usize,
    full_sent: bool,
    unchecked: Vec<bool>,
    chained: u32,
    spread: Option<Spread<u32>>,
    /// Children whose long-poll waits for news: (child, parent id at the child).
    waiters: Vec<(u32, ParentId)>,
    dl: Option<Dl>,
    done_at: Option<Duration>,
    /// Reads the origin (ordered, or told `Source`) until the download ends: announced.
    fetching: bool,
}

struct Node {
    name: String,
    addr: SocketAddr,
    place: Place,
    /// The rack tag its piece requests carry (`rack_group`).
    group: u32,
    seed: bool,
    alive: bool,
    arrive: Duration,
    holds: Vec<Hold>,
    links: HashMap<String, LinkReport>,
    uploads: u32,
}

/// What a run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub peers: usize,
    pub content_bytes: u64,
    pub bound_s: f64,
    /// Completion time of each peer that finished (from its arrival), sorted.
    pub done_s: Vec<f64>,
    pub finished: usize,
    /// Peers alive at the end that did not finish.
    pub unfinished: usize,
    pub p50_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
    pub origin_x_f: f64,
    pub seed_upload_x_f: f64,
    /// Bytes into each rack through its uplink, in F: mean and max over racks (0 when flat).
    pub spine_in_mean_x_f: f64,
    pub spine_in_max_x_f: f64,
    /// Scheduler calls (announcements and parent queries) per second: mean and peak over
    /// one-second buckets, all schedulers together.
    pub sched_calls_mean: f64,
    pub sched_calls_peak: f64,
    pub sim_seconds: f64,
    pub wall_seconds: f64,
    pub steps: u64,
}

pub struct World {
    sc: Scenario,
    cfg: Config,
    net: Net,
    nodes: Vec<Node>,
    tasks: Vec<(TaskId, PiecePlan)>,
    /// Per task, pieces whose chain values are known somewhere.
    published: Vec<Vec<bool>>,
    schedulers: Vec<Scheduler>,
    owner: Vec<usize>,
    rtt_host: Vec<Duration>,
    queue: BTreeMap<u64, Vec<Ev>>,
    dt: Duration,
    step: u64,
    base: Instant,
    dirty: HashSet<(u32, u32)>,
    calls: BTreeMap<u64, u64>,
    killed: usize,
    by_name: HashMap<String, u32>,
}

impl World {
    pub fn new(sc: Scenario) -> World {
        let mut cfg = Config::default();
        if let Some(m) = sc.max_parents {
            cfg.peer.max_parents = m;
        }
        let hosts = sc.seeds + sc.peers;
        let (rack, uplink): (Vec<u32>, Vec<f64>) = match sc.shape {
            Shape::Flat => (vec![0; hosts], vec![f64::INFINITY]),
            Shape::Racks {
                per_rack,
                oversubscription,
            } => {
                let racks = hosts.div_ceil(per_rack);
                let rate = sc.peer_rate(0);
                (
                    (0..hosts).map(|h| (h / per_rack) as u32).collect(),
                    vec![per_rack as f64 * rate / oversubscription; racks],
                )
            }
        };
        let rate = |h: usize| {
            if h < sc.seeds {
                sc.seed_rate
            } else {
                sc.peer_rate(h - sc.seeds)
            }
        };
        let spec = NetSpec {
            up: (0..hosts).map(rate).collect(),
            down: (0..hosts).map(rate).collect(),
            rack: rack.clone(),
            rack_uplink: uplink,
            origin_up: sc.origin_rate,
        };
        let tasks: Vec<(TaskId, PiecePlan)> = sc
            .tasks
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let id = TaskId::for_content(Digest::of(format!("sim task {i}").as_bytes()));
                let plan = match sc.piece_length {
                    Some(l) => PiecePlan::new(*bytes, l).expect("a valid piece length"),
                    None => PiecePlan::with_default(*bytes),
                };
                (id, plan)
            })
            .collect();
        let names: Vec<String> = (0..sc.schedulers).map(|i| format!("sched{i}")).collect();
        let ring = Ring::new(&names);
        let owner = tasks
            .iter()
            .map(|(id, _)| {
                let o = ring.owner(id).unwrap_or("sched0");
                names.iter().position(|n| n == o).unwrap_or(0)
            })
            .collect();
        let labelled = matches!(sc.shape, Shape::Racks { .. });
        let nodes: Vec<Node> = (0..hosts)
            .map(|h| {
                let seed = h < sc.seeds;
                // The scenario's seed number salts the names, which seed each engine's
                // shuffle and the scheduler's tie breaks.
                let name = if seed {
                    format!("seed{h}-{}", sc.seed_number)
                } else {
                    format!("peer{}-{}", h - sc.seeds, sc.seed_number)
                };
                let place = if labelled {
                    Place {
                        zone: "z0".into(),
                        rack: format!("r{}", rack[h]),
                    }
                } else {
                    Place::default()
                };
                Node {
                    name,
                    addr: SocketAddr::from(([10, (h >> 16) as u8, (h >> 8) as u8, h as u8], 7950)),
                    group: rack_group(&place.zone, &place.rack),
                    place,
                    seed,
                    alive: true,
                    arrive: Duration::ZERO,
                    holds: tasks
                        .iter()
                        .map(|(_, plan)| Hold {
                            serving: false,
                            have: vec![false; plan.count() as usize],
                            log: Vec::new(),
                            announced: 0,
                            full_sent: false,
                            unchecked: vec![false; plan.count() as usize],
                            chained: 0,
                            spread: None,
                            waiters: Vec::new(),
                            dl: None,
                            done_at: None,
                            fetching: false,
                        })
                        .collect(),
                    links: HashMap::new(),
                    uploads: 0,
                }
            })
            .collect();
        // A step about a quarter of a piece's time at the fastest link, within 0.5-20 ms.
        let piece = tasks
            .iter()
            .map(|(_, p)| p.piece_length())
            .max()
            .unwrap_or(1);
        let fastest = spec.down.iter().copied().fold(1.0, f64::max);
        let dt = Duration::from_secs_f64((piece as f64 / fastest / 4.0).clamp(0.000_5, 0.02));
        let schedulers = (0..sc.schedulers)
            .map(|_| Scheduler::new(SchedulerConfig::of(&cfg.scheduler)))
            .collect();
        let published = tasks
            .iter()
            .map(|(_, p)| vec![false; p.count() as usize])
            .collect();
        let rtt_host = vec![sc.rtt; hosts];
        let by_name = nodes
            .iter()
            .enumerate()
            .map(|(i, n): (usize, &Node)| (n.name.clone(), i as u32))
            .collect();
        let mut w = World {
            net: Net::new(&spec),
            sc,
            cfg,
            nodes,
            tasks,
            published,
            schedulers,
            owner,
            rtt_host,
            queue: BTreeMap::new(),
            dt,
            step: 0,
            base: Instant::now(),
            dirty: HashSet::new(),
            calls: BTreeMap::new(),
            killed: 0,
            by_name,
        };
        w.plan_events();
        w
    }

    fn plan_events(&mut self) {
        let sc = self.sc.clone();
        // Seeds run from the start (they announce themselves, holding nothing yet).
        for s in 0..sc.seeds as u32 {
            self.at(Duration::ZERO, Ev::Announce(s));
        }
        for i in 0..sc.peers {
            let n = (sc.seeds + i) as u32;
            let at = if sc.peers > 1 {
                sc.arrival_spread.mul_f64(i as f64 / (sc.peers - 1) as f64)
            } else {
                Duration::ZERO
            };
            self.nodes[n as usize].arrive = at;
            self.at(at, Ev::Arrive(n));
        }
        let kill_at = sc.bound().mul_f64(sc.kill_at);
        if sc.kill_peers > 0.0 {
            let k = (sc.peers as f64 * sc.kill_peers).round() as usize;
            // Every (peers / k)-th peer: spread over arrival order.
            for j in 0..k {
                let n = (sc.seeds + j * sc.peers / k) as u32;
                self.at(kill_at, Ev::Kill(n));
            }
        }
        if sc.kill_seed {
            // The seed that fetches task 0 (the scheduler's choice) is found at the time.
            self.at(kill_at, Ev::Kill(u32::MAX));
        }
    }

    fn now(&self) -> Duration {
        self.dt * self.step as u32
    }

    fn at(&mut self, when: Duration, ev: Ev) {
        let step = (when.as_nanos().div_ceil(self.dt.as_nanos()) as u64).max(self.step);
        self.queue.entry(step).or_default().push(ev);
    }

    fn after(&mut self, delay: Duration, ev: Ev) {
        let when = self.now() + delay;
        self.at(when, ev);
    }

    fn rtt(&self, a: u32, b: u32) -> Duration {
        let (ra, rb) = (&self.nodes[a as usize].place, &self.nodes[b as usize].place);
        if !ra.rack.is_empty() && ra.rack == rb.rack {
            self.sc.rtt_rack
        } else {
            self.rtt_host[a as usize].max(self.rtt_host[b as usize])
        }
    }

    /// Runs to the end: every living peer done, or the scenario's time limit.
    pub fn run(mut self) -> Report {
        let wall = Instant::now();
        let limit = self.sc.bound().mul_f64(self.sc.limit)
            + self.sc.arrival_spread
            + Duration::from_secs(60);
        let every_tick = (TICK.as_nanos() / self.dt.as_nanos()).max(1) as u64;
        // `STARLING_SIM_DUMP_AT=SECONDS`: the unfinished nodes' state at that simulated time.
        let mut dump_at: Option<Duration> = std::env::var("STARLING_SIM_DUMP_AT")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs_f64);
        loop {
            let now = self.now();
            if dump_at.is_some_and(|t| now >= t) {
                dump_at = None;
                eprintln!("--- at {now:?}");
                self.debug_dump();
            }
            while let Some(evs) = self.queue.remove(&self.step) {
                for ev in evs {
                    self.handle(ev);
                }
            }
            if self.step.is_multiple_of(every_tick) {
                for n in 0..self.nodes.len() as u32 {
                    for t in 0..self.tasks.len() as u32 {
                        if self.nodes[n as usize].holds[t as usize].dl.is_some() {
                            self.dirty.insert((n, t));
                        }
                    }
                }
            }
            let mut dirty: Vec<(u32, u32)> = self.dirty.drain().collect();
            dirty.sort_unstable();
            for (n, t) in dirty {
                self.drive(n, t);
            }
            let arrivals = self.net.advance(now, self.dt);
            self.step += 1;
            for a in arrivals {
                self.arrived(a);
            }
            if self.all_done() || self.now() >= limit {
                break;
            }
        }
        self.report(wall.elapsed())
    }

    fn all_done(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| !n.seed && n.alive)
            .all(|n| n.holds.iter().all(|h| h.done_at.is_some()))
    }

    fn count_call(&mut self) {
        let sec = self.now().as_secs();
        *self.calls.entry(sec).or_default() += 1;
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive(n) => {
                for t in 0..self.tasks.len() as u32 {
                    self.start(n, t, false);
                    self.ask(n, t);
                }
                self.after(Duration::ZERO, Ev::Announce(n));
                self.after(Duration::from_secs(1), Ev::Links(n));
            }
            Ev::Ask { n, t, gen } => {
                let ok =
                    self.nodes[n as usize].alive && self.dl(n, t).is_some_and(|d| d.ask_gen == gen);
                if ok {
                    self.ask(n, t);
                }
            }
            Ev::Reply { n, t, reply } => self.on_advice(n, t, reply),
            Ev::Connected { n, t, pid } => {
                if let Some(p) = self.dl_mut(n, t).and_then(|d| d.parents.get_mut(&pid)) {
                    p.connected = true;
                    self.after(Duration::ZERO, Ev::Poll { n, t, pid });
                }
            }
            Ev::Poll { n, t, pid } => self.poll(n, t, pid),
            Ev::Down { n, t, pid } => self.drop_parent(n, t, pid),
            Ev::Failed {
                n,
                t,
                pid,
                piece,
                why,
                offer,
            } => {
                let now = self.now();
                if let Some(d) = self.dl_mut(n, t) {
                    if d.parents.contains_key(&pid) {
                        if why == Failure::Busy {
                            d.engine.offered(pid, &offer, now);
                        }
                        d.engine.on_failure(Peer::Parent(pid), piece, why, now);
                    }
                }
                self.dirty.insert((n, t));
            }
            Ev::Announce(n) => self.announce(n),
            Ev::Order { seed, t } => {
                let h = &self.nodes[seed as usize].holds[t as usize];
                if self.nodes[seed as usize].alive && h.dl.is_none() && h.done_at.is_none() {
                    self.start(seed, t, true);
                }
            }
            Ev::Links(n) => self.measure(n),
            Ev::Kill(n) => self.kill(n),
        }
    }

    fn dl(&self, n: u32, t: u32) -> Option<&Dl> {
        self.nodes[n as usize].holds[t as usize].dl.as_ref()
    }

    fn dl_mut(&mut self, n: u32, t: u32) -> Option<&mut Dl> {
        self.nodes[n as usize].holds[t as usize].dl.as_mut()
    }

    /// Starts a download of task `t` at node `n`: from peers, or (a seed ordered to, or a peer
    /// told to) from the origin with the fetcher's settings.
    fn start(&mut self, n: u32, t: u32, from_source: bool) {
        let plan = self.tasks[t as usize].1;
        let node = &self.nodes[n as usize];
        let ecfg = if from_source {
            EngineConfig {
                source_allowed: true,
                source_wait: Duration::ZERO,
                source_window: self.cfg.source.concurrency.max(1) as u32,
                ..EngineConfig::default()
            }
        } else {
            engine_config(&self.cfg.peer, &node.name)
        };
        let spread = node.seed || from_source;
        let group = node.group;
        let h = &mut self.nodes[n as usize].holds[t as usize];
        h.fetching = from_source;
        let engine = Engine::new(plan, &h.have, ecfg);
        h.serving = true;
        if spread && h.spread.is_none() {
            h.spread = Some(Spread::new(plan.count(), group));
        }
        h.dl = Some(Dl {
            engine,
            parents: BTreeMap::new(),
            by_node: HashMap::new(),
            down_at: HashMap::new(),
            next_pid: 0,
            ask_gen: 0,
            ask_at: Duration::ZERO,
            short_every: ASK_SOON,
            wanted: self.cfg.peer.max_parents,
            alternative: false,
            gateway: false,
            ordered: HashSet::new(),
            have_every: HAVE_EVERY_FIRST,
        });
        self.dirty.insert((n, t));
    }

    fn sched(&self, t: u32) -> usize {
        self.owner[t as usize]
    }

    /// One scheduler call (the answer arrives a round trip later).
    fn ask(&mut self, n: u32, t: u32) {
        let now = self.now();
        let Some(d) = self.dl(n, t) else { return };
        let want = d.wanted;
        let exclude: Vec<String> = d
            .by_node
            .keys()
            .chain(
                d.down_at
                    .iter()
                    .filter(|(_, at)| now.saturating_sub(**at) < REDIAL_AFTER)
                    .map(|(q, _)| q),
            )
            .map(|q| self.nodes[*q as usize].name.clone())
            .collect();
        let name = self.nodes[n as usize].name.clone();
        let s = self.sched(t);
        let task = self.tasks[t as usize].0;
        self.schedulers[s].expire(now);
        let node = &self.nodes[n as usize];
        self.schedulers[s].introduce(&name, node.addr, &node.place, now);
        let answer = self.schedulers[s].advise(&name, &task, want, &exclude, now);
        let mut reply = CandidatesReply::of(&self.schedulers[s], &task, answer, now);
        reply.gateway = self.schedulers[s].is_gateway(&name, &task);
        self.count_call();
        let rtt = self.sc.rtt;
        self.after(rtt, Ev::Reply { n, t, reply });
    }

    fn node_of(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    fn on_advice(&mut self, n: u32, t: u32, r: CandidatesReply) {
        if !self.nodes[n as usize].alive || self.dl(n, t).is_none() {
            return;
        }
        let max = self.cfg.peer.max_parents;
        let says = Some(r.advice == Advice::Source);
        if says == Some(true) && std::env::var_os("STARLING_SIM_DEBUG").is_some() {
            eprintln!(
                "{:?} {n} told Source, lacking {:?}",
                self.now(),
                r.lacking.as_ref().map(Vec::len)
            );
        }
        if let Some(d) = self.dl_mut(n, t) {
            d.engine.source_by_scheduler(says, r.lacking.as_deref());
        }
        // Its rack's gateway spreads what it serves, as the daemon does.
        if r.gateway {
            let pieces = self.tasks[t as usize].1.count();
            let node = &mut self.nodes[n as usize];
            let group = node.group;
            if let Some(h) = node.holds.get_mut(t as usize) {
                h.spread
                    .get_or_insert_with(|| Spread::for_rack(pieces, group));
            }
            // Made the gateway mid-download: half the slots for parents outside the rack, as
            // the driver does (`make_room_outside_the_rack`).
            if let Some(d) = self.dl_mut(n, t).filter(|d| !d.gateway) {
                d.gateway = true;
                d.engine.retire_all_but(max / 2);
            }
        }
        match &r.advice {
            Advice::Source => {
                if let Some(h) = self.nodes[n as usize].holds.get_mut(t as usize) {
                    h.fetching = true;
                }
                // Without a plan yet (no parent ever answered), the driver gives the task back
                // and the fetcher reads the origin; with one, the engine fetches what no
                // parent holds.
                let planless = self.dl(n, t).is_some_and(|d| d.next_pid == 0);
                if planless {
                    self.start(n, t, true);
                    return;
                }
            }
            Advice::AskSeed { peer, .. } => {
                if let Some(seed) = self.node_of(peer) {
                    let first = self.dl_mut(n, t).is_some_and(|d| d.ordered.insert(seed));
                    if first {
                        let rtt = self.rtt(n, seed);
                        self.after(rtt / 2, Ev::Order { seed, t });
                    }
                    self.add_parent(n, t, seed);
                }
            }
            Advice::Parents | Advice::Wait => {}
        }
        for c in &r.parents {
            if let Some(q) = self.node_of(&c.peer) {
                self.add_parent(n, t, q);
            }
        }
        let alternative = r.parents.iter().any(|c| {
            self.node_of(&c.peer).is_some_and(|q| {
                q != n && !self.dl(n, t).is_some_and(|d| d.by_node.contains_key(&q))
            })
        });
        let now = self.now();
        let Some(d) = self.dl_mut(n, t) else { return };
        d.alternative = alternative;
        d.wanted = max.saturating_sub(active(d));
        // The ask loop's next call.
        d.ask_gen += 1;
        let (gen, delay) = if d.wanted > 0 {
            let delay = d.short_every;
            d.short_every = (d.short_every * 2).min(ASK_SHORT_AT_MOST);
            (d.ask_gen, delay)
        } else {
            (d.ask_gen, ASK_FULL_EVERY)
        };
        d.ask_at = now + delay;
        self.after(delay, Ev::Ask { n, t, gen });
    }

    /// The count of missing parents changed: the ask loop wakes soon if it was waiting long.
    fn update_wanted(&mut self, n: u32, t: u32) {
        let max = self.cfg.peer.max_parents;
        let now = self.now();
        let Some(d) = self.dl_mut(n, t) else { return };
        let wanted = max.saturating_sub(active(d));
        let changed = wanted != d.wanted;
        d.wanted = wanted;
        if changed && wanted > 0 && d.ask_at > now + ASK_SOON {
            d.ask_gen += 1;
            d.short_every = ASK_SOON * 2;
            d.ask_at = now + ASK_SOON;
            let gen = d.ask_gen;
            self.after(ASK_SOON, Ev::Ask { n, t, gen });
        }
    }

    fn add_parent(&mut self, n: u32, t: u32, q: u32) {
        let now = self.now();
        let max = self.cfg.peer.max_parents;
        let Some(d) = self.dl_mut(n, t) else { return };
        if q == n
            || d.by_node.contains_key(&q)
            || active(d) >= max
            || d.down_at
                .get(&q)
                .is_some_and(|at| now.saturating_sub(*at) < REDIAL_AFTER)
        {
            return;
        }
        let pid = d.next_pid;
        d.next_pid += 1;
        d.by_node.insert(q, pid);
        d.parents.insert(
            pid,
            Par {
                node: q,
                connected: false,
                in_engine: false,
                since: 0,
            },
        );
        if self.nodes[q as usize].alive {
            let rtt = self.rtt(n, q);
            self.after(2 * rtt, Ev::Connected { n, t, pid });
        } else {
            self.after(CONNECT_TIMEOUT, Ev::Down { n, t, pid });
        }
    }

    /// A have answer from parent `pid` (or a wait for one).
    fn poll(&mut self, n: u32, t: u32, pid: ParentId) {
        let Some(q) = self
            .dl(n, t)
            .and_then(|d| d.parents.get(&pid))
            .map(|p| p.node)
        else {
            return;
        };
        if !self.nodes[n as usize].alive || !self.nodes[q as usize].alive {
            return;
        }
        let rtt = self.rtt(n, q);
        let (serving, len, complete) = {
            let h = &self.nodes[q as usize].holds[t as usize];
            (
                h.serving,
                h.log.len(),
                h.done_at.is_some() || h.log.len() == h.have.len(),
            )
        };
        if !serving {
            // Not holding the task yet (a seed that just took the order): ask again.
            self.after(Duration::from_millis(100).max(rtt), Ev::Poll { n, t, pid });
            return;
        }
        let (since, in_engine) = match self.dl(n, t).and_then(|d| d.parents.get(&pid)) {
            Some(p) => (p.since, p.in_engine),
            None => return,
        };
        if in_engine && since == len {
            if !complete {
                self.nodes[q as usize].holds[t as usize]
                    .waiters
                    .push((n, pid));
            }
            return;
        }
        let fresh: Vec<u32> = self.nodes[q as usize].holds[t as usize].log[since..].to_vec();
        let have = (!in_engine).then(|| self.nodes[q as usize].holds[t as usize].have.clone());
        let Some(d) = self.dl_mut(n, t) else { return };
        match have {
            Some(have) => d.engine.add_parent(pid, &have),
            None => {
                for i in fresh {
                    d.engine.parent_has(pid, i);
                }
            }
        }
        let closing = d.engine.missing() <= CLOSING_PIECES;
        let every = d.have_every;
        if let Some(p) = d.parents.get_mut(&pid) {
            p.in_engine = true;
            p.since = len;
        }
        self.dirty.insert((n, t));
        if !complete {
            if len == 0 {
                // Nothing yet: the next ask waits at the parent for its first piece.
                self.nodes[q as usize].holds[t as usize]
                    .waiters
                    .push((n, pid));
            } else {
                let next = if closing { rtt } else { every.max(rtt) };
                self.after(next, Ev::Poll { n, t, pid });
            }
        }
    }

    fn drop_parent(&mut self, n: u32, t: u32, pid: ParentId) {
        let now = self.now();
        let Some(d) = self.dl_mut(n, t) else { return };
        let Some(p) = d.parents.remove(&pid) else {
            return;
        };
        d.by_node.remove(&p.node);
        d.down_at.insert(p.node, now);
        d.engine.remove_parent(pid);
        let q = p.node;
        // Whatever it was still sending stops.
        let pieces = self.tasks[t as usize].1.count();
        for piece in 0..pieces {
            self.net.cancel(End::Host(q), n, t, piece);
        }
        self.update_wanted(n, t);
        self.dirty.insert((n, t));
    }

    /// Steps one download's engine and carries out what it asks for.
    fn drive(&mut self, n: u32, t: u32) {
        if !self.nodes[n as usize].alive {
            return;
        }
        let now = self.now();
        let Some(d) = self.dl_mut(n, t) else { return };
        if d.engine.is_complete() {
            return;
        }
        let actions = d.engine.poll(now);
        let drained = d.engine.drained();
        d.engine.take_timeouts();
        for a in actions {
            match a {
                Action::Request { from, piece } => self.request(n, t, from, piece),
                Action::Cancel { from, piece } => {
                    let from_end = match from {
                        Peer::Source => Some(End::Origin),
                        Peer::Parent(pid) => self
                            .dl(n, t)
                            .and_then(|d| d.parents.get(&pid))
                            .map(|p| End::Host(p.node)),
                    };
                    if let Some(e) = from_end {
                        self.net.cancel(e, n, t, piece);
                        if let End::Host(q) = e {
                            let at = self.base + now;
                            if let Some(s) = &mut self.nodes[q as usize].holds[t as usize].spread {
                                s.ended(piece, n, false, at);
                            }
                        }
                    }
                }
                Action::Blacklist { .. } => {}
            }
        }
        for pid in drained {
            self.drop_parent(n, t, pid);
        }
    }

    fn request(&mut self, n: u32, t: u32, from: Peer, piece: u32) {
        let now = self.now();
        let bytes = self.tasks[t as usize]
            .1
            .piece(piece)
            .map_or(0, |p| p.length);
        let pid = match from {
            Peer::Source => {
                if std::env::var_os("STARLING_SIM_DEBUG").is_some() {
                    eprintln!("{:?} {n} source request {piece}", self.now());
                }
                let rtt = self.sc.rtt;
                self.net
                    .send(End::Origin, n, t, piece, bytes, now, now + rtt);
                return;
            }
            Peer::Parent(pid) => pid,
        };
        let Some((q, connected)) = self
            .dl(n, t)
            .and_then(|d| d.parents.get(&pid))
            .map(|p| (p.node, p.connected))
        else {
            return;
        };
        let fail = |why| Ev::Failed {
            n,
            t,
            pid,
            piece,
            why,
            offer: Vec::new(),
        };
        if !connected {
            self.after(Duration::ZERO, fail(Failure::Refused));
            return;
        }
        if !self.nodes[q as usize].alive {
            // Nothing comes back: the request waits for its timeout or the parent's loss.
            return;
        }
        let rtt = self.rtt(n, q);
        let at = self.base + now;
        let group = self.nodes[n as usize].group;
        let h = &mut self.nodes[q as usize].holds[t as usize];
        if !h.have[piece as usize] {
            self.after(rtt, fail(Failure::Refused));
            return;
        }
        if let Some(s) = &mut h.spread {
            if !s.admit(piece, n, group, at) {
                let have = &h.have;
                let offer = if offers() {
                    s.offer(n, group, at, MAX_OFFER, |i| have[i as usize])
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                self.after(
                    rtt,
                    Ev::Failed {
                        n,
                        t,
                        pid,
                        piece,
                        why: Failure::Busy,
                        offer,
                    },
                );
                return;
            }
        }
        self.nodes[q as usize].uploads += 1;
        self.net
            .send(End::Host(q), n, t, piece, bytes, now, now + rtt);
    }

    fn arrived(&mut self, a: Arrival) {
        let (n, t, piece) = (a.to, a.task, a.piece);
        let now = self.now();
        if a.from == End::Origin && std::env::var_os("STARLING_SIM_DEBUG").is_some() {
            eprintln!("{now:?} {n} origin arrival {piece}");
        }
        if let End::Host(q) = a.from {
            let at = self.base + a.at;
            if let Some(s) = &mut self.nodes[q as usize].holds[t as usize].spread {
                s.ended(piece, n, true, at);
            }
        }
        if !self.nodes[n as usize].alive {
            return;
        }
        let from = match a.from {
            End::Origin => Some(Peer::Source),
            End::Host(q) => self
                .dl(n, t)
                .and_then(|d| d.by_node.get(&q))
                .map(|pid| Peer::Parent(*pid)),
        };
        let Some(from) = from else { return };
        let Some(d) = self.dl_mut(n, t) else { return };
        d.engine
            .on_piece(from, piece, a.at.saturating_sub(a.asked), now);
        self.dirty.insert((n, t));
        let h = &self.nodes[n as usize].holds[t as usize];
        if h.have[piece as usize] || h.unchecked[piece as usize] {
            return;
        }
        if from == Peer::Source && !self.published[t as usize][piece as usize] {
            self.nodes[n as usize].holds[t as usize].unchecked[piece as usize] = true;
        } else {
            self.verified(n, t, piece);
        }
        self.chain(n, t);
        self.check_done(n, t);
    }

    /// The in-order chain: unchecked origin pieces are verified once every piece before them
    /// is stored.
    fn chain(&mut self, n: u32, t: u32) {
        loop {
            let h = &self.nodes[n as usize].holds[t as usize];
            let i = h.chained as usize;
            if i >= h.have.len() || !(h.have[i] || h.unchecked[i]) {
                return;
            }
            let unchecked = h.unchecked[i];
            self.nodes[n as usize].holds[t as usize].chained += 1;
            if unchecked {
                self.nodes[n as usize].holds[t as usize].unchecked[i] = false;
                self.verified(n, t, i as u32);
            }
        }
    }

    fn verified(&mut self, n: u32, t: u32, piece: u32) {
        self.published[t as usize][piece as usize] = true;
        let h = &mut self.nodes[n as usize].holds[t as usize];
        h.have[piece as usize] = true;
        h.log.push(piece);
        let waiters = std::mem::take(&mut h.waiters);
        for (c, pid) in waiters {
            let rtt = self.rtt(n, c);
            self.after(rtt / 2, Ev::Poll { n: c, t, pid });
        }
    }

    fn check_done(&mut self, n: u32, t: u32) {
        let now = self.now();
        let h = &mut self.nodes[n as usize].holds[t as usize];
        if h.done_at.is_none() && h.have.iter().all(|x| *x) {
            h.done_at = Some(now);
            // The download ends; the task stays served (a sealed parent's pollers stop).
            h.dl = None;
            h.fetching = false;
            h.waiters.clear();
        }
    }

    fn announce(&mut self, n: u32) {
        let now = self.now();
        if !self.nodes[n as usize].alive {
            return;
        }
        let mut per: BTreeMap<usize, Vec<(TaskId, Holding)>> = BTreeMap::new();
        let mut fetching: BTreeMap<usize, Vec<TaskId>> = BTreeMap::new();
        for t in 0..self.tasks.len() {
            let h = &mut self.nodes[n as usize].holds[t];
            if h.fetching && h.dl.is_some() {
                fetching
                    .entry(self.owner[t])
                    .or_default()
                    .push(self.tasks[t].0);
            }
            if !h.serving {
                continue;
            }
            let holding = if h.full_sent {
                Holding::Added(h.log[h.announced..].to_vec())
            } else {
                h.full_sent = true;
                Holding::Full {
                    pieces: h.have.len() as u32,
                    have: h.have.clone(),
                }
            };
            h.announced = h.log.len();
            per.entry(self.owner[t])
                .or_default()
                .push((self.tasks[t].0, holding));
        }
        let node = &mut self.nodes[n as usize];
        let uploads = std::mem::take(&mut node.uploads);
        let base = Announce {
            peer: node.name.clone(),
            addr: node.addr,
            seed: node.seed,
            upload_capacity: self.cfg.peer.upload_mbps * 125_000.0,
            uploads,
            tasks: Vec::new(),
            links: node.links.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            place: node.place.clone(),
            fetching: Vec::new(),
        };
        // Every scheduler hears from every node (its liveness), with its own tasks.
        for s in 0..self.schedulers.len() {
            let mut a = base.clone();
            a.tasks = per.remove(&s).unwrap_or_default();
            a.fetching = fetching.remove(&s).unwrap_or_default();
            self.schedulers[s].announce(a, now);
            self.count_call();
        }
        let every = Duration::from_millis(self.cfg.peer.announce_interval_ms);
        self.after(every, Ev::Announce(n));
    }

    /// Once a second: link measurements to the engine and the announcements, and the slow
    /// parent's replacement.
    fn measure(&mut self, n: u32) {
        if !self.nodes[n as usize].alive {
            return;
        }
        let now = self.now();
        let max = self.cfg.peer.max_parents;
        for t in 0..self.tasks.len() as u32 {
            let rtts: Vec<(ParentId, u32, Duration)> = match self.dl(n, t) {
                Some(d) => d
                    .parents
                    .iter()
                    .filter(|(_, p)| p.connected)
                    .map(|(pid, p)| (*pid, p.node, self.rtt(n, p.node)))
                    .collect(),
                None => continue,
            };
            let names: Vec<String> = rtts
                .iter()
                .map(|(_, q, _)| self.nodes[*q as usize].name.clone())
                .collect();
            let piece_length = self.tasks[t as usize].1.piece_length();
            let Some(d) = self.dl_mut(n, t) else { continue };
            for (pid, _, rtt) in &rtts {
                d.engine.link_quality(*pid, *rtt, 0.0);
            }
            let rates: HashMap<ParentId, f64> = d
                .engine
                .report()
                .into_iter()
                .filter_map(|r| Some((r.parent, r.rate?)))
                .collect();
            d.have_every = have_every(piece_length, rates.values().sum());
            let replace = active(d) >= max
                && d.alternative
                && d.engine.parent_to_replace(now, REPLACE_WINDOW).is_some();
            if replace {
                d.alternative = false;
            }
            let mut reports = Vec::new();
            for ((pid, _, rtt), name) in rtts.iter().zip(names) {
                if let Some(r) = rates.get(pid) {
                    reports.push((
                        name,
                        LinkReport {
                            throughput: *r,
                            rtt: *rtt,
                            loss: 0.0,
                            mtu: 0,
                        },
                    ));
                }
            }
            self.nodes[n as usize].links.extend(reports);
            if replace {
                self.update_wanted(n, t);
            }
        }
        self.after(Duration::from_secs(1), Ev::Links(n));
    }

    fn kill(&mut self, n: u32) {
        let n = if n == u32::MAX {
            // The seed that fetched task 0 from the origin.
            match (0..self.sc.seeds as u32).find(|s| self.nodes[*s as usize].holds[0].serving) {
                Some(s) => s,
                None => return,
            }
        } else {
            n
        };
        if !self.nodes[n as usize].alive {
            return;
        }
        self.nodes[n as usize].alive = false;
        self.killed += 1;
        let now = self.now();
        for (from, to, t, piece) in self.net.drop_host(n) {
            if let End::Host(q) = from {
                if q != n {
                    let at = self.base + now;
                    if let Some(s) = &mut self.nodes[q as usize].holds[t as usize].spread {
                        s.ended(piece, to, false, at);
                    }
                }
            }
        }
        // Its children notice when QUIC's idle timeout runs out.
        let mut downs = Vec::new();
        for (c, node) in self.nodes.iter().enumerate() {
            for (t, h) in node.holds.iter().enumerate() {
                if let Some(d) = &h.dl {
                    if let Some(pid) = d.by_node.get(&n) {
                        downs.push(Ev::Down {
                            n: c as u32,
                            t: t as u32,
                            pid: *pid,
                        });
                    }
                }
            }
        }
        for ev in downs {
            self.after(IDLE_TIMEOUT, ev);
        }
    }

    fn debug_dump(&self) {
        for (i, node) in self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive)
            .take(400)
        {
            for (t, h) in node.holds.iter().enumerate() {
                if h.done_at.is_none() {
                    let have = h.have.iter().filter(|x| **x).count();
                    let unchecked = h.unchecked.iter().filter(|x| **x).count();
                    let d = h.dl.as_ref();
                    eprintln!(
                        "node {i} {} task {t}: have {have} unchecked {unchecked} chained {} of {}; dl {:?} missing {:?} parents {:?} report {:?}",
                        node.name,
                        h.chained,
                        h.have.len(),
                        d.is_some(),
                        d.map(|d| d.engine.missing()),
                        d.map(|d| d.parents.values().map(|p| (p.node, p.connected, p.in_engine)).collect::<Vec<_>>()),
                        d.map(|d| d.engine.report()),
                    );
                }
            }
        }
    }

    fn report(&self, wall: Duration) -> Report {
        if std::env::var_os("STARLING_SIM_DEBUG").is_some() {
            self.debug_dump();
        }
        let f = self.sc.content() as f64;
        let mut done: Vec<f64> = Vec::new();
        let mut unfinished = 0;
        for node in self.nodes.iter().filter(|n| !n.seed) {
            let end = node
                .holds
                .iter()
                .map(|h| h.done_at)
                .collect::<Option<Vec<_>>>();
            match end.and_then(|v| v.into_iter().max()) {
                Some(t) => done.push(t.saturating_sub(node.arrive).as_secs_f64()),
                None if node.alive => unfinished += 1,
                None => {}
            }
        }
        done.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            if done.is_empty() {
                f64::NAN
            } else {
                done[((done.len() - 1) as f64 * p).round() as usize]
            }
        };
        let seed_up: f64 = (0..self.sc.seeds as u32)
            .map(|s| self.net.carried[self.net.host_up(s)])
            .sum();
        let (mut spine_sum, mut spine_max, mut racks) = (0.0, 0.0f64, 0);
        if let Shape::Racks { per_rack, .. } = self.sc.shape {
            let n = self.nodes.len().div_ceil(per_rack);
            for r in 0..n as u32 {
                let b = self.net.carried[self.net.rack_down(r)] / f;
                spine_sum += b;
                spine_max = spine_max.max(b);
                racks += 1;
            }
        }
        let secs = self.calls.len().max(1) as f64;
        Report {
            scenario: self.sc.name.clone(),
            peers: self.sc.peers,
            content_bytes: self.sc.content(),
            bound_s: self.sc.bound().as_secs_f64(),
            finished: done.len(),
            unfinished,
            p50_s: pct(0.5),
            p99_s: pct(0.99),
            max_s: done.last().copied().unwrap_or(f64::NAN),
            done_s: done.clone(),
            origin_x_f: self.net.carried[self.net.origin()] / f,
            seed_upload_x_f: seed_up / f,
            spine_in_mean_x_f: if racks > 0 {
                spine_sum / racks as f64
            } else {
                0.0
            },
            spine_in_max_x_f: spine_max,
            sched_calls_mean: self.calls.values().sum::<u64>() as f64 / secs,
            sched_calls_peak: self.calls.values().copied().max().unwrap_or(0) as f64,
            sim_seconds: self.now().as_secs_f64(),
            wall_seconds: wall.as_secs_f64(),
            steps: self.step,
        }
    }
}

/// Parents holding a slot: all but those retiring.
fn active(d: &Dl) -> usize {
    d.parents.len().saturating_sub(d.engine.retiring())
}
