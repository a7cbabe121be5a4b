//! A deterministic discrete-event simulator of a Starling swarm, over the real code: every
//! simulated peer runs Starling's own [`starling::engine::Engine`] (its piece planner), asks a
//! real [`starling::scheduler::Scheduler`] (consistent hashing across several through the real
//! `Ring`), applies the driver's rules from [`starling::swarm::policy`] (its timings, the
//! engine's config from `[peer]`, a sole holder's upload spread), and announces what it holds
//! as a daemon does. Only the network and the clock are simulated: `net` is a flow-level model
//! (max-min fair sharing of host links, rack uplinks and the origin), and time advances in
//! fixed steps, with the requests' round trips and the control messages' delays as events.
//!
//! | module | what |
//! |---|---|
//! | [`net`] | hosts, racks, the origin; flows and their max-min fair rates |
//! | [`world`] | the nodes and the event loop: asks, parent pollers, requests, announces, churn |
//! | [`scenario`] | the named scenarios of `cargo xtask bench scale`, and their bounds |
//!
//! What it leaves out: packets (loss is not modelled; congestion control is taken as fair and
//! instant), CPU, disk, and the QUIC handshake's cost beyond its round trips.

pub mod net;
pub mod scenario;
pub mod world;

pub use scenario::{Scenario, Shape};
pub use world::{Report, World};
