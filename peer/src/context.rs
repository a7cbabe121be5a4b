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
    /// Blocking file-system work: call it off the async runtime's workers.
    pub fn collect_garbage(&self) {
        match self.store.gc(&self.cfg.gc, SystemTime::now()) {
            Ok(r) => {
                if let Some(u) = r.after {
                    self.metrics.store_usage(u.used, u.capacity);
                }
                if !r.evicted.is_empty() {
                    tracing::info!(evicted = r.evicted.len(), "garbage collected")
                }
            }
            Err(e) => tracing::warn!(error = %e, "garbage collection failed; continuing"),
        }
    }

    /// [`NodeContext::collect_garbage`] on the blocking pool.
    pub async fn collect_garbage_async(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.collect_garbage()).await;
    }
}
