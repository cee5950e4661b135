//! predictions.jsonl: one JSON object per line, `{"prompt", "prediction", "reference"}`, written by
//! the evaluate stage and read by `runner score` (which may name other fields). Blank lines are
//! skipped; any other line must be a JSON object holding the requested string fields.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use crate::metrics::Error;

/// One generated sample.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PredictionRow {
    pub prompt: String,
    pub prediction: String,
    pub reference: String,
}

/// Writes `rows` as JSON lines (UTF-8, not ASCII-escaped).
pub fn write_predictions(path: &Path, rows: &[PredictionRow]) -> Result<(), Error> {
    let io_error = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(path).map_err(io_error)?;
    let mut out = BufWriter::new(file);
    for row in rows {
        let line = serde_json::to_string(row).expect("a struct of strings always serializes");
        writeln!(out, "{line}").map_err(io_error)?;
    }
    out.flush().map_err(io_error)
}

/// Reads predictions.jsonl rows with the standard field names.
pub fn read_predictions(path: &Path) -> Result<Vec<PredictionRow>, Error> {
    read_fields(path, &["prompt", "prediction", "reference"])?
        .into_iter()
        .map(|mut fields| {
            let reference = fields.pop().unwrap_or_default();
            let prediction = fields.pop().unwrap_or_default();
            let prompt = fields.pop().unwrap_or_default();
            Ok(PredictionRow {
                prompt,
                prediction,
                reference,
            })
        })
        .collect()
}

/// (prediction, reference) pairs from the named fields of every row.
pub fn read_pairs(
    path: &Path,
    prediction_field: &str,
    reference_field: &str,
) -> Result<Vec<(String, String)>, Error> {
    Ok(read_fields(path, &[prediction_field, reference_field])?
        .into_iter()
        .map(|mut fields| {
            let reference = fields.pop().unwrap_or_default();
            let prediction = fields.pop().unwrap_or_default();
            (prediction, reference)
        })
        .collect())
}

/// The values of `keys` (in order) for each non-blank line.
fn read_fields(path: &Path, keys: &[&str]) -> Result<Vec<Vec<String>>, Error> {
    let io_error = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let mut rows = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_error)?;
        if line.trim().is_empty() {
            continue;
        }
        let line_number = index + 1;
        let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            line: line_number,
            message: e.to_string(),
        })?;
        let fields = keys
            .iter()
            .map(|key| {
                value
                    .get(key)
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| Error::MissingField {
                        path: path.to_path_buf(),
                        line: line_number,
                        key: key.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        rows.push(fields);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.jsonl");
        let rows = vec![
            PredictionRow {
                prompt: "类型#裙".into(),
                prediction: "一条\"裙子\"\n".into(),
                reference: "裙子".into(),
            },
            PredictionRow {
                prompt: String::new(),
                prediction: String::new(),
                reference: "x".into(),
            },
        ];
        write_predictions(&path, &rows).unwrap();
        assert_eq!(read_predictions(&path).unwrap(), rows);
        assert_eq!(
            read_pairs(&path, "prediction", "reference").unwrap()[0],
            ("一条\"裙子\"\n".to_string(), "裙子".to_string())
        );

        std::fs::write(
            &path,
            "{\"prediction\": \"a\", \"reference\": \"b\"}\n\n{\"prediction\": \"a\"}\n",
        )
        .unwrap();
        let err = read_pairs(&path, "prediction", "reference")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("predictions.jsonl:3") && err.contains("\"reference\""),
            "{err}"
        );

        std::fs::write(
            &path,
            "{\"prediction\": \"a\", \"reference\": \"b\"}\nnot json\n",
        )
        .unwrap();
        let err = read_pairs(&path, "prediction", "reference")
            .unwrap_err()
            .to_string();
        assert!(err.contains("predictions.jsonl:2: not valid JSON"), "{err}");

        std::fs::write(&path, "{\"prediction\": 3, \"reference\": \"b\"}\n").unwrap();
        let err = read_pairs(&path, "prediction", "reference")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":1: missing string field \"prediction\""),
            "{err}"
        );
    }
}
