//! Where a recipe value came from, so every error can point at a file, line and column.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The origin of one recipe value: a place in a TOML file, or a `--set` override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File {
        file: PathBuf,
        line: usize,
        column: usize,
    },
    CommandLine(String),
    Unknown,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File { file, line, column } => {
                write!(f, "{}:{}:{}", file.display(), line, column)
            }
            Location::CommandLine(arg) => write!(f, "--set {arg}"),
            Location::Unknown => write!(f, "<recipe>"),
        }
    }
}

/// Dotted key path (`stages.raw.encoding`) to the place that set it.
#[derive(Debug, Clone, Default)]
pub struct SpanMap {
    entries: HashMap<String, Location>,
}

impl SpanMap {
    pub fn insert(&mut self, path: String, location: Location) {
        self.entries.insert(path, location);
    }

    /// The location of `path`, or of its nearest recorded ancestor.
    pub fn locate(&self, path: &str) -> Location {
        let mut key = path;
        loop {
            if let Some(loc) = self.entries.get(key) {
                return loc.clone();
            }
            match key.rfind('.') {
                Some(i) => key = &key[..i],
                None => return Location::Unknown,
            }
        }
    }

    /// Records the key and value spans of every entry in a parsed TOML document.
    pub fn record_document(&mut self, file: &Path, text: &str, doc: &toml_edit::Document<String>) {
        let index = LineIndex::new(text);
        record_table(self, file, &index, "", doc.as_table());
    }

    pub fn extend(&mut self, other: SpanMap) {
        self.entries.extend(other.entries);
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn record_table(
    spans: &mut SpanMap,
    file: &Path,
    index: &LineIndex,
    prefix: &str,
    table: &toml_edit::Table,
) {
    for (key, item) in table.iter() {
        let path = join(prefix, key);
        let span = table
            .key(key)
            .and_then(|k| k.span())
            .or_else(|| item.span());
        if let Some(span) = span {
            let (line, column) = index.position(span.start);
            spans.insert(
                path.clone(),
                Location::File {
                    file: file.to_path_buf(),
                    line,
                    column,
                },
            );
        }
        record_item(spans, file, index, &path, item);
    }
}

fn record_item(
    spans: &mut SpanMap,
    file: &Path,
    index: &LineIndex,
    path: &str,
    item: &toml_edit::Item,
) {
    match item {
        toml_edit::Item::Table(t) => record_table(spans, file, index, path, t),
        toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
            for (key, value) in t.iter() {
                let child = join(path, key);
                let span = t.key(key).and_then(|k| k.span()).or_else(|| value.span());
                if let Some(span) = span {
                    let (line, column) = index.position(span.start);
                    spans.insert(
                        child.clone(),
                        Location::File {
                            file: file.to_path_buf(),
                            line,
                            column,
                        },
                    );
                }
                if let toml_edit::Value::InlineTable(_) = value {
                    record_item(
                        spans,
                        file,
                        index,
                        &child,
                        &toml_edit::Item::Value(value.clone()),
                    );
                }
            }
        }
        _ => {}
    }
}

/// Byte offset to 1-based line and column (columns count characters).
struct LineIndex<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { text, line_starts }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = self.line_starts[line];
        let end = offset.min(self.text.len());
        let column = self
            .text
            .get(start..end)
            .map_or(1, |s| s.chars().count() + 1);
        (line + 1, column)
    }
}
