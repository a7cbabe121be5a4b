//! The scenarios: who takes part, over which links, what they fetch and what goes wrong.

use std::time::Duration;

use serde::Serialize;

pub const GBIT: f64 = 125_000_000.0;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

/// How the nodes are laid out.
#[derive(Clone, Debug, Serialize)]
pub enum Shape {
    /// Every host on one non-blocking fabric.
    Flat,
    /// Racks of `per_rack` hosts under a spine; each rack's uplink carries
    /// `per_rack × host rate / oversubscription`. Nodes get zone and rack labels.
    Racks {
        per_rack: usize,
        oversubscription: f64,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: String,
    /// Downloading peers (seeds not counted).
    pub peers: usize,
    pub seeds: usize,
    pub schedulers: usize,
    /// Content sizes: one task each (several layers of an image).
    pub tasks: Vec<u64>,
    /// Each peer's link rate, each way, in bytes/s, picked by peer index from this list
    /// (round robin): one entry for a uniform swarm, several for a mixed one.
    pub peer_rates: Vec<f64>,
    pub seed_rate: f64,
    pub origin_rate: f64,
    /// Round trip between hosts in one rack, and between racks (or on the flat fabric).
    pub rtt_rack: Duration,
    pub rtt: Duration,
    pub shape: Shape,
    /// Peers arrive at once (0), or spread evenly over this long.
    pub arrival_spread: Duration,
    /// Fraction of the peers killed at `kill_at` × the bound.
    pub kill_peers: f64,
    /// Whether the seed that fetched from the origin is killed at `kill_at` × the bound.
    pub kill_seed: bool,
    pub kill_at: f64,
    /// The simulation gives up at this multiple of the bound.
    pub limit: f64,
    /// `max_parents` and other `[peer]` settings differ from the defaults by these.
    pub max_parents: Option<usize>,
    /// Piece length (None: the product's default for the content's size).
    pub piece_length: Option<u64>,
    pub seed_number: u64,
}

impl Scenario {
    /// A flash crowd of `peers` over a flat 10 Gbit/s fabric, 1 seed reading the origin.
    pub fn crowd(name: &str, peers: usize, bytes: u64) -> Scenario {
        Scenario {
            name: name.into(),
            peers,
            seeds: 1,
            schedulers: 1,
            tasks: vec![bytes],
            peer_rates: vec![10.0 * GBIT],
            seed_rate: 10.0 * GBIT,
            origin_rate: 10.0 * GBIT,
            rtt_rack: Duration::from_micros(200),
            rtt: Duration::from_micros(500),
            shape: Shape::Flat,
            arrival_spread: Duration::ZERO,
            kill_peers: 0.0,
            kill_seed: false,
            kill_at: 0.5,
            limit: 20.0,
            max_parents: None,
            piece_length: None,
            seed_number: 1,
        }
    }

    /// The named scenarios of `bench scale`; `quick` leaves out the 10,000-peer ones.
    pub fn all(quick: bool) -> Vec<Scenario> {
        let mut v = vec![
            Scenario::crowd("crowd-1k-1g", 1000, GIB),
            Scenario::crowd("crowd-1k-10g", 1000, 10 * GIB),
            Scenario {
                arrival_spread: Duration::from_secs(30),
                ..Scenario::crowd("staggered-1k-1g", 1000, GIB)
            },
            Scenario {
                kill_peers: 0.1,
                kill_seed: true,
                ..Scenario::crowd("churn-1k-1g", 1000, GIB)
            },
            Scenario {
                peer_rates: vec![10.0 * GBIT, 25.0 * GBIT, 100.0 * GBIT],
                seed_rate: 100.0 * GBIT,
                origin_rate: 25.0 * GBIT,
                ..Scenario::crowd("mixed-links-1k-1g", 1000, GIB)
            },
            Scenario {
                seeds: 3,
                schedulers: 3,
                tasks: vec![GIB / 2, GIB / 4, GIB / 4],
                ..Scenario::crowd("3seeds-3sched-1k-1g", 1000, GIB)
            },
            Scenario {
                shape: Shape::Racks {
                    per_rack: 40,
                    oversubscription: 4.0,
                },
                ..Scenario::crowd("racks-1k-1g", 1000, GIB)
            },
            Scenario {
                kill_peers: 0.1,
                kill_seed: true,
                shape: Shape::Racks {
                    per_rack: 40,
                    oversubscription: 4.0,
                },
                ..Scenario::crowd("churn-racks-1k-1g", 1000, GIB)
            },
            Scenario::kraken(),
        ];
        if !quick {
            v.push(Scenario::crowd("crowd-10k-1g", 10_000, GIB));
            v.push(Scenario::crowd("crowd-10k-10g", 10_000, 10 * GIB));
        }
        v
    }

    /// Kraken's published benchmark: 2,600 hosts pull a 3 GB image of 2 layers at once,
    /// each host capped at 300 MB/s up and down (p50 10 s, p99 18 s).
    pub fn kraken() -> Scenario {
        Scenario {
            tasks: vec![2_000_000_000, 1_000_000_000],
            peer_rates: vec![300_000_000.0],
            seed_rate: 300_000_000.0,
            origin_rate: 300_000_000.0,
            ..Scenario::crowd("kraken-2600-3gb", 2600, 0)
        }
    }

    /// `bench swarm --peers N --size-mib 32 --mbit 10 --import`'s job, to hold the model
    /// against the real daemons: N peers and a seed on 10 Mbit/s links, 32 MiB.
    pub fn lab(peers: usize) -> Scenario {
        Scenario {
            peer_rates: vec![0.01 * GBIT],
            seed_rate: 0.01 * GBIT,
            origin_rate: 10.0 * GBIT,
            rtt_rack: Duration::from_millis(20),
            rtt: Duration::from_millis(20),
            ..Scenario::crowd(&format!("lab-{peers}-10mbit"), peers, 32 * MIB)
        }
    }

    /// The case CI runs: 300 peers on 1 Gbit/s links, 64 MiB, one seed.
    pub fn ci() -> Scenario {
        Scenario {
            peer_rates: vec![GBIT],
            seed_rate: GBIT,
            origin_rate: GBIT,
            ..Scenario::crowd("ci-300", 300, 64 * MIB)
        }
    }

    pub fn by_name(name: &str) -> Option<Scenario> {
        if name == "ci-300" {
            return Some(Scenario::ci());
        }
        if let Some(n) = name
            .strip_prefix("lab-")
            .and_then(|r| r.strip_suffix("-10mbit"))
            .and_then(|n| n.parse().ok())
        {
            return Some(Scenario::lab(n));
        }
        Scenario::all(false).into_iter().find(|s| s.name == name)
    }

    pub fn content(&self) -> u64 {
        self.tasks.iter().sum()
    }

    pub fn peer_rate(&self, i: usize) -> f64 {
        self.peer_rates[i % self.peer_rates.len()]
    }

    /// The time the links allow every peer to get every byte: the content through the
    /// source's link (the origin's, or the seed's, whichever is slower), through the slowest
    /// peer's download, and N copies through all uploads together.
    pub fn bound(&self) -> Duration {
        let f = self.content() as f64;
        let source = self.origin_rate.min(self.seed_rate * self.seeds as f64);
        let slowest = (0..self.peers)
            .map(|i| self.peer_rate(i))
            .fold(f64::INFINITY, f64::min);
        let uploads: f64 = self.seed_rate * self.seeds as f64
            + (0..self.peers).map(|i| self.peer_rate(i)).sum::<f64>();
        let t = (f / source)
            .max(f / slowest)
            .max(self.peers as f64 * f / uploads);
        Duration::from_secs_f64(t)
    }
}
