//! `TextTokenizer`: a HF fast tokenizer (tokenizer.json) plus the bits of tokenizer_config.json and
//! generation_config.json that change behaviour (special tokens, BOS/EOS policy, chat templates).
//! Reference: transformers `tokenization_utils_base.py`, `tokenization_utils_fast.py`
//! (`update_post_processor` of LlamaTokenizerFast), `clean_up_tokenization`.
//!
//! Model differences handled here:
//! - Llama-3: the tokenizer.json post-processor (TemplateProcessing) prepends `<|begin_of_text|>`;
//!   generation_config lists several EOS ids (`<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`);
//!   no pad token; `clean_up_tokenization_spaces` is true.
//! - Qwen2.5: no BOS at all (`bos_token: null`, ByteLevel post-processor); eos `<|im_end|>`
//!   (Instruct), pad `<|endoftext|>`; generation_config eos `[<|im_end|>, <|endoftext|>]`.
//! - SmolLM2: `bos_token` is `<|im_start|>` but the post-processor adds nothing; eos/pad `<|im_end|>`.
//! - Llama-2/Gemma style classes rebuild the post-processor from `add_bos_token`/`add_eos_token`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::text::chat_template::{ChatTemplate, SpecialTokens};
use crate::text::{Error, Result};

/// Byte range `start..end` of a token in the encoded text.
pub type ByteSpan = (usize, usize);

/// The tokenizer_config.json values that matter here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    /// Named chat templates; a plain string template is stored under `default`.
    pub chat_templates: BTreeMap<String, String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub model_max_length: Option<usize>,
    pub clean_up_tokenization_spaces: bool,
    pub tokenizer_class: Option<String>,
    /// `added_tokens_decoder` entries: id -> token.
    pub added_tokens: BTreeMap<u32, AddedToken>,
}

fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(m) => m.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    }
}

fn bad(path: &Path, key: &str, expected: &str, got: &Json) -> Error {
    Error::ConfigValue {
        path: path.to_owned(),
        key: key.to_owned(),
        expected: expected.to_owned(),
        got: got.to_string(),
    }
}

impl TokenizerConfig {
    /// Parses tokenizer_config.json content; `path` only names the source in errors.
    pub fn from_json(json: &Json, path: &Path) -> Result<Self> {
        let mut cfg = TokenizerConfig::default();
        let Some(obj) = json.as_object() else {
            return Err(bad(path, "<root>", "an object", json));
        };
        if let Some(t) = obj.get("chat_template") {
            match t {
                Json::String(s) => {
                    cfg.chat_templates.insert("default".into(), s.clone());
                }
                Json::Array(list) => {
                    for item in list {
                        let name = item.get("name").and_then(Json::as_str);
                        let tpl = item.get("template").and_then(Json::as_str);
                        match (name, tpl) {
                            (Some(n), Some(t)) => {
                                cfg.chat_templates.insert(n.to_owned(), t.to_owned());
                            }
                            _ => {
                                return Err(bad(
                                    path,
                                    "chat_template",
                                    "a list of {name, template}",
                                    item,
                                ))
                            }
                        }
                    }
                }
                Json::Null => {}
                other => return Err(bad(path, "chat_template", "a string or a list", other)),
            }
        }
        for (key, slot) in [
            ("bos_token", &mut cfg.bos_token),
            ("eos_token", &mut cfg.eos_token),
            ("pad_token", &mut cfg.pad_token),
            ("unk_token", &mut cfg.unk_token),
        ] {
            match obj.get(key) {
                None | Some(Json::Null) => {}
                Some(v) => {
                    *slot = Some(
                        token_string(v)
                            .ok_or_else(|| bad(path, key, "a string or AddedToken dict", v))?,
                    )
                }
            }
        }
        for (key, slot) in [
            ("add_bos_token", &mut cfg.add_bos_token),
            ("add_eos_token", &mut cfg.add_eos_token),
        ] {
            match obj.get(key) {
                None | Some(Json::Null) => {}
                Some(Json::Bool(b)) => *slot = Some(*b),
                Some(v) => return Err(bad(path, key, "a boolean", v)),
            }
        }
        // transformers writes 1e30 ("VERY_LARGE_INTEGER") when there is no limit.
        if let Some(v) = obj.get("model_max_length") {
            match v.as_f64() {
                Some(n) if n > 0.0 && n < 1e12 => cfg.model_max_length = Some(n as usize),
                Some(_) | None if v.is_number() => {}
                _ if v.is_null() => {}
                _ => return Err(bad(path, "model_max_length", "a number", v)),
            }
        }
        cfg.clean_up_tokenization_spaces = obj
            .get("clean_up_tokenization_spaces")
            .and_then(Json::as_bool)
            .unwrap_or(false);
        cfg.tokenizer_class = obj
            .get("tokenizer_class")
            .and_then(Json::as_str)
            .map(str::to_owned);
        if let Some(Json::Object(dec)) = obj.get("added_tokens_decoder") {
            for (id, tok) in dec {
                let id: u32 = id.parse().map_err(|_| {
                    bad(
                        path,
                        "added_tokens_decoder",
                        "integer keys",
                        &Json::String(id.clone()),
                    )
                })?;
                let content = token_string(tok)
                    .ok_or_else(|| bad(path, "added_tokens_decoder", "AddedToken dicts", tok))?;
                let flag =
                    |k: &str, default: bool| tok.get(k).and_then(Json::as_bool).unwrap_or(default);
                let special = flag("special", false);
                let added = AddedToken::from(content, special)
                    .lstrip(flag("lstrip", false))
                    .rstrip(flag("rstrip", false))
                    .single_word(flag("single_word", false))
                    .normalized(flag("normalized", !special));
                cfg.added_tokens.insert(id, added);
            }
        }
        Ok(cfg)
    }
}

/// Reads `eos_token_id` (int or list) from generation_config.json content.
pub fn generation_eos_ids(json: &Json, path: &Path) -> Result<Vec<u32>> {
    let as_id = |v: &Json| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match json.get("eos_token_id") {
        None | Some(Json::Null) => Ok(vec![]),
        Some(Json::Array(list)) => list
            .iter()
            .map(|v| as_id(v).ok_or_else(|| bad(path, "eos_token_id", "token ids", v)))
            .collect(),
        Some(v) => as_id(v)
            .map(|id| vec![id])
            .ok_or_else(|| bad(path, "eos_token_id", "an int or a list of ints", v)),
    }
}

/// A loaded tokenizer with its special-token policy and chat templates.
#[derive(Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    config: TokenizerConfig,
    generation_eos: Vec<u32>,
    fingerprint: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("config", &self.config)
            .field("generation_eos", &self.generation_eos)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_owned(),
        source,
    })
}

/// Classes whose transformers `__init__` rebuilds the post-processor from add_bos/add_eos_token.
const POST_PROCESSOR_FROM_FLAGS: &[&str] = &[
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
    "GemmaTokenizer",
    "GemmaTokenizerFast",
];

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`, and `tokenizer_config.json` / `generation_config.json` if present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| Error::TokenizerLoad {
            path: tok_path.clone(),
            message: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let mut config = if cfg_path.exists() {
            TokenizerConfig::from_json(&read_json(&cfg_path)?, &cfg_path)?
        } else {
            TokenizerConfig::default()
        };
        // transformers >= 4.43 saves the template beside the config as chat_template.jinja.
        let jinja = dir.join("chat_template.jinja");
        if config.chat_templates.is_empty() && jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                path: jinja.clone(),
                source,
            })?;
            config.chat_templates.insert("default".into(), text);
        }
        let gen_path = dir.join("generation_config.json");
        let generation_eos = if gen_path.exists() {
            generation_eos_ids(&read_json(&gen_path)?, &gen_path)?
        } else {
            vec![]
        };
        Self::from_parts(tokenizer, config, generation_eos)
    }

    /// Builds from in-memory parts (used by the GGUF reader and the BPE trainer).
    pub fn from_parts(
        mut tokenizer: Tokenizer,
        config: TokenizerConfig,
        generation_eos: Vec<u32>,
    ) -> Result<Self> {
        // transformers adds added_tokens_decoder entries missing from tokenizer.json.
        let missing: Vec<AddedToken> = config
            .added_tokens
            .iter()
            .filter(|(id, t)| tokenizer.token_to_id(&t.content) != Some(**id))
            .map(|(_, t)| t.clone())
            .collect();
        if !missing.is_empty() {
            let (special, normal): (Vec<_>, Vec<_>) = missing.into_iter().partition(|t| t.special);
            tokenizer.add_special_tokens(&special);
            tokenizer.add_tokens(&normal);
        }
        for (key, tok) in [
            ("bos_token", &config.bos_token),
            ("eos_token", &config.eos_token),
            ("pad_token", &config.pad_token),
        ] {
            if let Some(t) = tok {
                if tokenizer.token_to_id(t).is_none() {
                    return Err(Error::UnknownSpecialToken {
                        key: key.into(),
                        token: t.clone(),
                    });
                }
            }
        }
        let class = config.tokenizer_class.as_deref().unwrap_or("");
        if POST_PROCESSOR_FROM_FLAGS.contains(&class) {
            rebuild_post_processor(&mut tokenizer, &config)?;
        }
        let fingerprint = compute_fingerprint(&tokenizer, &config, &generation_eos)?;
        Ok(Self {
            tokenizer,
            config,
            generation_eos,
            fingerprint,
        })
    }

    /// The underlying HF tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// As HF `tokenizer(text)["input_ids"]`: the post-processor adds BOS/EOS as the model expects,
    /// special tokens written in the text become single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// As HF `tokenizer(text, add_special_tokens=False)`.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, add_special)
            .map_err(|e| Error::Tokenizer {
                op: "encode",
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes with byte offsets of each token into `text` (no special tokens added).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                op: "encode",
                message: e.to_string(),
            })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Ids the post-processor puts before / after a single sequence (e.g. Llama's BOS).
    pub fn special_affixes(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        let plain = self.encode_plain("a")?;
        let full = self.encode("a")?;
        let Some(start) = full
            .windows(plain.len())
            .position(|w| w == plain.as_slice())
        else {
            return Ok((vec![], vec![]));
        };
        Ok((full[..start].to_vec(), full[start + plain.len()..].to_vec()))
    }

    /// As HF `tokenizer.decode(ids, skip_special_tokens=...)`, including
    /// `clean_up_tokenization_spaces` when the config sets it.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer {
                op: "decode",
                message: e.to_string(),
            })?;
        Ok(if self.config.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// All ids that end generation: generation_config's list first, then the tokenizer's eos.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.generation_eos.clone();
        if let Some(id) = self
            .config
            .eos_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// The id appended after a response in training (tokenizer_config `eos_token`, else the
    /// first generation eos).
    pub fn eos_id(&self) -> Option<u32> {
        self.config
            .eos_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
            .or_else(|| self.generation_eos.first().copied())
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.config
            .bos_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    /// The configured pad id; `None` for models without one (Llama-3): callers usually use eos.
    pub fn pad_id(&self) -> Option<u32> {
        self.config
            .pad_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    pub fn model_max_length(&self) -> Option<usize> {
        self.config.model_max_length
    }

    /// The special-token variables transformers passes to chat templates.
    pub fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            bos_token: self.config.bos_token.clone(),
            eos_token: self.config.eos_token.clone(),
            pad_token: self.config.pad_token.clone(),
            unk_token: self.config.unk_token.clone(),
        }
    }

    pub fn chat_template_names(&self) -> Vec<String> {
        self.config.chat_templates.keys().cloned().collect()
    }

    /// The chat template `name` (default: `default`), compiled with this tokenizer's special tokens.
    pub fn chat_template(&self, name: Option<&str>) -> Result<ChatTemplate> {
        let name = name.unwrap_or("default");
        let source = self
            .config
            .chat_templates
            .get(name)
            .ok_or_else(|| Error::NoChatTemplate {
                name: name.to_owned(),
                available: self.chat_template_names(),
            })?;
        ChatTemplate::new(name, source, self.special_tokens())
    }

    /// blake3 (hex) of the serialized tokenizer and the config values that change encoding or
    /// templates; equal fingerprints mean equal token ids for equal inputs.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Writes tokenizer.json and tokenizer_config.json that transformers' AutoTokenizer loads.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?;
        let tok_path = dir.join("tokenizer.json");
        let json = self
            .tokenizer
            .to_string(true)
            .map_err(|e| Error::Tokenizer {
                op: "serialize",
                message: e.to_string(),
            })?;
        write(&tok_path, json.as_bytes())?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg =
            serde_json::to_string_pretty(&self.config_json()).map_err(|source| Error::Json {
                path: cfg_path.clone(),
                source,
            })?;
        write(&cfg_path, cfg.as_bytes())
    }

    fn config_json(&self) -> Json {
        let c = &self.config;
        let mut decoder = serde_json::Map::new();
        for t in self
            .tokenizer
            .get_added_tokens_decoder()
            .iter()
            .collect::<BTreeMap<_, _>>()
        {
            let (id, tok) = t;
            decoder.insert(
                id.to_string(),
                serde_json::json!({"content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized,
                    "rstrip": tok.rstrip, "single_word": tok.single_word, "special": tok.special}),
            );
        }
        let mut obj = serde_json::json!({
            "add_bos_token": c.add_bos_token.unwrap_or(false),
            "add_eos_token": c.add_eos_token.unwrap_or(false),
            "added_tokens_decoder": decoder,
            "bos_token": c.bos_token, "eos_token": c.eos_token, "pad_token": c.pad_token, "unk_token": c.unk_token,
            "clean_up_tokenization_spaces": c.clean_up_tokenization_spaces,
            "model_max_length": c.model_max_length,
            "tokenizer_class": c.tokenizer_class.clone().unwrap_or_else(|| "PreTrainedTokenizerFast".into()),
        });
        if let Some(t) = c
            .chat_templates
            .get("default")
            .filter(|_| c.chat_templates.len() == 1)
        {
            obj["chat_template"] = Json::String(t.clone());
        } else if !c.chat_templates.is_empty() {
            obj["chat_template"] = c
                .chat_templates
                .iter()
                .map(|(n, t)| serde_json::json!({"name": n, "template": t}))
                .collect();
        }
        obj
    }
}

fn write(path: &PathBuf, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })
}

fn rebuild_post_processor(tokenizer: &mut Tokenizer, config: &TokenizerConfig) -> Result<()> {
    let add_bos = config.add_bos_token.unwrap_or(true);
    let add_eos = config.add_eos_token.unwrap_or(false);
    let mut single = String::new();
    let mut pair = String::new();
    let mut specials = vec![];
    for (flag, tok) in [(add_bos, &config.bos_token), (add_eos, &config.eos_token)] {
        if let (true, Some(t)) = (flag, tok) {
            let id = tokenizer
                .token_to_id(t)
                .ok_or_else(|| Error::UnknownSpecialToken {
                    key: "bos/eos".into(),
                    token: t.clone(),
                })?;
            specials.push((t.clone(), id));
        }
    }
    let bos = config
        .bos_token
        .as_deref()
        .filter(|_| add_bos)
        .map(|t| format!("{t}:0 "));
    let eos = config
        .eos_token
        .as_deref()
        .filter(|_| add_eos)
        .map(|t| format!(" {t}:0"));
    single.push_str(&format!(
        "{}$A:0{}",
        bos.clone().unwrap_or_default(),
        eos.clone().unwrap_or_default()
    ));
    pair.push_str(&format!(
        "{}$A:0{} {}$B:1{}",
        bos.clone().unwrap_or_default(),
        eos.clone().unwrap_or_default(),
        bos.unwrap_or_default().replace(":0", ":1"),
        eos.unwrap_or_default().replace(":0", ":1")
    ));
    let processor = TemplateProcessing::builder()
        .try_single(single.as_str())
        .and_then(|b| b.try_pair(pair.as_str()))
        .map_err(|e| Error::Tokenizer {
            op: "post-processor template",
            message: e.to_string(),
        })?
        .special_tokens(specials)
        .build()
        .map_err(|e| Error::Tokenizer {
            op: "post-processor",
            message: e.to_string(),
        })?;
    tokenizer.with_post_processor(Some(processor));
    Ok(())
}

fn compute_fingerprint(
    tokenizer: &Tokenizer,
    config: &TokenizerConfig,
    generation_eos: &[u32],
) -> Result<String> {
    let json = tokenizer.to_string(false).map_err(|e| Error::Tokenizer {
        op: "serialize",
        message: e.to_string(),
    })?;
    let mut h = blake3::Hasher::new();
    h.update(json.as_bytes());
    let relevant = serde_json::json!({
        "chat_templates": config.chat_templates,
        "bos": config.bos_token, "eos": config.eos_token, "pad": config.pad_token, "unk": config.unk_token,
        "add_bos": config.add_bos_token, "add_eos": config.add_eos_token,
        "cleanup": config.clean_up_tokenization_spaces,
        "generation_eos": generation_eos,
    });
    h.update(relevant.to_string().as_bytes());
    Ok(h.finalize().to_hex().to_string())
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
