//! Tokenizer bridge between GGUF metadata (`tokenizer.ggml.*`, gpt2/BPE models) and Hugging Face
//! `tokenizer.json` + `tokenizer_config.json`. Pre-tokenizer regexes per `tokenizer.ggml.pre`
//! follow llama.cpp src/llama-vocab.cpp (`llm_tokenizer_bpe`), written with the original
//! tokenizer.json spelling; the reverse choice of `pre` follows convert_hf_to_gguf.py
//! `get_vocab_base_pre` by pre-tokenizer shape and model name instead of its token hash.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::gguf::reader::GgufFile;
use crate::gguf::{Error, MetaValue, Result};

/// llama.cpp token types (`llama_token_type`).
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_UNKNOWN: i32 = 2;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;
pub const TOKEN_BYTE: i32 = 6;

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Split regexes (applied in order, each isolating its matches) llama.cpp uses for `pre`.
pub fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" | "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion"
        | "granite-docling" | "mellum" => {
            vec![GPT2_REGEX]
        }
        "starcoder" | "smollm" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2_REGEX]
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" | "chatglm-bpe"
        | "pixtral" => {
            vec![LLAMA3_REGEX]
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => vec![QWEN2_REGEX],
        _ => return None,
    })
}

/// llama.cpp sets `ignore_merges` (whole-word vocab hits win over merges) for these.
fn ignores_merges(pre: &str) -> bool {
    matches!(
        pre,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral"
    )
}

/// The `tokenizer.ggml.*` / `tokenizer.chat_template` content of a GGUF file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model`; only "gpt2" (byte-level BPE) is converted to tokenizer.json.
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub eot_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub chat_template: Option<String>,
    /// `{arch}.context_length`, used as `model_max_length`.
    pub context_length: Option<usize>,
}

fn tok_err(path: &Path, what: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

impl GgufTokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<GgufTokenizer> {
        let strings = |key: &str| -> Result<Vec<String>> {
            match f.get_array(key)? {
                None => Ok(Vec::new()),
                Some(items) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| tok_err(&f.path, format!("`{key}` holds a non-string")))
                    })
                    .collect(),
            }
        };
        let id = |key: &str| -> Result<Option<u32>> { Ok(f.get_u64(key)?.map(|v| v as u32)) };
        let token_types = match f.get_array("tokenizer.ggml.token_type")? {
            None => Vec::new(),
            Some(items) => items
                .iter()
                .map(|v| v.as_i64().map(|t| t as i32).unwrap_or(TOKEN_NORMAL))
                .collect(),
        };
        let arch = f
            .get_str("general.architecture")?
            .unwrap_or("llama")
            .to_string();
        Ok(GgufTokenizer {
            model: f.req_str("tokenizer.ggml.model")?.to_string(),
            pre: f.get_str("tokenizer.ggml.pre")?.map(str::to_owned),
            tokens: strings("tokenizer.ggml.tokens")?,
            token_types,
            merges: strings("tokenizer.ggml.merges")?,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            eot_id: id("tokenizer.ggml.eot_token_id")?,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos: f.get_bool("tokenizer.ggml.add_bos_token")?,
            add_eos: f.get_bool("tokenizer.ggml.add_eos_token")?,
            chat_template: f.get_str("tokenizer.chat_template")?.map(str::to_owned),
            context_length: f
                .get_u64(&format!("{arch}.context_length"))?
                .map(|v| v as usize),
        })
    }

    /// GGUF metadata in the order convert_hf_to_gguf.py writes it.
    pub fn to_metadata(&self) -> Vec<(String, MetaValue)> {
        let mut m = vec![(
            "tokenizer.ggml.model".to_string(),
            MetaValue::String(self.model.clone()),
        )];
        if let Some(pre) = &self.pre {
            m.push(("tokenizer.ggml.pre".into(), MetaValue::String(pre.clone())));
        }
        m.push((
            "tokenizer.ggml.tokens".into(),
            MetaValue::string_array(self.tokens.clone()),
        ));
        m.push((
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(
                5,
                self.token_types
                    .iter()
                    .map(|&t| MetaValue::I32(t))
                    .collect(),
            ),
        ));
        if !self.merges.is_empty() {
            m.push((
                "tokenizer.ggml.merges".into(),
                MetaValue::string_array(self.merges.clone()),
            ));
        }
        for (key, v) in [
            ("bos_token_id", self.bos_id),
            ("eos_token_id", self.eos_id),
            ("eot_token_id", self.eot_id),
            ("unknown_token_id", self.unk_id),
            ("padding_token_id", self.pad_id),
        ] {
            if let Some(v) = v {
                m.push((format!("tokenizer.ggml.{key}"), MetaValue::U32(v)));
            }
        }
        if let Some(b) = self.add_bos {
            m.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(b)));
        }
        if let Some(b) = self.add_eos {
            m.push(("tokenizer.ggml.add_eos_token".into(), MetaValue::Bool(b)));
        }
        if let Some(t) = &self.chat_template {
            m.push((
                "tokenizer.chat_template".into(),
                MetaValue::String(t.clone()),
            ));
        }
        m
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }

    /// Tokens that end a turn: eos, eot and ChatML's `<|im_end|>` / `<|endoftext|>` when present.
    pub fn stop_tokens(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in [self.token(self.eos_id), self.token(self.eot_id)]
            .into_iter()
            .flatten()
        {
            if !out.iter().any(|o| o == t) {
                out.push(t.to_string());
            }
        }
        for extra in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"] {
            if self.tokens.iter().any(|t| t == extra) && !out.iter().any(|o| o == extra) {
                out.push(extra.to_string());
            }
        }
        out
    }

    /// An HF `tokenizer.json` for a "gpt2" (byte-level BPE) vocabulary.
    pub fn to_tokenizer_json(&self, source: &Path) -> Result<Value> {
        if self.model != "gpt2" {
            return Err(tok_err(
                source,
                format!(
                    "tokenizer.ggml.model `{}` is not supported (only gpt2 BPE)",
                    self.model
                ),
            ));
        }
        let pre = self.pre.as_deref().unwrap_or("default");
        let regexes = pre_tokenizer_regexes(pre).ok_or_else(|| {
            tok_err(
                source,
                format!("unknown tokenizer.ggml.pre `{pre}`; cannot choose a pre-tokenizer regex"),
            )
        })?;
        let mut vocab = Map::new();
        for (i, t) in self.tokens.iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
        }
        let added: Vec<Value> = self
            .tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(self.token_types.get(*i), Some(&TOKEN_CONTROL) | Some(&TOKEN_USER_DEFINED)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": self.token_types[i] == TOKEN_USER_DEFINED, "special": self.token_types[i] == TOKEN_CONTROL})
            })
            .collect();
        let mut pretok: Vec<Value> = regexes
            .iter()
            .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
            .collect();
        pretok.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
        let post = match (self.add_bos.unwrap_or(false), self.token(self.bos_id)) {
            (true, Some(bos)) => {
                let mut single = vec![
                    json!({"SpecialToken": {"id": bos, "type_id": 0}}),
                    json!({"Sequence": {"id": "A", "type_id": 0}}),
                ];
                let mut pair = single.clone();
                pair.push(json!({"SpecialToken": {"id": bos, "type_id": 1}}));
                pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
                let mut special = Map::new();
                special.insert(
                    bos.to_string(),
                    json!({"id": bos, "ids": [self.bos_id], "tokens": [bos]}),
                );
                if self.add_eos.unwrap_or(false) {
                    if let Some(eos) = self.token(self.eos_id) {
                        single.push(json!({"SpecialToken": {"id": eos, "type_id": 0}}));
                        special.insert(
                            eos.to_string(),
                            json!({"id": eos, "ids": [self.eos_id], "tokens": [eos]}),
                        );
                    }
                }
                json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
            }
            _ => {
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
            }
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretok},
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": ignores_merges(pre), "vocab": vocab, "merges": self.merges,
            }
        }))
    }

    pub fn to_tokenizer_config_json(&self) -> Value {
        let mut decoder = Map::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let ty = self.token_types.get(i).copied().unwrap_or(TOKEN_NORMAL);
            if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
                decoder.insert(
                    i.to_string(),
                    json!({"content": t, "lstrip": false, "normalized": ty == TOKEN_USER_DEFINED, "rstrip": false,
                           "single_word": false, "special": ty == TOKEN_CONTROL}),
                );
            }
        }
        let mut c = Map::new();
        c.insert("add_bos_token".into(), json!(self.add_bos.unwrap_or(false)));
        c.insert("add_eos_token".into(), json!(self.add_eos.unwrap_or(false)));
        c.insert("added_tokens_decoder".into(), Value::Object(decoder));
        for (key, id) in [
            ("bos_token", self.bos_id),
            ("eos_token", self.eos_id),
            ("pad_token", self.pad_id),
            ("unk_token", self.unk_id),
        ] {
            c.insert(key.into(), self.token(id).map_or(Value::Null, |t| json!(t)));
        }
        if let Some(t) = &self.chat_template {
            c.insert("chat_template".into(), json!(t));
        }
        c.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(n) = self.context_length {
            c.insert("model_max_length".into(), json!(n));
        }
        c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        Value::Object(c)
    }

    /// Writes tokenizer.json and tokenizer_config.json into `dir`.
    pub fn write_hf(&self, dir: &Path, source: &Path) -> Result<()> {
        let write = |name: &str, v: &Value| -> Result<()> {
            let p = dir.join(name);
            let text = serde_json::to_string_pretty(v).map_err(|e| Error::Json {
                path: p.clone(),
                what: e.to_string(),
            })?;
            std::fs::write(&p, text).map_err(|source| Error::Io { path: p, source })
        };
        write("tokenizer.json", &self.to_tokenizer_json(source)?)?;
        write("tokenizer_config.json", &self.to_tokenizer_config_json())
    }

    /// Reads an HF folder's tokenizer.json (+ tokenizer_config.json) as convert_hf_to_gguf.py's
    /// `get_vocab_base` does: ids padded with `[PAD{i}]` (UNUSED) up to `vocab_size`, added
    /// tokens CONTROL when special else USER_DEFINED. `model_name` helps choose `pre`.
    pub fn from_hf_dir(
        dir: &Path,
        vocab_size: Option<usize>,
        model_name: &str,
    ) -> Result<GgufTokenizer> {
        let tj_path = dir.join("tokenizer.json");
        let tj = read_json(&tj_path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            json!({})
        };
        let model = &tj["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(tok_err(
                &tj_path,
                format!(
                    "model type {} is not supported (only byte-level BPE)",
                    model["type"]
                ),
            ));
        }
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| tok_err(&tj_path, "model.vocab is not an object"))?;
        let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
        for (t, id) in vocab {
            let id = id.as_u64().ok_or_else(|| {
                tok_err(&tj_path, format!("vocab entry `{t}` has a non-integer id"))
            })?;
            by_id.insert(id as usize, (t.clone(), TOKEN_NORMAL));
        }
        for a in tj["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
                return Err(tok_err(&tj_path, format!("bad added_tokens entry {a}")));
            };
            let ty = if a["special"].as_bool().unwrap_or(false) {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            };
            by_id.insert(id as usize, (content.to_string(), ty));
        }
        let n = by_id
            .keys()
            .next_back()
            .map_or(0, |&m| m + 1)
            .max(vocab_size.unwrap_or(0));
        let mut tokens = Vec::with_capacity(n);
        let mut token_types = Vec::with_capacity(n);
        for i in 0..n {
            match by_id.remove(&i) {
                Some((t, ty)) => {
                    tokens.push(t);
                    token_types.push(ty);
                }
                None => {
                    tokens.push(format!("[PAD{i}]"));
                    token_types.push(TOKEN_UNUSED);
                }
            }
        }
        let merges = match model["merges"].as_array() {
            Some(ms) => ms
                .iter()
                .map(|m| match m {
                    Value::String(s) => Ok(s.clone()),
                    Value::Array(p) if p.len() == 2 => Ok(format!(
                        "{} {}",
                        p[0].as_str().unwrap_or(""),
                        p[1].as_str().unwrap_or("")
                    )),
                    other => Err(tok_err(&tj_path, format!("bad merge {other}"))),
                })
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let id_of = |key: &str| -> Option<u32> {
            let v = &cfg[key];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            tokens.iter().position(|t| t == s).map(|i| i as u32)
        };
        let bos_id = id_of("bos_token");
        let (eos_id, unk_id, pad_id) = (id_of("eos_token"), id_of("unk_token"), id_of("pad_token"));
        let add_bos = cfg["add_bos_token"].as_bool().or_else(|| {
            // No explicit flag: a TemplateProcessing that starts with the BOS token means yes.
            let first = tj["post_processor"]["single"][0]["SpecialToken"]["id"].as_str()?;
            Some(
                bos_id
                    .and_then(|b| tokens.get(b as usize))
                    .is_some_and(|t| t == first),
            )
        });
        let chat_template = match &cfg["chat_template"] {
            Value::String(s) => Some(s.clone()),
            _ => {
                let jinja = dir.join("chat_template.jinja");
                jinja
                    .exists()
                    .then(|| std::fs::read_to_string(&jinja).ok())
                    .flatten()
            }
        };
        let pre = choose_pre(&tj["pre_tokenizer"], model_name).ok_or_else(|| {
            tok_err(&tj_path, format!("pre-tokenizer not recognized (llama.cpp would need a new `tokenizer.ggml.pre`): {}", tj["pre_tokenizer"]))
        })?;
        Ok(GgufTokenizer {
            model: "gpt2".into(),
            pre: Some(pre.to_string()),
            tokens,
            token_types,
            merges,
            bos_id,
            eos_id,
            eot_id: None,
            unk_id,
            pad_id,
            add_bos,
            add_eos: cfg["add_eos_token"].as_bool(),
            chat_template,
            context_length: cfg["model_max_length"]
                .as_u64()
                .filter(|&n| n < 1 << 40)
                .map(|n| n as usize),
        })
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

/// `tokenizer.ggml.pre` for an HF pre_tokenizer, by its regexes (llama.cpp's table above).
pub fn choose_pre(pre_tokenizer: &Value, model_name: &str) -> Option<&'static str> {
    let mut parts: Vec<&Value> = Vec::new();
    match pre_tokenizer["type"].as_str() {
        Some("Sequence") => parts.extend(
            pre_tokenizer["pretokenizers"]
                .as_array()
                .into_iter()
                .flatten(),
        ),
        Some(_) => parts.push(pre_tokenizer),
        None => return None,
    }
    let mut regexes: Vec<String> = Vec::new();
    let mut digits = false;
    for p in parts {
        match p["type"].as_str() {
            Some("Split") => regexes.push(
                p["pattern"]["Regex"]
                    .as_str()
                    .or(p["pattern"]["String"].as_str())?
                    .to_string(),
            ),
            Some("Digits") => digits = p["individual_digits"].as_bool().unwrap_or(false),
            Some("ByteLevel") => {
                if p["use_regex"].as_bool().unwrap_or(true) {
                    regexes.push(GPT2_REGEX.to_string());
                }
            }
            _ => return None,
        }
    }
    let name = model_name.to_ascii_lowercase();
    match (
        digits,
        regexes
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
    ) {
        (true, [GPT2_REGEX]) | (false, [r"\p{N}", GPT2_REGEX]) => {
            Some(if name.contains("smollm") {
                "smollm"
            } else {
                "starcoder"
            })
        }
        (false, [GPT2_REGEX]) => Some("gpt-2"),
        (false, [LLAMA3_REGEX]) => Some("llama-bpe"),
        (false, [QWEN2_REGEX]) => Some(if name.contains("deepseek-r1") {
            "deepseek-r1-qwen"
        } else {
            "qwen2"
        }),
        _ => None,
    }
}
