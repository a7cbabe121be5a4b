//! Starling: a peer-to-peer distribution peer for container images and large artifacts.
//!
//! Layers; dependencies point down only (ARCHITECTURE.md has the same map):
//!
//! ```text
//! daemon      the local API, /metrics + status page + preheat API, GC  (cli/ sits above)
//! proxy       registry and Hugging Face mirror, HTTP(S) proxy
//! swarm       the peer: pull a task, serve peers, talk to schedulers, path upkeep
//!   engine      sans-IO piece planner
//!   scheduler   sans-IO tracker state, and its service
//!   transport   QUIC with mutual TLS, the wire protocol
//!   netprobe    eBPF probes, the path view, the adaptation policy
//! fetch       the origin pipeline: store look-up, ranged download, import, output
//! hub, s3     hf:// and s3:// listings as Requests; the Hugging Face cache layout
//! registry    an image reference as its blobs' Requests (preheat)
//! context     NodeContext: config, store, origin client, metrics
//! source      HTTP(S) origin client with checked Range requests
//! storage     io_uring piece store, crash-safe records, leases, GC, upload views
//! kube        the in-cluster Kubernetes API: node labels, the CA Secret
//! metrics, config, accept (listeners that back off and cap connections), telemetry (OTLP),
//! pace (a shared byte-rate limit)
//! core        Digest, TaskId, PiecePlan, Manifest, Request (used by every layer)
//! ```

pub mod accept;
pub mod config;
pub mod context;
pub mod core;
pub mod daemon;
pub mod engine;
pub mod fetch;
pub mod hub;
pub mod kube;
pub mod metrics;
pub mod netprobe;
pub mod pace;
pub mod proxy;
pub mod registry;
pub mod s3;
pub mod scheduler;
pub mod source;
pub mod stall;
pub mod storage;
pub mod swarm;
pub mod telemetry;
pub mod transport;
