//! Chat templates rendered like transformers' `apply_chat_template(tokenize=False)`.
//! Reference: transformers `utils/chat_template_utils.py` (`_cached_compile_jinja_template`,
//! `render_jinja_template`): jinja2 sandbox with trim_blocks, lstrip_blocks, loopcontrols; globals
//! `raise_exception`, `strftime_now`; a `tojson` filter that is `json.dumps(ensure_ascii=False)`;
//! the special tokens map, `messages`, `tools`, `documents`, `add_generation_prompt` as variables.
//! Python string/dict methods come from minijinja-contrib's pycompat.

use minijinja::value::{Kwargs, Value};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::text::{Error, Result};

/// One chat message. Extra fields (tool_calls, name...) can be passed with `render_json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Special-token variables visible to the template (transformers' `special_tokens_map`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    name: String,
    env: Environment<'static>,
    special: SpecialTokens,
}

const TEMPLATE_NAME: &str = "chat";

/// Template instructions one render may run: real chat templates take a few hundred a message, so
/// this allows conversations of tens of thousands of messages while a looping template (nested
/// `range` loops, recursive macros) ends with an error instead of running for hours.
pub const RENDER_FUEL: u64 = 20_000_000;

/// The largest `tojson(indent=N)`; Python accepts any, chat templates use 2 or 4.
const MAX_TOJSON_INDENT: usize = 64;

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("special", &self.special)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `name` is used in error messages.
    pub fn new(name: &str, source: &str, special: SpecialTokens) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| Error::Template {
                name: name.to_owned(),
                message: describe(&e),
            })?;
        Ok(Self {
            name: name.to_owned(),
            env,
            special,
        })
    }

    /// Renders `messages` (role/content pairs).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Json> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        self.render_json(&messages, None, add_generation_prompt)
    }

    /// Renders arbitrary JSON messages (tool calls etc.) and optional tool schemas.
    pub fn render_json(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| self.err(&e))?;
        let s = &self.special;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => s.bos_token.as_deref(),
            eos_token => s.eos_token.as_deref(),
            pad_token => s.pad_token.as_deref(),
            unk_token => s.unk_token.as_deref(),
        };
        tmpl.render(ctx).map_err(|e| self.err(&e))
    }

    fn err(&self, e: &minijinja::Error) -> Error {
        Error::Template {
            name: self.name.clone(),
            message: describe(e),
        }
    }
}

fn describe(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::OutOfFuel, _) => format!(
            "stopped after {RENDER_FUEL} template instructions{} (a loop that does not end?)",
            e.line()
                .map(|l| format!(" at line {l}"))
                .unwrap_or_default()
        ),
        (ErrorKind::InvalidOperation, Some(d)) => match e.line() {
            Some(line) => format!("{d} (line {line})"),
            None => d.to_owned(),
        },
        _ => e.to_string(),
    }
}

/// transformers' `strftime_now`: the local time formatted by a strftime string. chrono reports an
/// unknown specifier (`%Q`) as a formatting error, which `to_string` would turn into a panic.
fn strftime_now(fmt: String) -> std::result::Result<String, minijinja::Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&fmt)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: `{fmt}` is not a valid strftime format"),
        )
    })?;
    Ok(out)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
/// sort_keys=sort_keys)`, Python formatting (`", "`/`": "` separators without indent).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                let n = usize::try_from(v.clone()).unwrap_or(0);
                if n > MAX_TOJSON_INDENT {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: indent {n} is larger than {MAX_TOJSON_INDENT}"),
                    ));
                }
                " ".repeat(n)
            }
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let opts = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    opts.write(&json, 0, &mut out);
    Ok(out)
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, v: &Json, depth: usize, out: &mut String) {
        // With an indent, Python drops the trailing space of the item separator at line ends.
        let item_sep = if self.indent.is_some() {
            self.item_sep.trim_end()
        } else {
            self.item_sep.as_str()
        };
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&python_number(n)),
            Json::String(s) => self.write_str(s, out),
            Json::Array(items) if items.is_empty() => out.push_str("[]"),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            Json::Object(map) if map.is_empty() => out.push_str("{}"),
            Json::Object(map) => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write_str(k, out);
                    out.push_str(&self.key_sep);
                    self.write(item, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's float repr differs from Rust's: `1.0` not `1`, exponents as `1e+16`.
fn python_number(n: &serde_json::Number) -> String {
    if n.is_f64() {
        let f = n.as_f64().unwrap_or(0.0);
        if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
            return format!("{f:.1}");
        }
        let s = format!("{f:e}");
        if f.abs() >= 1e16 || (f != 0.0 && f.abs() < 1e-4) {
            let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
            let exp: i32 = exp.parse().unwrap_or(0);
            return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
        }
        return f.to_string();
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str) -> String {
        let t = ChatTemplate::new("t", src, SpecialTokens::default()).unwrap();
        t.render(&[ChatMessage::new("user", " Hi ")], false)
            .unwrap()
    }

    #[test]
    fn python_string_methods_work() {
        assert_eq!(
            render("{{ messages[0].content.strip() }}|{{ messages[0]['content'].upper() }}"),
            "Hi| HI "
        );
        assert_eq!(
            render("{{ 'a,b'.split(',') | join('-') }}{{ 'xy'.startswith('x') }}"),
            "a-bTrue"
        ); // Python prints booleans as True/False, as does minijinja
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let env_src = r#"{{ {"b": [1, 2.5, "中文\n\""], "a": none} | tojson }}"#;
        assert_eq!(render(env_src), r#"{"b": [1, 2.5, "中文\n\""], "a": null}"#);
        let indented = render(r#"{{ {"k": [1, {"z": true}]} | tojson(indent=2) }}"#);
        assert_eq!(
            indented,
            "{\n  \"k\": [\n    1,\n    {\n      \"z\": true\n    }\n  ]\n}"
        );
        assert_eq!(
            render(r#"{{ {"b": 1, "a": 2} | tojson(sort_keys=true, separators=[",", ":"]) }}"#),
            r#"{"a":2,"b":1}"#
        );
    }

    #[test]
    fn raise_exception_surfaces_message() {
        let t = ChatTemplate::new(
            "t",
            "{{ raise_exception('roles must alternate') }}",
            SpecialTokens::default(),
        )
        .unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    fn render_err(src: &str) -> String {
        let t = ChatTemplate::new("t", src, SpecialTokens::default()).unwrap();
        t.render(&[ChatMessage::new("user", "hi")], false)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_strftime_format_is_an_error_not_a_panic() {
        let err = render_err("{{ strftime_now('%Q') }}");
        assert!(err.contains("`%Q` is not a valid strftime format"), "{err}");
        assert_eq!(render("{{ strftime_now('%%') }}"), "%");
    }

    #[test]
    fn reversed_empty_values_render_empty() {
        // Found by `cargo fuzz run chat_template`: minijinja 2.24.0 panicked on these (index 0 of
        // an empty value); vendor/minijinja has the fix.
        assert_eq!(render("[{{ ''[::-1] }}]{{ [][::-1] | length }}"), "[]0");
        let t = ChatTemplate::new(
            "t",
            "{% for m in messages[::-1] %}{{ m.role }}{% endfor %}.",
            SpecialTokens::default(),
        )
        .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), ".");
        assert_eq!(render("{{ 'abc'[0:2:-1] }}|{{ 'abc'[::-1] }}"), "|cba");
    }

    #[test]
    fn endless_templates_run_out_of_fuel() {
        // 10^10 iterations: without a fuel limit this renders for hours.
        let err = render_err(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        );
        assert!(
            err.contains("chat template `t`") && err.contains("template instructions"),
            "{err}"
        );
        // Found by `cargo fuzz run chat_template`: a lazily repeated list is scanned by `in`
        // outside the fuel count (hours); vendor/minijinja caps repetition as `range` is capped.
        let err = render_err("{{ 1 in 1615 * messages * 929304 }}");
        assert!(err.contains("repeated sequence is too large"), "{err}");
        assert_eq!(render("{{ ([1, 2] * 2) | list | length }}"), "4");
        let err = render_err("{{ messages | tojson(indent=1000000000000) }}");
        assert!(
            err.contains("indent 1000000000000 is larger than 64"),
            "{err}"
        );
    }
}
