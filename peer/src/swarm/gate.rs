//! The per-task gate: one download, import or re-serve of a task at a time in this daemon.
//! Later requests for the task wait, then find it served. (The store's lease cannot do this
//! here: the daemon's own upload views hold it.)

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::core::TaskId;

#[derive(Default)]
pub(super) struct Gates {
    open: Mutex<HashMap<TaskId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Gates {
    /// Runs `work` for task `id` once no other work on that task holds its gate.
    pub(super) async fn one_at_a_time<T>(&self, id: TaskId, work: impl Future<Output = T>) -> T {
        let gate = match self.open.lock() {
            Ok(mut g) => g.entry(id).or_default().clone(),
            Err(_) => Arc::default(),
        };
        let res = {
            let _held = gate.lock().await;
            work.await
        };
        if let Ok(mut g) = self.open.lock() {
            // Ours and the map's: nobody else waits on it.
            if Arc::strong_count(&gate) == 2 {
                g.remove(&id);
            }
        }
        res
    }

    /// Whether work on `id` runs (or waits) now.
    pub(super) fn busy(&self, id: &TaskId) -> bool {
        self.open.lock().is_ok_and(|g| g.contains_key(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn work_on_one_task_runs_one_at_a_time_and_the_gate_is_dropped_after() {
        let gates = Arc::new(Gates::default());
        let task = |s: &[u8]| TaskId::for_content(crate::core::Digest::of(s));
        let (a, b) = (task(b"a"), task(b"b"));
        let inside = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        let mut jobs = Vec::new();
        for i in 0..8 {
            let (g, inside, most) = (gates.clone(), inside.clone(), most.clone());
            let id = if i % 2 == 0 { a } else { b };
            jobs.push(tokio::spawn(async move {
                g.one_at_a_time(id, async {
                    let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            }));
        }
        for j in jobs {
            j.await.unwrap();
        }
        // Two tasks: at most one job inside per task.
        assert!(most.load(Ordering::SeqCst) <= 2);
        assert!(gates.open.lock().unwrap().is_empty());
    }
}
