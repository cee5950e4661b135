//! Decoder configuration resolved from a Hugging Face `config.json`.
//!
//! Reads what transformers 4 and 5 write for Qwen2 (`Qwen2ForCausalLM`), Llama
//! (`LlamaForCausalLM`) and Mistral (`MistralForCausalLM`, run as Llama). Reference:
//! transformers `models/{qwen2,llama,mistral}/configuration_*.py` and
//! `modeling_rope_utils.py` (transformers 5 moves `rope_theta`/`rope_scaling` into
//! `rope_parameters`). As candle's `llama.rs`, a raw serde struct keeps every key optional
//! and [`RawModelConfig::into_config`] settles the defaults once.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Errors reading or resolving a `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid config.json: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: unsupported architecture {value:?} (key `{key}`); expected qwen2, llama or mistral")]
    UnsupportedArchitecture {
        path: PathBuf,
        key: &'static str,
        value: String,
    },
    #[error("{path}: missing required key `{key}`")]
    MissingKey { path: PathBuf, key: &'static str },
    #[error("{path}: key `{key}`: {message}")]
    InvalidValue {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The decoder family; Mistral-style configs resolve to [`Architecture::Llama`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen2,
    Llama,
}

/// Supported RoPE frequency scalings (`rope_type` in HF).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (`rope_type = "linear"`).
    Linear { factor: f64 },
    /// Llama 3.x frequency-dependent scaling (`rope_type = "llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// A fully resolved decoder configuration: every default settled.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// `model_type` as read (`qwen2`, `llama`, `mistral`), written back by [`Self::to_hf_json`].
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Config key `attention_bias` (Llama); Qwen2 ignores it (q/k/v always biased, o never).
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub initializer_range: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `torch_dtype` (transformers 4) or `dtype` (transformers 5), e.g. `"bfloat16"`.
    pub dtype: Option<String>,
}

impl ModelConfig {
    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        match self.architecture {
            Architecture::Qwen2 => true,
            Architecture::Llama => self.attention_bias,
        }
    }

    /// Whether o_proj carries a bias.
    pub fn o_bias(&self) -> bool {
        match self.architecture {
            Architecture::Qwen2 => false,
            Architecture::Llama => self.attention_bias,
        }
    }

    /// Reads and resolves `path` (a config.json file).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Resolves config.json text; `path` only names the source in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawModelConfig =
            serde_json::from_str(text).map_err(|source| ConfigError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        raw.into_config(path)
    }

    /// A config.json that transformers 4 and 5 load (legacy `rope_theta`/`rope_scaling` keys,
    /// which transformers 5 converts into `rope_parameters`).
    pub fn to_hf_json(&self) -> Value {
        let (arch, model_type) = match (self.architecture, self.model_type.as_str()) {
            (Architecture::Qwen2, _) => ("Qwen2ForCausalLM", "qwen2"),
            (Architecture::Llama, "mistral") => ("MistralForCausalLM", "mistral"),
            (Architecture::Llama, _) => ("LlamaForCausalLM", "llama"),
        };
        let mut m = Map::new();
        m.insert("architectures".into(), json!([arch]));
        m.insert("model_type".into(), json!(model_type));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        m.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        m.insert(
            "num_key_value_heads".into(),
            json!(self.num_key_value_heads),
        );
        m.insert("head_dim".into(), json!(self.head_dim));
        m.insert("hidden_act".into(), json!("silu"));
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        m.insert("rope_theta".into(), json!(self.rope_theta));
        let scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        m.insert("rope_scaling".into(), scaling);
        m.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        m.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        if self.architecture == Architecture::Llama && model_type == "llama" {
            m.insert("attention_bias".into(), json!(self.attention_bias));
            m.insert("mlp_bias".into(), json!(self.mlp_bias));
        }
        if self.architecture == Architecture::Qwen2 {
            m.insert("use_sliding_window".into(), json!(false));
        }
        m.insert("initializer_range".into(), json!(self.initializer_range));
        m.insert("attention_dropout".into(), json!(0.0));
        m.insert("use_cache".into(), json!(true));
        if let Some(b) = self.bos_token_id {
            m.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                m.insert("eos_token_id".into(), json!(one));
            }
            many => {
                m.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(p) = self.pad_token_id {
            m.insert("pad_token_id".into(), json!(p));
        }
        if let Some(d) = &self.dtype {
            m.insert("torch_dtype".into(), json!(d));
        }
        Value::Object(m)
    }

    /// Number of parameters (counting a tied lm_head once).
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias() { q + 2 * kv } else { 0 }
            + if self.o_bias() { h } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }
}

/// `config.json` as written, every key optional; unknown keys are ignored (HF writes many).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawModelConfig {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Option<String>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub initializer_range: Option<f64>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
}

impl RawModelConfig {
    /// Settles defaults and validates; `path` names the file in errors.
    pub fn into_config(self, path: &Path) -> Result<ModelConfig, ConfigError> {
        let p = || path.to_path_buf();
        let invalid = |key: &str, message: String| ConfigError::InvalidValue {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let (architecture, model_type) = resolve_architecture(&self, path)?;
        let require = |v: Option<usize>, key: &'static str| {
            v.ok_or(ConfigError::MissingKey { path: p(), key })
        };
        let hidden_size = require(self.hidden_size, "hidden_size")?;
        let num_attention_heads = require(self.num_attention_heads, "num_attention_heads")?;
        let vocab_size = require(self.vocab_size, "vocab_size")?;
        let intermediate_size = require(self.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = require(self.num_hidden_layers, "num_hidden_layers")?;
        if num_attention_heads == 0 {
            return Err(invalid("num_attention_heads", "must be > 0".into()));
        }
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} must divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(invalid(
                    "hidden_size",
                    format!(
                    "{hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                ),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(
                "head_dim",
                format!("{head_dim} must be even for RoPE"),
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(invalid(
                    "hidden_act",
                    format!("{act:?} unsupported; expected \"silu\""),
                ));
            }
        }
        let (rope_theta, rope_scaling) = resolve_rope(&self, path)?;
        let default_max_pos = match (architecture, model_type.as_str()) {
            (Architecture::Qwen2, _) => 32768,
            (_, "mistral") => 4096 * 32,
            _ => 2048,
        };
        let bos_token_id = token_id(self.bos_token_id.as_ref(), "bos_token_id", path)?
            .into_iter()
            .next();
        let eos_token_ids = token_id(self.eos_token_id.as_ref(), "eos_token_id", path)?;
        let pad_token_id = token_id(self.pad_token_id.as_ref(), "pad_token_id", path)?
            .into_iter()
            .next();
        Ok(ModelConfig {
            architecture,
            model_type,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(default_max_pos),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention_bias: self.attention_bias.unwrap_or(false),
            mlp_bias: self.mlp_bias.unwrap_or(false),
            initializer_range: self.initializer_range.unwrap_or(0.02),
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            dtype: self.dtype.or(self.torch_dtype),
        })
    }
}

fn resolve_architecture(
    raw: &RawModelConfig,
    path: &Path,
) -> Result<(Architecture, String), ConfigError> {
    let from_type = |t: &str| match t {
        "qwen2" => Some(Architecture::Qwen2),
        "llama" | "mistral" => Some(Architecture::Llama),
        _ => None,
    };
    if let Some(t) = &raw.model_type {
        return from_type(t).map(|a| (a, t.clone())).ok_or_else(|| {
            ConfigError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                key: "model_type",
                value: t.clone(),
            }
        });
    }
    let first =
        raw.architectures
            .as_ref()
            .and_then(|a| a.first())
            .ok_or(ConfigError::MissingKey {
                path: path.to_path_buf(),
                key: "model_type",
            })?;
    let model_type = match first.as_str() {
        "Qwen2ForCausalLM" => "qwen2",
        "LlamaForCausalLM" => "llama",
        "MistralForCausalLM" => "mistral",
        _ => {
            return Err(ConfigError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                key: "architectures",
                value: first.clone(),
            })
        }
    };
    Ok((
        from_type(model_type).unwrap_or(Architecture::Llama),
        model_type.to_string(),
    ))
}

/// `rope_parameters` (transformers 5) wins over `rope_theta` + `rope_scaling` (transformers 4).
fn resolve_rope(
    raw: &RawModelConfig,
    path: &Path,
) -> Result<(f64, Option<RopeScaling>), ConfigError> {
    let (key, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(v), _) if !v.is_null() => ("rope_parameters", Some(v)),
        (_, Some(v)) if !v.is_null() => ("rope_scaling", Some(v)),
        _ => ("rope_scaling", None),
    };
    let invalid = |field: &str, message: String| ConfigError::InvalidValue {
        path: path.to_path_buf(),
        key: format!("{key}.{field}"),
        message,
    };
    let obj = match params {
        None => return Ok((raw.rope_theta.unwrap_or(10000.0), None)),
        Some(Value::Object(o)) => o,
        Some(other) => return Err(invalid("", format!("expected an object, got {other}"))),
    };
    let num = |field: &'static str| -> Result<Option<f64>, ConfigError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(field, format!("expected a number, got {v}"))),
        }
    };
    let need = |field: &'static str| -> Result<f64, ConfigError> {
        num(field)?.ok_or_else(|| invalid(field, "missing".into()))
    };
    let rope_theta = num("rope_theta")?.or(raw.rope_theta).unwrap_or(10000.0);
    let rope_type = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match rope_type {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
        }),
        other => {
            return Err(invalid(
                "rope_type",
                format!("{other:?} unsupported; expected default, linear or llama3"),
            ))
        }
    };
    Ok((rope_theta, scaling))
}

/// A token id key: absent/null, an int, or a list of ints.
fn token_id(v: Option<&Value>, key: &'static str, path: &Path) -> Result<Vec<u32>, ConfigError> {
    let bad = |v: &Value| ConfigError::InvalidValue {
        path: path.to_path_buf(),
        key: key.to_string(),
        message: format!("expected a token id or a list of ids, got {v}"),
    };
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| bad(v))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json_str(text, Path::new("cfg/config.json"))
    }

    #[test]
    fn qwen2_transformers4() {
        let c = parse(
            r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","vocab_size":151936,
            "hidden_size":896,"intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,
            "num_key_value_heads":2,"rms_norm_eps":1e-06,"rope_theta":1000000.0,"max_position_embeddings":32768,
            "tie_word_embeddings":true,"bos_token_id":151643,"eos_token_id":151645,"torch_dtype":"bfloat16",
            "rope_scaling":null,"sliding_window":32768}"#,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert_eq!(c.head_dim, 64);
        assert!(c.qkv_bias() && !c.o_bias());
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.eos_token_ids, vec![151645]);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.num_parameters(), 494_032_768);
    }

    #[test]
    fn llama3_transformers5_rope_parameters() {
        let c = parse(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":2048,
            "intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,
            "head_dim":64,"rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":32.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},
            "eos_token_id":[128001,128008,128009],"dtype":"bfloat16"}"#,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.model_type, "llama");
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(!c.qkv_bias());
        // The HF json round-trips through the resolver.
        let again = parse(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn mistral_runs_as_llama_and_defaults() {
        let c = parse(
            r#"{"model_type":"mistral","vocab_size":32000,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4}"#,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(c.rope_scaling.is_none());
        assert_eq!(parse(&c.to_hf_json().to_string()).unwrap(), c);
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = parse(r#"{"architectures":["GPT2LMHeadModel"]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cfg/config.json") && e.contains("GPT2LMHeadModel"),
            "{e}"
        );
        let e = parse(r#"{"model_type":"llama","hidden_size":64}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
        let e = parse(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"rope_scaling":{"type":"yarn","factor":4.0}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rope_scaling.rope_type") && e.contains("yarn"),
            "{e}"
        );
        let e = parse(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }
}
