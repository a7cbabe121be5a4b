//! The simulated network, at flow level: no packets, only capacities shared max-min fairly.
//!
//! Resources are each host's upload and download link, each rack's uplink into the spine (up
//! and down) and the origin's link. A flow is one connection (a parent to a child, or the
//! origin to a node) and crosses its sender's upload, its receiver's download and, between
//! racks, both racks' uplinks; origin traffic enters the receiver's rack through its uplink.
//! The pieces in flight on a connection share its rate equally (QUIC streams of one
//! connection). Rates are recomputed every step by iterative water-filling, which converges to
//! the max-min fair allocation in as many rounds as there are bottleneck levels; a final pass
//! scales down any resource still over its capacity, so no link ever carries more than it can.

use std::collections::BTreeMap;
use std::time::Duration;

/// A host, or the origin, as a flow's sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum End {
    Host(u32),
    Origin,
}

/// One piece finished arriving.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub from: End,
    pub to: u32,
    pub task: u32,
    pub piece: u32,
    /// When the request was made.
    pub asked: Duration,
    /// When the last byte arrived (within the step).
    pub at: Duration,
}

struct Xfer {
    task: u32,
    piece: u32,
    left: f64,
    asked: Duration,
    /// Bytes start to flow at this time (the request's round trip).
    start: Duration,
}

struct Flow {
    path: [u32; 4],
    hops: u8,
    xfers: Vec<Xfer>,
    rate: f64,
}

/// Capacities in bytes per second.
pub struct NetSpec {
    pub up: Vec<f64>,
    pub down: Vec<f64>,
    /// Each host's rack (racks are numbered from 0).
    pub rack: Vec<u32>,
    /// Each rack's uplink capacity, each way (f64::INFINITY: no spine limit).
    pub rack_uplink: Vec<f64>,
    pub origin_up: f64,
}

pub struct Net {
    cap: Vec<f64>,
    /// Bytes carried per resource.
    pub carried: Vec<f64>,
    hosts: usize,
    racks: usize,
    rack: Vec<u32>,
    /// Ordered, so that a run is the same every time (sums of rates in one order).
    flows: BTreeMap<(End, u32), Flow>,
    /// Per resource, scratch for the allocation.
    share: Vec<f64>,
    count: Vec<u32>,
    fixed: Vec<f64>,
}

impl Net {
    pub fn new(spec: &NetSpec) -> Net {
        let hosts = spec.up.len();
        let racks = spec.rack_uplink.len();
        let mut cap = Vec::with_capacity(2 * hosts + 2 * racks + 1);
        for h in 0..hosts {
            cap.push(spec.up[h]);
            cap.push(spec.down[h]);
        }
        for r in 0..racks {
            cap.push(spec.rack_uplink[r]);
            cap.push(spec.rack_uplink[r]);
        }
        cap.push(spec.origin_up);
        let n = cap.len();
        Net {
            cap,
            carried: vec![0.0; n],
            hosts,
            racks,
            rack: spec.rack.clone(),
            flows: BTreeMap::new(),
            share: vec![0.0; n],
            count: vec![0; n],
            fixed: vec![0.0; n],
        }
    }

    pub fn host_up(&self, h: u32) -> usize {
        2 * h as usize
    }
    pub fn host_down(&self, h: u32) -> usize {
        2 * h as usize + 1
    }
    pub fn rack_up(&self, r: u32) -> usize {
        2 * self.hosts + 2 * r as usize
    }
    pub fn rack_down(&self, r: u32) -> usize {
        2 * self.hosts + 2 * r as usize + 1
    }
    pub fn origin(&self) -> usize {
        2 * self.hosts + 2 * self.racks
    }

    fn path(&self, from: End, to: u32) -> ([u32; 4], u8) {
        let mut p = [0u32; 4];
        let mut n = 0;
        let mut push = |r: usize| {
            p[n] = r as u32;
            n += 1;
        };
        let to_rack = self.rack[to as usize];
        match from {
            End::Host(h) => {
                push(self.host_up(h));
                let from_rack = self.rack[h as usize];
                if from_rack != to_rack {
                    push(self.rack_up(from_rack));
                    push(self.rack_down(to_rack));
                }
            }
            End::Origin => {
                push(self.origin());
                push(self.rack_down(to_rack));
            }
        }
        push(self.host_down(to));
        (p, n as u8)
    }

    /// Starts sending `piece` from `from` to `to`: its bytes flow from `start` on.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        from: End,
        to: u32,
        task: u32,
        piece: u32,
        bytes: u64,
        asked: Duration,
        start: Duration,
    ) {
        let (path, hops) = self.path(from, to);
        let f = self.flows.entry((from, to)).or_insert(Flow {
            path,
            hops,
            xfers: Vec::new(),
            rate: 0.0,
        });
        f.xfers.push(Xfer {
            task,
            piece,
            left: bytes as f64,
            asked,
            start,
        });
    }

    /// Stops sending `piece` (a cancelled request); bytes already sent stay counted.
    pub fn cancel(&mut self, from: End, to: u32, task: u32, piece: u32) {
        if let Some(f) = self.flows.get_mut(&(from, to)) {
            f.xfers.retain(|x| !(x.task == task && x.piece == piece));
        }
    }

    /// Every flow from or to `host` stops (the host died). Returns what was in flight to it
    /// from others and from it to others, as (from, to, task, piece).
    pub fn drop_host(&mut self, host: u32) -> Vec<(End, u32, u32, u32)> {
        let mut gone = Vec::new();
        self.flows.retain(|(from, to), f| {
            let touches = *to == host || *from == End::Host(host);
            if touches {
                gone.extend(f.xfers.iter().map(|x| (*from, *to, x.task, x.piece)));
            }
            !touches
        });
        gone
    }

    /// Advances the network by `dt` from `now`: allocates rates, moves bytes, returns the
    /// pieces that finished.
    pub fn advance(&mut self, now: Duration, dt: Duration) -> Vec<Arrival> {
        let end = now + dt;
        self.allocate(end);
        let mut done = Vec::new();
        let secs = dt.as_secs_f64();
        for ((from, to), f) in self.flows.iter_mut() {
            if f.rate <= 0.0 {
                continue;
            }
            let mut budget = f.rate * secs;
            let mut sent = 0.0;
            // Equal shares among the active transfers; what a finishing one leaves over goes
            // to the rest.
            let mut elapsed = 0.0f64;
            loop {
                let active: Vec<usize> = (0..f.xfers.len())
                    .filter(|i| f.xfers[*i].start <= end && f.xfers[*i].left > 0.0)
                    .collect();
                if active.is_empty() || budget <= 1e-9 {
                    break;
                }
                let each = budget / active.len() as f64;
                let smallest = active
                    .iter()
                    .map(|i| f.xfers[*i].left)
                    .fold(f64::INFINITY, f64::min);
                let step = each.min(smallest);
                for i in &active {
                    f.xfers[*i].left -= step;
                }
                let used = step * active.len() as f64;
                budget -= used;
                sent += used;
                elapsed += used / f.rate;
                for i in &active {
                    let x = &f.xfers[*i];
                    if x.left <= 1e-6 {
                        done.push(Arrival {
                            from: *from,
                            to: *to,
                            task: x.task,
                            piece: x.piece,
                            asked: x.asked,
                            at: now + Duration::from_secs_f64(elapsed.min(secs)),
                        });
                    }
                }
                if step >= each {
                    break;
                }
            }
            f.xfers.retain(|x| x.left > 1e-6);
            for r in &f.path[..f.hops as usize] {
                self.carried[*r as usize] += sent;
            }
        }
        self.flows.retain(|_, f| !f.xfers.is_empty());
        done
    }

    /// Max-min fair rates for the flows with a transfer under way by `end`.
    fn allocate(&mut self, end: Duration) {
        let active: Vec<(End, u32)> = self
            .flows
            .iter()
            .filter(|(_, f)| f.xfers.iter().any(|x| x.start <= end))
            .map(|(k, _)| *k)
            .collect();
        for f in self.flows.values_mut() {
            f.rate = 0.0;
        }
        if active.is_empty() {
            return;
        }
        self.count.iter_mut().for_each(|c| *c = 0);
        for k in &active {
            let f = &self.flows[k];
            for r in &f.path[..f.hops as usize] {
                self.count[*r as usize] += 1;
            }
        }
        for r in 0..self.cap.len() {
            self.share[r] = if self.count[r] > 0 {
                self.cap[r] / self.count[r] as f64
            } else {
                f64::INFINITY
            };
        }
        let rate_of = |share: &[f64], f: &Flow| {
            f.path[..f.hops as usize]
                .iter()
                .map(|r| share[*r as usize])
                .fold(f64::INFINITY, f64::min)
        };
        for _round in 0..4 {
            // Each resource: the flows bottlenecked elsewhere keep their rate; what is left is
            // shared by those bottlenecked here.
            self.fixed.iter_mut().for_each(|x| *x = 0.0);
            self.count.iter_mut().for_each(|c| *c = 0);
            for k in &active {
                let f = &self.flows[k];
                let rate = rate_of(&self.share, f);
                for r in &f.path[..f.hops as usize] {
                    let r = *r as usize;
                    if rate < self.share[r] * (1.0 - 1e-9) {
                        self.fixed[r] += rate;
                    } else {
                        self.count[r] += 1;
                    }
                }
            }
            for r in 0..self.cap.len() {
                if self.count[r] > 0 {
                    self.share[r] = ((self.cap[r] - self.fixed[r]).max(0.0)) / self.count[r] as f64;
                }
            }
        }
        // Feasibility: scale down any resource still over capacity.
        self.fixed.iter_mut().for_each(|x| *x = 0.0);
        for k in &active {
            let f = self.flows.get_mut(k).expect("active flow");
            f.rate = rate_of(&self.share, f);
            for r in &f.path[..f.hops as usize] {
                self.fixed[*r as usize] += f.rate;
            }
        }
        for k in &active {
            let f = self.flows.get_mut(k).expect("active flow");
            let scale = f.path[..f.hops as usize]
                .iter()
                .map(|r| {
                    let (load, cap) = (self.fixed[*r as usize], self.cap[*r as usize]);
                    if load > cap {
                        cap / load
                    } else {
                        1.0
                    }
                })
                .fold(1.0, f64::min);
            f.rate *= scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn spec(hosts: usize, rate: f64) -> NetSpec {
        NetSpec {
            up: vec![rate; hosts],
            down: vec![rate; hosts],
            rack: vec![0; hosts],
            rack_uplink: vec![f64::INFINITY],
            origin_up: rate,
        }
    }

    #[test]
    fn an_uploader_splits_its_link_and_a_lone_flow_takes_a_whole_link() {
        let mut n = Net::new(&spec(4, 1000.0));
        n.send(End::Host(0), 1, 0, 0, 1000, Duration::ZERO, Duration::ZERO);
        n.send(End::Host(0), 2, 0, 0, 1000, Duration::ZERO, Duration::ZERO);
        n.send(End::Host(3), 2, 0, 1, 250, Duration::ZERO, Duration::ZERO);
        // 0 uploads to 1 and 2 (500 each); 2 also gets 3's piece: its download is 1000, so
        // 3's flow gets the 500 left.
        let done = n.advance(Duration::ZERO, 500 * MS);
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0].from, End::Host(3));
        assert!((n.carried[n.host_up(0)] - 500.0).abs() < 1.0);
        let done = n.advance(500 * MS, 1500 * MS);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|a| a.at <= 2000 * MS + MS));
    }

    #[test]
    fn a_bottleneck_elsewhere_leaves_capacity_to_others() {
        // 0 sends to 1 and 2; 1's download is slow (100), so 2 gets the remaining 900.
        let mut s = spec(3, 1000.0);
        s.down[1] = 100.0;
        let mut n = Net::new(&s);
        n.send(
            End::Host(0),
            1,
            0,
            0,
            100_000,
            Duration::ZERO,
            Duration::ZERO,
        );
        n.send(
            End::Host(0),
            2,
            0,
            0,
            100_000,
            Duration::ZERO,
            Duration::ZERO,
        );
        n.advance(Duration::ZERO, 1000 * MS);
        assert!((n.carried[n.host_down(1)] - 100.0).abs() < 1.0);
        assert!((n.carried[n.host_down(2)] - 900.0).abs() < 1.0);
    }

    #[test]
    fn traffic_between_racks_crosses_both_uplinks_and_is_capped_by_them() {
        let s = NetSpec {
            up: vec![1000.0; 4],
            down: vec![1000.0; 4],
            rack: vec![0, 0, 1, 1],
            rack_uplink: vec![500.0, 500.0],
            origin_up: 1000.0,
        };
        let mut n = Net::new(&s);
        n.send(
            End::Host(0),
            2,
            0,
            0,
            1_000_000,
            Duration::ZERO,
            Duration::ZERO,
        );
        n.send(
            End::Host(1),
            0,
            0,
            0,
            1_000_000,
            Duration::ZERO,
            Duration::ZERO,
        );
        n.advance(Duration::ZERO, 1000 * MS);
        assert!((n.carried[n.rack_up(0)] - 500.0).abs() < 1.0);
        assert!((n.carried[n.rack_down(1)] - 500.0).abs() < 1.0);
        assert!(
            (n.carried[n.host_down(0)] - 1000.0).abs() < 1.0,
            "in-rack flow unaffected"
        );
    }

    #[test]
    fn bytes_wait_for_the_round_trip() {
        let mut n = Net::new(&spec(2, 1000.0));
        n.send(End::Host(0), 1, 0, 0, 100, Duration::ZERO, 50 * MS);
        assert!(n.advance(Duration::ZERO, 10 * MS).is_empty());
        assert_eq!(n.carried[n.host_up(0)], 0.0);
    }
}
