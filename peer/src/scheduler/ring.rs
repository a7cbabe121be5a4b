//! Consistent hashing of task IDs over several schedulers: each scheduler owns many points on a
//! ring, and a task belongs to the first point at or after its own hash. Adding or removing one
//! scheduler moves only the tasks next to its points (about 1/N of them).

use std::collections::BTreeMap;

use crate::core::{Digest, TaskId};

/// Points per scheduler: enough for an even split, cheap to build.
const VNODES: u32 = 160;

#[derive(Clone, Debug, Default)]
pub struct Ring {
    points: BTreeMap<u64, String>,
}

fn point(data: &[u8]) -> u64 {
    let d = Digest::of(data);
    u64::from_le_bytes([
        d.0[0], d.0[1], d.0[2], d.0[3], d.0[4], d.0[5], d.0[6], d.0[7],
    ])
}

impl Ring {
    pub fn new<S: AsRef<str>>(schedulers: &[S]) -> Ring {
        let mut r = Ring::default();
        for s in schedulers {
            r.add(s.as_ref());
        }
        r
    }

    pub fn add(&mut self, scheduler: &str) {
        for v in 0..VNODES {
            self.points.insert(
                point(format!("{scheduler}#{v}").as_bytes()),
                scheduler.to_string(),
            );
        }
    }

    pub fn remove(&mut self, scheduler: &str) {
        self.points.retain(|_, s| s != scheduler);
    }

    /// The scheduler that owns `task`, or None on an empty ring.
    pub fn owner(&self, task: &TaskId) -> Option<&str> {
        let h = point(&task.hash.0);
        self.points
            .range(h..)
            .next()
            .or_else(|| self.points.iter().next())
            .map(|(_, s)| s.as_str())
    }
}
