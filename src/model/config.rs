//! Decoder configuration resolved from a Hugging Face `config.json`.
//!
//! Reads what transformers 4 and 5 write for Qwen2, Qwen3, Llama, Mistral (run as Llama with its
//! sliding window), Gemma 2, Gemma 3 text and GLM / GLM-4. Reference: transformers
//! `models/{qwen2,qwen3,llama,mistral,gemma2,gemma3,glm,glm4}/configuration_*.py` and
//! `modeling_rope_utils.py` (transformers 5 moves `rope_theta`/`rope_scaling` into
//! `rope_parameters`, per layer type for Gemma 3). As candle's `llama.rs`, a raw serde struct keeps every key optional
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
    #[error(
        "{path}: unsupported architecture {value:?} (key `{key}`); expected one of {}",
        supported_model_types()
    )]
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

/// Every `model_type` this decoder reads, with the class transformers saves it as
/// (`architectures[0]`) and the decoder it runs as (Mistral runs as Llama with its window).
const FAMILIES: &[(&str, &str, Architecture)] = &[
    ("qwen2", "Qwen2ForCausalLM", Architecture::Qwen2),
    ("qwen3", "Qwen3ForCausalLM", Architecture::Qwen3),
    ("llama", "LlamaForCausalLM", Architecture::Llama),
    ("mistral", "MistralForCausalLM", Architecture::Llama),
    ("gemma2", "Gemma2ForCausalLM", Architecture::Gemma2),
    ("gemma3_text", "Gemma3ForCausalLM", Architecture::Gemma3),
    ("glm", "GlmForCausalLM", Architecture::Glm),
    ("glm4", "Glm4ForCausalLM", Architecture::Glm4),
];

/// The `model_type`s of [`FAMILIES`], for error messages.
fn supported_model_types() -> String {
    FAMILIES
        .iter()
        .map(|(t, _, _)| *t)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The decoder family; Mistral-style configs resolve to [`Architecture::Llama`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen2,
    Llama,
    /// Qwen2 without q/k/v biases, with a per-head RMSNorm on queries and keys.
    Qwen3,
    /// (1 + w) norms, scaled embeddings, GeGLU, norms after attention and MLP, soft-capping,
    /// alternating sliding-window layers.
    Gemma2,
    /// Gemma 2 with q/k norms, no soft-capping, and a rope base of its own on local layers.
    Gemma3,
    /// Partial, interleaved rotary embeddings and one fused gate/up projection.
    Glm,
    /// GLM with norms after attention and MLP.
    Glm4,
}

impl Architecture {
    fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }

    fn is_glm(self) -> bool {
        matches!(self, Self::Glm | Self::Glm4)
    }
}

/// The MLP's activation on the gate (`hidden_act`, Gemma's `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (`silu`, `swish`).
    Silu,
    /// GeGLU with the tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// GeGLU with the exact erf GELU (`gelu`).
    Gelu,
}

impl Activation {
    fn hf_name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::GeluTanh => "gelu_pytorch_tanh",
            Self::Gelu => "gelu",
        }
    }
}

/// What a decoder layer's attention sees (`layer_types` in transformers 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Full,
    /// Keys within the config's `sliding_window` positions of the query (the query included).
    Sliding,
}

/// The settings by which the families beyond Llama differ; the defaults are Llama's.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantParams {
    pub hidden_act: Activation,
    /// Window of the [`LayerType::Sliding`] layers; `None`: no layer slides.
    pub sliding_window: Option<usize>,
    /// One per layer; empty means every layer is [`LayerType::Full`].
    pub layer_types: Vec<LayerType>,
    /// Gemma: attention scores are scaled by `query_pre_attn_scalar^-0.5`, not `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// `tanh(s / cap) * cap` on attention scores (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// `tanh(z / cap) * cap` on the logits (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// Rope base of the sliding layers (Gemma 3's `rope_local_base_freq`), without scaling.
    pub rope_local_theta: Option<f64>,
    /// Fraction of each head's dimensions that rotate (GLM: 0.5).
    pub partial_rotary_factor: f64,
}

impl Default for VariantParams {
    fn default() -> Self {
        Self {
            hidden_act: Activation::Silu,
            sliding_window: None,
            layer_types: Vec::new(),
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            rope_local_theta: None,
            partial_rotary_factor: 1.0,
        }
    }
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
    /// What the families beyond Qwen2 and Llama add.
    pub variant: VariantParams,
}

impl ModelConfig {
    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        match self.architecture {
            Architecture::Qwen2 => true,
            _ => self.attention_bias,
        }
    }

    /// Whether o_proj carries a bias.
    pub fn o_bias(&self) -> bool {
        match self.architecture {
            Architecture::Qwen2 | Architecture::Glm | Architecture::Glm4 => false,
            _ => self.attention_bias,
        }
    }

    /// Whether queries and keys pass a per-head RMSNorm before the rotary embedding.
    pub fn qk_norm(&self) -> bool {
        matches!(
            self.architecture,
            Architecture::Qwen3 | Architecture::Gemma3
        )
    }

    /// Added to every RMSNorm weight in the forward pass (Gemma stores `w` and scales by `1 + w`).
    pub fn norm_offset(&self) -> f64 {
        if self.architecture.is_gemma() {
            1.0
        } else {
            0.0
        }
    }

    /// Whether attention and MLP outputs pass a norm before their residual add (Gemma 2/3:
    /// `post_attention_layernorm`/`post_feedforward_layernorm`; GLM-4: `post_self_attn_layernorm`/
    /// `post_mlp_layernorm`).
    pub fn output_norms(&self) -> bool {
        matches!(
            self.architecture,
            Architecture::Gemma2 | Architecture::Gemma3 | Architecture::Glm4
        )
    }

    /// Factor on the token embeddings (Gemma: `sqrt(hidden_size)`, rounded to the weights'
    /// precision as transformers does).
    pub fn embed_scale(&self) -> Option<f32> {
        self.architecture
            .is_gemma()
            .then(|| (self.hidden_size as f64).sqrt() as f32)
    }

    /// Whether the MLP's gate and up projections are one `gate_up_proj` tensor (GLM).
    pub fn fused_gate_up(&self) -> bool {
        self.architecture.is_glm()
    }

    /// Whether rotary pairs are adjacent dimensions (GLM's `rotate_half`) instead of halves.
    pub fn rope_interleaved(&self) -> bool {
        self.architecture.is_glm()
    }

    /// Dimensions of each head that rotate (transformers: `int(head_dim * partial_rotary_factor)`).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.variant.partial_rotary_factor) as usize
    }

    /// Scale of the attention scores.
    pub fn attention_scale(&self) -> f64 {
        match self.variant.query_pre_attn_scalar {
            Some(s) => s.powf(-0.5),
            None => (self.head_dim as f64).powf(-0.5),
        }
    }

    /// The sliding window of layer `i`, if it slides.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        match self.variant.layer_types.get(i) {
            Some(LayerType::Sliding) => self.variant.sliding_window,
            Some(LayerType::Full) => None,
            // Mistral: every layer slides when a window is set.
            None => self.variant.sliding_window,
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
        // The family read (Mistral and Llama share a decoder), else the decoder's first.
        let (model_type, arch, _) = FAMILIES
            .iter()
            .find(|(t, _, a)| *a == self.architecture && *t == self.model_type)
            .or_else(|| FAMILIES.iter().find(|(_, _, a)| *a == self.architecture))
            .expect("every architecture has a family");
        let (arch, model_type) = (*arch, *model_type);
        let v = &self.variant;
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
        let act_key = if self.architecture.is_gemma() {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        m.insert(act_key.into(), json!(v.hidden_act.hf_name()));
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
        if let Some(local) = v.rope_local_theta {
            m.insert("rope_local_base_freq".into(), json!(local));
        }
        if v.partial_rotary_factor != 1.0 || self.architecture.is_glm() {
            m.insert(
                "partial_rotary_factor".into(),
                json!(v.partial_rotary_factor),
            );
        }
        m.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        m.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        if self.architecture != Architecture::Qwen2 && model_type != "mistral" {
            m.insert("attention_bias".into(), json!(self.attention_bias));
        }
        if self.architecture == Architecture::Llama && model_type == "llama" {
            m.insert("mlp_bias".into(), json!(self.mlp_bias));
        }
        let layer_types: Vec<&str> = (0..self.num_hidden_layers)
            .map(|i| match self.layer_window(i) {
                Some(_) => "sliding_attention",
                None => "full_attention",
            })
            .collect();
        match self.architecture {
            Architecture::Qwen2 | Architecture::Qwen3 => {
                // transformers 4 slides the layers from `max_window_layers` on; 5 reads layer_types.
                let first = (0..self.num_hidden_layers)
                    .find(|&i| self.layer_window(i).is_some())
                    .unwrap_or(self.num_hidden_layers);
                m.insert(
                    "use_sliding_window".into(),
                    json!(v.sliding_window.is_some()),
                );
                m.insert("sliding_window".into(), json!(v.sliding_window));
                m.insert("max_window_layers".into(), json!(first));
                m.insert("layer_types".into(), json!(layer_types));
            }
            Architecture::Llama if model_type == "mistral" => {
                m.insert("sliding_window".into(), json!(v.sliding_window));
            }
            Architecture::Gemma2 | Architecture::Gemma3 => {
                m.insert("sliding_window".into(), json!(v.sliding_window));
                m.insert("layer_types".into(), json!(layer_types));
                // transformers 5 validates it as an int.
                let scalar = v.query_pre_attn_scalar.map(|q| {
                    if q.fract() == 0.0 {
                        json!(q as u64)
                    } else {
                        json!(q)
                    }
                });
                m.insert("query_pre_attn_scalar".into(), json!(scalar));
                m.insert(
                    "attn_logit_softcapping".into(),
                    json!(v.attn_logit_softcapping),
                );
                m.insert(
                    "final_logit_softcapping".into(),
                    json!(v.final_logit_softcapping),
                );
            }
            _ => {}
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
        // Gemma and GLM configs default pad_token_id to a token: null says "none" explicitly.
        m.insert("pad_token_id".into(), json!(self.pad_token_id));
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
        let qk_norms = if self.qk_norm() { 2 * self.head_dim } else { 0 };
        let norms = if self.output_norms() { 4 * h } else { 2 * h };
        let layer = attn + mlp + norms + qk_norms;
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
    pub hidden_activation: Option<String>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub sliding_window_pattern: Option<usize>,
    pub query_pre_attn_scalar: Option<f64>,
    /// Absent: the class default; null: off.
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Option<f64>>,
    pub rope_local_base_freq: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
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
        let head_dim = match (self.head_dim, architecture) {
            (Some(d), _) => d,
            // The classes' defaults (transformers writes head_dim, older configs may not).
            (None, Architecture::Gemma2 | Architecture::Gemma3) => 256,
            (None, Architecture::Qwen3 | Architecture::Glm | Architecture::Glm4) => 128,
            (None, _) if hidden_size % num_attention_heads == 0 => {
                hidden_size / num_attention_heads
            }
            (None, _) => {
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
        let gemma = architecture.is_gemma();
        let (act_key, act) = match (&self.hidden_activation, &self.hidden_act) {
            (Some(a), _) if gemma => ("hidden_activation", Some(a.as_str())),
            (_, Some(a)) => ("hidden_act", Some(a.as_str())),
            _ => ("hidden_act", None),
        };
        let hidden_act = match act {
            None if gemma => Activation::GeluTanh,
            None | Some("silu" | "swish") => Activation::Silu,
            Some("gelu_pytorch_tanh" | "gelu_new" | "gelu_fast") => Activation::GeluTanh,
            Some("gelu") => Activation::Gelu,
            Some(other) => {
                return Err(invalid(
                    act_key,
                    format!(
                    "{other:?} unsupported; expected \"silu\", \"gelu_pytorch_tanh\" or \"gelu\""
                ),
                ))
            }
        };
        let rope = resolve_rope(&self, architecture, path)?;
        let (rope_theta, rope_scaling) = (rope.theta, rope.scaling);
        let partial_rotary_factor = rope
            .partial_rotary_factor
            .or(self.partial_rotary_factor)
            .unwrap_or(if architecture.is_glm() { 0.5 } else { 1.0 });
        let rotates = (head_dim as f64 * partial_rotary_factor) as usize;
        let valid = partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0;
        if !valid || rotates == 0 || !rotates.is_multiple_of(2) {
            return Err(invalid(
                "partial_rotary_factor",
                format!("{partial_rotary_factor} must be in (0, 1] and rotate an even number of the {head_dim} head dimensions"),
            ));
        }
        let sliding_window = match (architecture, self.sliding_window) {
            // Qwen slides only with use_sliding_window (its configs carry a window regardless).
            (Architecture::Qwen2 | Architecture::Qwen3, _)
                if !self.use_sliding_window.unwrap_or(false) =>
            {
                None
            }
            (Architecture::Gemma2 | Architecture::Gemma3, None) => Some(4096),
            (Architecture::Glm | Architecture::Glm4, _) => None,
            (Architecture::Llama, _) if model_type != "mistral" => None,
            (_, w) => w,
        };
        if sliding_window == Some(0) {
            return Err(invalid("sliding_window", "must be > 0".into()));
        }
        let layer_types = match &self.layer_types {
            // Without a window every layer is full (kept empty, the canonical form).
            _ if sliding_window.is_none() => Vec::new(),
            Some(types) => {
                if types.len() != num_hidden_layers {
                    return Err(invalid(
                        "layer_types",
                        format!("{} entries for {num_hidden_layers} layers", types.len()),
                    ));
                }
                types
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match t.as_str() {
                        "full_attention" => Ok(LayerType::Full),
                        "sliding_attention" => Ok(LayerType::Sliding),
                        other => Err(invalid(
                            &format!("layer_types[{i}]"),
                            format!("{other:?} unsupported; expected \"full_attention\" or \"sliding_attention\""),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => {
                let pattern = |i: usize| -> LayerType {
                    let sliding = match architecture {
                        Architecture::Gemma2 => !(i + 1).is_multiple_of(2),
                        Architecture::Gemma3 => {
                            !(i + 1).is_multiple_of(self.sliding_window_pattern.unwrap_or(6))
                        }
                        Architecture::Qwen2 | Architecture::Qwen3 => {
                            i >= self.max_window_layers.unwrap_or(28)
                        }
                        _ => true,
                    };
                    if sliding {
                        LayerType::Sliding
                    } else {
                        LayerType::Full
                    }
                };
                (0..num_hidden_layers).map(pattern).collect()
            }
        };
        let default_max_pos = match (architecture, model_type.as_str()) {
            (Architecture::Qwen2 | Architecture::Qwen3, _) => 32768,
            (_, "mistral") => 4096 * 32,
            (Architecture::Gemma2, _) => 8192,
            (Architecture::Gemma3 | Architecture::Glm | Architecture::Glm4, _) => 131072,
            _ => 2048,
        };
        let variant = VariantParams {
            hidden_act,
            sliding_window,
            layer_types,
            query_pre_attn_scalar: if gemma {
                Some(self.query_pre_attn_scalar.unwrap_or(256.0))
            } else {
                None
            },
            attn_logit_softcapping: match architecture {
                Architecture::Gemma2 => self.attn_logit_softcapping.unwrap_or(Some(50.0)),
                Architecture::Gemma3 => self.attn_logit_softcapping.flatten(),
                _ => None,
            },
            final_logit_softcapping: match architecture {
                Architecture::Gemma2 => self.final_logit_softcapping.unwrap_or(Some(30.0)),
                Architecture::Gemma3 => self.final_logit_softcapping.flatten(),
                _ => None,
            },
            rope_local_theta: match architecture {
                Architecture::Gemma3 => Some(
                    rope.local_theta
                        .or(self.rope_local_base_freq)
                        .unwrap_or(10000.0),
                ),
                _ => None,
            },
            partial_rotary_factor,
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
            rms_norm_eps: self.rms_norm_eps.unwrap_or(if architecture.is_glm() {
                1.5625e-7
            } else {
                1e-6
            }),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(default_max_pos),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(gemma),
            attention_bias: self.attention_bias.unwrap_or(architecture.is_glm()),
            mlp_bias: self.mlp_bias.unwrap_or(false),
            initializer_range: self.initializer_range.unwrap_or(0.02),
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            dtype: self.dtype.or(self.torch_dtype),
            variant,
        })
    }
}

fn resolve_architecture(
    raw: &RawModelConfig,
    path: &Path,
) -> Result<(Architecture, String), ConfigError> {
    let unsupported = |key: &'static str, value: &str| ConfigError::UnsupportedArchitecture {
        path: path.to_path_buf(),
        key,
        value: value.to_string(),
    };
    let family = match (
        &raw.model_type,
        raw.architectures.as_ref().and_then(|a| a.first()),
    ) {
        (Some(t), _) => FAMILIES
            .iter()
            .find(|(ty, _, _)| ty == t)
            .ok_or_else(|| unsupported("model_type", t))?,
        (None, Some(class)) => FAMILIES
            .iter()
            .find(|(_, c, _)| c == class)
            .ok_or_else(|| unsupported("architectures", class))?,
        (None, None) => {
            return Err(ConfigError::MissingKey {
                path: path.to_path_buf(),
                key: "model_type",
            })
        }
    };
    Ok((family.2, family.0.to_string()))
}

/// Serde helper: a key present (even as null) is `Some`, an absent one `None` (with `default`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

/// The rotary settings read from a config.
struct ResolvedRope {
    theta: f64,
    scaling: Option<RopeScaling>,
    /// Gemma 3's sliding layers (`rope_parameters.sliding_attention.rope_theta`).
    local_theta: Option<f64>,
    /// When `rope_parameters` carries it (transformers 5).
    partial_rotary_factor: Option<f64>,
}

/// `rope_parameters` (transformers 5) wins over `rope_theta` + `rope_scaling` (transformers 4).
/// Gemma 3's transformers 5 configs nest one such object per layer type.
fn resolve_rope(
    raw: &RawModelConfig,
    architecture: Architecture,
    path: &Path,
) -> Result<ResolvedRope, ConfigError> {
    let (key, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(v), _) if !v.is_null() => ("rope_parameters", Some(v)),
        (_, Some(v)) if !v.is_null() => ("rope_scaling", Some(v)),
        _ => ("rope_scaling", None),
    };
    let default_theta = if architecture == Architecture::Gemma3 {
        1_000_000.0
    } else {
        10000.0
    };
    let obj = match params {
        None => {
            return Ok(ResolvedRope {
                theta: raw.rope_theta.unwrap_or(default_theta),
                scaling: None,
                local_theta: None,
                partial_rotary_factor: None,
            })
        }
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(ConfigError::InvalidValue {
                path: path.to_path_buf(),
                key: key.to_string(),
                message: format!("expected an object, got {other}"),
            })
        }
    };
    if let Some(full) = obj.get("full_attention") {
        let local = obj.get("sliding_attention");
        let global = rope_object(
            full,
            &format!("{key}.full_attention"),
            raw,
            default_theta,
            path,
        )?;
        let local = match local {
            Some(v) => Some(rope_object(
                v,
                &format!("{key}.sliding_attention"),
                raw,
                10000.0,
                path,
            )?),
            None => None,
        };
        return Ok(ResolvedRope {
            local_theta: local.map(|l| l.theta),
            ..global
        });
    }
    rope_object(
        params.unwrap_or(&Value::Null),
        key,
        raw,
        default_theta,
        path,
    )
}

/// One rope parameter object (`{"rope_type": ..., "rope_theta": ..., "factor": ...}`).
fn rope_object(
    value: &Value,
    key: &str,
    raw: &RawModelConfig,
    default_theta: f64,
    path: &Path,
) -> Result<ResolvedRope, ConfigError> {
    let invalid = |field: &str, message: String| ConfigError::InvalidValue {
        path: path.to_path_buf(),
        key: format!("{key}.{field}"),
        message,
    };
    let obj = match value {
        Value::Object(o) => o,
        other => return Err(invalid("", format!("expected an object, got {other}"))),
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
    let theta = num("rope_theta")?
        .or(raw.rope_theta)
        .unwrap_or(default_theta);
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
    Ok(ResolvedRope {
        theta,
        scaling,
        local_theta: None,
        partial_rotary_factor: num("partial_rotary_factor")?,
    })
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
