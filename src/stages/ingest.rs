//! `ingest`: reads CSV/JSON/JSONL/Parquet files into a dataset artifact (Parquet per split).
//!
//! Output: `train.parquet` (and `test.parquet` with a split) plus `dataset.json` with the schema,
//! row counts and what happened to each source file.

use super::artifact::{DatasetManifest, SplitFile};
use super::{ArtifactKind, Stage, StageContext, StageError};
use crate::data::ops::{self, Filter, SplitSpec};
use crate::data::readers::{self, BadRows, FileFormat};
use crate::data::{Table, TextEncoding};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct Ingest;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// A file, a folder or a glob, relative to the recipe file.
    pub path: String,
    #[serde(default)]
    pub encoding: TextEncoding,
    /// From the file extension when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
    /// `new = "old"` renames; the other columns stay.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    #[serde(default)]
    pub dropna: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<Dedup>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitSpec>,
    #[serde(default)]
    pub on_bad_rows: BadRows,
    /// CSV field separator (one character, or `"\\t"`); a tab for `.tsv` files and a comma for
    /// the others when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delimiter: Option<String>,
    /// Add a `source_file` column naming the file each row came from.
    #[serde(default = "yes")]
    pub source_column: bool,
    /// Keep at most this many rows (after filters and dedup, before the split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

fn yes() -> bool {
    true
}

/// `dedup = true` (all columns), `false`, or a list of columns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Dedup {
    All(bool),
    Columns(Vec<String>),
}

impl Params {
    /// The field separator of `file`: `delimiter` when set, else by the file's extension.
    fn delimiter_for(&self, file: &Path) -> Result<u8, String> {
        let Some(delimiter) = &self.delimiter else {
            let tsv = file
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
            return Ok(if tsv { b'\t' } else { b',' });
        };
        match delimiter.as_bytes() {
            [b] => Ok(*b),
            _ if delimiter == "\\t" => Ok(b'\t'),
            _ => Err(format!(
                "`delimiter` must be one ASCII character, got {delimiter:?}"
            )),
        }
    }
}

/// Expands `pattern` (file, folder or glob), sorted for determinism. A relative pattern is looked
/// up next to the recipe file first, then in the current folder.
pub fn resolve_paths(pattern: &str, base: &Path) -> Result<Vec<PathBuf>, StageError> {
    if Path::new(pattern).is_absolute() {
        return expand(Path::new(pattern), pattern)?
            .ok_or_else(|| no_match(pattern, &[PathBuf::from(pattern)]));
    }
    let candidates = [base.join(pattern), PathBuf::from(pattern)];
    for full in &candidates {
        if let Some(files) = expand(full, pattern)? {
            return Ok(files);
        }
    }
    Err(no_match(pattern, &candidates))
}

fn no_match(pattern: &str, tried: &[PathBuf]) -> StageError {
    StageError::msg(format!(
        "`path = {pattern:?}` matches no data file (tried {})",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    ))
}

fn expand(full: &Path, pattern: &str) -> Result<Option<Vec<PathBuf>>, StageError> {
    let mut files: Vec<PathBuf> = if full.is_dir() {
        std::fs::read_dir(full)
            .map_err(|e| StageError::io(full, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && FileFormat::from_path(p).is_some())
            .collect()
    } else if full.is_file() {
        vec![full.to_path_buf()]
    } else {
        glob::glob(&full.to_string_lossy())
            .map_err(|e| StageError::msg(format!("`path = {pattern:?}` is not a valid glob: {e}")))?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect()
    };
    files.sort();
    Ok((!files.is_empty()).then_some(files))
}

impl Stage for Ingest {
    type Params = Params;
    const KIND: &'static str = "ingest";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Dataset;
    const SUMMARY: &'static str = "read CSV/JSON/JSONL/Parquet files into Parquet splits";

    fn named_outputs(params: &Params) -> Vec<String> {
        match params.split {
            Some(_) => vec!["train".into(), "test".into()],
            None => vec!["train".into()],
        }
    }

    fn external_files(params: &Params, recipe_dir: &Path) -> Result<Vec<PathBuf>, StageError> {
        resolve_paths(&params.path, recipe_dir)
    }

    fn validate(params: &Params) -> Result<(), (String, String)> {
        params
            .delimiter_for(Path::new(""))
            .map_err(|m| ("delimiter".to_string(), m))?;
        if let Some(split) = &params.split {
            split.validate().map_err(|m| ("split".to_string(), m))?;
        }
        Ok(())
    }

    fn run(params: &Params, ctx: &StageContext) -> Result<(), StageError> {
        let files = resolve_paths(&params.path, &ctx.recipe_dir)?;
        let bar = ctx.progress_bar(files.len() as u64, "files");
        let mut table = Table::default();
        let mut sources = Vec::new();
        for file in &files {
            let format = params
                .format
                .or_else(|| FileFormat::from_path(file))
                .ok_or_else(|| {
                    StageError::msg(format!(
                        "{}: cannot tell the format from the extension; set `format`",
                        file.display()
                    ))
                })?;
            let delimiter = params.delimiter_for(file).map_err(StageError::msg)?;
            let report =
                readers::read_file(file, format, params.encoding, params.on_bad_rows, delimiter)
                    .map_err(StageError::wrap)?;
            let mut part = report.table;
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if params.source_column && part.column_index("source_file").is_none() {
                part.columns.push("source_file".into());
                for row in &mut part.rows {
                    row.push(Some(name.clone()));
                }
            }
            if !report.skipped_rows.is_empty() {
                tracing::warn!(
                    file = %file.display(),
                    skipped = report.skipped_rows.len(),
                    "skipped rows with the wrong number of fields"
                );
            }
            sources.push(serde_json::json!({
                "file": name,
                "encoding": report.encoding,
                "rows": part.len(),
                "skipped_rows": report.skipped_rows,
            }));
            table.append(part);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let rows_read = table.len();
        ops::rename_columns(&mut table, &params.columns).map_err(StageError::wrap)?;
        let dropna: Vec<usize> = params
            .dropna
            .iter()
            .map(|c| ops::resolve_column(&table, c, &params.columns, "dropna"))
            .collect::<Result<_, _>>()
            .map_err(StageError::wrap)?;
        let dropped_missing = ops::drop_missing(&mut table, &dropna);
        let mut filtered = 0;
        for filter in &params.filters {
            let col = ops::resolve_column(&table, &filter.column, &params.columns, "filters")
                .map_err(StageError::wrap)?;
            filtered += ops::apply_filter(&mut table, col, filter).map_err(StageError::wrap)?;
        }
        let dedup_columns: Vec<usize> = match &params.dedup {
            Some(Dedup::All(true)) => (0..table.columns.len())
                .filter(|&i| table.columns[i] != "source_file")
                .collect(),
            Some(Dedup::All(false)) | None => Vec::new(),
            Some(Dedup::Columns(cols)) => cols
                .iter()
                .map(|c| ops::resolve_column(&table, c, &params.columns, "dedup"))
                .collect::<Result<_, _>>()
                .map_err(StageError::wrap)?,
        };
        let duplicates = if dedup_columns.is_empty() {
            0
        } else {
            ops::dedup(&mut table, &dedup_columns)
        };
        if let Some(limit) = params.limit {
            table.rows.truncate(limit);
        }

        let mut splits = BTreeMap::new();
        let columns = table.columns.clone();
        let parts = match &params.split {
            Some(spec) => {
                let (train, test) = ops::split(table, spec, ctx.seed);
                vec![("train", train), ("test", test)]
            }
            None => vec![("train", table)],
        };
        for (name, part) in &parts {
            let file = format!("{name}.parquet");
            part.write_parquet(&ctx.out(&file))
                .map_err(StageError::wrap)?;
            splits.insert(
                name.to_string(),
                SplitFile {
                    file,
                    rows: part.len(),
                },
            );
        }
        let manifest = DatasetManifest {
            columns,
            dropped_missing: Some(dropped_missing),
            duplicates: Some(duplicates),
            filtered: Some(filtered),
            rows_read: Some(rows_read),
            sources: Some(sources),
            splits,
            template: None,
        };
        manifest.write(&ctx.out_dir)?;
        tracing::info!(rows_read, dropped_missing, duplicates, "ingested");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(toml_text: &str) -> Params {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn tsv_files_are_split_at_tabs_unless_a_delimiter_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let tsv = dir.path().join("qa.tsv");
        std::fs::write(&tsv, "question\tanswer\nwhy, then?\tbecause, so\n").unwrap();
        let read = |p: &Params| {
            let delimiter = p.delimiter_for(&tsv).unwrap();
            let format = FileFormat::from_path(&tsv).unwrap();
            readers::read_file(&tsv, format, p.encoding, p.on_bad_rows, delimiter)
                .unwrap()
                .table
        };
        let table = read(&params(r#"path = "qa.tsv""#));
        assert_eq!(table.columns, ["question", "answer"]);
        assert_eq!(table.rows[0][1].as_deref(), Some("because, so"));
        // A CSV keeps its comma; a set delimiter wins over the extension.
        let csv = params(r#"path = "x""#);
        assert_eq!(csv.delimiter_for(Path::new("a.csv")), Ok(b','));
        assert_eq!(csv.delimiter_for(Path::new("a.TSV")), Ok(b'\t'));
        let semicolon = params("path = \"x\"\ndelimiter = \";\"");
        assert_eq!(semicolon.delimiter_for(&tsv), Ok(b';'));
        let tab = params("path = \"x\"\ndelimiter = '\\t'");
        assert_eq!(tab.delimiter_for(Path::new("a.csv")), Ok(b'\t'));
        let bad = params("path = \"x\"\ndelimiter = \";;\"");
        assert!(bad
            .delimiter_for(&tsv)
            .unwrap_err()
            .contains("one ASCII character"));
    }
}
