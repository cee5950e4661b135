//! `tokenize`: prompt/response records to token ids and labels with the model's tokenizer.
//!
//! Labels are -100 on prompt tokens (response-only loss) unless `train_on_prompt`; Alpaca-style
//! records get EOS appended; chat records are rendered with the model's own chat template.
//! Output: `<split>.jsonl` (one `{"input_ids", "labels"}` per line) and `tokens.json` with counts
//! and the tokenizer's fingerprint.

use super::artifact::{
    read_records_with_preferences, DatasetManifest, PreferenceColumns, TokenRow,
};
use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::text::format::Record;
use crate::text::{
    pack_examples, tokenize_example, tokenize_pair, TemplateKind, TextTokenizer, TokenizeOptions,
};
use serde::{Deserialize, Serialize};
use std::io::Write;

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
        let model_dir = super::artifact::model_folder(model.kind, &model.dir)?;
        let tokenizer = TextTokenizer::from_dir(&model_dir).map_err(StageError::wrap)?;
        let manifest = DatasetManifest::read(&input.dir)?;
        let chat = match params.template.as_str() {
            "chat" => true,
            "plain" => false,
            _ => manifest.is_chat(),
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
        let splits = super::artifact::input_splits(input)?;
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
        crate::stages::artifact::write_json(
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
    use crate::stages::artifact::encode_generation_prompt;
    use std::path::Path;

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
