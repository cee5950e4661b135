//! runner patch: the high-water mark of GPU memory in use, as `torch.cuda.max_memory_allocated`
//! counts it (live buffers, not the pool's reserved pages).
//!
//! `RUNNER_MEMORY_LIMIT` (bytes, or with a K/M/G suffix) makes an allocation that would take
//! the bytes in use past it fail as a real out-of-memory does (`IoError::BufferTooBig`), so a
//! smaller card can be played on a larger one.
//!
//! Kept at little cost: between two exact readings the bytes in use can grow by at most what was
//! reserved since, so the pool's usage is read again only when that bound passes the peak by a
//! margin of 1/128 (at least 8 MiB): the peak is exact to within that margin. Off until [`reset_peak_bytes_in_use`] is first called, so processes that never ask
//! pay nothing.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static TRACKING: AtomicBool = AtomicBool::new(false);
static PEAK: AtomicU64 = AtomicU64::new(0);
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// The most GPU memory in use at once, in bytes, since [`reset_peak_bytes_in_use`].
pub fn peak_bytes_in_use() -> u64 {
    PEAK.load(Ordering::Relaxed)
}

/// Starts (or restarts) tracking [`peak_bytes_in_use`] from the next allocation on.
pub fn reset_peak_bytes_in_use() {
    PEAK.store(0, Ordering::Relaxed);
    EPOCH.fetch_add(1, Ordering::Relaxed);
    TRACKING.store(true, Ordering::Relaxed);
}

/// `RUNNER_MEMORY_LIMIT`, read once.
fn limit() -> Option<u64> {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let text = std::env::var("RUNNER_MEMORY_LIMIT").ok()?;
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
        let value: f64 = t[..split].parse().ok()?;
        let scale = match t[split..].trim().to_ascii_uppercase().trim_end_matches("IB") {
            "" | "B" => 1u64,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => return None,
        };
        Some((value * scale as f64) as u64)
    })
}

/// One stream's side of the tracking.
#[derive(Debug, Default)]
pub(crate) struct PeakTracker {
    last_exact: u64,
    reserved_since: u64,
    epoch: u64,
}

impl PeakTracker {
    /// Whether reserving `size` more bytes would pass `RUNNER_MEMORY_LIMIT`.
    pub(crate) fn would_pass_limit(&mut self, size: u64, in_use: impl FnOnce() -> u64) -> bool {
        let Some(limit) = limit() else {
            return false;
        };
        if self.last_exact.saturating_add(self.reserved_since).saturating_add(size) <= limit {
            return false;
        }
        self.last_exact = in_use();
        self.reserved_since = 0;
        self.last_exact.saturating_add(size) > limit
    }

    /// Called after each reservation of `size` bytes; `in_use` reads the pool's exact usage.
    pub(crate) fn reserved(&mut self, size: u64, in_use: impl FnOnce() -> u64) {
        if !TRACKING.load(Ordering::Relaxed) {
            return;
        }
        let epoch = EPOCH.load(Ordering::Relaxed);
        self.reserved_since = self.reserved_since.saturating_add(size);
        let stale = epoch != self.epoch;
        // Reading the pool's usage walks all its slices, and while usage hovers near the peak
        // (an offloaded backward pass) the bound passes the peak at almost every reservation.
        // So it is read again only when the bound passes the peak by a margin, and the peak
        // reported is low by at most that margin (1/128 of it, at least 8 MiB).
        let peak = PEAK.load(Ordering::Relaxed);
        let margin = (peak / 128).max(8 << 20);
        if stale || self.last_exact.saturating_add(self.reserved_since) > peak.saturating_add(margin)
        {
            self.epoch = epoch;
            self.last_exact = in_use();
            self.reserved_since = 0;
            PEAK.fetch_max(self.last_exact, Ordering::Relaxed);
        }
    }
}
