//! A sampling profile of the host threads while a benchmark runs (feature `profile`, for
//! finding where a host-bound training step spends its time on a machine without perf).
//! `RUNNER_PPROF=<file>` turns it on; the file gets the functions with the most samples, by
//! self time and by inclusive time, per thread.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Frames of one-time work (kernel compilation and loading, autotuning), left out of the summary.
const WARM_UP: [&str; 4] = ["nvrtc", "cuModuleLoadData", "autotune", "Autotune"];

/// Samples while alive when `RUNNER_PPROF` names a file; writes the summary on drop.
pub struct HostProfile {
    guard: Option<(pprof::ProfilerGuard<'static>, PathBuf)>,
}

impl HostProfile {
    pub fn from_env() -> Self {
        let guard = std::env::var_os("RUNNER_PPROF").and_then(|path| {
            pprof::ProfilerGuardBuilder::default()
                .frequency(997)
                .blocklist(&["libc", "libgcc", "pthread", "vdso"])
                .build()
                .map_err(|e| eprintln!("runner: host profile unavailable: {e}"))
                .ok()
                .map(|g| (g, PathBuf::from(path)))
        });
        Self { guard }
    }
}

impl Drop for HostProfile {
    fn drop(&mut self) {
        let Some((guard, path)) = self.guard.take() else {
            return;
        };
        let report = match guard.report().build() {
            Ok(r) => r,
            Err(e) => return eprintln!("runner: host profile: {e}"),
        };
        let mut by_thread: HashMap<
            String,
            (isize, HashMap<String, isize>, HashMap<String, isize>),
        > = HashMap::new();
        for (frames, &count) in &report.data {
            let entry = by_thread.entry(frames.thread_name_or_id()).or_default();
            entry.0 += count;
            let names: Vec<String> = frames
                .frames
                .iter()
                .filter_map(|inlined| inlined.first().map(|s| s.name()))
                .collect();
            // Kernel compilation belongs to the warm-up steps, not to the steady state.
            if names.iter().any(|n| WARM_UP.iter().any(|w| n.contains(w))) {
                continue;
            }
            if let Some(leaf) = names.first() {
                *entry.1.entry(leaf.clone()).or_default() += count;
            }
            let mut seen = std::collections::HashSet::new();
            for name in names {
                if seen.insert(name.clone()) {
                    *entry.2.entry(name).or_default() += count;
                }
            }
        }
        let mut out = String::new();
        let mut threads: Vec<_> = by_thread.into_iter().collect();
        threads.sort_by_key(|t| -t.1 .0);
        for (thread, (total, leaf, inclusive)) in threads {
            let _ = writeln!(out, "## thread {thread}: {total} samples");
            for (title, table, rows) in [("self", leaf, 60), ("inclusive", inclusive, 250)] {
                let mut sorted: Vec<_> = table.into_iter().collect();
                sorted.sort_by_key(|e| -e.1);
                let _ = writeln!(out, "### {title}");
                for (name, n) in sorted.into_iter().take(rows) {
                    let pct = 100.0 * n as f64 / total.max(1) as f64;
                    let short: String = name.chars().take(220).collect();
                    let _ = writeln!(out, "{n:7} {pct:5.1}% {short}");
                }
            }
        }
        if let Err(e) = std::fs::write(&path, out) {
            eprintln!("runner: host profile: cannot write {}: {e}", path.display());
        }
    }
}
