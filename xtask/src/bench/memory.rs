//! `--warm-memory` for the benches: this VM hands freed pages back to its host (free page
//! reporting), and the first write to such a page costs a host fault, which can double a
//! run's page-cache writes. The guard switches reporting off and touches the memory once, so
//! no system pays it; reporting is restored when it drops.

use anyhow::{Context, Result};

/// The balloon's free page reporting, switched off while this lives: pages of an order at or
/// above this parameter are reported, and the page allocator's orders stop at 10.
pub struct WarmMemory {
    old: String,
}

const PAGE_REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

impl WarmMemory {
    /// Switches reporting off and touches `bytes` of memory once (then frees it: free pages
    /// that are never reported stay backed by the host).
    pub fn start(bytes: u64) -> Result<WarmMemory> {
        let old = std::fs::read_to_string(PAGE_REPORTING_ORDER)
            .with_context(|| format!("{PAGE_REPORTING_ORDER}: this kernel has no free page reporting to switch off; run without --warm-memory"))?
            .trim()
            .to_string();
        std::fs::write(PAGE_REPORTING_ORDER, "11")
            .with_context(|| format!("cannot write {PAGE_REPORTING_ORDER}"))?;
        let guard = WarmMemory { old };
        let mut v = vec![0u8; bytes as usize];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
        println!(
            "free page reporting off (was order {}); {} GiB touched",
            guard.old,
            bytes >> 30
        );
        Ok(guard)
    }
}

/// [`WarmMemory::start`] over `need` bytes, or less: what the machine has available, leaving
/// 2 GiB free.
pub fn warm_up_to(need: u64) -> Result<WarmMemory> {
    let free = mem_available().unwrap_or(need);
    WarmMemory::start(need.min(free.saturating_sub(2 << 30)))
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl Drop for WarmMemory {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(PAGE_REPORTING_ORDER, &self.old) {
            eprintln!(
                "could not restore {PAGE_REPORTING_ORDER} to {}: {e}",
                self.old
            );
        }
    }
}
