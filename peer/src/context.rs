//! The node context: what every part of one node shares (the configuration, the piece store,
//! the origin client and the metrics). The origin pipeline ([`crate::fetch`]) and the peer
//! ([`crate::swarm`]) both receive it; neither reaches through the other for it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::source::{Origin, SourceError};
use crate::storage::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

pub struct NodeContext {
    pub cfg: Config,
    pub store: Store,
    pub origin: Origin,
    pub metrics: Arc<Metrics>,
}

impl NodeContext {
    /// Opens the store under `cfg.data_dir` and builds the origin client.
    pub fn open(cfg: Config) -> Result<Arc<NodeContext>, ContextError> {
        let store = Store::open(
            &cfg.data_dir,
            Duration::from_millis(cfg.storage.commit_interval_ms),
        )?;
        let origin = Origin::new(&cfg.source)?;
        Ok(Arc::new(NodeContext {
            cfg,
            store,
            origin,
            metrics: Arc::new(Metrics::new()),
        }))
    }

    /// One GC pass with the configured policy; tasks in use by anyone are never touched.
    /// Blocking file-system work: call it off the async runtime's workers. Returns whether
    /// the store is still over its high watermark (what is left is in use).
    pub fn collect_garbage(&self) -> bool {
        match self.store.gc(&self.cfg.gc, SystemTime::now()) {
            Ok(r) => {
                if !r.evicted.is_empty() {
                    tracing::info!(evicted = r.evicted.len(), "garbage collected")
                }
                r.after.is_some_and(|u| {
                    self.metrics.store_usage(u.used, u.capacity);
                    u.capacity > 0 && u.used as f64 > self.cfg.gc.high_watermark * u.capacity as f64
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection failed; continuing");
                false
            }
        }
    }

    /// [`NodeContext::collect_garbage`] on the blocking pool.
    pub async fn collect_garbage_async(self: &Arc<Self>) -> bool {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.collect_garbage())
            .await
            .unwrap_or(false)
    }
}
