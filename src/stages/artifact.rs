//! What stages read from and write into artifacts, typed, so that no stage imports another for
//! a helper: JSON files, the manifest of a data set (`dataset.json`) that `ingest` and `format`
//! write, the model folder of a model or trained artifact, the token rows of a `tokenize`
//! artifact, the prompt records of a `format` artifact and the generation prompt a record
//! encodes to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::Table;
use crate::stages::{ArtifactKind, StageError, StageInput};
use crate::text::format::Record;
use crate::text::{ChatMessage, ChatTemplate, TextTokenizer};

/// Writes `value` as pretty JSON with a final newline.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| StageError::Json {
        path: path.to_path_buf(),
        key: String::new(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|e| StageError::io(path, e))
}

/// Reads a JSON file as `T`; errors name the file and the key at fault.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let key = e.path().to_string();
        StageError::Json {
            path: path.to_path_buf(),
            key: if key == "." { String::new() } else { key },
            source: e.into_inner(),
        }
    })
}

/// The splits of a data-set input to read: the named output (`raw.test`), else every split in
/// its `dataset.json`.
pub fn input_splits(input: &StageInput) -> Result<Vec<String>, StageError> {
    if let Some(o) = &input.output {
        return Ok(vec![o.clone()]);
    }
    Ok(DatasetManifest::read(&input.dir)?
        .splits
        .into_keys()
        .collect())
}

/// One split of a data set: its Parquet file (relative to the artifact) and its row count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitFile {
    pub file: String,
    pub rows: usize,
}

/// `dataset.json`: the columns and splits of a data-set artifact, with what `ingest` counted
/// and, after `format`, the prompt template. The fields are in the order the files were written
/// in before this type existed, so their bytes stay the same.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub columns: Vec<String>,
    pub splits: BTreeMap<String, SplitFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_read: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_missing: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filtered: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<usize>,
    /// The files read, with their encodings and row counts (ingest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<serde_json::Value>>,
    /// The prompt format (`alpaca`, `chat`, ...), after `format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

impl DatasetManifest {
    pub const FILE: &'static str = "dataset.json";

    pub fn read(dir: &Path) -> Result<Self, StageError> {
        read_json(&dir.join(Self::FILE))
    }

    pub fn write(&self, dir: &Path) -> Result<(), StageError> {
        write_json(&dir.join(Self::FILE), self)
    }

    /// The Parquet file of `split`, relative to the artifact.
    pub fn split_file(&self, split: &str) -> String {
        self.splits
            .get(split)
            .map(|s| s.file.clone())
            .unwrap_or_else(|| format!("{split}.parquet"))
    }

    /// Whether the prompts were formatted with the model's chat template.
    pub fn is_chat(&self) -> bool {
        self.template.as_deref() == Some("chat")
    }
}

/// The HF folder to generate with: a base model, or what a training stage produced.
pub fn model_folder(kind: ArtifactKind, dir: &Path) -> Result<PathBuf, StageError> {
    if kind == ArtifactKind::Model {
        return Ok(dir.to_path_buf());
    }
    for sub in ["merged", "model"] {
        if dir.join(sub).join("config.json").is_file() {
            return Ok(dir.join(sub));
        }
    }
    Err(StageError::msg(format!(
        "{}: the trained artifact has no merged model (prompt-learning adapters cannot be merged; \
         export them with format = \"peft\")",
        dir.display()
    )))
}

/// One tokenized example as stored in the artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRow {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Preference pairs: the same prompt with the rejected response (`input_ids` holds the
    /// chosen one, so SFT on pair data trains on the chosen responses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_input_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_labels: Option<Vec<i64>>,
    /// KTO: whether the response is desirable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<bool>,
}

impl TokenRow {
    pub(crate) fn plain(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        Self {
            input_ids,
            labels,
            rejected_input_ids: None,
            rejected_labels: None,
            label: None,
        }
    }
}

/// A record's rejected response and KTO label.
pub type PreferenceColumns = (Option<String>, Option<bool>);

/// Reads `<dir>/<split>.jsonl` written by this stage.
pub fn read_tokens(dir: &Path, split: &str) -> Result<Vec<TokenRow>, StageError> {
    let path = dir.join(format!("{split}.jsonl"));
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| StageError::io(&path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| StageError::msg(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// Prompt records of one split of a `format` artifact.
pub fn read_records(dir: &Path, split: &str) -> Result<Vec<Record>, StageError> {
    Ok(read_records_with_preferences(dir, split)?
        .into_iter()
        .map(|(record, _)| record)
        .collect())
}

/// [`read_records`] with each record's preference columns: its rejected response and KTO label,
/// where the artifact has those columns.
pub fn read_records_with_preferences(
    dir: &Path,
    split: &str,
) -> Result<Vec<(Record, PreferenceColumns)>, StageError> {
    let table =
        Table::read_parquet(&dir.join(format!("{split}.parquet"))).map_err(StageError::wrap)?;
    table
        .rows
        .iter()
        .map(|row| {
            let messages = match table.get(row, "messages") {
                Some(m) => Some(
                    serde_json::from_str::<Vec<ChatMessage>>(m)
                        .map_err(|e| StageError::msg(format!("messages column: {e}")))?,
                ),
                None => None,
            };
            let record = Record {
                prompt: table.get(row, "prompt").unwrap_or("").to_string(),
                response: table.get(row, "response").unwrap_or("").to_string(),
                system: table.get(row, "system").map(str::to_string),
                messages,
            };
            let preference = (
                table.get(row, "rejected").map(str::to_string),
                table.get(row, "label").map(|l| l == "true"),
            );
            Ok((record, preference))
        })
        .collect()
}

/// Token ids of the prompt a model generates from for `record`: with a chat template, the
/// record's system message and user turn followed by the generation prompt; without one, the
/// prompt text (chat records: system message, blank line, prompt; Alpaca records already hold
/// their system text). `response_prefix` is appended: text the answer is made to start with
/// (e.g. "<reasoning>\n"), which callers count as the first part of the completion.
pub fn encode_generation_prompt(
    tokenizer: &TextTokenizer,
    template: Option<&ChatTemplate>,
    record: &Record,
    response_prefix: &str,
) -> Result<Vec<u32>, StageError> {
    match template {
        Some(t) => {
            let mut messages = Vec::new();
            if let Some(s) = &record.system {
                messages.push(ChatMessage::new("system", s));
            }
            messages.push(ChatMessage::new("user", &record.prompt));
            let text = t.render(&messages, true).map_err(StageError::wrap)?;
            tokenizer
                .encode_plain(&format!("{text}{response_prefix}"))
                .map_err(StageError::wrap)
        }
        None => {
            let text = match (&record.system, &record.messages) {
                (Some(s), Some(_)) => format!("{s}\n\n{}", record.prompt),
                _ => record.prompt.clone(),
            };
            tokenizer
                .encode(&format!("{text}{response_prefix}"))
                .map_err(StageError::wrap)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_keep_the_bytes_written_before_the_type() {
        let written = serde_json::json!({
            "columns": ["prompt", "response"],
            "splits": {"train": {"file": "train.parquet", "rows": 3}},
            "template": "chat",
        });
        let text = serde_json::to_string_pretty(&written).unwrap();
        let manifest: DatasetManifest = serde_json::from_str(&text).unwrap();
        assert!(manifest.is_chat());
        assert_eq!(manifest.split_file("train"), "train.parquet");
        assert_eq!(manifest.split_file("test"), "test.parquet");
        assert_eq!(serde_json::to_string_pretty(&manifest).unwrap(), text);
        let ingested = serde_json::json!({
            "columns": ["q", "a"],
            "splits": {"test": {"file": "test.parquet", "rows": 1}, "train": {"file": "train.parquet", "rows": 9}},
            "rows_read": 12,
            "dropped_missing": 1,
            "filtered": 0,
            "duplicates": 1,
            "sources": [{"file": "x.csv", "encoding": "GBK", "rows": 12, "skipped_rows": []}],
        });
        let text = serde_json::to_string_pretty(&ingested).unwrap();
        let manifest: DatasetManifest = serde_json::from_str(&text).unwrap();
        assert!(!manifest.is_chat());
        assert_eq!(serde_json::to_string_pretty(&manifest).unwrap(), text);
    }

    #[test]
    fn a_manifest_that_is_not_one_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dataset.json"), "{\"splits\": 3}").unwrap();
        let err = DatasetManifest::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("dataset.json"), "{err}");
        assert!(err.contains("`splits`: invalid type"), "{err}");
    }
}
