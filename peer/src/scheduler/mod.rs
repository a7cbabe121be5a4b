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

use std::collections::{BTreeMap, HashMap, HashSet};
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
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            ttl: Duration::from_secs(30),
            fanout: 4.0,
            assignment_ttl: Duration::from_secs(10),
            fetch_ttl: Duration::from_secs(10),
        }
    }
}

struct PeerState {
    addr: SocketAddr,
    seed: bool,
    upload_capacity: f64,
    uploads: u32,
    last_seen: Duration,
    tasks: HashMap<TaskId, Vec<bool>>,
    links: HashMap<PeerId, LinkReport>,
    /// When each recent assignment of this peer as a parent was made.
    assigned: Vec<Duration>,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    peers: BTreeMap<PeerId, PeerState>,
    /// Who was told to go back to source for a task nobody held, and when.
    fetchers: HashMap<TaskId, (PeerId, Duration)>,
    /// Peers that asked for a task's parents and have not announced it yet, and when: they
    /// are downloading it, so they are candidates (holding nothing yet) for those who ask
    /// next. Without this, peers that start together all got the one or two that happened
    /// to announce first, and with `max_parents` under the swarm's size the rest got no
    /// children.
    joining: HashMap<TaskId, HashMap<PeerId, Duration>>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        Scheduler {
            cfg,
            peers: BTreeMap::new(),
            fetchers: HashMap::new(),
            joining: HashMap::new(),
        }
    }

    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Applies an announcement received at `now`.
    pub fn announce(&mut self, a: Announce, now: Duration) {
        let p = self
            .peers
            .entry(a.peer.clone())
            .or_insert_with(|| PeerState {
                addr: a.addr,
                seed: a.seed,
                upload_capacity: 0.0,
                uploads: 0,
                last_seen: now,
                tasks: HashMap::new(),
                links: HashMap::new(),
                assigned: Vec::new(),
            });
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
                    p.tasks.insert(task, have);
                }
                Holding::Added(added) => {
                    // Without a full bitmap first we do not know the piece count: ignore, the
                    // peer re-sends in full when asked (after a scheduler restart).
                    if let Some(have) = p.tasks.get_mut(&task) {
                        for i in added {
                            if let Some(slot) = have.get_mut(i as usize) {
                                *slot = true;
                            }
                        }
                    }
                }
                Holding::Gone => {
                    p.tasks.remove(&task);
                }
            }
        }
        for (parent, link) in a.links {
            p.links.insert(parent, link);
        }
    }

    /// Whether the scheduler holds `peer`'s full bitmap for `task` (else the peer must re-send
    /// it in full, e.g. after a scheduler restart).
    pub fn knows(&self, peer: &str, task: &TaskId) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.tasks.contains_key(task))
    }

    /// Forgets peers not heard from within the TTL, and stale assignments.
    pub fn expire(&mut self, now: Duration) {
        let ttl = self.cfg.ttl;
        self.peers
            .retain(|_, p| now.saturating_sub(p.last_seen) <= ttl);
        let keep = self.cfg.assignment_ttl;
        for p in self.peers.values_mut() {
            p.assigned.retain(|t| now.saturating_sub(*t) <= keep);
        }
        let fetch_ttl = self.cfg.fetch_ttl;
        let peers = &self.peers;
        self.joining.retain(|task, j| {
            j.retain(|peer, since| {
                now.saturating_sub(*since) <= keep
                    && peers.get(peer).is_some_and(|p| !p.tasks.contains_key(task))
            });
            !j.is_empty()
        });
        self.fetchers.retain(|_, (peer, since)| {
            now.saturating_sub(*since) <= fetch_ttl && peers.contains_key(peer)
        });
    }

    /// Candidates plus advice on going back to source. A requester that is itself a seed
    /// goes to source when nobody holds the task; otherwise a seed is preferred (chosen per
    /// task by hash, so tasks spread over seeds), and only without one does the first
    /// requester fetch. A fetcher that does not become a holder within `fetch_ttl` is
    /// replaced.
    pub fn advise(
        &mut self,
        requester: &str,
        task: &TaskId,
        max: usize,
        exclude: &[PeerId],
        now: Duration,
    ) -> (Vec<Candidate>, Advice) {
        let parents = self.candidates(requester, task, max, exclude, now);
        if let Some(p) = self.peers.get(requester) {
            if !p.tasks.contains_key(task) {
                self.joining
                    .entry(*task)
                    .or_default()
                    .insert(requester.to_string(), now);
            }
        }
        // Holders the requester already has (or just left) still count as holders; peers
        // still joining do not (someone must still be told to fetch).
        let holds = |x: &str| {
            x != requester
                && self
                    .peers
                    .get(x)
                    .is_some_and(|p| p.tasks.contains_key(task))
        };
        if parents.iter().any(|c| holds(&c.peer)) || exclude.iter().any(|x| holds(x)) {
            return (parents, Advice::Parents);
        }
        let fetcher = self
            .fetchers
            .get(task)
            .filter(|(_, since)| now.saturating_sub(*since) <= self.cfg.fetch_ttl)
            .map(|(p, _)| p.clone());
        let advice = |s: &Scheduler, who: &str| match s.peers.get(who) {
            Some(p) if who != requester && p.seed => Advice::AskSeed {
                peer: who.to_string(),
                addr: p.addr,
            },
            Some(_) if who != requester => Advice::Wait,
            _ => Advice::Source,
        };
        if let Some(f) = fetcher {
            if self.peers.contains_key(&f) {
                return (parents, advice(self, &f));
            }
        }
        let requester_is_seed = self.peers.get(requester).is_some_and(|p| p.seed);
        let seed = if requester_is_seed {
            None
        } else {
            self.peers
                .iter()
                .filter(|(id, p)| p.seed && id.as_str() != requester)
                .min_by_key(|(id, _)| tie(&task.dir_name(), id))
                .map(|(id, _)| id.clone())
        };
        let chosen = seed.unwrap_or_else(|| requester.to_string());
        tracing::info!(%task, fetcher = %chosen, "nobody holds this task; choosing who fetches it from source");
        self.fetchers.insert(*task, (chosen.clone(), now));
        (parents, advice(self, &chosen))
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
        let (mine, my_links) = match self.peers.get(requester) {
            Some(p) => (p.tasks.get(task).cloned(), p.links.clone()),
            None => (None, HashMap::new()),
        };
        let measured: Vec<f64> = {
            let mut v: Vec<f64> = my_links
                .values()
                .map(|l| l.throughput)
                .filter(|t| *t > 0.0)
                .collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v
        };
        let median = measured.get(measured.len() / 2).copied().unwrap_or(1.0);
        let joining = self.joining.get(task);
        let exclude: HashSet<&str> = exclude.iter().map(String::as_str).collect();
        let mut out: Vec<Candidate> = Vec::new();
        for (id, p) in &self.peers {
            if id == requester || exclude.contains(id.as_str()) {
                continue;
            }
            let (have, joined) = match p.tasks.get(task) {
                Some(have) => (have.as_slice(), false),
                None if joining.is_some_and(|j| j.contains_key(id)) => (&[][..], true),
                None => continue,
            };
            let useful = have
                .iter()
                .enumerate()
                .filter(|(i, h)| {
                    **h && !mine
                        .as_ref()
                        .is_some_and(|m| m.get(*i).copied().unwrap_or(false))
                })
                .count() as u32;
            // A holder with nothing new is still worth watching while it downloads (at the
            // start, a seed that has verified nothing yet); a complete one is not.
            if useful == 0 && !joined && have.iter().all(|h| *h) {
                continue;
            }
            let load = p.uploads as f64 + p.assigned.len() as f64;
            let spare = 1.0 / (1.0 + load / self.cfg.fanout);
            let capacity = if p.upload_capacity > 0.0 {
                p.upload_capacity
            } else {
                median
            };
            let link = match my_links.get(id) {
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
            let score = value * spare * link;
            out.push(Candidate {
                peer: id.clone(),
                addr: p.addr,
                seed: p.seed,
                useful,
                score,
            });
        }
        out.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| tie(requester, &a.peer).cmp(&tie(requester, &b.peer)))
        });
        out.truncate(max);
        for c in &out {
            if let Some(p) = self.peers.get_mut(&c.peer) {
                p.assigned.push(now);
            }
        }
        out
    }
}

/// What a downloading holder with nothing the requester lacks scores, before load and link:
/// a twentieth of one useful piece's, so any useful holder outranks it unless far busier.
const WATCH_SCORE: f64 = 0.05;

/// How many useful pieces make a holder as good as any other (before load and link).
const USEFUL_ENOUGH: u32 = 8;

/// A stable per-(requester, candidate) order for equal scores.
fn tie(requester: &str, candidate: &str) -> u64 {
    let d = crate::core::Digest::of(format!("{requester}\0{candidate}").as_bytes());
    u64::from_le_bytes([
        d.0[0], d.0[1], d.0[2], d.0[3], d.0[4], d.0[5], d.0[6], d.0[7],
    ])
}

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
