//! Seed orders: a peer that finds nobody holding a task, and is told by the scheduler to ask a
//! seed, sends that seed a [`SeedOrder`] (wire kind 4, JSON body: the same [`Request`] a client
//! gives). Only a seed takes one; it pulls the task from the origin and serves it as it goes.

use std::sync::Arc;

use bytes::Bytes;

use super::Swarm;
use crate::core::{Request, TaskId};
use crate::fetch::Progress;
use crate::transport::wire::Status;

/// A seed's order to go back to source for a task: the client's own request.
pub type SeedOrder = Request;

impl Swarm {
    /// A seed order from another peer: checked (it must name `task`), then pulled in the
    /// background. Refused (`BadRequest`) by a node that is not a seed.
    pub(super) fn take_order(self: Arc<Self>, task: TaskId, body: &[u8]) -> Result<Bytes, Status> {
        if !self.ctx.cfg.peer.seed {
            return Err(Status::BadRequest);
        }
        let order: SeedOrder = serde_json::from_slice(body).map_err(|_| Status::BadRequest)?;
        let filtered = &self.ctx.cfg.source.filtered_query_params;
        if TaskId::resolve(&order.url, order.digest, filtered).ok() != Some(task) {
            return Err(Status::BadRequest);
        }
        let fresh = self
            .orders
            .lock()
            .map(|mut o| o.insert(task))
            .unwrap_or(false);
        let have = self.is_served(&task);
        if fresh && !have {
            let me = self.clone();
            tokio::spawn(async move {
                let progress = Arc::new(Progress::default());
                match me.pull(&order, &progress).await {
                    Ok(_) => tracing::info!(%task, "seeded on order"),
                    Err(e) => tracing::warn!(%task, error = %e, "seed order failed"),
                }
                if let Ok(mut o) = me.orders.lock() {
                    o.remove(&task);
                }
            });
        } else if have {
            if let Ok(mut o) = self.orders.lock() {
                o.remove(&task);
            }
        }
        Ok(Bytes::from_static(b"{}"))
    }
}
