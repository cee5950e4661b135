//! Prompt-learning adapters (peft PROMPT_TUNING, P_TUNING, PREFIX_TUNING): their folder format and
//! how a frozen [`CausalLm`] runs with them, in training and in generation.
//!
//! peft saves all three as one tensor, `prompt_embeddings` (`get_prompt_embedding_to_save`: the
//! prompt encoder's output, so a P-Tuning MLP/LSTM is folded in), beside `adapter_config.json`.
//! - Virtual tokens (prompt tuning, P-Tuning): `[num_virtual_tokens, hidden]`, concatenated before
//!   the input embeddings (`PeftModelForCausalLM.forward`); positions run 0..n+len over both.
//! - Prefix: `[num_virtual_tokens, layers * 2 * kv_heads * head_dim]`, viewed as
//!   `[n, layers * 2, kv_heads, head_dim]` (`get_prompt`), layer i's keys at 2i and values at
//!   2i+1, put in the KV cache before the first token; the tokens sit at positions n.. .
//!
//! Reference: peft `peft_model.py` (`get_prompt`, `PeftModelForCausalLM.forward`,
//! `prepare_inputs_for_generation`), `utils/save_and_load.py`, `tuners/*/config.py`.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde_json::{json, Value};

use crate::model::config::ModelConfig;
use crate::model::decoder::{CausalLm, KvCache};
use crate::model::hf::{load_safetensors_file, save_safetensors, DType, HostTensor};

/// The tensor name peft saves for every prompt-learning method.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// Errors reading or writing a prompt-learning adapter.
#[derive(Debug, thiserror::Error)]
pub enum PromptAdapterError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Hf(#[from] crate::model::hf::HfError),
}

/// Which prompt-learning method an adapter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    PromptTuning,
    PTuning,
    Prefix,
}

impl PromptKind {
    pub fn peft_type(self) -> &'static str {
        match self {
            Self::PromptTuning => "PROMPT_TUNING",
            Self::PTuning => "P_TUNING",
            Self::Prefix => "PREFIX_TUNING",
        }
    }

    pub fn from_peft_type(s: &str) -> Option<Self> {
        [Self::PromptTuning, Self::PTuning, Self::Prefix]
            .into_iter()
            .find(|k| k.peft_type() == s)
    }
}

/// The keys of adapter_config.json, as peft 0.21 writes them for a causal LM.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptAdapterConfig {
    pub kind: PromptKind,
    pub num_virtual_tokens: usize,
    /// hidden (virtual tokens) or kv_heads * head_dim (prefix).
    pub token_dim: usize,
    /// attention heads (virtual tokens) or kv heads (prefix).
    pub num_attention_heads: usize,
    pub num_layers: usize,
    pub base_model_name_or_path: Option<String>,
    /// P-Tuning: `MLP` or `LSTM`.
    pub encoder_reparameterization_type: String,
    pub encoder_hidden_size: usize,
    pub encoder_num_layers: usize,
    /// Prompt tuning: `RANDOM` or `TEXT` (then `prompt_tuning_init_text` and the tokenizer).
    pub prompt_tuning_init: String,
    pub prompt_tuning_init_text: Option<String>,
    pub tokenizer_name_or_path: Option<String>,
}

impl PromptAdapterConfig {
    /// The config of `kind` for `model` with defaults as peft's (encoder size = token_dim).
    pub fn new(kind: PromptKind, num_virtual_tokens: usize, model: &ModelConfig) -> Self {
        let (token_dim, heads) = match kind {
            PromptKind::Prefix => (
                model.num_key_value_heads * model.head_dim,
                model.num_key_value_heads,
            ),
            _ => (model.hidden_size, model.num_attention_heads),
        };
        Self {
            kind,
            num_virtual_tokens,
            token_dim,
            num_attention_heads: heads,
            num_layers: model.num_hidden_layers,
            base_model_name_or_path: None,
            encoder_reparameterization_type: "MLP".into(),
            encoder_hidden_size: token_dim,
            encoder_num_layers: 2,
            prompt_tuning_init: "RANDOM".into(),
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
        }
    }

    /// adapter_config.json with exactly the keys peft 0.21 saves (inference mode).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": true,
            "modules_to_save": null,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": self.kind.peft_type(),
            "peft_version": "0.21.2",
            "revision": null,
            "task_type": "CAUSAL_LM",
            "token_dim": self.token_dim,
        });
        let o = v.as_object_mut().expect("a JSON object literal");
        match self.kind {
            PromptKind::PromptTuning => {
                o.insert("prompt_tuning_init".into(), json!(self.prompt_tuning_init));
                o.insert(
                    "prompt_tuning_init_text".into(),
                    json!(self.prompt_tuning_init_text),
                );
                o.insert("tokenizer_kwargs".into(), Value::Null);
                o.insert(
                    "tokenizer_name_or_path".into(),
                    json!(self.tokenizer_name_or_path),
                );
            }
            PromptKind::PTuning => {
                o.insert("encoder_dropout".into(), json!(0.0));
                o.insert(
                    "encoder_hidden_size".into(),
                    json!(self.encoder_hidden_size),
                );
                o.insert("encoder_num_layers".into(), json!(self.encoder_num_layers));
                o.insert(
                    "encoder_reparameterization_type".into(),
                    json!(self.encoder_reparameterization_type),
                );
            }
            PromptKind::Prefix => {
                o.insert(
                    "encoder_hidden_size".into(),
                    json!(self.encoder_hidden_size),
                );
                o.insert("init_weights".into(), Value::Null);
                // The saved tensor is the projection's output, so no projection is needed to load.
                o.insert("prefix_projection".into(), json!(false));
            }
        }
        v
    }
}

/// What a prompt-learning adapter folder holds.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptAdapterFile {
    pub kind: PromptKind,
    pub num_virtual_tokens: usize,
    /// adapter_config.json as read.
    pub config: Value,
    /// `[num_virtual_tokens, token_dim]` (virtual tokens) or `[n, layers * 2 * kv_dim]` (prefix).
    pub prompt_embeddings: HostTensor,
}

fn invalid(path: &Path, message: impl Into<String>) -> PromptAdapterError {
    PromptAdapterError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_config(dir: &Path) -> Result<Value, PromptAdapterError> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| PromptAdapterError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| invalid(&path, format!("invalid JSON: {e}")))
}

/// The prompt-learning kind of the adapter in `dir`, or `None` (no adapter, or another kind).
pub fn prompt_adapter_kind(dir: &Path) -> Option<PromptKind> {
    let v = read_config(dir).ok()?;
    PromptKind::from_peft_type(v["peft_type"].as_str()?)
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` (`prompt_embeddings`, f32).
pub fn write_prompt_adapter(
    dir: &Path,
    config: &PromptAdapterConfig,
    prompt_embeddings: HostTensor,
) -> Result<(), PromptAdapterError> {
    std::fs::create_dir_all(dir).map_err(|source| PromptAdapterError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config.to_json()).expect("JSON values serialize");
    std::fs::write(&path, text).map_err(|source| PromptAdapterError::Io { path, source })?;
    let tensors = [(PROMPT_EMBEDDINGS.to_string(), prompt_embeddings)]
        .into_iter()
        .collect();
    save_safetensors(dir.join("adapter_model.safetensors"), &tensors, DType::F32)?;
    Ok(())
}

/// Reads a prompt-learning adapter written by peft or runner.
pub fn read_prompt_adapter(dir: &Path) -> Result<PromptAdapterFile, PromptAdapterError> {
    let config = read_config(dir)?;
    let cfg_path = dir.join("adapter_config.json");
    let peft_type = config["peft_type"].as_str().unwrap_or("");
    let kind = PromptKind::from_peft_type(peft_type).ok_or_else(|| {
        invalid(
            &cfg_path,
            format!("peft_type `{peft_type}` is not PROMPT_TUNING, P_TUNING or PREFIX_TUNING"),
        )
    })?;
    let n = config["num_virtual_tokens"]
        .as_u64()
        .ok_or_else(|| invalid(&cfg_path, "missing integer key `num_virtual_tokens`"))?
        as usize;
    if config["num_transformer_submodules"].as_u64().unwrap_or(1) != 1 {
        return Err(invalid(
            &cfg_path,
            "num_transformer_submodules must be 1 (a decoder-only model)",
        ));
    }
    let st = dir.join("adapter_model.safetensors");
    let mut tensors = load_safetensors_file(&st)?;
    let e = tensors
        .remove(PROMPT_EMBEDDINGS)
        .ok_or_else(|| invalid(&st, format!("no tensor `{PROMPT_EMBEDDINGS}`")))?;
    if e.shape.len() != 2 || e.shape[0] != n {
        return Err(invalid(
            &st,
            format!(
                "`{PROMPT_EMBEDDINGS}` has shape {:?}; expected [{n}, dim] (num_virtual_tokens {n})",
                e.shape
            ),
        ));
    }
    Ok(PromptAdapterFile {
        kind,
        num_virtual_tokens: n,
        config,
        prompt_embeddings: e,
    })
}

/// A prompt-learning adapter on the device, ready to run with a model.
#[derive(Debug, Clone)]
pub enum PromptAdapter<B: Backend> {
    /// `[n, hidden]` embeddings prepended to the input embeddings.
    Virtual(Tensor<B, 2>),
    /// `[n, layers * 2 * kv_dim]` past keys and values.
    Prefix(Tensor<B, 2>),
}

impl<B: Backend> PromptAdapter<B> {
    /// Checks the tensor against `model` and moves it to `device`.
    pub fn from_file(
        file: &PromptAdapterFile,
        model: &ModelConfig,
        dir: &Path,
        device: &B::Device,
    ) -> Result<Self, PromptAdapterError> {
        let e = &file.prompt_embeddings;
        let want = match file.kind {
            PromptKind::Prefix => {
                model.num_hidden_layers * 2 * model.num_key_value_heads * model.head_dim
            }
            _ => model.hidden_size,
        };
        if e.shape[1] != want {
            return Err(invalid(
                dir,
                format!(
                    "{} adapter `{PROMPT_EMBEDDINGS}` has width {}; this model needs {want}",
                    file.kind.peft_type(),
                    e.shape[1]
                ),
            ));
        }
        let t = Tensor::from_data(TensorData::new(e.data.clone(), e.shape.clone()), device);
        Ok(match file.kind {
            PromptKind::Prefix => Self::Prefix(t),
            _ => Self::Virtual(t),
        })
    }

    /// Number of virtual tokens (cache positions taken before the prompt).
    pub fn len(&self) -> usize {
        match self {
            Self::Virtual(t) | Self::Prefix(t) => t.dims()[0],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A KV cache holding the prefix keys and values for `batch` rows.
///
/// # Shapes
/// - prefix: `[n, layers * 2 * kv_heads * head_dim]`
pub fn prefix_cache<B: Backend>(
    prefix: Tensor<B, 2>,
    config: &ModelConfig,
    batch: usize,
) -> KvCache<B> {
    let n = prefix.dims()[0];
    let (layers, kvh, d) = (
        config.num_hidden_layers,
        config.num_key_value_heads,
        config.head_dim,
    );
    // [n, layers * 2, kvh, d] -> [layers * 2, kvh, n, d]
    let past = prefix
        .reshape([n, layers * 2, kvh, d])
        .permute([1, 2, 0, 3]);
    let pick = |j: usize| {
        past.clone()
            .slice([j..j + 1, 0..kvh, 0..n, 0..d])
            .expand([batch, kvh, n, d])
    };
    KvCache::from_prefix(
        (0..layers)
            .map(|i| (pick(2 * i), pick(2 * i + 1)))
            .collect(),
    )
}

/// Input embeddings with the virtual tokens in front of every row.
///
/// # Shapes
/// - virtual_tokens: `[n, hidden]`; input_ids: `[batch, seq]` -> `[batch, n + seq, hidden]`
pub fn with_virtual_tokens<B: Backend>(
    model: &CausalLm<B>,
    virtual_tokens: Tensor<B, 2>,
    input_ids: Tensor<B, 2, Int>,
) -> Tensor<B, 3> {
    let [b, _] = input_ids.dims();
    let [n, h] = virtual_tokens.dims();
    let prompts = virtual_tokens.unsqueeze_dim::<3>(0).expand([b, n, h]);
    Tensor::cat(vec![prompts, model.embed(input_ids)], 1)
}
