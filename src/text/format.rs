//! Prompt formats of the `format` stage: pure functions from a row (column -> string) to a
//! `Record {prompt, response, system, messages}`.
//! References: Stanford Alpaca `train.py` (`PROMPT_DICT`), ChatGLM-6B `ptuning/main.py`
//! (AdvertiseGen: `content` -> `summary`, optional `source_prefix`), ShareGPT/OpenAI message lists.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::text::chat_template::ChatMessage;
use crate::text::{Error, Result};

/// One input row: column name -> text.
pub type Row = BTreeMap<String, String>;

/// Stanford Alpaca's prompt when the example has a non-empty input.
pub const ALPACA_PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// Stanford Alpaca's prompt without input.
pub const ALPACA_PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// A formatted example. For `chat`, `messages` holds the whole conversation (system first if any)
/// and `prompt`/`response` the last user/assistant texts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub prompt: String,
    pub response: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
}

/// How rows become records. Column names default to the usual dataset names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PromptFormat {
    /// instruction/input/output columns.
    Alpaca {
        #[serde(default = "default_instruction")]
        instruction: String,
        #[serde(default = "default_input")]
        input: String,
        #[serde(default = "default_output")]
        output: String,
    },
    /// AdvertiseGen: prompt = prefix + content, response = summary.
    Chatglm {
        #[serde(default = "default_content")]
        prompt: String,
        #[serde(default = "default_summary")]
        response: String,
        #[serde(default)]
        prefix: Option<String>,
    },
    /// A conversation: either a `messages` column with a JSON list (`role`/`content` or ShareGPT
    /// `from`/`value`), or user/assistant (+ optional system) columns. Rendered with the model's
    /// chat template at tokenization.
    Chat {
        #[serde(default)]
        messages: Option<String>,
        #[serde(default = "default_instruction")]
        user: String,
        #[serde(default = "default_output")]
        assistant: String,
        #[serde(default)]
        system: Option<String>,
    },
    /// `{column}` placeholders, or full minijinja (row columns as variables) when the template
    /// contains `{{` or `{%`.
    Custom { prompt: String, response: String },
}

fn default_instruction() -> String {
    "instruction".into()
}
fn default_input() -> String {
    "input".into()
}
fn default_output() -> String {
    "output".into()
}
fn default_content() -> String {
    "content".into()
}
fn default_summary() -> String {
    "summary".into()
}

impl PromptFormat {
    pub fn alpaca() -> Self {
        Self::Alpaca {
            instruction: default_instruction(),
            input: default_input(),
            output: default_output(),
        }
    }

    pub fn chatglm(prefix: Option<String>) -> Self {
        Self::Chatglm {
            prompt: default_content(),
            response: default_summary(),
            prefix,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Alpaca { .. } => "alpaca",
            Self::Chatglm { .. } => "chatglm",
            Self::Chat { .. } => "chat",
            Self::Custom { .. } => "custom",
        }
    }
}

fn column<'a>(row: &'a Row, format: &PromptFormat, name: &str) -> Result<&'a str> {
    row.get(name)
        .map(String::as_str)
        .ok_or_else(|| Error::MissingColumn {
            format: format.name().to_owned(),
            column: name.to_owned(),
            available: row.keys().cloned().collect(),
        })
}

/// Formats one row.
pub fn format_row(format: &PromptFormat, row: &Row) -> Result<Record> {
    match format {
        PromptFormat::Alpaca {
            instruction,
            input,
            output,
        } => {
            let instruction = column(row, format, instruction)?;
            // A missing input column means "no input", as in datasets that omit it.
            let input = row.get(input).map(String::as_str).unwrap_or("");
            // Split at the placeholders rather than replacing them, so braces in the data stay.
            let prompt = if input.is_empty() {
                let (head, tail) = ALPACA_PROMPT_NO_INPUT
                    .split_once("{instruction}")
                    .expect("template has the placeholder");
                format!("{head}{instruction}{tail}")
            } else {
                let (head, rest) = ALPACA_PROMPT_INPUT
                    .split_once("{instruction}")
                    .expect("template has the placeholder");
                let (middle, tail) = rest
                    .split_once("{input}")
                    .expect("template has the placeholder");
                format!("{head}{instruction}{middle}{input}{tail}")
            };
            Ok(Record {
                prompt,
                response: column(row, format, output)?.to_owned(),
                ..Default::default()
            })
        }
        PromptFormat::Chatglm {
            prompt,
            response,
            prefix,
        } => {
            let content = column(row, format, prompt)?;
            Ok(Record {
                prompt: format!("{}{content}", prefix.as_deref().unwrap_or("")),
                response: column(row, format, response)?.to_owned(),
                ..Default::default()
            })
        }
        PromptFormat::Chat {
            messages,
            user,
            assistant,
            system,
        } => {
            let msgs = match messages {
                Some(col) => parse_messages(col, column(row, format, col)?)?,
                None => {
                    let mut msgs = vec![];
                    if let Some(sys) = system {
                        let s = column(row, format, sys)?;
                        if !s.is_empty() {
                            msgs.push(ChatMessage::new("system", s));
                        }
                    }
                    msgs.push(ChatMessage::new("user", column(row, format, user)?));
                    msgs.push(ChatMessage::new(
                        "assistant",
                        column(row, format, assistant)?,
                    ));
                    msgs
                }
            };
            let last = |role: &str| {
                msgs.iter()
                    .rev()
                    .find(|m| m.role == role)
                    .map(|m| m.content.clone())
            };
            Ok(Record {
                prompt: last("user").unwrap_or_default(),
                response: last("assistant").unwrap_or_default(),
                system: msgs
                    .first()
                    .filter(|m| m.role == "system")
                    .map(|m| m.content.clone()),
                messages: Some(msgs),
            })
        }
        PromptFormat::Custom { prompt, response } => Ok(Record {
            prompt: fill_template(prompt, row, format)?,
            response: fill_template(response, row, format)?,
            ..Default::default()
        }),
    }
}

fn parse_messages(col: &str, text: &str) -> Result<Vec<ChatMessage>> {
    let bad = |message: String| Error::BadColumn {
        column: col.to_owned(),
        message,
    };
    let json: Json =
        serde_json::from_str(text).map_err(|e| bad(format!("not a JSON message list: {e}")))?;
    let list = json
        .as_array()
        .ok_or_else(|| bad("expected a JSON list of messages".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let get = |keys: [&str; 2]| {
                keys.iter()
                    .find_map(|k| m.get(*k).and_then(Json::as_str))
                    .map(str::to_owned)
            };
            let role = get(["role", "from"])
                .ok_or_else(|| bad(format!("message {i} has no role/from")))?;
            let content = get(["content", "value"])
                .ok_or_else(|| bad(format!("message {i} has no content/value")))?;
            let role = match role.as_str() {
                "human" => "user".to_owned(),
                "gpt" => "assistant".to_owned(),
                _ => role,
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn fill_template(template: &str, row: &Row, format: &PromptFormat) -> Result<String> {
    if template.contains("{{") || template.contains("{%") {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_fuel(Some(crate::text::chat_template::RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        let render = env.render_str(template, row).map_err(|e| match e.kind() {
            minijinja::ErrorKind::UndefinedError => {
                let column = undefined_name(template, row).unwrap_or_else(|| e.to_string());
                Error::MissingColumn {
                    format: format.name().to_owned(),
                    column,
                    available: row.keys().cloned().collect(),
                }
            }
            _ => Error::Template {
                name: "custom".into(),
                message: e.to_string(),
            },
        })?;
        return Ok(render);
    }
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) if is_identifier(&after[..end]) => {
                out.push_str(column(row, format, &after[..end])?);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// The first `{{ name` whose name is not a column, for a readable error.
fn undefined_name(template: &str, row: &Row) -> Option<String> {
    let re = regex::Regex::new(r"\{\{-?\s*([A-Za-z_][A-Za-z0-9_]*)").ok()?;
    let missing = re
        .captures_iter(template)
        .map(|c| c[1].to_owned())
        .find(|n| !row.contains_key(n));
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, &str)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn alpaca_prompts_are_stanford_texts() {
        let r = format_row(
            &PromptFormat::alpaca(),
            &row(&[("instruction", "Add."), ("input", "1+1"), ("output", "2")]),
        )
        .unwrap();
        assert_eq!(
            r.prompt,
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1+1\n\n### Response:\n"
        );
        assert_eq!(r.response, "2");
        let r = format_row(
            &PromptFormat::alpaca(),
            &row(&[
                ("instruction", "Hi {input}"),
                ("input", ""),
                ("output", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(
            r.prompt,
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nHi {input}\n\n### Response:\n"
        );
    }

    #[test]
    fn chatglm_uses_content_summary_and_prefix() {
        let r = format_row(
            &PromptFormat::chatglm(Some("广告：".into())),
            &row(&[("content", "类型#上衣"), ("summary", "简约")]),
        )
        .unwrap();
        assert_eq!(
            (r.prompt.as_str(), r.response.as_str()),
            ("广告：类型#上衣", "简约")
        );
        let err = format_row(&PromptFormat::chatglm(None), &row(&[("content", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`summary`") && err.contains("chatglm"),
            "{err}"
        );
    }

    #[test]
    fn chat_from_columns_and_sharegpt_json() {
        let f = PromptFormat::Chat {
            messages: None,
            user: "q".into(),
            assistant: "a".into(),
            system: Some("s".into()),
        };
        let r = format_row(&f, &row(&[("q", "hi"), ("a", "yo"), ("s", "be nice")])).unwrap();
        assert_eq!(r.system.as_deref(), Some("be nice"));
        assert_eq!(r.messages.as_ref().map(Vec::len), Some(3));
        let f = PromptFormat::Chat {
            messages: Some("conv".into()),
            user: String::new(),
            assistant: String::new(),
            system: None,
        };
        let conv = r#"[{"from":"human","value":"1"},{"from":"gpt","value":"2"},{"from":"human","value":"3"},{"from":"gpt","value":"4"}]"#;
        let r = format_row(&f, &row(&[("conv", conv)])).unwrap();
        assert_eq!((r.prompt.as_str(), r.response.as_str()), ("3", "4"));
        assert_eq!(r.messages.unwrap()[1], ChatMessage::new("assistant", "2"));
    }

    #[test]
    fn custom_templates_fill_columns_and_name_missing_ones() {
        let f = PromptFormat::Custom {
            prompt: "Q: {title}\n{ask} {not a field}".into(),
            response: "{answer}".into(),
        };
        let r = format_row(&f, &row(&[("title", "t"), ("ask", "a"), ("answer", "b")])).unwrap();
        assert_eq!(r.prompt, "Q: t\na {not a field}");
        let err = format_row(&f, &row(&[("title", "t"), ("answer", "b")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`ask`"), "{err}");
        let f = PromptFormat::Custom {
            prompt: "{{ title.upper() }}{% if ask %}:{{ ask }}{% endif %}".into(),
            response: "{{ answerx }}".into(),
        };
        assert_eq!(
            format_row(&f, &row(&[("title", "t"), ("ask", "a"), ("answerx", "")]))
                .unwrap()
                .prompt,
            "T:a"
        );
        let err = format_row(&f, &row(&[("title", "t"), ("ask", "a")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`answerx`"), "{err}");
    }
}
