//! `metrics.jsonl`: one JSON object per logged step (`step`, `loss`, `lr`, `grad_norm`,
//! `tokens_per_s`, `memory_mb`, `eval_loss`, and any extra keys), each line written and flushed
//! whole, so a crash leaves at most one partial last line. On resume the log is cut back to the
//! rows at or before the resumed step, like the trainer state it goes with.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Errors of the metrics log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a metrics row: {message}")]
    BadRow {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: row key `{key}` clashes with a built-in column")]
    ReservedKey { path: PathBuf, key: String },
}

/// One row. Absent values are left out of the line; NaN/inf become `null` (JSON has no such numbers).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MetricsRow {
    pub step: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Any other values (e.g. `reward`, `rewards/correctness`, `epoch`), written after the fixed keys.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

const RESERVED: [&str; 7] = [
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "memory_mb",
    "eval_loss",
];

impl MetricsRow {
    pub fn new(step: u64) -> Self {
        Self {
            step,
            ..Self::default()
        }
    }

    /// Adds an extra key (builder style).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }
}

/// An open `metrics.jsonl`, appending.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts a new log, replacing any file at `path`.
    pub fn create(path: &Path) -> Result<Self, Error> {
        let file = File::create(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Reopens the log of a run resumed after optimizer step `resumed_step`: keeps the rows up to
    /// the first one past that step, drops the rest (and a partial last line), then appends.
    /// A missing file starts a new log.
    pub fn resume(path: &Path, resumed_step: u64) -> Result<Self, Error> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::create(path),
            Err(e) => return Err(io(e)),
        };
        let mut keep = 0u64;
        for (index, row) in parse_lines(path, &text)? {
            if row.step > resumed_step {
                break;
            }
            keep = index;
        }
        let file = OpenOptions::new().write(true).open(path).map_err(io)?;
        file.set_len(keep).map_err(io)?;
        drop(file);
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes one row as one line and flushes it to the OS.
    pub fn append(&mut self, row: &MetricsRow) -> Result<(), Error> {
        if let Some(key) = row.extra.keys().find(|k| RESERVED.contains(&k.as_str())) {
            return Err(Error::ReservedKey {
                path: self.path.clone(),
                key: key.clone(),
            });
        }
        let mut line = serde_json::to_string(row).expect("metrics rows serialize");
        line.push('\n');
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.flush().map_err(io)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Parses complete lines, yielding each row with the byte offset just past its line.
/// A last line without its newline is a write cut short: it is ignored.
fn parse_lines(path: &Path, text: &str) -> Result<Vec<(u64, MetricsRow)>, Error> {
    let mut rows = Vec::new();
    let mut offset = 0usize;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        offset += line.len();
        let Some(body) = line.strip_suffix('\n') else {
            break;
        };
        if body.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(body).map_err(|e| Error::BadRow {
            path: path.to_path_buf(),
            line: index + 1,
            message: e.to_string(),
        })?;
        rows.push((offset as u64, row));
    }
    Ok(rows)
}

/// Reads every complete row of a log.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRow>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_lines(path, &text)?
        .into_iter()
        .map(|(_, row)| row)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64) -> MetricsRow {
        MetricsRow {
            loss: Some(2.0 / (step + 1) as f64),
            lr: Some(1e-4),
            ..MetricsRow::new(step)
        }
    }

    #[test]
    fn writes_one_flushed_line_per_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        let full = MetricsRow {
            grad_norm: Some(0.5),
            tokens_per_s: Some(1234.5),
            memory_mb: Some(512.0),
            eval_loss: Some(f64::NAN),
            ..row(0)
        }
        .with("rewards/correctness", 1.5)
        .with("epoch", 0.25);
        log.append(&full).unwrap();
        // Readable before the log is dropped: each line is flushed.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"step\":0,\"loss\":2.0,\"lr\":0.0001,\"grad_norm\":0.5,\"tokens_per_s\":1234.5,\
             \"memory_mb\":512.0,\"eval_loss\":null,\"epoch\":0.25,\"rewards/correctness\":1.5}\n"
        );
        log.append(&row(1)).unwrap();
        let rows = read_metrics(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1], row(1));
        assert_eq!(rows[0].extra["rewards/correctness"], 1.5);
        assert_eq!(rows[0].eval_loss, None);
        let err = log
            .append(&MetricsRow::new(2).with("loss", 1.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`loss`"), "{err}");
    }

    #[test]
    fn resume_truncates_rows_past_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        for step in [0, 5, 10, 15] {
            log.append(&row(step)).unwrap();
        }
        drop(log);
        // A crash mid-write leaves a partial line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"step\":20,\"lo")
            .unwrap();
        let mut log = MetricsLog::resume(&path, 10).unwrap();
        log.append(&row(11)).unwrap();
        let steps: Vec<u64> = read_metrics(&path)
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(steps, [0, 5, 10, 11]);
        drop(log);
        MetricsLog::resume(&path, 100).unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 4);
        MetricsLog::resume(&path, 0).unwrap();
        assert_eq!(read_metrics(&path).unwrap(), [row(0)]);
        let fresh = dir.path().join("new.jsonl");
        MetricsLog::resume(&fresh, 3)
            .unwrap()
            .append(&row(4))
            .unwrap();
        assert_eq!(read_metrics(&fresh).unwrap(), [row(4)]);
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1}\nnot json\n{\"step\":3}\n").unwrap();
        let err = MetricsLog::resume(&path, 5).err().unwrap().to_string();
        assert!(err.contains("metrics.jsonl:2"), "{err}");
    }
}
