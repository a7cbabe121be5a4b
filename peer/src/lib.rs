//! Starling: a peer-to-peer distribution peer for container images and large artifacts.
//!
//! Layers (dependencies point down only):
//! - [`fetch`]: the task pipeline that drives `source` and `storage` for one task.
//! - [`source`]: back to source over HTTP(S) with parallel, compliance-checked Range requests.
//! - [`storage`]: the io_uring piece store, its crash-safe metadata and its garbage collector.
//! - [`core`]: task IDs, digests, the piece plan and the manifest, used by every layer.
//! - [`config`]: the one TOML configuration file and every default.

pub mod config;
pub mod context;
pub mod core;
pub mod daemon;
pub mod engine;
pub mod fetch;
pub mod metrics;
pub mod netprobe;
pub mod proxy;
pub mod scheduler;
pub mod source;
pub mod storage;
pub mod swarm;
pub mod transport;
