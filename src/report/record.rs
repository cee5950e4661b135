//! Reading what the pipeline wrote: run records (`<runs>/<id>/run.json`), artifact manifests
//! (`<store>/<fingerprint>/manifest.json`), training metrics and evaluation outputs. Everything
//! a stage left behind is optional here: a garbage-collected store must still give a report.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::charts::{read_metrics_jsonl, training_chart_specs, ChartSpec};
use crate::report::Error;

// The pipeline's own record and manifest types: the report reads what the pipeline writes.
pub use crate::pipeline::record::{RunRecord, StageRecord, StageState};
pub use crate::pipeline::store::{FileEntry, Manifest};

/// One line of an evaluate stage's `predictions.jsonl`.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct Prediction {
    pub prompt: String,
    pub prediction: String,
    pub reference: String,
}

/// What the report found in a stage's artifact folder. Each part failed or absent on its own,
/// with a message instead of aborting the whole report.
#[derive(Debug, Default)]
pub struct StageArtifacts {
    /// None: the artifact is not in the store (never written or garbage-collected).
    pub dir: Option<PathBuf>,
    pub manifest: Option<Result<Manifest, String>>,
    pub charts: Option<Result<Vec<ChartSpec>, String>>,
    pub eval_metrics: Option<Result<Map<String, Value>, String>>,
    pub predictions: Option<Result<Vec<Prediction>, String>>,
}

/// How many predictions the report shows per evaluate stage.
pub const PREDICTIONS_SHOWN: usize = 5;

/// Reads `<runs_dir>/<run_id>/run.json`.
pub fn load_run(runs_dir: &Path, run_id: &str) -> Result<RunRecord, Error> {
    let path = runs_dir.join(run_id).join("run.json");
    if !path.is_file() {
        return Err(Error::RunNotFound {
            run_id: run_id.to_string(),
            path,
        });
    }
    let text = fs::read_to_string(&path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let mut record: RunRecord = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        line: e.line(),
        message: e.to_string(),
    })?;
    if record.run_id.is_empty() {
        record.run_id = run_id.to_string();
    }
    record.status = record.status_now();
    Ok(record)
}

/// The artifact folder of a stage: the recorded path, else `<runs_dir>/../store/<fingerprint>`
/// (the project may have moved since the run). None when neither exists.
pub fn locate_artifact(runs_dir: &Path, stage: &StageRecord) -> Option<PathBuf> {
    let recorded = (!stage.artifact.is_empty()).then(|| PathBuf::from(&stage.artifact));
    let beside = (!stage.fingerprint.is_empty())
        .then(|| {
            runs_dir
                .parent()
                .map(|p| p.join("store").join(&stage.fingerprint))
        })
        .flatten();
    recorded.into_iter().chain(beside).find(|dir| dir.is_dir())
}

/// Loads everything the report shows about one stage's artifact.
pub fn load_stage_artifacts(runs_dir: &Path, stage: &StageRecord) -> StageArtifacts {
    let Some(dir) = locate_artifact(runs_dir, stage) else {
        return StageArtifacts::default();
    };
    let manifest_path = dir.join("manifest.json");
    let manifest = Some(read_json::<Manifest>(&manifest_path));
    let metrics_path = dir.join("metrics.jsonl");
    let charts = metrics_path.is_file().then(|| {
        read_metrics_jsonl(&metrics_path)
            .map(|rows| training_chart_specs(&rows))
            .map_err(|e| e.to_string())
    });
    let eval_path = dir.join("metrics.json");
    let eval_metrics = eval_path
        .is_file()
        .then(|| read_json::<Map<String, Value>>(&eval_path));
    let predictions_path = dir.join("predictions.jsonl");
    let predictions = predictions_path
        .is_file()
        .then(|| read_predictions(&predictions_path, PREDICTIONS_SHOWN));
    StageArtifacts {
        dir: Some(dir),
        manifest,
        charts,
        eval_metrics,
        predictions,
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}:{}: {e}", path.display(), e.line()))
}

/// The first `limit` predictions, without reading the rest of a possibly large file.
pub fn read_predictions(path: &Path, limit: usize) -> Result<Vec<Prediction>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        if out.len() >= limit {
            break;
        }
        let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let prediction = serde_json::from_str(&line).map_err(|e| {
            format!(
                "{}:{}: expected {{\"prompt\",\"prediction\",\"reference\"}}: {e}",
                path.display(),
                index + 1
            )
        })?;
        out.push(prediction);
    }
    Ok(out)
}

/// The run whose `started_at` is latest (RFC 3339 timestamps; unparsable ones sort first).
/// Folders without a readable run.json are passed over: a run may be writing it right now.
pub fn latest_run_id(runs_dir: &Path) -> Result<String, Error> {
    let entries = fs::read_dir(runs_dir).map_err(|source| Error::Read {
        path: runs_dir.to_path_buf(),
        source,
    })?;
    let mut best: Option<(
        Option<chrono::DateTime<chrono::FixedOffset>>,
        String,
        String,
    )> = None;
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(record) = load_run(runs_dir, &id) else {
            continue;
        };
        let started = record.started_at.clone();
        let key = (
            chrono::DateTime::parse_from_rfc3339(&started).ok(),
            started,
            id,
        );
        if best
            .as_ref()
            .is_none_or(|b| (&key.0, &key.1, &key.2) > (&b.0, &b.1, &b.2))
        {
            best = Some(key);
        }
    }
    best.map(|(_, _, id)| id).ok_or_else(|| Error::NoRuns {
        path: runs_dir.to_path_buf(),
    })
}
