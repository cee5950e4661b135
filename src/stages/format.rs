//! `format`: rows to prompt/response records (Alpaca, ChatGLM AdvertiseGen, chat, custom).
//!
//! Output: `<split>.parquet` per input split with columns `prompt`, `response`, `system` and
//! `messages` (a JSON list for chat records, rendered later with the model's own chat template),
//! plus `dataset.json` naming the format.

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
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

impl Params {
    fn prompt_format(&self) -> Result<PromptFormat, String> {
        let mut table = serde_json::Map::new();
        let kind = serde_json::to_value(self.template).map_err(|e| e.to_string())?;
        table.insert("kind".into(), kind);
        for (k, v) in &self.fields {
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
        params
            .prompt_format()
            .map(|_| ())
            .map_err(|m| ("template".to_string(), m))
    }

    fn run(params: &Params, ctx: &StageContext) -> Result<(), StageError> {
        let format = params.prompt_format().map_err(StageError::msg)?;
        let input = ctx.input("input")?;
        let splits = input.splits()?;
        let mut counts = serde_json::Map::new();
        for split in &splits {
            let table = Table::read_parquet(&input.dir.join(format!("{split}.parquet")))
                .map_err(|e| StageError::msg(e.to_string()))?;
            let columns = ["prompt", "response", "system", "messages"];
            let mut out = Table::new(columns.iter().map(|c| c.to_string()).collect());
            for (i, values) in table.rows.iter().enumerate() {
                let row: Row = table
                    .columns
                    .iter()
                    .zip(values)
                    .filter_map(|(c, v)| v.as_ref().map(|v| (c.clone(), v.clone())))
                    .collect();
                let mut record = format_row(&format, &row)
                    .map_err(|e| StageError::msg(format!("{split} row {}: {e}", i + 1)))?;
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
                out.rows.push(vec![
                    Some(record.prompt),
                    Some(record.response),
                    record.system,
                    messages,
                ]);
            }
            out.write_parquet(&ctx.out(&format!("{split}.parquet")))
                .map_err(|e| StageError::msg(e.to_string()))?;
            counts.insert(
                split.clone(),
                serde_json::json!({ "file": format!("{split}.parquet"), "rows": out.len() }),
            );
        }
        crate::util::write_json(
            &ctx.out("dataset.json"),
            &serde_json::json!({
                "columns": ["prompt", "response", "system", "messages"],
                "splits": counts,
                "template": params.template,
            }),
        )
    }
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
        };
        assert!(p.prompt_format().unwrap_err().contains("needs `prompt`"));
        let p = Params {
            template: Template::Alpaca,
            system: None,
            prompt: None,
            response: None,
            fields: [("instruction".to_string(), "ask".to_string())].into(),
        };
        assert!(
            matches!(p.prompt_format().unwrap(), PromptFormat::Alpaca { instruction, .. } if instruction == "ask")
        );
    }
}
