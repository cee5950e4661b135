//! Run reports a person looks at: one self-contained HTML page per run (inline CSS and SVG, no
//! scripts, fonts or requests) with the run header, the stage graph, per-stage artifacts, training
//! curves, evaluation metrics with sample predictions, and optionally a comparison with a second
//! run (changed parameters, overlaid curves, metrics side by side).

pub mod dag;
pub mod diff;
mod page;
pub mod record;
mod stage;

use std::fs;
use std::path::{Path, PathBuf};

pub use record::{latest_run_id, load_run, RunRecord, StageRecord};

/// Errors finding or reading runs and writing the report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("run {run_id} not found: no {path}")]
    RunNotFound { run_id: String, path: PathBuf },
    #[error("no runs with a run.json in {path}")]
    NoRuns { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a valid run record: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot write report {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A run with what its stages left in the store (index-aligned with `record.stages`).
pub(crate) struct RunView {
    pub record: RunRecord,
    pub artifacts: Vec<record::StageArtifacts>,
}

fn load_view(runs_dir: &Path, run_id: &str) -> Result<RunView, Error> {
    let record = load_run(runs_dir, run_id)?;
    let artifacts = record
        .stages
        .iter()
        .map(|stage| record::load_stage_artifacts(runs_dir, stage))
        .collect();
    Ok(RunView { record, artifacts })
}

/// Renders the report of `run_id` (compared with run `compare` when given) as one HTML page.
pub fn render_report(
    runs_dir: &Path,
    run_id: &str,
    compare: Option<&str>,
) -> Result<String, Error> {
    let main = load_view(runs_dir, run_id)?;
    let other = compare.map(|id| load_view(runs_dir, id)).transpose()?;
    Ok(page::render_page(&main, other.as_ref()))
}

/// Writes the report to `out`, by default `<runs_dir>/<run_id>/report.html`; returns the path.
pub fn write_report(
    runs_dir: &Path,
    run_id: &str,
    compare: Option<&str>,
    out: Option<&Path>,
) -> Result<PathBuf, Error> {
    let html = render_report(runs_dir, run_id, compare)?;
    let path = out.map_or_else(
        || runs_dir.join(run_id).join("report.html"),
        Path::to_path_buf,
    );
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
    }
    fs::write(&path, html).map_err(|source| Error::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests;
