//! Whole-model GGUF I/O for dense llama/qwen2/qwen3 decoders: `ModelConfig` from/to `{arch}.*`
//! metadata (keys as gguf-py/gguf/constants.py `Keys`, values as convert_hf_to_gguf.py
//! `set_gguf_parameters`), HF tensor names, and Llama's q/k permutation
//! (conversion/llama.py `LlamaModel.permute`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::gguf::mix::{llama_cpp_order, tensor_type, ExportType, MixContext};
use crate::gguf::names::{gguf_to_hf, hf_to_gguf, permute_rows, qk_role_hf, QkRole};
use crate::gguf::reader::GgufFile;
use crate::gguf::tokenizer::GgufTokenizer;
use crate::gguf::writer::GgufWriter;
use crate::gguf::{Error, GgmlType, MetaValue, Result};
use crate::model::config::{Architecture, ModelConfig, RopeScaling};
use crate::model::hf::HostTensor;

/// An f32 read from GGUF, shown as its shortest decimal (1e-5, not 9.99999974e-6).
fn f32_as_f64(v: f64) -> f64 {
    format!("{}", v as f32).parse().unwrap_or(v)
}

/// GGUF architecture name for a config; `None` for families this module does not write yet.
pub fn gguf_arch(cfg: &ModelConfig) -> Option<&'static str> {
    match cfg.architecture {
        Architecture::Qwen2 => Some("qwen2"),
        Architecture::Qwen3 if cfg.variant.sliding_window.is_none() => Some("qwen3"),
        // Mistral's window has no llama.cpp key under `llama`: a sliding model is refused.
        Architecture::Llama if cfg.variant.sliding_window.is_none() => Some("llama"),
        _ => None,
    }
}

/// Resolves a `ModelConfig` from `{arch}.*` metadata and the tensor list.
pub fn config_from_gguf(f: &GgufFile, tok: &GgufTokenizer) -> Result<ModelConfig> {
    let arch_name = f.req_str("general.architecture")?;
    let architecture = match arch_name {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        other => {
            return Err(Error::Arch {
                path: f.path.clone(),
                arch: other.into(),
            })
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let n = |k: &str| -> Result<usize> { Ok(f.req_u64(&key(k))? as usize) };
    let hidden_size = n("embedding_length")?;
    let num_attention_heads = n("attention.head_count")?;
    let num_key_value_heads = f
        .get_u64(&key("attention.head_count_kv"))?
        .map_or(num_attention_heads, |v| v as usize);
    let head_dim = match f.get_u64(&key("attention.key_length"))? {
        Some(v) => v as usize,
        None => hidden_size / num_attention_heads.max(1),
    };
    let embd = f.tensor_info("token_embd.weight")?;
    let vocab_size = match f.get_u64(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => embd.dims.get(1).copied().unwrap_or(tok.tokens.len() as u64) as usize,
    };
    let rope_scaling = match f.get_str(&key("rope.scaling.type"))? {
        Some("linear") => {
            f.get_f64(&key("rope.scaling.factor"))?
                .map(|factor| RopeScaling::Linear {
                    factor: f32_as_f64(factor),
                })
        }
        _ => None,
    };
    let has = |name: &str| f.tensors.iter().any(|t| t.name == name);
    Ok(ModelConfig {
        architecture,
        model_type: arch_name.to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: n("feed_forward_length")?,
        num_hidden_layers: n("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f32_as_f64(
            f.get_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
        ),
        rope_theta: f32_as_f64(f.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0)),
        rope_scaling,
        max_position_embeddings: n("context_length")?,
        tie_word_embeddings: !has("output.weight"),
        attention_bias: architecture != Architecture::Qwen2 && has("blk.0.attn_q.bias"),
        mlp_bias: false,
        initializer_range: 0.02,
        bos_token_id: tok.bos_id,
        eos_token_ids: tok.eos_id.into_iter().collect(),
        pad_token_id: tok.pad_id,
        dtype: Some("bfloat16".into()),
        variant: Default::default(),
    })
}

/// Loads a llama/qwen2 GGUF as an HF model: config, f32 tensors under HF names (Llama q/k
/// permutation undone, tied lm_head left out), tokenizer metadata.
pub fn load_gguf_model(
    path: impl AsRef<Path>,
) -> Result<(ModelConfig, BTreeMap<String, HostTensor>, GgufTokenizer)> {
    let f = GgufFile::open(path.as_ref())?;
    let tok = GgufTokenizer::from_gguf(&f)?;
    let cfg = config_from_gguf(&f, &tok)?;
    let mut out = BTreeMap::new();
    for t in &f.tensors {
        let Some(hf_name) = gguf_to_hf(&t.name) else {
            tracing::warn!(
                "{}: skipping tensor `{}` (no Hugging Face counterpart)",
                f.path.display(),
                t.name
            );
            continue;
        };
        let mut ht = f.tensor_f32(t)?;
        if cfg.architecture == Architecture::Llama {
            if let Some(role) = qk_role_hf(&hf_name) {
                ht.data = permute_qk(&hf_name, &ht, role, &cfg, true)?;
            }
        }
        out.insert(hf_name, ht);
    }
    Ok((cfg, out, tok))
}

fn permute_qk(
    name: &str,
    t: &HostTensor,
    role: QkRole,
    cfg: &ModelConfig,
    inverse: bool,
) -> Result<Vec<f32>> {
    let heads = match role {
        QkRole::Query => cfg.num_attention_heads,
        QkRole::Key => cfg.num_key_value_heads,
    };
    let rows = t.shape.first().copied().unwrap_or(0);
    let row_len = t.shape.iter().skip(1).product();
    permute_rows(&t.data, rows, row_len, heads, inverse).ok_or_else(|| Error::Shape {
        tensor: name.to_string(),
        what: format!(
            "shape {:?} cannot be split into {heads} rotary heads",
            t.shape
        ),
    })
}

/// `{arch}.*` and `general.*` metadata as convert_hf_to_gguf.py writes it for llama/qwen2.
pub fn config_metadata(
    cfg: &ModelConfig,
    model_name: &str,
    et: ExportType,
) -> Vec<(String, MetaValue)> {
    let arch = gguf_arch(cfg).unwrap_or("llama");
    let mut m: Vec<(String, MetaValue)> = vec![
        (
            "general.architecture".into(),
            MetaValue::String(arch.into()),
        ),
        ("general.type".into(), MetaValue::String("model".into())),
        ("general.name".into(), MetaValue::String(model_name.into())),
    ];
    let mut put = |k: &str, v: MetaValue| m.push((format!("{arch}.{k}"), v));
    put("block_count", MetaValue::U32(cfg.num_hidden_layers as u32));
    put(
        "context_length",
        MetaValue::U32(cfg.max_position_embeddings as u32),
    );
    put("embedding_length", MetaValue::U32(cfg.hidden_size as u32));
    put(
        "feed_forward_length",
        MetaValue::U32(cfg.intermediate_size as u32),
    );
    put(
        "attention.head_count",
        MetaValue::U32(cfg.num_attention_heads as u32),
    );
    put(
        "attention.head_count_kv",
        MetaValue::U32(cfg.num_key_value_heads as u32),
    );
    put("rope.freq_base", MetaValue::F32(cfg.rope_theta as f32));
    put(
        "attention.layer_norm_rms_epsilon",
        MetaValue::F32(cfg.rms_norm_eps as f32),
    );
    if let Some(RopeScaling::Linear { factor }) = &cfg.rope_scaling {
        put("rope.scaling.type", MetaValue::String("linear".into()));
        put("rope.scaling.factor", MetaValue::F32(*factor as f32));
    }
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        put("attention.key_length", MetaValue::U32(cfg.head_dim as u32));
        put(
            "attention.value_length",
            MetaValue::U32(cfg.head_dim as u32),
        );
    }
    if cfg.architecture == Architecture::Llama {
        put("vocab_size", MetaValue::U32(cfg.vocab_size as u32));
        put("rope.dimension_count", MetaValue::U32(cfg.head_dim as u32));
    }
    m.push(("general.file_type".into(), MetaValue::U32(et.file_type())));
    if et.is_quantized() {
        m.push(("general.quantization_version".into(), MetaValue::U32(2)));
    }
    m
}

/// llama3 rope factors (conversion/llama.py `generate_extra_tensors`), written as rope_freqs.weight.
fn llama3_rope_freqs(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let Some(RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    }) = cfg.rope_scaling.clone()
    else {
        return None;
    };
    let dim = cfg.head_dim;
    let old = original_max_position_embeddings as f64;
    let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
    Some(
        (0..dim)
            .step_by(2)
            .map(|i| {
                // torch computes the frequency in f32
                let freq = 1.0f32 / (cfg.rope_theta as f32).powf(i as f32 / dim as f32);
                let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
                if wavelen < high_wl {
                    1.0
                } else if wavelen > low_wl {
                    factor as f32
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect(),
    )
}

/// Writes an HF-named f32 model as a llama.cpp GGUF of export type `et`; returns each
/// written tensor's GGUF name and type in file order.
pub fn write_gguf_model(
    path: &Path,
    cfg: &ModelConfig,
    tensors: &BTreeMap<String, HostTensor>,
    tok: &GgufTokenizer,
    et: ExportType,
    model_name: &str,
) -> Result<Vec<(String, GgmlType)>> {
    if gguf_arch(cfg).is_none() {
        return Err(Error::ArchExport {
            model_type: cfg.model_type.clone(),
        });
    }
    let mut named: Vec<(String, &String, &HostTensor)> = Vec::new();
    for (hf_name, t) in tensors {
        if hf_name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if hf_name == "lm_head.weight" && cfg.tie_word_embeddings {
            continue;
        }
        let g = hf_to_gguf(hf_name).ok_or_else(|| Error::Shape {
            tensor: hf_name.clone(),
            what: "no llama.cpp tensor name for this Hugging Face tensor".into(),
        })?;
        named.push((g, hf_name, t));
    }
    named.sort_by(|a, b| llama_cpp_order(&a.0, &b.0));
    let ctx = MixContext {
        n_layers: cfg.num_hidden_layers,
        tied_embeddings: !named.iter().any(|(g, _, _)| g == "output.weight"),
    };
    let mut w = GgufWriter::new();
    for (k, v) in config_metadata(cfg, model_name, et) {
        w.set(&k, v);
    }
    for (k, v) in tok.to_metadata() {
        w.set(&k, v);
    }
    let mut written = Vec::new();
    if let Some(freqs) = llama3_rope_freqs(cfg) {
        if cfg.architecture == Architecture::Llama {
            w.add_tensor_f32("rope_freqs.weight", &[freqs.len()], GgmlType::F32, &freqs)?;
            written.push(("rope_freqs.weight".to_string(), GgmlType::F32));
        }
    }
    for (g, hf_name, t) in named {
        let permuted;
        let data: &[f32] = match (cfg.architecture, qk_role_hf(hf_name)) {
            (Architecture::Llama, Some(role)) => {
                permuted = permute_qk(hf_name, t, role, cfg, false)?;
                &permuted
            }
            _ => &t.data,
        };
        if data.len() != t.shape.iter().product::<usize>() {
            return Err(Error::Shape {
                tensor: hf_name.clone(),
                what: format!("{} values for shape {:?}", data.len(), t.shape),
            });
        }
        let ty = tensor_type(&g, &t.shape, et, &ctx);
        w.add_tensor_f32(&g, &t.shape, ty, data)?;
        written.push((g, ty));
    }
    w.write(path)?;
    Ok(written)
}
