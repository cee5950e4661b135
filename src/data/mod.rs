//! Tabular data: decoding bytes, reading CSV/JSON/JSONL/Parquet into a [`Table`], and the row
//! operations of the ingest stage (column mapping, filters, dedup, splits).

pub mod decode;
pub mod ops;
pub mod readers;
pub mod table;

pub use decode::TextEncoding;
pub use table::Table;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    AtLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    InFile { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("parquet {path}: {message}")]
    Parquet { path: PathBuf, message: String },
}
