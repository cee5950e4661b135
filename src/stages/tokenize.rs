//! `tokenize`: prompt/response records to token ids and labels with the model's tokenizer.
//!
//! Labels are -100 on prompt tokens (response-only loss) unless `train_on_prompt`; Alpaca-style
//! records get EOS appended; chat records are rendered with the model's own chat template.
//! Output: `<split>.jsonl` (one `{"input_ids", "labels"}` per line) and `tokens.json` with counts
//! and the tokenizer's fingerprint.

use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::data::Table;
use crate::text::format::Record;
use crate::text::{
    pack_examples, tokenize_example, tokenize_pair, ChatMessage, ChatTemplate, TemplateKind,
    TextTokenizer, TokenizeOptions,
};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

pub struct Tokenize;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Tokens per example at most (TRL's `max_length` is accepted as an alias).
    #[serde(default = "default_max_seq_len", alias = "max_length")]
    pub max_seq_len: usize,
    /// Preference pairs: prompt tokens kept at most (the last ones), before `max_seq_len`
    /// shares the rest between prompt and responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prompt_length: Option<usize>,
    /// Keep the loss on prompt tokens too.
    #[serde(default)]
    pub train_on_prompt: bool,
    /// Append EOS after each response (Alpaca + EOS).
    #[serde(default = "yes")]
    pub add_eos: bool,
    /// Pack several examples into sequences of `max_seq_len` (first-fit; attention is not masked
    /// between packed examples).
    #[serde(default)]
    pub packing: bool,
    /// `auto` renders chat records with the chat template and the rest as plain text.
    #[serde(default = "default_template")]
    pub template: String,
}

fn default_max_seq_len() -> usize {
    1024
}
fn yes() -> bool {
    true
}
fn default_template() -> String {
    "auto".into()
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
    fn plain(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
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

impl Stage for Tokenize {
    type Params = Params;
    const KIND: &'static str = "tokenize";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Tokens;
    const SUMMARY: &'static str = "tokenize prompt/response records with response-only labels";

    fn input_slots() -> &'static [InputSlot] {
        const SLOTS: &[InputSlot] = &[
            InputSlot::one("input", &[ArtifactKind::Prompts]),
            InputSlot::one("model", &[ArtifactKind::Model, ArtifactKind::Trained]),
        ];
        SLOTS
    }

    fn named_outputs(_params: &Params) -> Vec<String> {
        vec!["train".into(), "test".into()]
    }

    fn validate(params: &Params) -> Result<(), (String, String)> {
        if params.max_seq_len < 2 {
            return Err(("max_seq_len".into(), "must be at least 2".into()));
        }
        if !["auto", "plain", "chat"].contains(&params.template.as_str()) {
            return Err(("template".into(), "one of auto, plain, chat".into()));
        }
        Ok(())
    }

    fn run(params: &Params, ctx: &StageContext) -> Result<(), StageError> {
        let input = ctx.input("input")?;
        let model = ctx.input("model")?;
        // A trained stage's merged or full model continues from where it ended (SFT, then GRPO).
        let model_dir = super::evaluate::model_folder(model.kind, &model.dir)?;
        let tokenizer = TextTokenizer::from_dir(&model_dir).map_err(StageError::wrap)?;
        let manifest: serde_json::Value = crate::util::read_json(&input.dir.join("dataset.json"))?;
        let chat = match params.template.as_str() {
            "chat" => true,
            "plain" => false,
            _ => manifest["template"].as_str() == Some("chat"),
        };
        let template = if chat {
            Some(tokenizer.chat_template(None).map_err(|e| {
                StageError::msg(format!(
                    "the model's tokenizer has no chat template for a chat dataset: {e}"
                ))
            })?)
        } else {
            None
        };
        let opts = TokenizeOptions {
            max_seq_len: params.max_seq_len,
            train_on_prompt: params.train_on_prompt,
            add_eos: params.add_eos,
        };
        let splits = input.splits()?;
        let mut summary = serde_json::Map::new();
        for split in &splits {
            let (records, preference): (Vec<Record>, Vec<PreferenceColumns>) =
                read_records_with_preferences(&input.dir, split)?
                    .into_iter()
                    .unzip();
            let kind = match &template {
                Some(t) => TemplateKind::Chat(t),
                None => TemplateKind::Plain,
            };
            let paired = preference.iter().any(|(rejected, _)| rejected.is_some());
            if paired && params.packing {
                return Err(StageError::msg(
                    "packing = true does not apply to preference pairs (each pair is one row)",
                ));
            }
            let bar = ctx.progress_bar(records.len() as u64, &format!("{split} examples"));
            let rows: Vec<TokenRow> = if paired {
                let mut rows = Vec::with_capacity(records.len());
                for (i, (record, (rejected, label))) in records.iter().zip(&preference).enumerate()
                {
                    let located =
                        |m: String| StageError::msg(format!("{split} record {}: {m}", i + 1));
                    let rejected = rejected
                        .as_deref()
                        .ok_or_else(|| located("no rejected response".into()))?;
                    let (chosen, rejected) = tokenize_pair(
                        &tokenizer,
                        kind,
                        record,
                        rejected,
                        &opts,
                        params.max_prompt_length,
                    )
                    .map_err(|e| located(e.to_string()))?;
                    bar.inc(1);
                    let scored = |e: &crate::text::TokenizedExample| {
                        e.labels.iter().any(|&l| l != crate::text::IGNORE_INDEX)
                    };
                    if !scored(&chosen) || !scored(&rejected) {
                        continue; // the prompt took the whole budget
                    }
                    rows.push(TokenRow {
                        input_ids: chosen.input_ids,
                        labels: chosen.labels,
                        rejected_input_ids: Some(rejected.input_ids),
                        rejected_labels: Some(rejected.labels),
                        label: *label,
                    });
                }
                rows
            } else {
                let mut examples = Vec::with_capacity(records.len());
                for (i, record) in records.iter().enumerate() {
                    let ex = tokenize_example(&tokenizer, kind, record, &opts)
                        .map_err(|e| StageError::msg(format!("{split} record {}: {e}", i + 1)))?;
                    examples.push(ex);
                    bar.inc(1);
                }
                if params.packing {
                    pack_examples(&examples, params.max_seq_len)
                        .into_iter()
                        .map(|p| TokenRow::plain(p.input_ids, p.labels))
                        .collect()
                } else {
                    examples
                        .into_iter()
                        .zip(&preference)
                        .filter(|(e, _)| e.labels.iter().any(|&l| l != crate::text::IGNORE_INDEX))
                        .map(|(e, (_, label))| TokenRow {
                            label: *label,
                            ..TokenRow::plain(e.input_ids, e.labels)
                        })
                        .collect()
                }
            };
            bar.finish_and_clear();
            let path = ctx.out(&format!("{split}.jsonl"));
            let mut file = std::io::BufWriter::new(
                std::fs::File::create(&path).map_err(|e| StageError::io(&path, e))?,
            );
            let mut tokens = 0usize;
            let mut trained = 0usize;
            for row in &rows {
                tokens += row.input_ids.len();
                trained += row
                    .labels
                    .iter()
                    .filter(|&&l| l != crate::text::IGNORE_INDEX)
                    .count();
                let line = serde_json::to_string(row).map_err(StageError::wrap)?;
                writeln!(file, "{line}").map_err(|e| StageError::io(&path, e))?;
            }
            file.flush().map_err(|e| StageError::io(&path, e))?;
            summary.insert(
                split.clone(),
                serde_json::json!({ "file": format!("{split}.jsonl"), "rows": rows.len(), "tokens": tokens, "label_tokens": trained }),
            );
        }
        crate::util::write_json(
            &ctx.out("tokens.json"),
            &serde_json::json!({
                "splits": summary,
                "tokenizer_fingerprint": tokenizer.fingerprint(),
                "max_seq_len": params.max_seq_len,
                "max_prompt_length": params.max_prompt_length,
                "chat_template": chat,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_tokenizer() -> TextTokenizer {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/text/tiny_tokenizer"
        );
        TextTokenizer::from_dir(Path::new(dir)).unwrap()
    }

    fn chat_record() -> Record {
        Record {
            prompt: "2+2?".into(),
            response: "#### 4".into(),
            system: Some("Answer in tags.".into()),
            messages: Some(vec![]),
        }
    }

    #[test]
    fn generation_prompt_ends_with_the_response_prefix() {
        let tok = tiny_tokenizer();
        let template = tok.chat_template(None).unwrap();
        let ids = encode_generation_prompt(&tok, Some(&template), &chat_record(), "<reasoning>\n")
            .unwrap();
        let want = "<|im_start|>system\nAnswer in tags.<|im_end|>\n<|im_start|>user\n2+2?\
                    <|im_end|>\n<|im_start|>assistant\n<reasoning>\n";
        assert_eq!(tok.decode(&ids, false).unwrap(), want);
        let plain = encode_generation_prompt(&tok, Some(&template), &chat_record(), "").unwrap();
        assert_eq!(
            tok.decode(&plain, false).unwrap(),
            want.trim_end_matches("<reasoning>\n")
        );
    }

    #[test]
    fn without_a_template_chat_records_keep_their_system_text() {
        let tok = tiny_tokenizer();
        let ids = encode_generation_prompt(&tok, None, &chat_record(), "A:").unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "Answer in tags.\n\n2+2?A:");
        // Alpaca records carry the system text inside the prompt already.
        let alpaca = Record {
            messages: None,
            ..chat_record()
        };
        let ids = encode_generation_prompt(&tok, None, &alpaca, "").unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "2+2?");
    }
}
