//! Readers from files to [`Table`]: CSV (any supported text encoding), JSON arrays, JSONL, Parquet.

use super::decode::{decode, TextEncoding};
use super::{DataError, Table};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Csv,
    Json,
    Jsonl,
    Parquet,
}

impl FileFormat {
    /// The format implied by a file's extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" | "tsv" => Some(Self::Csv),
            "json" => Some(Self::Json),
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            "parquet" | "pq" => Some(Self::Parquet),
            _ => None,
        }
    }
}

/// What to do with a CSV row whose field count differs from the header's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BadRows {
    #[default]
    Error,
    Skip,
}

/// One file read into a table, with what happened on the way.
#[derive(Debug)]
pub struct ReadReport {
    pub table: Table,
    pub encoding: &'static str,
    pub skipped_rows: Vec<usize>,
}

pub fn read_file(
    path: &Path,
    format: FileFormat,
    encoding: TextEncoding,
    bad_rows: BadRows,
    delimiter: u8,
) -> Result<ReadReport, DataError> {
    if format == FileFormat::Parquet {
        return Ok(ReadReport {
            table: Table::read_parquet(path)?,
            encoding: "binary",
            skipped_rows: Vec::new(),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_text_bytes(&bytes, path, format, encoding, bad_rows, delimiter)
}

/// [`read_file`] on the bytes of a text file (CSV, JSON, JSONL) already read from `path`, which
/// names the file in errors.
pub fn read_text_bytes(
    bytes: &[u8],
    path: &Path,
    format: FileFormat,
    encoding: TextEncoding,
    bad_rows: BadRows,
    delimiter: u8,
) -> Result<ReadReport, DataError> {
    let (text, used) = decode(bytes, encoding, path)?;
    let (table, skipped_rows) = match format {
        FileFormat::Csv => read_csv(&text, path, bad_rows, delimiter)?,
        FileFormat::Json => (read_json(&text, path)?, Vec::new()),
        FileFormat::Jsonl => (read_jsonl(&text, path)?, Vec::new()),
        FileFormat::Parquet => {
            return Err(DataError::InFile {
                path: path.to_path_buf(),
                message: "Parquet is binary; it is read from the file, not as text".into(),
            })
        }
    };
    Ok(ReadReport {
        table,
        encoding: used,
        skipped_rows,
    })
}

/// Parses RFC 4180 CSV (quoted commas and newlines, doubled quotes, CRLF). Lines are 1-based with
/// the header on line 1; an empty field is a null, as pandas reads it.
pub fn read_csv(
    text: &str,
    path: &Path,
    bad_rows: BadRows,
    delimiter: u8,
) -> Result<(Table, Vec<usize>), DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(true)
        .delimiter(delimiter)
        .from_reader(text.as_bytes());
    let csv_error = |e: csv::Error| {
        let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
        DataError::AtLine {
            path: path.to_path_buf(),
            line,
            message: e.to_string(),
        }
    };
    let header: Vec<String> = reader
        .headers()
        .map_err(csv_error)?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_string())
        .collect();
    if header.iter().all(String::is_empty) {
        return Err(DataError::InFile {
            path: path.to_path_buf(),
            message: "no header row".into(),
        });
    }
    let mut table = Table::new(header);
    let mut skipped = Vec::new();
    let mut record = csv::StringRecord::new();
    loop {
        let more = reader.read_record(&mut record).map_err(csv_error)?;
        if !more {
            break;
        }
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        if record.len() != table.columns.len() {
            match bad_rows {
                BadRows::Skip => {
                    skipped.push(line);
                    continue;
                }
                BadRows::Error => {
                    return Err(DataError::AtLine {
                        path: path.to_path_buf(),
                        line,
                        message: format!(
                            "expected {} fields as in the header, found {} (set `on_bad_rows = \"skip\"` to skip such rows)",
                            table.columns.len(),
                            record.len()
                        ),
                    })
                }
            }
        }
        table.rows.push(
            record
                .iter()
                .map(|f| (!f.is_empty()).then(|| f.to_string()))
                .collect(),
        );
    }
    Ok((table, skipped))
}

fn json_cell(value: serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

fn push_object(table: &mut Table, object: serde_json::Map<String, serde_json::Value>) {
    for key in object.keys() {
        if table.column_index(key).is_none() {
            table.columns.push(key.clone());
            for row in &mut table.rows {
                row.push(None);
            }
        }
    }
    let mut row = vec![None; table.columns.len()];
    for (key, value) in object {
        if let Some(i) = table.column_index(&key) {
            row[i] = json_cell(value);
        }
    }
    table.rows.push(row);
}

/// A JSON array of objects (Alpaca, s1), or JSON lines mistakenly named `.json` (AdvertiseGen).
pub fn read_json(text: &str, path: &Path) -> Result<Table, DataError> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('[') {
        return read_jsonl(text, path);
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| DataError::AtLine {
        path: path.to_path_buf(),
        line: e.line(),
        message: format!("invalid JSON: {e}"),
    })?;
    let mut table = Table::default();
    let items = match value {
        serde_json::Value::Array(items) => items,
        _ => unreachable!("checked for '['"),
    };
    for (i, item) in items.into_iter().enumerate() {
        match item {
            serde_json::Value::Object(o) => push_object(&mut table, o),
            other => {
                return Err(DataError::InFile {
                    path: path.to_path_buf(),
                    message: format!("item {i} of the array is {other}, expected an object"),
                })
            }
        }
    }
    Ok(table)
}

pub fn read_jsonl(text: &str, path: &Path) -> Result<Table, DataError> {
    let mut table = Table::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| DataError::AtLine {
                path: path.to_path_buf(),
                line: i + 1,
                message: format!("invalid JSON: {e}"),
            })?;
        match value {
            serde_json::Value::Object(o) => push_object(&mut table, o),
            _ => {
                return Err(DataError::AtLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: "expected a JSON object".into(),
                })
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting_crlf_and_nulls() {
        let text = "a,b,c\r\n1,\"x, y\",\"multi\r\nline \"\"q\"\"\"\r\n2,,z\r\n";
        let (t, skipped) = read_csv(text, Path::new("t.csv"), BadRows::Error, b',').unwrap();
        assert!(skipped.is_empty());
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0][1].as_deref(), Some("x, y"));
        assert_eq!(t.rows[0][2].as_deref(), Some("multi\r\nline \"q\""));
        assert_eq!(t.rows[1][1], None);
    }

    #[test]
    fn text_bytes_decode_then_parse() {
        let (gbk, _, _) = encoding_rs::GBK.encode("问题,回答\n高血压,多运动\n");
        let p = Path::new("g.csv");
        let r = read_text_bytes(
            &gbk,
            p,
            FileFormat::Csv,
            TextEncoding::Auto,
            BadRows::Error,
            b',',
        )
        .unwrap();
        assert_eq!(r.encoding, "gb18030");
        assert_eq!(r.table.columns, vec!["问题", "回答"]);
        assert_eq!(r.table.rows[0][1].as_deref(), Some("多运动"));
        let err = read_text_bytes(
            b"",
            p,
            FileFormat::Parquet,
            TextEncoding::Auto,
            BadRows::Error,
            b',',
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("g.csv: Parquet"), "{err}");
    }

    #[test]
    fn bad_row_names_its_line() {
        // The quoted newline spans lines 3-4, so the bad record is on line 5.
        let text = "a,b\n1,2\n\"x\ny\",3\n4,5,6\n7,8\n";
        let err = read_csv(text, Path::new("d.csv"), BadRows::Error, b',').unwrap_err();
        assert!(err.to_string().starts_with("d.csv:5:"), "{err}");
        let (t, skipped) = read_csv(text, Path::new("d.csv"), BadRows::Skip, b',').unwrap();
        assert_eq!(skipped, vec![5]);
        assert_eq!(t.rows.len(), 3);
    }

    #[test]
    fn jsonl_error_names_line() {
        let err = read_jsonl("{\"a\":1}\n{oops}\n", Path::new("x.jsonl")).unwrap_err();
        assert!(err.to_string().starts_with("x.jsonl:2:"), "{err}");
    }
}
