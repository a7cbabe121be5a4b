//! The scheduler's state, sans-IO: peers announce what they hold and how their links perform,
//! and get back ranked candidate parents. State is soft: everything expires unless announced
//! again, so a restarted scheduler rebuilds itself from the next round of announcements.
//!
//! Ranking, for a requester R and candidate C holding task T:
//! `score = ln(1 + useful) × spare × link`, where `useful` is the number of pieces C has that R
//! lacks (with diminishing returns: a parent with enough pieces to keep a link busy is nearly as
//! good as one with all of them, so a seed does not outrank everyone),
//! `spare` is C's unused upload capacity share after the children already assigned to it (so
//! one fast seed does not become a star), and `link` is R's measured throughput from C,
//! discounted by loss (unmeasured links get the median of measured ones). Ties break by a hash
//! of (R, C), so different requesters see different orders and the swarm forms a mesh rather
//! than a chain. `ring.rs` splits tasks across several schedulers by consistent hashing.
//!
//! When nobody holds a task yet, [`Scheduler::advise`] decides who goes back to source: a seed
//! peer when there is one (the requester then orders it to fetch), else the first requester;
//! everyone else waits for that peer's pieces. `service.rs` puts this on the network.

pub mod ring;
pub mod service;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::TaskId;

pub type PeerId = String;

/// Measured quality of the link from a parent, as the child reports it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    /// Bytes per second received from that parent.
    pub throughput: f64,
    pub rtt: Duration,
    /// Fraction of packets lost, 0..=1.
    pub loss: f64,
    /// Path MTU toward that parent in IP bytes, as QUIC validated it (0: unknown).
    #[serde(default)]
    pub mtu: u32,
}

/// What a peer holds of one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holding {
    /// The whole bitmap (first announcement, or after a restart).
    Full {
        pieces: u32,
        #[serde(with = "bits")]
        have: Vec<bool>,
    },
    /// Pieces verified since the last announcement.
    Added(Vec<u32>),
    /// The peer dropped the task.
    Gone,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Announce {
    pub peer: PeerId,
    pub addr: SocketAddr,
    pub seed: bool,
    /// Upload capacity in bytes per second (0: unknown).
    pub upload_capacity: f64,
    /// Uploads in progress now.
    pub uploads: u32,
    pub tasks: Vec<(TaskId, Holding)>,
    /// Link quality per parent this peer has downloaded from.
    pub links: Vec<(PeerId, LinkReport)>,
    /// Where the peer sits (zone and rack labels); absent from older peers.
    #[serde(default)]
    pub place: Place,
    /// Tasks it reads from their origins now (it was told to, or it is their seed): a
    /// restarted scheduler learns its fetchers from these, and a long fetch stays known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetching: Vec<TaskId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub peer: PeerId,
    pub addr: SocketAddr,
    pub seed: bool,
    /// Pieces it has that the requester lacks.
    pub useful: u32,
    pub score: f64,
}

/// Who should go back to source when the candidates are not enough.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Advice {
    /// Download from the candidates.
    Parents,
    /// Nobody holds the task: the requester itself goes back to source.
    Source,
    /// Nobody holds it yet: order this seed peer to fetch it, and download from it.
    AskSeed { peer: PeerId, addr: SocketAddr },
    /// Another peer is fetching it from source; ask again shortly.
    Wait,
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Peers and their holdings expire when not announced for this long.
    pub ttl: Duration,
    /// Children a parent is expected to feed at once; beyond it, its score falls.
    pub fanout: f64,
    /// How long a handed-out parent assignment counts against the parent.
    pub assignment_ttl: Duration,
    /// How long a peer told to go back to source has to show up as a holder before another
    /// one is told.
    pub fetch_ttl: Duration,
    /// Tasks read from origins at once (one fetcher each); a task beyond it waits its turn
    /// (`Wait`, with `queued`). 0: no limit.
    pub max_fetchers: usize,
    /// Origin bandwidth, Mbit/s, shared by the fetchers at any time (each told its share).
    /// 0: no limit.
    pub max_source_mbps: f64,
}

impl SchedulerConfig {
    /// The settings of the `[scheduler]` config section.
    pub fn of(section: &crate::config::SchedulerSection) -> SchedulerConfig {
        SchedulerConfig {
            ttl: Duration::from_secs(section.peer_ttl_seconds),
            fanout: section.fanout,
            max_fetchers: section.max_fetchers,
            max_source_mbps: section.max_source_mbps,
            ..SchedulerConfig::default()
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            ttl: Duration::from_secs(30),
            fanout: 4.0,
            assignment_ttl: Duration::from_secs(10),
            fetch_ttl: Duration::from_secs(10),
            max_fetchers: 0,
            max_source_mbps: 0.0,
        }
    }
}

/// One registered peer. Peers are kept in slots and named by their slot index inside the
/// scheduler, so the per-task pools and the ranking loop work on small integers.
struct PeerState {
    name: PeerId,
    /// A hash of the name: per-requester tie breaks without hashing strings in the hot loop.
    hash: u64,
    addr: SocketAddr,
    seed: bool,
    place: Place,
    upload_capacity: f64,
    uploads: u32,
    last_seen: Duration,
    /// The tasks it holds (their bitmaps are in the tasks' pools).
    tasks: HashSet<TaskId>,
    links: HashMap<PeerId, LinkReport>,
    /// When each recent assignment of this peer as a parent was made.
    assigned: Vec<Duration>,
}

type Slot = u32;

/// A piece bitmap, packed, with its count of set bits.
#[derive(Clone, Debug)]
struct Bits {
    words: Vec<u64>,
    len: u32,
    count: u32,
}

impl Bits {
    fn of(have: &[bool]) -> Bits {
        let mut words = vec![0u64; have.len().div_ceil(64)];
        for (i, h) in have.iter().enumerate() {
            if *h {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        let count = have.iter().filter(|h| **h).count() as u32;
        Bits {
            words,
            len: have.len() as u32,
            count,
        }
    }

    fn set(&mut self, i: u32) {
        if i < self.len {
            let (w, b) = ((i / 64) as usize, i % 64);
            if self.words[w] & (1 << b) == 0 {
                self.words[w] |= 1 << b;
                self.count += 1;
            }
        }
    }

    fn complete(&self) -> bool {
        self.count == self.len
    }

    /// ORs `b` into `union` (started empty at `b`'s length); whether the union is complete.
    fn merge(union: &mut Option<Bits>, b: &Bits) -> bool {
        let u = union.get_or_insert_with(|| Bits {
            words: vec![0; b.words.len()],
            len: b.len,
            count: 0,
        });
        for (u, w) in u.words.iter_mut().zip(&b.words) {
            *u |= w;
        }
        u.count = u.words.iter().map(|w| w.count_ones()).sum();
        u.complete()
    }

    /// The indices not set.
    fn unset(&self) -> Vec<u32> {
        (0..self.len)
            .filter(|i| self.words[(*i / 64) as usize] & (1 << (i % 64)) == 0)
            .collect()
    }

    /// How many pieces these bits hold that `mine` lacks, counting no further than `cap`
    /// (ranking needs no more than [`USEFUL_ENOUGH`]; counting every word of every holder was
    /// most of a parent query's time).
    fn useful_capped(&self, mine: Option<&Bits>, cap: u32) -> u32 {
        let Some(m) = mine else {
            return self.count.min(cap);
        };
        let mut n = 0;
        for (t, m) in self
            .words
            .iter()
            .zip(m.words.iter().chain(std::iter::repeat(&0)))
        {
            n += (t & !m).count_ones();
            if n >= cap {
                return cap;
            }
        }
        n
    }

    /// How many pieces these bits hold that `mine` lacks.
    fn useful_to(&self, mine: Option<&Bits>) -> u32 {
        match mine {
            None => self.count,
            Some(m) => self
                .words
                .iter()
                .zip(m.words.iter().chain(std::iter::repeat(&0)))
                .map(|(t, m)| (t & !m).count_ones())
                .sum(),
        }
    }
}

/// The peers that hold one task and their bitmaps, side by side, so that ranking scans
/// contiguous memory instead of looking each peer's bitmap up by task (that lookup, a SipHash
/// of the task ID per holder, was half of a parent query's time).
#[derive(Default)]
struct Pool {
    members: Vec<Slot>,
    bits: Vec<Bits>,
    at: HashMap<Slot, usize>,
}

impl Pool {
    fn put(&mut self, s: Slot, b: Bits) {
        match self.at.get(&s) {
            Some(i) => self.bits[*i] = b,
            None => {
                self.at.insert(s, self.members.len());
                self.members.push(s);
                self.bits.push(b);
            }
        }
    }

    fn get(&self, s: Slot) -> Option<&Bits> {
        self.at.get(&s).map(|i| &self.bits[*i])
    }

    fn get_mut(&mut self, s: Slot) -> Option<&mut Bits> {
        self.at.get(&s).map(|i| &mut self.bits[*i])
    }

    fn remove(&mut self, s: Slot) {
        if let Some(i) = self.at.remove(&s) {
            self.members.swap_remove(i);
            self.bits.swap_remove(i);
            if let Some(moved) = self.members.get(i) {
                self.at.insert(*moved, i);
            }
        }
    }
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    slots: Vec<Option<PeerState>>,
    free: Vec<Slot>,
    ids: HashMap<PeerId, Slot>,
    /// Per task, the peers holding it (any part).
    holders: HashMap<TaskId, Pool>,
    /// Who was told to go back to source for a task nobody held, and when.
    fetchers: HashMap<TaskId, (PeerId, Duration)>,
    /// Who was told to fetch the pieces that only peers it banned hold, and when (one at a
    /// time per task; see [`Scheduler::advise_banning`]).
    rescuers: HashMap<TaskId, (PeerId, Duration)>,
    /// Tasks waiting for a fetcher slot (`max_fetchers`), and when last asked for.
    queued: HashMap<TaskId, Duration>,
    /// Peers that asked for a task's parents and have not announced it yet, and when: they
    /// are downloading it, so they are candidates (holding nothing yet) for those who ask
    /// next. Without this, peers that start together all got the one or two that happened
    /// to announce first, and with `max_parents` under the swarm's size the rest got no
    /// children.
    joining: HashMap<TaskId, HashMap<Slot, Duration>>,
    /// When expired state was last swept (a sweep visits every peer, so at most once per
    /// [`SWEEP_EVERY`]).
    swept: Option<Duration>,
    /// Calls answered, for the rotation of large pools (see [`SCAN_AT_MOST`]).
    calls: u64,
    /// Per task, what the live holders hold between them, and when that was worked out.
    cover: HashMap<TaskId, Cover>,
    /// The peers in each labelled rack (those with a non-empty `rack`).
    racks: HashMap<Place, Vec<Slot>>,
    /// Per task and rack, the one member that takes the task from outside the rack (see
    /// [`Scheduler::gateway`]).
    gateways: HashMap<TaskId, HashMap<Place, Slot>>,
}

/// A fetcher (or holder) not heard from for this long counts as gone when deciding who goes
/// to source: with announcements every 500 ms, ten missed ones. (Forgetting a peer entirely
/// waits for the longer `ttl`.)
const FETCHER_SILENT: Duration = Duration::from_secs(5);
/// Most tasks one announcement may name as being fetched (the rest are ignored).
const MAX_FETCHING: usize = 1024;

/// For this long after the scheduler starts, a task that some peer holds is not taken for
/// uncovered, nor a task its requester already downloads from peers: the holders and the
/// fetcher have not announced yet. They announce every 500 ms, but after a restart each
/// first waits out its call to the old scheduler (3 s) and reconnects: at 3 s here, fetchers
/// were chosen again for pieces a live fetcher was reading.
pub const WARM_UP: Duration = Duration::from_secs(5);
/// The union of the live holders' bitmaps of one task.
struct Cover {
    at: Duration,
    complete: bool,
    /// None: no live holder.
    union: Option<Bits>,
}

/// How often a task's cover by live holders is worked out again.
const COVER_EVERY: Duration = Duration::from_secs(1);

/// How often expired peers and assignments are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A call ranks at most this many of a task's holders (and joiners): a window of the pool
/// that starts at a different place for each call, so a requester still sees the whole
/// swarm over a few calls. Ranking every holder made a call cost O(swarm × pieces); with
/// 10,000 peers a call took milliseconds.
pub const SCAN_AT_MOST: usize = 256;

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        Scheduler {
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            ids: HashMap::new(),
            holders: HashMap::new(),
            fetchers: HashMap::new(),
            rescuers: HashMap::new(),
            queued: HashMap::new(),
            joining: HashMap::new(),
            swept: None,
            calls: 0,
            cover: HashMap::new(),
            racks: HashMap::new(),
            gateways: HashMap::new(),
        }
    }

    pub fn peers(&self) -> usize {
        self.ids.len()
    }

    /// Tasks some live peer holds.
    pub fn tasks(&self) -> usize {
        self.holders
            .values()
            .filter(|p| !p.members.is_empty())
            .count()
    }

    fn peer(&self, name: &str) -> Option<&PeerState> {
        self.ids
            .get(name)
            .and_then(|s| self.slots[*s as usize].as_ref())
    }

    fn at(&self, s: Slot) -> Option<&PeerState> {
        self.slots.get(s as usize).and_then(Option::as_ref)
    }

    /// Applies an announcement received at `now`. Returns the tasks the peer says it reads
    /// from their origins while another live peer was chosen to (see [`Announce::fetching`]):
    /// it should stop and take the rest from the swarm.
    pub fn announce(&mut self, a: Announce, now: Duration) -> Vec<TaskId> {
        let slot = match self.ids.get(&a.peer) {
            Some(s) => *s,
            None => {
                let state = PeerState {
                    name: a.peer.clone(),
                    hash: name_hash(&a.peer),
                    addr: a.addr,
                    seed: a.seed,
                    place: Place::default(),
                    upload_capacity: 0.0,
                    uploads: 0,
                    last_seen: now,
                    tasks: HashSet::new(),
                    links: HashMap::new(),
                    assigned: Vec::new(),
                };
                let s = match self.free.pop() {
                    Some(s) => {
                        self.slots[s as usize] = Some(state);
                        s
                    }
                    None => {
                        self.slots.push(Some(state));
                        (self.slots.len() - 1) as Slot
                    }
                };
                self.ids.insert(a.peer.clone(), s);
                s
            }
        };
        let Some(p) = self.slots[slot as usize].as_mut() else {
            return Vec::new();
        };
        if p.place != a.place {
            let old = std::mem::replace(&mut p.place, a.place.clone());
            self.move_rack(slot, &old, &a.place);
        }
        let Some(p) = self.slots[slot as usize].as_mut() else {
            return Vec::new();
        };
        p.addr = a.addr;
        p.seed = a.seed;
        p.upload_capacity = a.upload_capacity.max(0.0);
        p.uploads = a.uploads;
        p.last_seen = now;
        for (task, holding) in a.tasks {
            match holding {
                Holding::Full { pieces, mut have } => {
                    if pieces > crate::transport::wire::MAX_WIRE_PIECES {
                        continue;
                    }
                    have.resize(pieces as usize, false);
                    p.tasks.insert(task);
                    self.holders
                        .entry(task)
                        .or_default()
                        .put(slot, Bits::of(&have));
                }
                Holding::Added(added) => {
                    // Without a full bitmap first we do not know the piece count: ignore, the
                    // peer re-sends in full when asked (after a scheduler restart).
                    if let Some(have) = self.holders.get_mut(&task).and_then(|h| h.get_mut(slot)) {
                        for i in added {
                            have.set(i);
                        }
                    }
                }
                Holding::Gone => {
                    p.tasks.remove(&task);
                    if let Some(pool) = self.holders.get_mut(&task) {
                        pool.remove(slot);
                    }
                }
            }
        }
        for (parent, link) in a.links {
            p.links.insert(parent, link);
        }
        // A peer reading a task's origin says so each time: it stays (or, to a restarted
        // scheduler, becomes) the task's fetcher, unless another live one was chosen. Then it
        // is told to stop: a fetcher that was silent (a stalled process, a paused VM) was
        // replaced, and on waking it read on what its successor was reading (1.9 x F). A
        // rescuer (pieces only banned peers hold) fetches beside the fetcher by design.
        let mut superseded = Vec::new();
        for task in a.fetching.into_iter().take(MAX_FETCHING) {
            let other = self.fetchers.get(&task).is_some_and(|(who, _)| {
                *who != a.peer
                    && self
                        .peer(who)
                        .is_some_and(|q| now.saturating_sub(q.last_seen) <= FETCHER_SILENT)
            });
            if !other {
                self.fetchers.insert(task, (a.peer.clone(), now));
            } else if self
                .rescuers
                .get(&task)
                .is_none_or(|(who, _)| *who != a.peer)
            {
                superseded.push(task);
            }
        }
        superseded
    }

    /// A requester not yet heard from (it asks before its first announcement reaches this
    /// scheduler) is registered with its place, holding nothing, so that its first call is
    /// already answered for its rack. Its announcements fill in the rest.
    pub fn introduce(&mut self, peer: &str, addr: SocketAddr, place: &Place, now: Duration) {
        if place.rack.is_empty() || self.ids.contains_key(peer) {
            return;
        }
        self.announce(
            Announce {
                peer: peer.to_string(),
                addr,
                seed: false,
                place: place.clone(),
                upload_capacity: 0.0,
                uploads: 0,
                tasks: Vec::new(),
                links: Vec::new(),
                fetching: Vec::new(),
            },
            now,
        );
    }

    /// Files `slot` under its new rack (an empty rack label files it nowhere).
    fn move_rack(&mut self, slot: Slot, from: &Place, to: &Place) {
        if !from.rack.is_empty() {
            if let Some(v) = self.racks.get_mut(from) {
                v.retain(|s| *s != slot);
                if v.is_empty() {
                    self.racks.remove(from);
                }
            }
        }
        if !to.rack.is_empty() {
            self.racks.entry(to.clone()).or_default().push(slot);
        }
    }

    /// The member of `place`'s rack that takes `task` from outside the rack; the others take
    /// it only from their rack. The spine then carries each piece into a rack about once, and
    /// the rack's members pass it among themselves at their own links' speed (the gateway's
    /// download is one host's link, as fast as any member's).
    ///
    /// A seed in the rack that holds or fetches the task is its gateway. Otherwise the gateway
    /// stays while it is heard from (within [`FETCHER_SILENT`]) and takes part in the task;
    /// then the live member holding the most of it takes over, or `me` (the requester, which
    /// is live: it asks now).
    fn gateway(&mut self, task: &TaskId, me: Slot, place: &Place, now: Duration) -> Slot {
        let fetcher = self.fetchers.get(task).map(|(who, _)| who.as_str());
        let taking_part = |s: &Scheduler, g: Slot| {
            s.at(g).is_some_and(|p| {
                p.place == *place
                    && now.saturating_sub(p.last_seen) <= FETCHER_SILENT
                    && (p.tasks.contains(task)
                        || fetcher == Some(p.name.as_str())
                        || s.joining.get(task).is_some_and(|j| j.contains_key(&g)))
            })
        };
        let current = self.gateways.get(task).and_then(|g| g.get(place)).copied();
        let is_seed = |s: &Scheduler, g: Slot| s.at(g).is_some_and(|p| p.seed);
        if let Some(g) = current.filter(|g| is_seed(self, *g) && taking_part(self, *g)) {
            return g;
        }
        let members = self.racks.get(place).map_or(&[][..], Vec::as_slice);
        let seed = members
            .iter()
            .copied()
            .find(|s| is_seed(self, *s) && taking_part(self, *s));
        if let Some(g) = seed.or(current.filter(|g| *g == me || taking_part(self, *g))) {
            if current != Some(g) {
                self.gateways
                    .entry(*task)
                    .or_default()
                    .insert(place.clone(), g);
            }
            return g;
        }
        let pool = self.holders.get(task);
        let best = members
            .iter()
            .filter_map(|s| Some((pool?.get(*s)?.count, *s)))
            .filter(|(count, s)| *count > 0 && taking_part(self, *s))
            .max();
        let g = best.map_or(me, |(_, s)| s);
        self.gateways
            .entry(*task)
            .or_default()
            .insert(place.clone(), g);
        g
    }

    /// Whether `peer` is its labelled rack's gateway for `task`.
    pub fn is_gateway(&self, peer: &str, task: &TaskId) -> bool {
        let Some(&me) = self.ids.get(peer) else {
            return false;
        };
        self.at(me).is_some_and(|p| {
            !p.place.rack.is_empty()
                && self
                    .gateways
                    .get(task)
                    .and_then(|g| g.get(&p.place))
                    .is_some_and(|g| *g == me)
        })
    }

    /// Whether `requester` is in a labelled rack whose gateway for `task` is another member.
    fn behind_gateway(&self, requester: &str, task: &TaskId) -> bool {
        let Some(&me) = self.ids.get(requester) else {
            return false;
        };
        let Some(p) = self.at(me).filter(|p| !p.place.rack.is_empty()) else {
            return false;
        };
        self.behind(task, me, &p.place)
    }

    /// Whether the peer in `slot`, at `place`, is behind another member's gateway for `task`.
    fn behind(&self, task: &TaskId, slot: Slot, place: &Place) -> bool {
        !place.rack.is_empty()
            && self
                .gateways
                .get(task)
                .and_then(|g| g.get(place))
                .is_some_and(|g| *g != slot)
    }

    /// Whether the scheduler holds `peer`'s full bitmap for `task` (else the peer must re-send
    /// it in full, e.g. after a scheduler restart).
    pub fn knows(&self, peer: &str, task: &TaskId) -> bool {
        self.peer(peer).is_some_and(|p| p.tasks.contains(task))
    }

    /// Forgets peers not heard from within the TTL, and stale assignments. The sweep visits
    /// every peer, so it runs at most once per [`SWEEP_EVERY`].
    pub fn expire(&mut self, now: Duration) {
        if self
            .swept
            .is_some_and(|t| now.saturating_sub(t) < SWEEP_EVERY && now >= t)
        {
            return;
        }
        self.swept = Some(now);
        let ttl = self.cfg.ttl;
        self.queued.retain(|_, at| now.saturating_sub(*at) <= ttl);
        let ttl = self.cfg.ttl;
        let keep = self.cfg.assignment_ttl;
        for s in 0..self.slots.len() {
            let Some(p) = self.slots[s].as_mut() else {
                continue;
            };
            if now.saturating_sub(p.last_seen) > ttl {
                let Some(p) = self.slots[s].take() else {
                    continue;
                };
                for task in &p.tasks {
                    if let Some(pool) = self.holders.get_mut(task) {
                        pool.remove(s as Slot);
                    }
                }
                self.move_rack(s as Slot, &p.place, &Place::default());
                for g in self.gateways.values_mut() {
                    g.retain(|_, g| *g != s as Slot);
                }
                self.gateways.retain(|_, g| !g.is_empty());
                self.ids.remove(&p.name);
                self.free.push(s as Slot);
                continue;
            }
            p.assigned.retain(|t| now.saturating_sub(*t) <= keep);
        }
        self.holders.retain(|_, pool| !pool.members.is_empty());
        let holders = &self.holders;
        self.cover.retain(|task, _| holders.contains_key(task));
        let fetch_ttl = self.cfg.fetch_ttl;
        let slots = &self.slots;
        self.joining.retain(|task, j| {
            j.retain(|peer, since| {
                now.saturating_sub(*since) <= keep
                    && slots
                        .get(*peer as usize)
                        .and_then(Option::as_ref)
                        .is_some_and(|p| !p.tasks.contains(task))
            });
            !j.is_empty()
        });
        let ids = &self.ids;
        self.fetchers.retain(|_, (peer, since)| {
            now.saturating_sub(*since) <= fetch_ttl && ids.contains_key(peer)
        });
        self.rescuers.retain(|_, (peer, _)| ids.contains_key(peer));
        // A task nobody holds or asks for has no gateways left to keep.
        let (holders, joining) = (&self.holders, &self.joining);
        self.gateways
            .retain(|task, _| holders.contains_key(task) || joining.contains_key(task));
    }

    /// Candidates plus advice on going back to source. While the live holders together hold
    /// every piece, everyone downloads from parents. Otherwise one peer fetches what nobody
    /// holds: the current fetcher while it is heard from (a peer that was told and has not
    /// become a holder within `fetch_ttl` is replaced); else a seed, chosen per task by hash
    /// so tasks spread over seeds (the requester orders it, `AskSeed`); else the requester
    /// itself (`Source`). A requester that is itself a seed fetches when nobody holds the
    /// task. Everyone else waits for the swarm: a peer's own timer does not send pieces to
    /// source while the scheduler answers (see [`crate::engine::Engine::source_by_scheduler`]).
    pub fn advise(
        &mut self,
        requester: &str,
        task: &TaskId,
        max: usize,
        exclude: &[PeerId],
        now: Duration,
    ) -> (Vec<Candidate>, Advice) {
        self.advise_banning(requester, task, max, exclude, &[], false, now)
    }

    /// [`Scheduler::advise`] for a requester that banned `banned` (it caught them sending
    /// wrong bytes or false values). Pieces that only they hold are lost to it: when the other
    /// live holders do not hold the whole task between them, it is told to fetch from source
    /// itself (only those pieces: see [`Scheduler::lacking_without`]), whoever else fetches
    /// the task. One such requester at a time per task, while it is heard from: others that
    /// banned the same peers download from parents meanwhile (the rescuer among them), and
    /// find the pieces covered once it holds them.
    ///
    /// `joined`: the requester already takes part in the task's swarm (it holds pieces, or
    /// has parents). Right after a (re)start, when holders and fetchers have not announced
    /// again yet, such a requester is not sent to the origin: it goes on with its parents.
    #[allow(clippy::too_many_arguments)]
    pub fn advise_banning(
        &mut self,
        requester: &str,
        task: &TaskId,
        max: usize,
        exclude: &[PeerId],
        banned: &[PeerId],
        joined: bool,
        now: Duration,
    ) -> (Vec<Candidate>, Advice) {
        // A requester is heard from as it asks. Counting only its announcements, a fetcher
        // chosen as it asked looked silent to the next asker whenever its announcements ran
        // late, and each asker in turn was made the fetcher.
        if let Some(p) = self
            .ids
            .get(requester)
            .and_then(|s| self.slots[*s as usize].as_mut())
        {
            p.last_seen = p.last_seen.max(now);
        }
        let parents = self.candidates(requester, task, max, exclude, now);
        // A rack member behind its gateway is not sent to a seed elsewhere: the gateway is.
        let behind = self.behind_gateway(requester, task);
        if let Some(&s) = self.ids.get(requester) {
            if !self.at(s).is_some_and(|p| p.tasks.contains(task)) {
                self.joining.entry(*task).or_default().insert(s, now);
            }
        }
        // Holders the requester already has (or just left) still count as holders; peers
        // still joining do not (someone must still be told to fetch).
        let holds = |x: &str| x != requester && self.knows(x, task);
        let held = parents.iter().any(|c| holds(&c.peer)) || exclude.iter().any(|x| holds(x));
        let covered = self.covered(task, now);
        if held && covered && !banned.is_empty() {
            let whole = self
                .union_without(task, banned, now)
                .is_some_and(|u| u.complete());
            if !whole {
                let busy = self.rescuers.get(task).is_some_and(|(who, _)| {
                    who != requester
                        && self
                            .peer(who)
                            .is_some_and(|p| now.saturating_sub(p.last_seen) <= FETCHER_SILENT)
                });
                if busy {
                    return (parents, Advice::Parents);
                }
                if self
                    .rescuers
                    .insert(*task, (requester.to_string(), now))
                    .is_none_or(|(who, _)| who != requester)
                {
                    tracing::info!(%task, %requester, banned = banned.len(), "some pieces are held only by peers this requester banned; it fetches them from source");
                }
                return (parents, Advice::Source);
            }
        }
        // Just started (a restart): holders are still announcing, so a task some of them hold
        // only looks uncovered. Choosing a fetcher now sent pieces the swarm held to the
        // origin again.
        if held && (covered || now < WARM_UP) {
            return (parents, Advice::Parents);
        }
        if joined && now < WARM_UP {
            return (parents, Advice::Wait);
        }
        let live = |s: &Scheduler, who: &str| {
            s.peer(who)
                .is_some_and(|p| now.saturating_sub(p.last_seen) <= FETCHER_SILENT)
        };
        let fetcher = self
            .fetchers
            .get(task)
            .filter(|(who, since)| {
                // A fetcher chosen when it asked, before its first announcement reached this
                // scheduler (after a restart), is not yet known: it stays the fetcher for a
                // while all the same, or each asker in turn replaced the last.
                let told = now.saturating_sub(*since);
                (live(self, who) || (self.peer(who).is_none() && told <= FETCHER_SILENT))
                    && (self.knows(who, task) || told <= self.cfg.fetch_ttl)
            })
            .map(|(p, _)| p.clone());
        // (The requester may not have announced yet: to a restarted scheduler it is unknown.)
        let advice = |s: &Scheduler, who: &str| match s.peer(who) {
            _ if who == requester => Advice::Source,
            // Parents hold what they hold; the fetcher adds the rest as it goes.
            _ if held => Advice::Parents,
            Some(p) if p.seed && !behind => Advice::AskSeed {
                peer: who.to_string(),
                addr: p.addr,
            },
            _ => Advice::Wait,
        };
        if let Some(f) = fetcher {
            return (parents, advice(self, &f));
        }
        // The origin is protected: at most `max_fetchers` tasks read from it at once.
        if self.cfg.max_fetchers > 0 && self.active_fetchers(now) >= self.cfg.max_fetchers {
            self.queued.insert(*task, now);
            return (parents, Advice::Wait);
        }
        self.queued.remove(task);
        let requester_is_seed = self.peer(requester).is_some_and(|p| p.seed);
        let seed = if requester_is_seed {
            None
        } else {
            let t = name_hash(&task.dir_name());
            self.slots
                .iter()
                .flatten()
                .filter(|p| p.seed && p.name != requester && live(self, &p.name))
                .min_by_key(|p| mix(t ^ p.hash))
                .map(|p| p.name.clone())
        };
        let chosen = seed.unwrap_or_else(|| requester.to_string());
        tracing::info!(%task, fetcher = %chosen, "no live peer holds some of this task; choosing who fetches it from source");
        self.fetchers.insert(*task, (chosen.clone(), now));
        let advice = match advice(self, &chosen) {
            // A seed chosen while others hold parts is ordered all the same: it fetches what
            // is missing and serves it.
            Advice::Parents if chosen != requester && !behind => match self.peer(&chosen) {
                Some(p) if p.seed => Advice::AskSeed {
                    peer: chosen.clone(),
                    addr: p.addr,
                },
                _ => Advice::Parents,
            },
            a => a,
        };
        (parents, advice)
    }

    /// Tasks being read from origins now: a live fetcher (or one told within `fetch_ttl`)
    /// that does not yet hold its task whole (by its own announcements, so a slot frees the
    /// moment the fetcher says it is done).
    fn active_fetchers(&self, now: Duration) -> usize {
        self.fetchers
            .iter()
            .filter(|(task, (who, since))| {
                let Some(&slot) = self.ids.get(who.as_str()) else {
                    return false;
                };
                let live = self
                    .at(slot)
                    .is_some_and(|p| now.saturating_sub(p.last_seen) <= FETCHER_SILENT);
                let bits = self.holders.get(*task).and_then(|pool| pool.get(slot));
                let done = bits.is_some_and(Bits::complete);
                live && !done
                    && (bits.is_some() || now.saturating_sub(*since) <= self.cfg.fetch_ttl)
            })
            .count()
    }

    /// Whether `task` waits for a fetcher slot.
    pub fn is_queued(&self, task: &TaskId) -> bool {
        self.queued.contains_key(task)
    }

    /// A fetcher's share of `max_source_mbps` now (None: no limit).
    pub fn source_share(&self, now: Duration) -> Option<f64> {
        (self.cfg.max_source_mbps > 0.0)
            .then(|| self.cfg.max_source_mbps / self.active_fetchers(now).max(1) as f64)
    }

    /// Whether the holders heard from lately hold every piece of `task` between them. Worked
    /// out at most once per [`COVER_EVERY`] per task (it visits every holder).
    fn covered(&mut self, task: &TaskId, now: Duration) -> bool {
        if let Some(c) = self.cover.get(task) {
            if now.saturating_sub(c.at) < COVER_EVERY && now >= c.at {
                return c.complete;
            }
        }
        let mut union: Option<Bits> = None;
        if let Some(pool) = self.holders.get(task) {
            for (s, b) in pool.members.iter().zip(&pool.bits) {
                let Some(p) = self.at(*s) else { continue };
                if now.saturating_sub(p.last_seen) > FETCHER_SILENT {
                    continue;
                }
                if Bits::merge(&mut union, b) {
                    break;
                }
            }
        }
        let complete = union.as_ref().is_some_and(Bits::complete);
        self.cover.insert(
            *task,
            Cover {
                at: now,
                complete,
                union,
            },
        );
        complete
    }

    /// The union of the bitmaps of `task`'s holders heard from lately, leaving out `banned`
    /// (None: no such holder). Visits every holder: only for requesters that banned someone.
    fn union_without(&self, task: &TaskId, banned: &[PeerId], now: Duration) -> Option<Bits> {
        let pool = self.holders.get(task)?;
        let mut union: Option<Bits> = None;
        for (s, b) in pool.members.iter().zip(&pool.bits) {
            let Some(p) = self.at(*s) else { continue };
            if now.saturating_sub(p.last_seen) > FETCHER_SILENT || banned.contains(&p.name) {
                continue;
            }
            Bits::merge(&mut union, b);
        }
        union
    }

    /// The pieces of `task` no live holder but `banned` holds (see
    /// [`Scheduler::advise_banning`]); None when nobody else holds any.
    pub fn lacking_without(
        &self,
        task: &TaskId,
        banned: &[PeerId],
        now: Duration,
    ) -> Option<Vec<u32>> {
        Some(self.union_without(task, banned, now)?.unset())
    }

    /// The pieces of `task` that no live holder held when last worked out (by [`advise`]):
    /// what a peer told to go to source should fetch. None: nobody holds any of it.
    ///
    /// [`advise`]: Scheduler::advise
    pub fn lacking(&self, task: &TaskId) -> Option<Vec<u32>> {
        Some(self.cover.get(task)?.union.as_ref()?.unset())
    }

    /// Every peer heard from within the TTL: (name, address, seed), sorted by name.
    pub fn live_peers(&self) -> Vec<(PeerId, SocketAddr, bool)> {
        let mut out: Vec<_> = self
            .slots
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.addr, p.seed))
            .collect();
        out.sort();
        out
    }

    /// Per live holder of `task`: (name, pieces held, pieces), at most `max` of them.
    pub fn holdings(&self, task: &TaskId, max: usize) -> Vec<(PeerId, u32, u32)> {
        let Some(pool) = self.holders.get(task) else {
            return Vec::new();
        };
        pool.members
            .iter()
            .zip(&pool.bits)
            .filter_map(|(s, b)| Some((self.at(*s)?.name.clone(), b.count, b.len)))
            .take(max)
            .collect()
    }

    /// How many live peers hold `task`: (complete, partial). Read-only: asking changes nothing
    /// (`starling tasks`).
    pub fn holders(&self, task: &TaskId) -> (u32, u32) {
        let Some(pool) = self.holders.get(task) else {
            return (0, 0);
        };
        pool.members
            .iter()
            .zip(&pool.bits)
            .filter(|(s, _)| self.at(**s).is_some())
            .fold(
                (0, 0),
                |(c, p), (_, b)| {
                    if b.complete() {
                        (c + 1, p)
                    } else {
                        (c, p + 1)
                    }
                },
            )
    }

    /// Up to `max` ranked parents for `requester` on `task`, leaving out `exclude` (the
    /// parents it has, and those it just left). Each one handed out counts as an assignment
    /// against that parent for a while, which spreads later requesters.
    pub fn candidates(
        &mut self,
        requester: &str,
        task: &TaskId,
        max: usize,
        exclude: &[PeerId],
        now: Duration,
    ) -> Vec<Candidate> {
        self.calls += 1;
        let me = self.ids.get(requester).copied();
        // A member of a labelled rack behind another member (its gateway) ranks only its
        // rack's members; the gateway ranks everyone but the members of its rack that hold
        // nothing new to it (what they get comes through it).
        let (rack_only, gateway_of) = match me
            .and_then(|s| Some((s, self.at(s)?.place.clone())))
            .filter(|(_, place)| !place.rack.is_empty())
        {
            Some((s, place)) if self.gateway(task, s, &place, now) == s => (None, Some(place)),
            Some((_, place)) => (Some(place), None),
            None => (None, None),
        };
        let me_state = me.and_then(|s| self.at(s));
        let pool = self.holders.get(task);
        let mine = me.and_then(|s| pool?.get(s));
        let my_links = me_state.map(|p| &p.links);
        let my_hash = me_state.map_or_else(|| name_hash(requester), |p| p.hash);
        let my_place = me_state.map(|p| &p.place);
        let measured: Vec<f64> = {
            let mut v: Vec<f64> = my_links
                .into_iter()
                .flat_map(|l| l.values())
                .map(|l| l.throughput)
                .filter(|t| *t > 0.0)
                .collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v
        };
        let median = measured.get(measured.len() / 2).copied().unwrap_or(1.0);
        let excluded: HashSet<Slot> = exclude
            .iter()
            .filter_map(|x| self.ids.get(x).copied())
            .collect();
        // Holders, then peers still joining (holding nothing yet).
        let held: &[Slot] = self
            .holders
            .get(task)
            .map_or(&[][..], |p| p.members.as_slice());
        let mut joiners: Vec<Slot> = self
            .joining
            .get(task)
            .map(|j| {
                j.keys()
                    .copied()
                    .filter(|s| !self.at(*s).is_some_and(|p| p.tasks.contains(task)))
                    .collect()
            })
            .unwrap_or_default();
        // In slot order, so that the same calls give the same answers.
        joiners.sort_unstable();
        // What to rank: each peer with the index of its bitmap in the pool (None: joining).
        let scan: Vec<(Slot, Option<usize>)> = match &rack_only {
            Some(place) => self
                .racks
                .get(place)
                .into_iter()
                .flatten()
                .filter_map(|s| match pool.and_then(|pl| pl.at.get(s)) {
                    Some(i) => Some((*s, Some(*i))),
                    None => joiners.binary_search(s).is_ok().then_some((*s, None)),
                })
                .collect(),
            None => {
                let total = held.len() + joiners.len();
                let (start, take) = if total > SCAN_AT_MOST {
                    (
                        (mix(my_hash ^ self.calls) % total as u64) as usize,
                        SCAN_AT_MOST,
                    )
                } else {
                    (0, total)
                };
                (0..take)
                    .map(|k| {
                        let i = (start + k) % total;
                        match held.get(i) {
                            Some(s) => (*s, Some(i)),
                            None => (joiners[i - held.len()], None),
                        }
                    })
                    .collect()
            }
        };
        let mut ranked: Vec<(f64, u64, Slot, u32)> = Vec::with_capacity(scan.len());
        for (slot, at) in scan {
            let joined = at.is_none();
            if Some(slot) == me || excluded.contains(&slot) {
                continue;
            }
            let Some(p) = self.at(slot) else { continue };
            let have = at.and_then(|i| pool.map(|pl| &pl.bits[i]));
            let useful = have.map_or(0, |h| h.useful_capped(mine, USEFUL_ENOUGH));
            // A holder with nothing new is still worth watching while it downloads (at the
            // start, a seed that has verified nothing yet); a complete one is not.
            if useful == 0 && !joined && have.is_some_and(Bits::complete) {
                continue;
            }
            if let Some(m) = &gateway_of {
                // To a gateway, a member of its own rack, or one behind another rack's
                // gateway, matters only once it holds something new: until then what it gets
                // is what the gateways get.
                let behind = self.behind(task, slot, &p.place);
                if useful == 0 && (*m == p.place || behind) {
                    continue;
                }
            }
            let load = p.uploads as f64 + p.assigned.len() as f64;
            let spare = 1.0 / (1.0 + load / self.cfg.fanout);
            let capacity = if p.upload_capacity > 0.0 {
                p.upload_capacity
            } else {
                median
            };
            let link = match my_links.and_then(|l| l.get(&p.name)) {
                Some(l) => l.throughput.max(1.0) * (1.0 - l.loss.clamp(0.0, 0.9)),
                None => median.min(capacity),
            };
            // A holder with nothing new yet still scores a little, so that load spreads
            // requesters over such holders too: at the start every peer has nothing, and
            // with a bare ln(1 + 0) = 0 for all, each requester took the same few peers by the
            // tie-break (with `max_parents` under the swarm's size, half the peers got no
            // children and the seed sent 2.7 x F).
            //
            // Past `USEFUL_ENOUGH` pieces, more does not rank higher: any such holder can keep
            // a child's requests busy, and load should then decide, or the first peers to hold
            // a few pieces collect every child while later ones (the same content a second
            // later) get none.
            let value = (1.0 + useful.min(USEFUL_ENOUGH) as f64).ln() + WATCH_SCORE;
            // Locality ranks among holders of something useful; a nearby peer holding
            // nothing yet must not outrank a farther one that can send now.
            let near = match my_place {
                Some(m) if useful > 0 => m.affinity(&p.place),
                _ => 1.0,
            };
            // Another rack's gateway (not a seed) spends its upload on its own rack, whose only
            // way in it is: a gateway takes from the other racks' members first.
            let near = match &gateway_of {
                Some(m)
                    if !p.seed
                        && !p.place.rack.is_empty()
                        && p.place != *m
                        && !self.behind(task, slot, &p.place) =>
                {
                    near * OTHER_GATEWAY
                }
                _ => near,
            };
            let score = value * spare * link * near;
            ranked.push((score, mix(my_hash ^ p.hash), slot, useful));
        }
        let order = |a: &(f64, u64, Slot, u32), b: &(f64, u64, Slot, u32)| {
            b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
        };
        ranked.sort_by(order);
        ranked.truncate(max);
        let mut out = Vec::with_capacity(ranked.len());
        for (score, _, slot, _) in ranked {
            // The exact count, for the few handed out.
            let useful = pool
                .and_then(|pl| pl.get(slot))
                .map_or(0, |h| h.useful_to(mine));
            if let Some(p) = self.slots[slot as usize].as_mut() {
                p.assigned.push(now);
                out.push(Candidate {
                    peer: p.name.clone(),
                    addr: p.addr,
                    seed: p.seed,
                    useful,
                    score,
                });
            }
        }
        out
    }
}

/// Where a node sits, from its config's `[peer] zone` and `rack` labels (empty: unknown).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Place {
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub rack: String,
}

impl Place {
    /// How much a parent at `other` is preferred by a requester here: a parent in the same
    /// rack keeps the bytes off the spine, one in the same zone off the links between zones.
    fn affinity(&self, other: &Place) -> f64 {
        let same = |a: &str, b: &str| !a.is_empty() && a == b;
        if same(&self.zone, &other.zone) || (self.zone.is_empty() && other.zone.is_empty()) {
            if same(&self.rack, &other.rack) {
                SAME_RACK
            } else {
                1.0
            }
        } else {
            OTHER_ZONE
        }
    }
}

/// How another rack's gateway ranks, to a gateway, against that rack's other members.
const OTHER_GATEWAY: f64 = 0.1;

/// How a parent in the requester's rack ranks against one elsewhere in its zone.
const SAME_RACK: f64 = 4.0;
/// How a parent in another zone ranks against one in the requester's zone.
const OTHER_ZONE: f64 = 0.25;

fn name_hash(name: &str) -> u64 {
    let d = crate::core::Digest::of(name.as_bytes());
    u64::from_le_bytes([
        d.0[0], d.0[1], d.0[2], d.0[3], d.0[4], d.0[5], d.0[6], d.0[7],
    ])
}

/// splitmix64's finaliser: a cheap, well-spread permutation of u64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a downloading holder with nothing the requester lacks scores, before load and link:
/// a twentieth of one useful piece's, so any useful holder outranks it unless far busier.
const WATCH_SCORE: f64 = 0.05;

/// How many useful pieces make a holder as good as any other (before load and link).
const USEFUL_ENOUGH: u32 = 8;

/// Bitmaps in JSON as hex of packed bits (piece i is bit i%8 of byte i/8): 1024 pieces take
/// 256 characters rather than thousands.
mod bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(have: &[bool], s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = vec![0u8; have.len().div_ceil(8)];
        for (i, h) in have.iter().enumerate() {
            if *h {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<bool>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bad = || serde::de::Error::custom("a piece bitmap must be hex digits in pairs");
        if s.len() % 2 != 0 {
            return Err(bad());
        }
        let bytes = (0..s.len() / 2)
            .map(|i| {
                s.get(2 * i..2 * i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        Ok((0..bytes.len() * 8)
            .map(|i| bytes[i / 8] & (1 << (i % 8)) != 0)
            .collect())
    }
}
