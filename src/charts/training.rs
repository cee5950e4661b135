//! Training curves from a stage's `metrics.jsonl` (one JSON object per step, written by the sft
//! and grpo stages): groups related numeric keys into charts (loss with eval loss, learning
//! rate, grad norm, throughput, memory, GRPO rewards by function, KL, ...) and writes them as SVG
//! files into the artifact folder. Key names follow HF TRL's `SFTTrainer`/`GRPOTrainer` logs.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::charts::{line_chart_svg, ChartOptions, Series};

/// Errors reading metrics or writing chart files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected one JSON object per line: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot write chart {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// EMA weight for the training loss: per-step loss is noisy.
const LOSS_SMOOTHING: f64 = 0.6;

/// One chart to draw: which file it goes to and which series it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartSpec {
    /// File name without `.svg`: `loss`, `lr`, `grad_norm`, `throughput`, `rewards`, ...
    pub file_stem: String,
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub smoothing: Option<f64>,
}

/// Reads `metrics.jsonl`: one object per non-blank line.
pub fn read_metrics_jsonl(path: &Path) -> Result<Vec<Map<String, Value>>, Error> {
    let file = fs::File::open(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let json_error = |message: String| Error::Json {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        };
        match serde_json::from_str::<Value>(&line).map_err(|e| json_error(e.to_string()))? {
            Value::Object(row) => rows.push(row),
            other => return Err(json_error(format!("got {}", type_name(&other)))),
        }
    }
    Ok(rows)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Which chart a metric key belongs to: (file stem, title, y label).
fn chart_for_key(key: &str) -> (String, String, String) {
    let known =
        |stem: &str, title: &str, y: &str| (stem.to_string(), title.to_string(), y.to_string());
    match key {
        "loss" | "eval_loss" | "train_loss" => known("loss", "Loss", "loss"),
        "lr" | "learning_rate" => known("lr", "Learning rate", "learning rate"),
        "grad_norm" => known("grad_norm", "Gradient norm", "L2 norm"),
        "memory_mb" => known("memory", "Memory", "MB"),
        "reward" | "reward_std" => known("rewards", "Rewards", "reward"),
        "kl" => known("kl", "KL divergence to the reference", "KL"),
        "completion_length" | "eval_completion_length" => {
            known("completion_length", "Completion length", "tokens")
        }
        "eval_reward" => known("eval_rewards", "Rewards on the eval prompts", "reward"),
        _ if key.starts_with("eval_rewards/") => {
            known("eval_rewards", "Rewards on the eval prompts", "reward")
        }
        "clip_ratio" => known("clip_ratio", "Clip ratio", "fraction"),
        // Preference training (TRL's names): accuracy and margin on scales of their own.
        "rewards/accuracies" | "eval_rewards/accuracies" => known(
            "accuracies",
            "Preference accuracy (chosen reward > rejected)",
            "fraction of pairs",
        ),
        "rewards/margins" | "eval_rewards/margins" => {
            known("margins", "Reward margin (chosen − rejected)", "reward")
        }
        _ if key.starts_with("rewards/") => known("rewards", "Rewards", "reward"),
        _ if key.ends_with("_per_s") => known("throughput", "Throughput", "per second"),
        _ if key.ends_with("_loss") => known("loss", "Loss", "loss"),
        _ => match key.split_once('/') {
            Some((prefix, _)) => (file_stem(prefix), prefix.to_string(), String::new()),
            None => (file_stem(key), key.to_string(), String::new()),
        },
    }
}

/// File-name-safe version of a metric key.
fn file_stem(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Order of the well-known charts; others follow in first-seen order.
const KNOWN_ORDER: [&str; 10] = [
    "loss",
    "lr",
    "grad_norm",
    "throughput",
    "memory",
    "rewards",
    "eval_rewards",
    "kl",
    "completion_length",
    "clip_ratio",
];

/// Keys that are x coordinates or counters rather than curves.
const NOT_PLOTTED: [&str; 3] = ["step", "epoch", "global_step"];

/// Groups every numeric key of the rows into charts. The x value is `step` (the row index when
/// a row has none); rows without a key leave a gap rather than a zero.
pub fn training_chart_specs(rows: &[Map<String, Value>]) -> Vec<ChartSpec> {
    let mut specs: Vec<ChartSpec> = Vec::new();
    let mut spec_index: HashMap<String, usize> = HashMap::new();
    let mut series_index: HashMap<String, (usize, usize)> = HashMap::new();
    for (row_number, row) in rows.iter().enumerate() {
        let x = row
            .get("step")
            .and_then(Value::as_f64)
            .unwrap_or(row_number as f64);
        for (key, value) in row {
            if NOT_PLOTTED.contains(&key.as_str()) {
                continue;
            }
            let Some(y) = value.as_f64() else { continue };
            let (spec_at, series_at) = match series_index.get(key) {
                Some(found) => *found,
                None => {
                    let (stem, title, y_label) = chart_for_key(key);
                    let spec_at = *spec_index.entry(stem.clone()).or_insert_with(|| {
                        specs.push(ChartSpec {
                            smoothing: (stem == "loss").then_some(LOSS_SMOOTHING),
                            file_stem: stem,
                            title,
                            y_label,
                            series: Vec::new(),
                        });
                        specs.len() - 1
                    });
                    specs[spec_at].series.push(Series {
                        name: key.clone(),
                        points: Vec::new(),
                    });
                    let found = (spec_at, specs[spec_at].series.len() - 1);
                    series_index.insert(key.clone(), found);
                    found
                }
            };
            specs[spec_at].series[series_at].points.push((x, y));
        }
    }
    let rank = |stem: &str| {
        KNOWN_ORDER
            .iter()
            .position(|k| *k == stem)
            .unwrap_or(KNOWN_ORDER.len())
    };
    specs.sort_by_key(|spec| rank(&spec.file_stem)); // stable: unknown charts keep first-seen order
    for spec in &mut specs {
        // Main series first: "loss" before "eval_loss", "reward" before "rewards/<fn>".
        let main = spec.file_stem.clone();
        spec.series.sort_by_key(|s| match s.name.as_str() {
            "loss" | "reward" | "eval_reward" | "lr" | "tokens_per_s" => 0,
            name if name == main => 0,
            "eval_loss" => 1,
            _ => 2,
        });
    }
    specs
}

/// Draws one spec with the standard options (x axis: step).
pub fn render_chart_spec(spec: &ChartSpec) -> String {
    let opts = ChartOptions {
        y_label: spec.y_label.clone(),
        smoothing: spec.smoothing,
        ..ChartOptions::default()
    };
    line_chart_svg(&spec.title, "step", &spec.series, &opts)
}

/// Reads `<artifact_dir>/metrics.jsonl` and writes one `<stem>.svg` per chart that has data
/// (loss.svg, lr.svg, grad_norm.svg, throughput.svg, rewards.svg, ...) into the same folder.
/// Returns the written paths. A missing metrics.jsonl is an error; an empty one writes nothing.
pub fn write_training_charts(artifact_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let rows = read_metrics_jsonl(&artifact_dir.join("metrics.jsonl"))?;
    let mut written = Vec::new();
    for spec in training_chart_specs(&rows) {
        let path = artifact_dir.join(format!("{}.svg", spec.file_stem));
        fs::write(&path, render_chart_spec(&spec)).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}
