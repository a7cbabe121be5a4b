//! The sans-IO piece planner. It owns no sockets, files or clock: the driver tells it what
//! happened (a parent appeared, a piece arrived, a request failed, time passed) and asks it what
//! to do next ([`Action`]s: request a piece from a parent, cancel one, blacklist a parent, go
//! back to source). Time is a `Duration` since any fixed instant the driver chooses.
//!
//! Policy:
//! - **Order**: rarest first among the candidate parents; equally rare pieces in an order
//!   shuffled by `tie_seed` (each peer its own, so peers fetch different pieces from a seed and
//!   then have something to trade), or by index without one; sequential from a cursor while a
//!   streaming client waits. The shuffle stays within spans of `tie_span` pieces, lower spans
//!   first, so a download fills in roughly in order and the in-order whole-content hash keeps
//!   pace with it (fully shuffled, nearly all of that hash ran after the last piece landed).
//! - **Windows**: each parent's in-flight window is its bandwidth-delay product in pieces,
//!   `ceil(throughput × RTT / piece) + 1`, clamped to `[min_window, max_window]`; before any
//!   measurement it is `initial_window`. Faster parents therefore carry more.
//! - **Strikes**: a timeout, a reset or a refusal is a strike: the piece goes back to the pool,
//!   the parent's window halves, and after `strike_limit` strikes it rests for `cooldown`.
//! - **Integrity**: a digest mismatch also refetches elsewhere; `mismatch_limit` mismatches
//!   blacklist the parent for good.
//! - **Endgame**: once every missing piece is in flight and at most `endgame_pieces` remain,
//!   idle capacity requests duplicates of pieces outstanding for longer than `endgame_after` (at
//!   most `endgame_copies` per piece); the first copy to arrive cancels the rest.
//! - **Source**: only if `source_allowed`, and then only for pieces no usable parent holds,
//!   when the scheduler chose this peer to fetch them ([`Engine::source_by_scheduler`], only
//!   the pieces it listed), or, with no word from a scheduler, once no parent has announced a
//!   new piece for `source_wait` (parents that are themselves still downloading, a seed at
//!   the start above all, get that long to produce more); or for any piece once the parents
//!   together have been slower than `source_min_rate` for `source_grace`.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::core::PiecePlan;

/// A parent, as the driver names it.
pub type ParentId = u64;

/// Where a piece request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    Parent(ParentId),
    Source,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Reset,
    /// The parent said it does not have the piece, or refused the request.
    Refused,
    /// The bytes did not hash to the manifest's digest.
    Mismatch,
    /// The parent declined for now (a seed spreading its uploads): not a strike; that piece is
    /// not asked of that parent again for `busy_backoff`.
    Busy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Request { from: Peer, piece: u32 },
    Cancel { from: Peer, piece: u32 },
    Blacklist { parent: ParentId },
}

#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    pub initial_window: u32,
    pub min_window: u32,
    pub max_window: u32,
    /// A piece request with no answer for this long (or 4× its expected time at the parent's
    /// measured rate, whichever is longer) times out.
    pub piece_timeout: Duration,
    pub strike_limit: u32,
    pub cooldown: Duration,
    pub mismatch_limit: u32,
    pub endgame_copies: u32,
    pub endgame_pieces: u32,
    pub endgame_after: Duration,
    pub source_allowed: bool,
    /// Bytes per second below which the parents count as too slow (0: never too slow).
    pub source_min_rate: u64,
    pub source_grace: Duration,
    /// How long without news from parents (a piece newly held) before pieces nobody holds go
    /// to source.
    pub source_wait: Duration,
    /// Source requests in flight at once.
    pub source_window: u32,
    /// Shuffles equally rare pieces (None: by index). Give each peer its own.
    pub tie_seed: Option<u64>,
    /// Equally rare pieces are shuffled only within consecutive spans of this many pieces,
    /// lower spans first, so a download fills in roughly in order and its in-order content
    /// hash keeps up instead of hashing nearly everything after the last piece lands.
    pub tie_span: u32,
    /// How long a piece a parent declined (busy) is not asked of it again.
    pub busy_backoff: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            initial_window: 2,
            min_window: 1,
            max_window: 32,
            piece_timeout: Duration::from_secs(10),
            strike_limit: 3,
            cooldown: Duration::from_secs(30),
            mismatch_limit: 2,
            endgame_copies: 2,
            endgame_pieces: 8,
            endgame_after: Duration::from_millis(500),
            source_allowed: true,
            source_min_rate: 0,
            source_grace: Duration::from_secs(10),
            source_wait: Duration::ZERO,
            source_window: 4,
            tie_seed: None,
            tie_span: 64,
            busy_backoff: Duration::from_millis(500),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct ParentState {
    has: Vec<bool>,
    in_flight: BTreeMap<u32, Duration>,
    /// Bytes per second, exponentially weighted; None before the first piece.
    rate: Option<f64>,
    rtt: Option<Duration>,
    loss: f64,
    strikes: u32,
    resting_until: Option<Duration>,
    mismatches: u32,
    blacklisted: bool,
    /// Being replaced ([`Engine::parent_to_replace`]): asked for nothing more, its requests
    /// in flight left to finish.
    retiring: bool,
    /// Window after strikes halve it, until measurements recover it.
    penalty_window: Option<u32>,
    /// Bytes delivered in the current replacement window ([`Engine::parent_to_replace`]).
    window_bytes: u64,
    /// Pieces it offered with its last `Busy` ([`Engine::offered`]), asked of it first until
    /// `offer_until`.
    offer: Vec<u32>,
    offer_until: Duration,
}

/// Per-parent view for reports and the scheduler.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentReport {
    pub parent: ParentId,
    pub rate: Option<f64>,
    pub window: u32,
    pub in_flight: usize,
    pub strikes: u32,
    pub blacklisted: bool,
}

pub struct Engine {
    cfg: EngineConfig,
    plan: PiecePlan,
    have: Vec<bool>,
    missing: u32,
    /// Who each missing piece is currently requested from.
    in_flight: BTreeMap<u32, BTreeSet<Peer>>,
    /// Per piece, parents it failed from: `true` (a digest mismatch) means never again;
    /// `false` (timeout, reset, refusal) means only when no other holder is usable.
    avoid: BTreeMap<u32, BTreeMap<ParentId, bool>>,
    source_in_flight: BTreeMap<u32, Duration>,
    parents: BTreeMap<ParentId, ParentState>,
    streaming: Option<u32>,
    slow_since: Option<Duration>,
    /// When a parent last announced a piece (None before the first poll).
    news_at: Option<Duration>,
    news_pending: bool,
    /// Requests that timed out since the driver last asked (for its logs and metrics).
    timed_out: Vec<(Peer, u32)>,
    /// (parent, piece) pairs declined as busy, and until when they are not asked again.
    busy: HashMap<(ParentId, u32), Duration>,
    /// The earliest time in `busy`: sweeping it on every poll cost most of a poll's time in
    /// a large swarm, where a seed declines most requests.
    busy_until: Option<Duration>,
    /// When the current parent-replacement window began.
    window_start: Option<Duration>,
    /// The scheduler's word on going back to source ([`Engine::source_by_scheduler`]), and
    /// the pieces it said nobody holds (None: any this peer lacks).
    scheduler_says: Option<bool>,
    scheduler_lacking: Option<Vec<bool>>,
    /// Pieces to read from source only after every other ([`Engine::source_last`]).
    source_last: Vec<bool>,
    out: Vec<Action>,
}

impl Engine {
    /// A planner for `plan`, already holding the pieces marked in `have`.
    pub fn new(plan: PiecePlan, have: &[bool], cfg: EngineConfig) -> Engine {
        let n = plan.count() as usize;
        let have: Vec<bool> = (0..n)
            .map(|i| have.get(i).copied().unwrap_or(false))
            .collect();
        let missing = have.iter().filter(|h| !**h).count() as u32;
        Engine {
            cfg,
            plan,
            have,
            missing,
            in_flight: BTreeMap::new(),
            avoid: BTreeMap::new(),
            source_in_flight: BTreeMap::new(),
            parents: BTreeMap::new(),
            streaming: None,
            slow_since: None,
            news_at: None,
            news_pending: false,
            timed_out: Vec::new(),
            busy: HashMap::new(),
            busy_until: None,
            window_start: None,
            scheduler_says: None,
            scheduler_lacking: None,
            source_last: Vec::new(),
            out: Vec::new(),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    pub fn missing(&self) -> u32 {
        self.missing
    }

    pub fn has(&self, piece: u32) -> bool {
        self.have.get(piece as usize).copied().unwrap_or(false)
    }

    /// A piece held is held no more (it was verified against a value a lying parent named):
    /// it is wanted again.
    pub fn lost(&mut self, piece: u32) {
        if let Some(h) = self.have.get_mut(piece as usize) {
            if *h {
                *h = false;
                self.missing += 1;
                self.news_pending = true;
            }
        }
    }

    /// A parent and the pieces it holds. Re-adding replaces its bitmap.
    pub fn add_parent(&mut self, id: ParentId, has: &[bool]) {
        let n = self.have.len();
        let p = self.parents.entry(id).or_default();
        p.has = (0..n)
            .map(|i| has.get(i).copied().unwrap_or(false))
            .collect();
        self.news_pending = true;
    }

    /// A parent announced one more piece.
    pub fn parent_has(&mut self, id: ParentId, piece: u32) {
        if let Some(slot) = self
            .parents
            .get_mut(&id)
            .and_then(|p| p.has.get_mut(piece as usize))
        {
            *slot = true;
            self.news_pending = true;
        }
    }

    /// A parent went away (killed, disconnected): its requests go back to the pool.
    pub fn remove_parent(&mut self, id: ParentId) {
        if let Some(p) = self.parents.remove(&id) {
            for piece in p.in_flight.keys() {
                self.forget(Peer::Parent(id), *piece);
            }
        }
    }

    /// Measured path quality (from QUIC stats and eBPF probes).
    pub fn link_quality(&mut self, id: ParentId, rtt: Duration, loss: f64) {
        if let Some(p) = self.parents.get_mut(&id) {
            p.rtt = Some(rtt);
            p.loss = loss.clamp(0.0, 1.0);
        }
    }

    /// Who decides when pieces nobody holds go to source. `None`: this engine, by its own
    /// timer (`source_wait` without news). `Some(false)`: the scheduler, which sees the whole
    /// swarm, says others hold or will soon hold them, so this peer waits (the slow-parents
    /// rule still applies). `Some(true)`: the scheduler chose this peer to fetch what nobody
    /// holds: pieces no parent holds go to source at once, only those in `lacking` when it is
    /// given (the pieces no live peer holds; others are the swarm's to deliver). In a large
    /// swarm each peer's timer sent the same pieces to source from many peers at once (a seed
    /// killed mid-run, 1,000 peers: the origin served 6.4 x F); the scheduler picks one.
    pub fn source_by_scheduler(&mut self, says: Option<bool>, lacking: Option<&[u32]>) {
        self.scheduler_says = says;
        self.scheduler_lacking = lacking.map(|l| {
            let mut v = vec![false; self.have.len()];
            for i in l {
                if let Some(x) = v.get_mut(*i as usize) {
                    *x = true;
                }
            }
            v
        });
    }

    /// Pieces to read from source only once no other is left to read there, in index order:
    /// those another node verified but that no live peer holds. A reader that replaced a
    /// stalled one (silent past the scheduler's patience) read first what that one had just
    /// verified, and when it woke it held them too: with 24 MiB at 3 MB/s, 6% of the file went
    /// out twice. Read last, they are either served by then (it came back) or cost nothing
    /// more (it is gone). Their values are known, so each is checked on arrival, and the
    /// reader's in-order chain does not wait for them (`storage::Chainer`).
    pub fn source_last(&mut self, pieces: &[u32]) {
        self.source_last = vec![false; self.have.len()];
        for &i in pieces {
            if let Some(x) = self.source_last.get_mut(i as usize) {
                *x = true;
            }
        }
    }

    /// A parent that declined a piece (`Busy`) offered `pieces` instead: the ones this peer
    /// lacks and has not asked anyone for are its next requests to that parent, before the
    /// rarest-first order, for `busy_backoff`. A spreading seed offers pieces that no one has
    /// been sent, which are the rarest in the whole swarm anyway.
    pub fn offered(&mut self, id: ParentId, pieces: &[u32], now: Duration) {
        let n = self.have.len() as u32;
        if let Some(p) = self.parents.get_mut(&id) {
            p.offer = pieces.iter().copied().filter(|i| *i < n).collect();
            p.offer_until = now + self.cfg.busy_backoff;
        }
    }

    /// Sequential-first from `cursor` while a streaming client waits; None for rarest-first.
    pub fn set_streaming(&mut self, cursor: Option<u32>) {
        self.streaming = cursor;
    }

    /// A verified piece arrived from `from` after `elapsed`.
    pub fn on_piece(&mut self, from: Peer, piece: u32, elapsed: Duration, now: Duration) {
        let Some(len) = self.plan.piece(piece).map(|p| p.length) else {
            return;
        };
        self.forget(from, piece);
        if let Peer::Parent(id) = from {
            if let Some(p) = self.parents.get_mut(&id) {
                let sample = len as f64 / elapsed.as_secs_f64().max(1e-6);
                p.rate = Some(match p.rate {
                    Some(r) => 0.7 * r + 0.3 * sample,
                    None => sample,
                });
                p.strikes = p.strikes.saturating_sub(1);
                if p.strikes == 0 {
                    p.penalty_window = None;
                }
                p.window_bytes += len;
            }
        }
        if !self.have[piece as usize] {
            self.have[piece as usize] = true;
            self.missing -= 1;
        }
        self.avoid.remove(&piece);
        // Endgame duplicates of this piece are no longer needed.
        if let Some(others) = self.in_flight.remove(&piece) {
            for other in others {
                self.untrack(other, piece);
                self.out.push(Action::Cancel { from: other, piece });
            }
        }
        let _ = now;
    }

    /// With every parent slot taken, the parent to replace, if one has been delivering far
    /// less than the others: over a window of at least `window`, under a third of the median
    /// parent's bytes (a parent holding nothing this peer lacks delivers none). With a partial
    /// mesh (more peers than slots), such a parent is overloaded with children or behind this
    /// peer, while others it is not connected to are idle or ahead. Picking one starts a new
    /// window for all, so one parent at most goes per window. A parent that is this peer's
    /// only way to some piece it lacks (no other parent holds it) is never picked: that is a
    /// seed early on, whose link is split among every child and so delivers little to each,
    /// yet is where every new piece comes from; dropping it cancels what it was sending.
    ///
    /// The parent picked retires: it is asked for nothing more, but what it is sending is
    /// let finish rather than cancelled and fetched again elsewhere (24 peers with 16 slots
    /// each: cancelling made the peers upload 25.7 x F where 23 x F was needed; now 24.5 x F).
    /// [`Engine::drained`] says when it can go.
    pub fn parent_to_replace(&mut self, now: Duration, window: Duration) -> Option<ParentId> {
        let started = self.window_start.get_or_insert(now);
        let active = self.parents.values().filter(|p| !p.retiring).count();
        if now.saturating_sub(*started) < window || active < 2 {
            return None;
        }
        let mut bytes: Vec<(u64, ParentId)> = self
            .parents
            .iter()
            .filter(|(_, p)| !p.retiring)
            .map(|(id, p)| (p.window_bytes, *id))
            .collect();
        bytes.sort_unstable();
        let median = bytes[bytes.len() / 2].0;
        let (least, id) = bytes[0];
        let pick = (least.saturating_mul(3) < median || median == 0 && self.missing > 0)
            .then_some(id)
            .filter(|&id| !self.sole_holder_of_some(id));
        self.window_start = Some(now);
        for p in self.parents.values_mut() {
            p.window_bytes = 0;
        }
        if let Some(p) = pick.and_then(|id| self.parents.get_mut(&id)) {
            p.retiring = true;
        }
        pick
    }

    /// Retires every parent but the `keep` that delivered most in the current window
    /// (ties: the lower id stays), sparing any that alone holds a piece this peer lacks, and
    /// returns those retired. For a peer made its rack's gateway mid-download: its parents
    /// were all chosen in its rack, where what arrives came through the old gateway, and its
    /// slots must take parents outside the rack now.
    pub fn retire_all_but(&mut self, keep: usize) -> Vec<ParentId> {
        let mut order: Vec<(u64, ParentId)> = self
            .parents
            .iter()
            .filter(|(_, p)| !p.retiring && !p.blacklisted)
            .map(|(id, p)| (p.window_bytes, *id))
            .collect();
        order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut retired = Vec::new();
        for (_, id) in order.into_iter().skip(keep) {
            if self.sole_holder_of_some(id) {
                continue;
            }
            if let Some(p) = self.parents.get_mut(&id) {
                p.retiring = true;
                retired.push(id);
            }
        }
        retired
    }

    /// How many parents are retiring (they hold no slot).
    pub fn retiring(&self) -> usize {
        self.parents.values().filter(|p| p.retiring).count()
    }

    /// Retiring parents with nothing left in flight: the driver can let them go (and
    /// [`Engine::remove_parent`] them).
    pub fn drained(&self) -> Vec<ParentId> {
        self.parents
            .iter()
            .filter(|(_, p)| p.retiring && p.in_flight.is_empty())
            .map(|(id, _)| *id)
            .collect()
    }

    /// A request failed. The piece goes back to the pool; the parent takes a strike.
    pub fn on_failure(&mut self, from: Peer, piece: u32, cause: Failure, now: Duration) {
        self.forget(from, piece);
        let Peer::Parent(id) = from else { return };
        if cause == Failure::Busy {
            let until = now + self.cfg.busy_backoff;
            self.busy.insert((id, piece), until);
            self.busy_until = Some(self.busy_until.map_or(until, |t| t.min(until)));
            return;
        }
        let hard = self
            .avoid
            .entry(piece)
            .or_default()
            .entry(id)
            .or_insert(false);
        *hard |= cause == Failure::Mismatch;
        let cfg = self.cfg.clone();
        if cause == Failure::Mismatch {
            let Some(p) = self.parents.get_mut(&id) else {
                return;
            };
            p.mismatches += 1;
            if p.mismatches >= cfg.mismatch_limit && !p.blacklisted {
                p.blacklisted = true;
                let pieces: Vec<u32> = p.in_flight.keys().copied().collect();
                for q in pieces {
                    self.forget(from, q);
                    self.out.push(Action::Cancel { from, piece: q });
                }
                self.out.push(Action::Blacklist { parent: id });
                return;
            }
        }
        let Some(p) = self.parents.get_mut(&id) else {
            return;
        };
        p.strikes += 1;
        let w = window_of(p, &cfg, self.plan.piece_length());
        p.penalty_window = Some((w / 2).max(cfg.min_window));
        if p.strikes >= cfg.strike_limit {
            p.resting_until = Some(now + cfg.cooldown);
            p.strikes = 0;
        }
    }

    /// Advances time and returns what to do now.
    pub fn poll(&mut self, now: Duration) -> Vec<Action> {
        self.expire(now);
        self.fill(now);
        self.source(now);
        std::mem::take(&mut self.out)
    }

    /// The requests that timed out (each was cancelled and struck), since the last call.
    pub fn take_timeouts(&mut self) -> Vec<(Peer, u32)> {
        std::mem::take(&mut self.timed_out)
    }

    pub fn report(&self) -> Vec<ParentReport> {
        self.parents
            .iter()
            .map(|(id, p)| ParentReport {
                parent: *id,
                rate: p.rate,
                window: window_of(p, &self.cfg, self.plan.piece_length()),
                in_flight: p.in_flight.len(),
                strikes: p.strikes,
                blacklisted: p.blacklisted,
            })
            .collect()
    }

    fn untrack(&mut self, from: Peer, piece: u32) {
        match from {
            Peer::Parent(id) => {
                if let Some(p) = self.parents.get_mut(&id) {
                    p.in_flight.remove(&piece);
                }
            }
            Peer::Source => {
                self.source_in_flight.remove(&piece);
            }
        }
    }

    /// Drops one request from the books.
    fn forget(&mut self, from: Peer, piece: u32) {
        self.untrack(from, piece);
        if let Some(set) = self.in_flight.get_mut(&piece) {
            set.remove(&from);
            if set.is_empty() {
                self.in_flight.remove(&piece);
            }
        }
    }

    fn usable(&self, p: &ParentState, now: Duration) -> bool {
        !p.blacklisted && !p.retiring && p.resting_until.is_none_or(|t| now >= t)
    }

    /// Times out requests that took too long.
    fn expire(&mut self, now: Duration) {
        if self.busy_until.is_some_and(|t| t <= now) {
            self.busy.retain(|_, until| *until > now);
            self.busy_until = self.busy.values().min().copied();
        }
        let mut late = Vec::new();
        for (id, p) in &self.parents {
            let limit = self.timeout_for(p);
            for (piece, since) in &p.in_flight {
                if now.saturating_sub(*since) > limit {
                    late.push((Peer::Parent(*id), *piece));
                }
            }
        }
        for (from, piece) in late {
            self.timed_out.push((from, piece));
            self.out.push(Action::Cancel { from, piece });
            self.on_failure(from, piece, Failure::Timeout, now);
        }
        for p in self.parents.values_mut() {
            if p.resting_until.is_some_and(|t| now >= t) {
                p.resting_until = None;
            }
        }
    }

    fn timeout_for(&self, p: &ParentState) -> Duration {
        let expected = p
            .rate
            .map(|r| Duration::from_secs_f64(self.plan.piece_length() as f64 / r.max(1.0)))
            .unwrap_or_default();
        self.cfg.piece_timeout.max(expected * 4)
    }

    /// Missing pieces not yet requested, each with a key that sorts it into the order the
    /// pieces should be requested in (see [`Ranked`]). With `takers`, only the pieces one of
    /// those parents holds: the rest cannot go to them.
    fn candidates(&self, now: Duration, takers: Option<&[ParentId]>) -> Vec<(u32, u64, u32)> {
        // This runs on most polls, so it works on flat per-piece arrays (one pass per parent)
        // rather than asking every parent about every piece.
        let mut open: Vec<bool> = self.have.iter().map(|h| !h).collect();
        for i in self.in_flight.keys() {
            open[*i as usize] = false;
        }
        if let Some(ids) = takers {
            let mut held = vec![false; open.len()];
            for p in ids.iter().filter_map(|id| self.parents.get(id)) {
                for (h, has) in held.iter_mut().zip(&p.has) {
                    *h |= *has;
                }
            }
            for (o, h) in open.iter_mut().zip(&held) {
                *o &= *h;
            }
        }
        let open_at = |i: &u32| open[*i as usize];
        if let Some(cursor) = self.streaming {
            let n = self.have.len() as u32;
            let cursor = cursor.min(n);
            return (cursor..n)
                .chain(0..cursor)
                .filter(open_at)
                .enumerate()
                .map(|(at, i)| (0, at as u64, i))
                .collect();
        }
        let rarity = self.holders(|p| self.usable(p, now));
        // Pieces nobody has sort last (rarity 0 would otherwise come first); they go to source.
        let span = self.cfg.tie_span.max(1);
        (0..self.have.len() as u32)
            .filter(open_at)
            .map(|i| {
                let rank = match rarity[i as usize] {
                    0 => u32::MAX,
                    r => r,
                };
                let tie = self.cfg.tie_seed.map_or(u64::from(i), |s| {
                    (u64::from(i / span) << 32) | (mix(s ^ u64::from(i)) >> 32)
                });
                (rank, tie, i)
            })
            .collect()
    }

    /// Fills every usable parent's window, best parents first.
    fn fill(&mut self, now: Duration) {
        let piece_len = self.plan.piece_length();
        // Only parents with a free slot can take a request (the endgame's too). Most polls
        // follow an event that freed nothing, so the piece order is not worked out for them.
        let mut free: Vec<(ParentId, u32)> = self
            .parents
            .iter()
            .filter(|(_, p)| self.usable(p, now))
            .map(|(id, p)| {
                let room =
                    window_of(p, &self.cfg, piece_len).saturating_sub(p.in_flight.len() as u32);
                (*id, room)
            })
            .filter(|&(_, room)| room > 0)
            .collect();
        if free.is_empty() || self.missing == 0 {
            return;
        }
        // Best measured rate first; unmeasured parents after, by id.
        let rate = |id: &ParentId| self.parents[id].rate.unwrap_or(0.0);
        free.sort_by(|(a, _), (b, _)| rate(b).total_cmp(&rate(a)).then(a.cmp(b)));
        let ids: Vec<ParentId> = free.iter().map(|&(id, _)| id).collect();
        let keyed = self.candidates(now, Some(&ids));
        // Nothing a pick depends on changes with a request, so the picks are made first.
        let mut taken = vec![false; self.have.len()];
        let mut picks: Vec<(ParentId, u32)> = Vec::new();
        for &(id, mut room) in &free {
            let Some(p) = self.parents.get(&id) else {
                continue;
            };
            // What it offered first (not while streaming: order matters then).
            if self.streaming.is_none() && now < p.offer_until {
                for &piece in &p.offer {
                    if room == 0 {
                        break;
                    }
                    let open = !self.have[piece as usize]
                        && !taken[piece as usize]
                        && !self.in_flight.contains_key(&piece);
                    if open && self.may_ask(id, piece) && !self.better_elsewhere(id, piece, now) {
                        taken[piece as usize] = true;
                        picks.push((id, piece));
                        room -= 1;
                    }
                }
            }
            // Each parent ranks only the pieces it holds and no better parent took, and sorts
            // no more of them than it can take (a few more for the rare ones skipped below).
            let mine = keyed
                .iter()
                .filter(|k| !taken[k.2 as usize] && p.has[k.2 as usize])
                .copied()
                .collect();
            let mut order = Ranked::new(mine, 2 * room as usize + 8);
            let mut at = 0;
            while room > 0 {
                let Some(piece) = order.get(at) else {
                    break;
                };
                at += 1;
                if !self.may_ask(id, piece) || self.better_elsewhere(id, piece, now) {
                    continue;
                }
                taken[piece as usize] = true;
                picks.push((id, piece));
                room -= 1;
            }
        }
        for (id, piece) in picks {
            self.request(Peer::Parent(id), piece, now);
        }
        // Endgame: everything missing is in flight and little is left; idle capacity takes
        // duplicates of pieces that have been outstanding for a while.
        let endgame = self.in_flight.len() as u32 >= self.missing
            && self.missing > 0
            && self.missing <= self.cfg.endgame_pieces;
        if endgame {
            for id in &ids {
                let cfg = self.cfg.clone();
                let Some(p) = self.parents.get(id) else {
                    continue;
                };
                let mut room =
                    window_of(p, &cfg, piece_len).saturating_sub(p.in_flight.len() as u32);
                let dupes: Vec<u32> = self
                    .in_flight
                    .iter()
                    .filter(|(piece, who)| {
                        who.len() < cfg.endgame_copies as usize
                            && !who.contains(&Peer::Parent(*id))
                            && self.may_ask(*id, **piece)
                            && self.age(**piece, now) >= cfg.endgame_after
                    })
                    .map(|(piece, _)| *piece)
                    .collect();
                for piece in dupes {
                    if room == 0 {
                        break;
                    }
                    self.request(Peer::Parent(*id), piece, now);
                    room -= 1;
                }
            }
        }
    }

    /// Back to source, only where the rules allow it.
    fn source(&mut self, now: Duration) {
        if !self.cfg.source_allowed || self.missing == 0 {
            return;
        }
        let total_rate: f64 = self
            .parents
            .values()
            .filter(|p| self.usable(p, now) && !p.in_flight.is_empty())
            .filter_map(|p| p.rate)
            .sum();
        // Parents with nothing in flight deliver nothing: while pieces are missing, idle
        // parents count as slow too (with the scheduler deciding who fetches what nobody
        // holds, waiting on a slow seed's next piece is this rule's case).
        let too_slow = self.cfg.source_min_rate > 0 && total_rate < self.cfg.source_min_rate as f64;
        if too_slow {
            self.slow_since.get_or_insert(now);
        } else {
            self.slow_since = None;
        }
        let slow_for_long = self
            .slow_since
            .is_some_and(|t| now.saturating_sub(t) >= self.cfg.source_grace);
        if self.news_pending || self.news_at.is_none() {
            self.news_at = Some(now);
            self.news_pending = false;
        }
        let starved = match self.scheduler_says {
            None => self
                .news_at
                .is_some_and(|t| now.saturating_sub(t) >= self.cfg.source_wait),
            Some(go) => go,
        };
        let mut room = self
            .cfg
            .source_window
            .saturating_sub(self.source_in_flight.len() as u32);
        // Nothing can go to source now: skip working out the order (most polls).
        if room == 0 || !(starved || slow_for_long) {
            return;
        }
        let mut keyed = self.candidates(now, None);
        for k in &mut keyed {
            if self.source_last.get(k.2 as usize) == Some(&true) {
                *k = (u32::MAX, u64::MAX, k.2);
            }
        }
        let mut order = Ranked::new(keyed, self.cfg.source_window as usize);
        let mut at = 0;
        while let Some(piece) = order.get(at) {
            at += 1;
            if room == 0 {
                break;
            }
            // A parent that declined a piece for now (busy) still holds it: wait for it.
            let held = self
                .parents
                .iter()
                .any(|(id, p)| self.usable(p, now) && self.holds(*id, piece));
            let ours = self
                .scheduler_lacking
                .as_ref()
                .is_none_or(|l| l.get(piece as usize).copied().unwrap_or(false));
            if (!held && starved && ours) || slow_for_long {
                self.request(Peer::Source, piece, now);
                room -= 1;
            }
        }
    }

    /// Per piece, how many of the parents that `keep` admits hold it.
    fn holders(&self, keep: impl Fn(&ParentState) -> bool) -> Vec<u32> {
        let mut count = vec![0u32; self.have.len()];
        for p in self.parents.values().filter(|p| keep(p)) {
            for (c, has) in count.iter_mut().zip(&p.has) {
                *c += u32::from(*has);
            }
        }
        count
    }

    /// Whether `id` holds a piece this peer lacks that no other parent (short of blacklisted
    /// and retiring ones) holds.
    fn sole_holder_of_some(&self, id: ParentId) -> bool {
        let Some(p) = self.parents.get(&id) else {
            return false;
        };
        let held = self.holders(|o| !o.blacklisted && !o.retiring);
        let own = u32::from(!p.blacklisted && !p.retiring);
        (0..self.have.len()).any(|i| !self.have[i] && p.has[i] && held[i] == own)
    }

    /// Whether `id` holds `piece` and has not served it corrupt before.
    fn holds(&self, id: ParentId, piece: u32) -> bool {
        self.parents.get(&id).is_some_and(|p| p.has[piece as usize])
            && self.avoid.get(&piece).and_then(|a| a.get(&id)) != Some(&true)
    }

    /// Whether to ask `id` for `piece` now: it holds it and has not just declined it.
    fn may_ask(&self, id: ParentId, piece: u32) -> bool {
        self.holds(id, piece) && !self.busy.contains_key(&(id, piece))
    }

    /// `piece` recently failed at `id`, and another usable holder has not failed it.
    fn better_elsewhere(&self, id: ParentId, piece: u32, now: Duration) -> bool {
        let Some(failed) = self.avoid.get(&piece) else {
            return false;
        };
        failed.contains_key(&id)
            && self.parents.iter().any(|(q, p)| {
                *q != id
                    && self.usable(p, now)
                    && self.may_ask(*q, piece)
                    && !failed.contains_key(q)
            })
    }

    /// How long the oldest request for `piece` has been outstanding.
    fn age(&self, piece: u32, now: Duration) -> Duration {
        let parent = self
            .parents
            .values()
            .filter_map(|p| p.in_flight.get(&piece))
            .min();
        let source = self.source_in_flight.get(&piece);
        parent
            .into_iter()
            .chain(source)
            .min()
            .map_or(Duration::ZERO, |t| now.saturating_sub(*t))
    }

    fn request(&mut self, from: Peer, piece: u32, now: Duration) {
        match from {
            Peer::Parent(id) => {
                if let Some(p) = self.parents.get_mut(&id) {
                    p.in_flight.insert(piece, now);
                    p.offer.retain(|i| *i != piece);
                }
            }
            Peer::Source => {
                self.source_in_flight.insert(piece, now);
            }
        }
        self.in_flight.entry(piece).or_default().insert(from);
        self.out.push(Action::Request { from, piece });
    }
}

/// Pieces in request order, sorted as far as they are read: the first ones at once (the
/// smallest keys picked out in linear time), the rest on the first read past them. Sorting
/// every open piece on every poll, and each parent with a free slot reading that order from
/// the top, cost about a tenth of a peer's CPU with 4096 pieces.
struct Ranked {
    /// (rank, tie, piece), sorted up to `sorted`.
    keyed: Vec<(u32, u64, u32)>,
    sorted: usize,
}

impl Ranked {
    fn new(mut keyed: Vec<(u32, u64, u32)>, first: usize) -> Ranked {
        let first = first.max(1);
        if keyed.len() > first {
            // The `first` smallest keys before index `first`, unordered; the rest after.
            keyed.select_nth_unstable(first);
            keyed[..first].sort_unstable();
            Ranked {
                keyed,
                sorted: first,
            }
        } else {
            keyed.sort_unstable();
            let sorted = keyed.len();
            Ranked { keyed, sorted }
        }
    }

    /// The `at`-th piece in order.
    fn get(&mut self, at: usize) -> Option<u32> {
        if at >= self.sorted && self.sorted < self.keyed.len() {
            self.keyed[self.sorted..].sort_unstable();
            self.sorted = self.keyed.len();
        }
        self.keyed.get(at).map(|&(_, _, i)| i)
    }
}

/// splitmix64's finaliser: a cheap, well-spread permutation of u64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The window from the bandwidth-delay product, or the initial window before measurements;
/// halved after strikes until the parent recovers.
fn window_of(p: &ParentState, cfg: &EngineConfig, piece_len: u64) -> u32 {
    let bdp = match (p.rate, p.rtt) {
        (Some(rate), Some(rtt)) => {
            let pieces = (rate * rtt.as_secs_f64() / piece_len.max(1) as f64).ceil() as u32 + 1;
            // Loss shrinks the window: a lossy path cannot carry its nominal BDP.
            let scaled = (pieces as f64 * (1.0 - p.loss).max(0.25)).ceil() as u32;
            scaled.clamp(cfg.min_window, cfg.max_window)
        }
        (Some(_), None) => cfg.initial_window.max(cfg.min_window) * 2,
        _ => cfg.initial_window,
    };
    let w = bdp.clamp(cfg.min_window, cfg.max_window);
    p.penalty_window.map_or(w, |pw| pw.min(w))
}
