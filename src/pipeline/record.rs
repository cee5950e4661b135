//! Run records: `.runner/runs/<run-id>/run.json`, enough to see and repeat any run.

use super::PipelineError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Pending,
    Run,
    Cached,
    Failed,
    /// Not run because a stage it depends on failed.
    Skipped,
    /// Submitted to a cluster; see `job_id`.
    Submitted,
}

impl StageState {
    /// The state as records spell it (`run`, `cached`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Run => "run",
            Self::Cached => "cached",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Submitted => "submitted",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    pub kind: String,
    pub fingerprint: String,
    pub inputs: Vec<String>,
    pub state: StageState,
    /// Why the stage ran (what changed) or null when cached.
    pub reason: Option<String>,
    pub duration_s: f64,
    pub artifact: String,
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub recipe_path: String,
    /// Relative paths in the resolved recipe are relative to this folder.
    pub recipe_dir: String,
    pub recipe_name: String,
    pub resolved_recipe: serde_json::Value,
    pub overrides: Vec<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub status: String,
    pub runner_version: String,
    pub git_revision: Option<String>,
    pub host: String,
    pub device: String,
    pub store: String,
    #[serde(default)]
    pub executor: String,
    /// The process of a local run, so a record left `running` by a killed one reads `interrupted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub stages: Vec<StageRecord>,
}

/// The status to show for a record: a local run still recorded as `running` whose process is
/// gone from this host (killed, crashed, rebooted) was interrupted.
pub fn shown_status(status: &str, executor: &str, host: &str, pid: Option<u32>) -> String {
    let gone = status == "running"
        && executor == "local"
        && host == crate::pipeline::host::host_name()
        && pid.is_some_and(|pid| !process_alive(pid));
    if gone {
        "interrupted".into()
    } else {
        status.to_string()
    }
}

#[cfg(target_os = "linux")]
fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(not(target_os = "linux"))]
fn process_alive(_pid: u32) -> bool {
    true
}

pub fn default_runs_dir(store_root: &Path) -> PathBuf {
    store_root
        .parent()
        .map(|p| p.join("runs"))
        .unwrap_or_else(|| PathBuf::from(".runner/runs"))
}

/// `YYYYmmdd-HHMMSS-` and 32 bits from the host, pid, clock and a per-process counter: runs
/// started in the same second, on one host or many, get different ids.
pub fn new_run_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = chrono::Utc::now();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let salt = blake3::hash(
        format!(
            "{}|{}|{:?}|{n}",
            crate::pipeline::host::host_name(),
            std::process::id(),
            now
        )
        .as_bytes(),
    )
    .to_hex();
    format!("{}-{}", now.format("%Y%m%d-%H%M%S"), &salt[..8])
}

impl RunRecord {
    /// `status`, or `interrupted` for a local run whose process is gone.
    pub fn status_now(&self) -> String {
        shown_status(&self.status, &self.executor, &self.host, self.pid)
    }

    pub fn path(runs_dir: &Path, run_id: &str) -> PathBuf {
        runs_dir.join(run_id).join("run.json")
    }

    /// Writes atomically (temp file, then rename), so a crash never leaves a torn record.
    pub fn save(&self, runs_dir: &Path) -> Result<PathBuf, PipelineError> {
        let dir = runs_dir.join(&self.run_id);
        std::fs::create_dir_all(&dir).map_err(|e| PipelineError::io(&dir, e))?;
        let path = dir.join("run.json");
        // One temp file per process: two savers never write into each other's file.
        let temp = dir.join(format!(".run.json.{}.tmp", std::process::id()));
        let text =
            serde_json::to_string_pretty(self).map_err(|e| PipelineError::Store(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temp)?;
            std::io::Write::write_all(&mut file, text.as_bytes())?;
            // On disk before the rename makes it the record.
            file.sync_all()
        };
        write().map_err(|e| PipelineError::io(&temp, e))?;
        std::fs::rename(&temp, &path).map_err(|e| PipelineError::io(&path, e))?;
        Ok(path)
    }

    pub fn load(runs_dir: &Path, run_id: &str) -> Result<Self, PipelineError> {
        let path = Self::path(runs_dir, run_id);
        let text = std::fs::read_to_string(&path).map_err(|e| PipelineError::io(&path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| PipelineError::Store(format!("{}: {e}", path.display())))
    }

    /// All records, oldest first.
    pub fn list(runs_dir: &Path) -> Vec<Self> {
        let mut out: Vec<Self> = std::fs::read_dir(runs_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Self::load(runs_dir, &e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort_by(|a, b| {
            a.started_at
                .cmp(&b.started_at)
                .then(a.run_id.cmp(&b.run_id))
        });
        out
    }
}

/// The current git revision of the folder, if it is a repository.
pub fn git_revision(dir: &Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let rev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dirty = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty { format!("{rev}-dirty") } else { rev })
}
