//! `format`: rows to prompt/response records (Alpaca, ChatGLM AdvertiseGen, chat, custom).
//!
//! Output: `<split>.parquet` per input split with columns `prompt`, `response`, `system` and
//! `messages` (a JSON list for chat records, rendered later with the model's own chat template),
//! for preference data also `rejected` (the rejected response) and `label` (KTO's desirable
//! flag), plus `dataset.json` naming the format and its columns.

use super::artifact::{DatasetManifest, SplitFile};
use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::data::Table;
use crate::text::format::{
    format_row, PromptFormat, Row, ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub struct Format;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Template {
    Alpaca,
    Chatglm,
    Chat,
    Custom,
}

impl Template {
    /// The name as recipes write it (and `dataset.json` records it).
    pub fn name(self) -> &'static str {
        match self {
            Template::Alpaca => "alpaca",
            Template::Chatglm => "chatglm",
            Template::Chat => "chat",
            Template::Custom => "custom",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub template: Template,
    /// System prompt. For Alpaca it replaces the preamble sentence (as LLaMA-Factory's alpaca
    /// template does); for chat it becomes the system message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Custom: the prompt template with `{column}` fields (or minijinja syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Custom: the response template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// Column names the built-in templates read, e.g. `{ instruction = "question" }`
    /// (alpaca: instruction/input/output; chatglm: prompt/response/prefix; chat:
    /// messages/user/assistant/system).
    ///
    /// Preference data: `rejected` names the column of the rejected response (the template's
    /// response column holds the chosen one); `label` names KTO's column saying whether a
    /// response is desirable (true/false, 1/0, yes/no).
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// `"other_rows"`: make preference pairs from plain prompt/response data, each record's
    /// rejected response being the response of another record of the same split (a seeded
    /// shuffle; never one with the same text): an answer to a different question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_from: Option<RejectedFrom>,
    /// Seed of `rejected_from`'s shuffle.
    #[serde(default = "default_seed", skip_serializing_if = "is_default_seed")]
    pub seed: u64,
}

fn default_seed() -> u64 {
    42
}

// Left out of the fingerprint at its default, so format stages cached before the key existed
// stay cached.
fn is_default_seed(seed: &u64) -> bool {
    *seed == default_seed()
}

/// Where synthetic rejected responses come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectedFrom {
    OtherRows,
}

/// The preference columns of `fields`, which the prompt templates do not read.
const PREFERENCE_FIELDS: [&str; 2] = ["rejected", "label"];

impl Params {
    fn prompt_format(&self) -> Result<PromptFormat, String> {
        let mut table = serde_json::Map::new();
        let kind = serde_json::to_value(self.template).map_err(|e| e.to_string())?;
        table.insert("kind".into(), kind);
        for (k, v) in self
            .fields
            .iter()
            .filter(|(k, _)| !PREFERENCE_FIELDS.contains(&k.as_str()))
        {
            table.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        if self.template == Template::Custom {
            let prompt = self.prompt.clone().ok_or(
                "template = \"custom\" needs `prompt`, e.g. prompt = \"Question: {question}\"",
            )?;
            table.insert("prompt".into(), prompt.into());
            table.insert(
                "response".into(),
                self.response.clone().unwrap_or_default().into(),
            );
        } else if self.prompt.is_some() || self.response.is_some() {
            return Err(
                "`prompt`/`response` are for template = \"custom\"; use `fields` to name columns"
                    .into(),
            );
        }
        serde_json::from_value(serde_json::Value::Object(table)).map_err(|e| format!("fields: {e}"))
    }
}

impl Params {
    /// The columns of the records written: the preference columns only for preference data.
    fn output_columns(&self) -> Vec<&'static str> {
        let mut columns = vec!["prompt", "response", "system", "messages"];
        if self.fields.contains_key("rejected") || self.rejected_from.is_some() {
            columns.push("rejected");
        }
        if self.fields.contains_key("label") {
            columns.push("label");
        }
        columns
    }
}

/// Swaps Alpaca's preamble sentence for the recipe's system prompt.
fn with_system(prompt: String, system: &str) -> String {
    for template in [ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT] {
        let preamble = template.split("\n\n").next().unwrap_or("");
        if let Some(rest) = prompt.strip_prefix(preamble) {
            return format!("{system}{rest}");
        }
    }
    prompt
}

impl Stage for Format {
    type Params = Params;
    const KIND: &'static str = "format";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Prompts;
    const SUMMARY: &'static str = "turn rows into prompt/response records";

    fn input_slots() -> &'static [InputSlot] {
        const SLOTS: &[InputSlot] = &[InputSlot::one("input", &[ArtifactKind::Dataset])];
        SLOTS
    }

    fn named_outputs(_params: &Params) -> Vec<String> {
        vec!["train".into(), "test".into()]
    }

    fn validate(params: &Params) -> Result<(), (String, String)> {
        if params.rejected_from.is_some() && params.fields.contains_key("rejected") {
            return Err((
                "rejected_from".into(),
                "give either `fields.rejected` (a column) or `rejected_from`, not both".into(),
            ));
        }
        params
            .prompt_format()
            .map(|_| ())
            .map_err(|m| ("template".to_string(), m))
    }

    fn run(params: &Params, ctx: &StageContext) -> Result<(), StageError> {
        let format = params.prompt_format().map_err(StageError::msg)?;
        let input = ctx.input("input")?;
        let splits = super::artifact::input_splits(input)?;
        let columns = params.output_columns();
        let mut counts = BTreeMap::new();
        for split in &splits {
            let table = Table::read_parquet(&input.dir.join(format!("{split}.parquet")))
                .map_err(StageError::wrap)?;
            let rejected_column = params.fields.get("rejected");
            let label_column = params.fields.get("label");
            let pairs = rejected_column.is_some() || params.rejected_from.is_some();
            let mut out = Table::new(columns.iter().map(|c| c.to_string()).collect());
            for (i, values) in table.rows.iter().enumerate() {
                let row: Row = table
                    .columns
                    .iter()
                    .zip(values)
                    .filter_map(|(c, v)| v.as_ref().map(|v| (c.clone(), v.clone())))
                    .collect();
                let located =
                    |message: String| StageError::msg(format!("{split} row {}: {message}", i + 1));
                let mut record = format_row(&format, &row).map_err(|e| located(e.to_string()))?;
                if let Some(system) = &params.system {
                    if params.template == Template::Alpaca {
                        record.prompt = with_system(record.prompt, system);
                    }
                    record.system.get_or_insert_with(|| system.clone());
                }
                let messages = record
                    .messages
                    .as_ref()
                    .map(|m| serde_json::to_string(m).unwrap_or_default());
                let mut cells = vec![
                    Some(record.prompt),
                    Some(record.response),
                    record.system,
                    messages,
                ];
                if let Some(column) = rejected_column {
                    let text = row.get(column).ok_or_else(|| {
                        located(format!("no value in column `{column}` (fields.rejected)"))
                    })?;
                    cells.push(Some(text.clone()));
                } else if pairs {
                    cells.push(None); // filled below from other rows
                }
                if let Some(column) = label_column {
                    let text = row.get(column).ok_or_else(|| {
                        located(format!("no value in column `{column}` (fields.label)"))
                    })?;
                    let label = parse_label(text).ok_or_else(|| {
                        located(format!(
                            "column `{column}` (fields.label): `{text}` is not true/false, 1/0 or yes/no"
                        ))
                    })?;
                    cells.push(Some(label.to_string()));
                }
                out.rows.push(cells);
            }
            if params.rejected_from == Some(RejectedFrom::OtherRows) {
                fill_rejected_from_other_rows(&mut out, params.seed)
                    .map_err(|m| StageError::msg(format!("{split}: {m}")))?;
            }
            out.write_parquet(&ctx.out(&format!("{split}.parquet")))
                .map_err(StageError::wrap)?;
            counts.insert(
                split.clone(),
                SplitFile {
                    file: format!("{split}.parquet"),
                    rows: out.len(),
                },
            );
        }
        DatasetManifest {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            splits: counts,
            template: Some(params.template.name().into()),
            ..Default::default()
        }
        .write(&ctx.out_dir)
    }
}

/// KTO's desirability label.
fn parse_label(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "1.0" => Some(true),
        "false" | "0" | "no" | "0.0" => Some(false),
        _ => None,
    }
}

/// Gives each record of `table` (columns prompt, response, ..., rejected) the response of
/// another record as its rejected one: a seeded permutation, moved on past responses with the
/// same text as the record's own.
fn fill_rejected_from_other_rows(table: &mut Table, seed: u64) -> Result<(), String> {
    let n = table.rows.len();
    if n == 0 {
        return Ok(());
    }
    let (response, rejected) = (1, 4);
    let distinct: std::collections::BTreeSet<&str> = table
        .rows
        .iter()
        .filter_map(|r| r[response].as_deref())
        .collect();
    if distinct.len() < 2 {
        return Err("rejected_from = \"other_rows\" needs at least two different responses".into());
    }
    let order = crate::train::data::epoch_order(n, seed, 0);
    let mut position = vec![0; n];
    for (at, &i) in order.iter().enumerate() {
        position[i] = at;
    }
    let responses: Vec<Option<String>> = table.rows.iter().map(|r| r[response].clone()).collect();
    for (i, row) in table.rows.iter_mut().enumerate() {
        // The record after i in the shuffled order, or a later one if its text is the same.
        let at = position[i];
        let other = (1..n)
            .map(|step| order[(at + step) % n])
            .find(|&j| responses[j] != responses[i]);
        row[rejected] = other.and_then(|j| responses[j].clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_replaces_alpaca_preamble() {
        let p = ALPACA_PROMPT_NO_INPUT.replace("{instruction}", "头痛");
        let out = with_system(p, "你是一名经验丰富的医生。");
        assert_eq!(
            out,
            "你是一名经验丰富的医生。\n\n### Instruction:\n头痛\n\n### Response:\n"
        );
    }

    #[test]
    fn custom_needs_prompt_and_fields_map_columns() {
        let p = Params {
            template: Template::Custom,
            system: None,
            prompt: None,
            response: None,
            fields: BTreeMap::new(),
            rejected_from: None,
            seed: 42,
        };
        assert!(p.prompt_format().unwrap_err().contains("needs `prompt`"));
        let p = Params {
            template: Template::Alpaca,
            system: None,
            prompt: None,
            response: None,
            fields: [
                ("instruction".to_string(), "ask".to_string()),
                ("rejected".to_string(), "worse".to_string()),
            ]
            .into(),
            rejected_from: None,
            seed: 42,
        };
        assert!(
            matches!(p.prompt_format().unwrap(), PromptFormat::Alpaca { instruction, .. } if instruction == "ask")
        );
    }

    #[test]
    fn rejected_from_other_rows_takes_a_different_response_of_the_split() {
        let mut table = Table::new(
            ["prompt", "response", "system", "messages", "rejected"]
                .iter()
                .map(|c| c.to_string())
                .collect(),
        );
        for (p, r) in [("a", "x"), ("b", "y"), ("c", "x"), ("d", "z")] {
            table
                .rows
                .push(vec![Some(p.into()), Some(r.into()), None, None, None]);
        }
        fill_rejected_from_other_rows(&mut table, 7).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for row in &table.rows {
            let rejected = row[4].as_deref().unwrap();
            assert_ne!(Some(rejected), row[1].as_deref());
            seen.insert(rejected.to_string());
        }
        assert!(seen.len() >= 2, "{seen:?}");
        let mut same = Table::new(table.columns.clone());
        same.rows = vec![vec![Some("a".into()), Some("x".into()), None, None, None]; 2];
        assert!(fill_rejected_from_other_rows(&mut same, 7)
            .unwrap_err()
            .contains("two different responses"));
        assert_eq!(parse_label(" Yes"), Some(true));
        assert_eq!(parse_label("0"), Some(false));
        assert_eq!(parse_label("maybe"), None);
    }
}
