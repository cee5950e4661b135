//! Everything between raw text and token ids: HF tokenizer loading (`tokenizer`), chat templates
//! rendered like transformers' `apply_chat_template` (`chat_template`), prompt formats of the
//! `format` stage (`format`), response-only label masking, truncation and packing (`tokenize`),
//! and the `init:tiny` byte-level BPE trainer (`train`).
//!
//! References: transformers `tokenization_utils_base.py` / `utils/chat_template_utils.py`,
//! Stanford Alpaca `train.py`, LLaMA-Factory `data/processor/supervised.py`.

pub mod chat_template;
pub mod format;
pub mod stream;
pub mod suggest;
pub mod tokenize;
pub mod tokenizer;
pub mod train;

#[cfg(test)]
mod tests;

pub use chat_template::{ChatMessage, ChatTemplate, SpecialTokens};
pub use format::{format_row, PromptFormat, Record, Row};
pub use stream::IncrementalDecoder;
pub use tokenize::{
    pack_examples, tokenize_example, tokenize_pair, PackedSequence, TemplateKind, TokenizeOptions,
    TokenizedExample, IGNORE_INDEX,
};
pub use tokenizer::{TextTokenizer, TokenizerConfig};
pub use train::train_byte_level_bpe;

use std::path::PathBuf;

/// Errors of the `text` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: key `{key}`: expected {expected}, got {got}")]
    ConfigValue {
        path: PathBuf,
        key: String,
        expected: String,
        got: String,
    },
    #[error("{path}: cannot load tokenizer: {message}")]
    TokenizerLoad { path: PathBuf, message: String },
    #[error("tokenizer {op} failed: {message}")]
    Tokenizer { op: &'static str, message: String },
    #[error("special token `{token}` (key `{key}`) is not in the vocabulary")]
    UnknownSpecialToken { key: String, token: String },
    #[error("no chat template named `{name}` (available: {available:?})")]
    NoChatTemplate {
        name: String,
        available: Vec<String>,
    },
    #[error("chat template `{name}`: {message}")]
    Template { name: String, message: String },
    #[error("chat template output for the first {turns} message(s) is not a prefix of the output for the next message; cannot find the assistant span")]
    TemplateNotIncremental { turns: usize },
    #[error("the prompt renders differently with the chosen and the rejected response (the chat template reads the answer before it?); a pair needs one prompt")]
    PairPromptsDiffer,
    #[error("row has no column `{column}` needed by {format} format (columns: {available:?})")]
    MissingColumn {
        format: String,
        column: String,
        available: Vec<String>,
    },
    #[error("column `{column}`: {message}")]
    BadColumn { column: String, message: String },
    #[error("record for `{kind}` tokenization has no {what}")]
    MissingRecordField { kind: String, what: &'static str },
    #[error("max_seq_len must be at least 2, got {got}")]
    BadMaxSeqLen { got: usize },
    #[error("BPE training failed: {message}")]
    Train { message: String },
}

pub type Result<T> = std::result::Result<T, Error>;
