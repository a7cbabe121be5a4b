//! Orders to pull a task (wire kind 4, JSON body: the same [`Request`] a client gives):
//! - a peer that finds nobody holding a task, and is told by the scheduler to ask a seed,
//!   sends that seed an order; the seed pulls the task from the origin and serves it as it
//!   goes;
//! - a preheat (`swarm::preheat`) sends orders to the seeds and the share of peers it chose.
//!
//! Any peer takes an order and pulls the task as a client's `get` would (the scheduler decides
//! who reads the origin), at most [`ORDERS_AT_ONCE`] at a time; the rest wait their turn.

use std::sync::Arc;

use bytes::Bytes;

use super::Swarm;
use crate::core::{Request, TaskId};
use crate::fetch::Progress;
use crate::transport::wire::Status;

/// An order to pull a task: the client's own request.
pub type SeedOrder = Request;

/// Orders a peer pulls at once.
pub const ORDERS_AT_ONCE: usize = 4;

impl Swarm {
    /// An order from another peer: checked (it must name `task`), then pulled in the
    /// background.
    pub(super) fn take_order(self: Arc<Self>, task: TaskId, body: &[u8]) -> Result<Bytes, Status> {
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
                let _turn = me.order_slots.acquire().await;
                let progress = Arc::new(Progress::default());
                match me.pull(&order, &progress).await {
                    Ok(_) => tracing::info!(%task, "pulled on order"),
                    Err(e) => tracing::warn!(%task, error = %e, "order failed"),
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
