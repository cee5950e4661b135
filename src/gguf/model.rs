//! Whole-model GGUF I/O for the dense decoders: `ModelConfig` from/to `{arch}.*` metadata (keys
//! as gguf-py/gguf/constants.py `Keys`, values as convert_hf_to_gguf.py `set_gguf_parameters`,
//! defaults as llama.cpp's `load_arch_hparams`), HF tensor names per family, Llama's q/k
//! permutation (conversion/llama.py `LlamaModel.permute`) and Gemma's norm weights, which
//! llama.cpp stores as `1 + w` (convert_hf_to_gguf.py Gemma2Model/Gemma3Model `modify_tensors`).
//!
//! llama.cpp's architectures: llama (Llama, Mistral), qwen2, qwen3, gemma2, gemma3, glm4 (GLM-4,
//! `Glm4ForCausalLM`) and chatglm (GLM, `GlmForCausalLM` of glm-4-9b-chat-hf: its converter
//! registers that class under `chatglm`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::gguf::mix::{llama_cpp_order, tensor_type, ExportType, MixContext};
use crate::gguf::names::{gguf_to_hf_arch, hf_to_gguf_arch, permute_rows, qk_role_hf, QkRole};
use crate::gguf::reader::GgufFile;
use crate::gguf::tokenizer::GgufTokenizer;
use crate::gguf::writer::GgufWriter;
use crate::gguf::{Error, GgmlType, MetaValue, Result};
use crate::model::config::{Activation, Architecture, LayerType, ModelConfig, RopeScaling};
use crate::model::hf::HostTensor;

/// An f32 read from GGUF, shown as its shortest decimal (1e-5, not 9.99999974e-6).
fn f32_as_f64(v: f64) -> f64 {
    format!("{}", v as f32).parse().unwrap_or(v)
}

/// llama.cpp's architecture names and the family each reads as.
pub const GGUF_ARCHS: &[(&str, Architecture)] = &[
    ("llama", Architecture::Llama),
    ("qwen2", Architecture::Qwen2),
    ("qwen3", Architecture::Qwen3),
    ("gemma2", Architecture::Gemma2),
    ("gemma3", Architecture::Gemma3),
    ("glm4", Architecture::Glm4),
    ("chatglm", Architecture::Glm),
];

/// GGUF architecture name for a config; `None` for configs this module cannot write.
pub fn gguf_arch(cfg: &ModelConfig) -> Option<&'static str> {
    // A window (Mistral's, Qwen's) is written as `{arch}.attention.sliding_window` (see
    // config_metadata).
    GGUF_ARCHS
        .iter()
        .find(|(_, a)| *a == cfg.architecture)
        .map(|(n, _)| *n)
}

/// Whether the family stores RMSNorm weights as `w` and scales by `1 + w` (Gemma): llama.cpp
/// stores `1 + w`.
fn norm_shift(cfg: &ModelConfig, hf_name: &str) -> bool {
    cfg.norm_offset() != 0.0 && hf_name.ends_with("norm.weight")
}

/// llama.cpp's sliding-layer period for Gemma (`set_swa_pattern`: layer `i` slides unless
/// `(i + 1) % period == 0`), overridable by `{arch}.attention.sliding_window_pattern`.
fn default_swa_period(arch: Architecture) -> Option<usize> {
    match arch {
        Architecture::Gemma2 => Some(2),
        Architecture::Gemma3 => Some(6),
        _ => None,
    }
}

fn swa_pattern(n_layers: usize, period: usize) -> Vec<LayerType> {
    (0..n_layers)
        .map(|i| {
            if (i + 1).is_multiple_of(period) {
                LayerType::Full
            } else {
                LayerType::Sliding
            }
        })
        .collect()
}

/// The attention scale llama.cpp derives for Gemma (it reads no key): `1/sqrt(hidden/heads)`
/// for the 27B sizes (46 layers for Gemma 2, 62 for Gemma 3), else `1/sqrt(head_dim)`; as a
/// `query_pre_attn_scalar`.
fn llama_cpp_gemma_scalar(cfg: &ModelConfig) -> f64 {
    let big = matches!(
        (cfg.architecture, cfg.num_hidden_layers),
        (Architecture::Gemma2, 46) | (Architecture::Gemma3, 62)
    );
    if big {
        (cfg.hidden_size / cfg.num_attention_heads.max(1)) as f64
    } else {
        cfg.head_dim as f64
    }
}

/// `general.architecture` and the family it reads as; an error naming the file for others.
pub fn file_arch(f: &GgufFile) -> Result<(&'static str, Architecture)> {
    let arch_name = f.req_str("general.architecture")?;
    GGUF_ARCHS
        .iter()
        .find(|(n, _)| *n == arch_name)
        .copied()
        .ok_or_else(|| Error::Arch {
            path: f.path.clone(),
            arch: arch_name.into(),
        })
}

/// Resolves a `ModelConfig` from `{arch}.*` metadata and the tensor list.
pub fn config_from_gguf(f: &GgufFile, tok: &GgufTokenizer) -> Result<ModelConfig> {
    let (arch_name, architecture) = file_arch(f)?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let n = |k: &str| -> Result<usize> { Ok(f.req_u64(&key(k))? as usize) };
    let hidden_size = n("embedding_length")?;
    let num_hidden_layers = n("block_count")?;
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
    let gemma = matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3);
    let glm = matches!(architecture, Architecture::Glm | Architecture::Glm4);
    // Rotary dimensions: GLM rotates half of each head (its converter writes the count).
    let partial_rotary_factor = match f.get_u64(&key("rope.dimension_count"))? {
        Some(d) if glm && head_dim > 0 => d as f64 / head_dim as f64,
        _ if glm => 0.5,
        _ => 1.0,
    };
    let softcap = |k: &str| -> Result<Option<f64>> {
        Ok(f.get_f64(&key(k))?.map(f32_as_f64).filter(|v| *v > 0.0))
    };
    let mut sliding_window = f
        .get_u64(&key("attention.sliding_window"))?
        .map(|v| v as usize)
        .filter(|v| *v > 0);
    if architecture == Architecture::Gemma2 && sliding_window.is_none() {
        sliding_window = Some(4096); // llama.cpp's default for Gemma 2
    }
    let pattern_key = key("attention.sliding_window_pattern");
    let layer_types = match (sliding_window, f.get(&pattern_key)) {
        (None, _) => Vec::new(),
        // One bool per layer (true: sliding), as newer llama.cpp also accepts.
        (Some(_), Some(MetaValue::Array(_, items))) => {
            if items.len() != num_hidden_layers {
                return Err(Error::MetaType {
                    path: f.path.clone(),
                    key: pattern_key,
                    expected: format!("one entry per layer ({num_hidden_layers})"),
                    got: format!("{} entries", items.len()),
                });
            }
            items
                .iter()
                .map(|b| match b.as_bool() {
                    Some(true) => LayerType::Sliding,
                    _ => LayerType::Full,
                })
                .collect()
        }
        (Some(_), pattern) => match (
            pattern.and_then(|p| p.as_u64()),
            default_swa_period(architecture),
        ) {
            (Some(period), _) => swa_pattern(num_hidden_layers, period.max(1) as usize),
            (None, Some(default)) => swa_pattern(num_hidden_layers, default),
            // Mistral, Qwen: every layer slides.
            (None, None) => vec![LayerType::Sliding; num_hidden_layers],
        },
    };
    // Mistral: llama with a window on every layer (`llama.attention.sliding_window`).
    let model_type = if architecture == Architecture::Llama && sliding_window.is_some() {
        "mistral".to_string()
    } else {
        match architecture {
            Architecture::Gemma3 => "gemma3_text",
            Architecture::Glm => "glm",
            _ => arch_name,
        }
        .to_string()
    };
    let rope_theta = f32_as_f64(f.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0));
    let mut cfg = ModelConfig {
        architecture,
        model_type,
        vocab_size,
        hidden_size,
        intermediate_size: n("feed_forward_length")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f32_as_f64(
            f.get_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
        ),
        rope_theta,
        rope_scaling,
        max_position_embeddings: n("context_length")?,
        tie_word_embeddings: !has("output.weight"),
        attention_bias: architecture != Architecture::Qwen2
            && (has("blk.0.attn_q.bias") || has("blk.0.attn_qkv.bias")),
        mlp_bias: false,
        initializer_range: 0.02,
        bos_token_id: tok.bos_id,
        eos_token_ids: tok.eos_id.into_iter().collect(),
        pad_token_id: tok.pad_id,
        dtype: Some("bfloat16".into()),
        variant: Default::default(),
    };
    let v = &mut cfg.variant;
    v.sliding_window = sliding_window;
    v.layer_types = layer_types;
    v.partial_rotary_factor = partial_rotary_factor;
    if gemma {
        v.hidden_act = Activation::GeluTanh;
    }
    match architecture {
        Architecture::Gemma2 => {
            v.attn_logit_softcapping = Some(softcap("attn_logit_softcapping")?.unwrap_or(50.0));
            v.final_logit_softcapping = Some(softcap("final_logit_softcapping")?.unwrap_or(30.0));
        }
        Architecture::Gemma3 => {
            v.final_logit_softcapping = softcap("final_logit_softcapping")?;
            v.rope_local_theta = Some(f32_as_f64(
                f.get_f64(&key("rope.freq_base_swa"))?.unwrap_or(10000.0),
            ));
        }
        _ => {}
    }
    if gemma {
        // runner writes `attention.scale` where llama.cpp's derivation would differ.
        let scalar = match f.get_f64(&key("attention.scale"))?.filter(|s| *s > 0.0) {
            Some(s) => {
                let q = 1.0 / (s * s);
                // 1/sqrt(q) went through f32: an integer scalar comes back as one.
                if (q - q.round()).abs() < 1e-3 * q.max(1.0) {
                    q.round()
                } else {
                    q
                }
            }
            None => llama_cpp_gemma_scalar(&cfg),
        };
        cfg.variant.query_pre_attn_scalar = Some(scalar);
    }
    if architecture == Architecture::Llama && has("rope_freqs.weight") {
        cfg.rope_scaling = llama3_scaling_from_gguf(f, &cfg)?;
    }
    Ok(cfg)
}

/// Keys under which runner keeps llama3 rope scaling's parameters beside the `rope_freqs`
/// factors llama.cpp reads (llama.cpp has no keys for them; it ignores these).
const LLAMA3_KEYS: [&str; 4] = [
    "runner.rope.llama3.factor",
    "runner.rope.llama3.low_freq_factor",
    "runner.rope.llama3.high_freq_factor",
    "runner.rope.llama3.original_context_length",
];

/// Llama 3 rope scaling of a GGUF with `rope_freqs.weight`: runner's keys when present, else
/// the Llama 3.1-3.3 parameters (low 1, high 4, original context 8192, factor the largest
/// factor) when they reproduce the file's factors; else an error naming the tensor.
fn llama3_scaling_from_gguf(f: &GgufFile, cfg: &ModelConfig) -> Result<Option<RopeScaling>> {
    let mut params = [0f64; 4];
    let mut found = 0;
    for (p, k) in params.iter_mut().zip(LLAMA3_KEYS) {
        if let Some(v) = f.get_f64(k)? {
            *p = f32_as_f64(v);
            found += 1;
        }
    }
    let freqs = f.tensor_f32(f.tensor_info("rope_freqs.weight")?)?.data;
    let scaling = |[factor, low, high, orig]: [f64; 4]| RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: orig as usize,
    };
    let candidate = if found == LLAMA3_KEYS.len() {
        scaling(params)
    } else {
        let factor = freqs.iter().copied().fold(1.0f32, f32::max) as f64;
        scaling([factor, 1.0, 4.0, 8192.0])
    };
    let mut c = cfg.clone();
    c.rope_scaling = Some(candidate.clone());
    let same = llama3_rope_freqs(&c).is_some_and(|mine| {
        mine.len() == freqs.len()
            && mine
                .iter()
                .zip(&freqs)
                .all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1.0))
    });
    if !same {
        return Err(Error::ArchTensor {
            path: f.path.clone(),
            tensor: "rope_freqs.weight".into(),
            arch: "llama".into(),
            what: format!(
                "{} rope factors that no llama3 scaling reproduces (tried {candidate:?}; runner's keys {} absent)",
                freqs.len(),
                LLAMA3_KEYS.join(", ")
            ),
        });
    }
    Ok(Some(candidate))
}

/// The HF tensors (names and shapes) a decoder of `cfg` is built from, lm_head left out when tied.
pub fn expected_hf_shapes(cfg: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut m = BTreeMap::new();
    m.insert(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    );
    m.insert("model.norm.weight".to_string(), vec![h]);
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), vec![cfg.vocab_size, h]);
    }
    for i in 0..cfg.num_hidden_layers {
        let mut put = |k: &str, shape: Vec<usize>| {
            m.insert(format!("model.layers.{i}.{k}"), shape);
        };
        put("input_layernorm.weight", vec![h]);
        put("self_attn.q_proj.weight", vec![q, h]);
        put("self_attn.k_proj.weight", vec![kv, h]);
        put("self_attn.v_proj.weight", vec![kv, h]);
        put("self_attn.o_proj.weight", vec![h, q]);
        if cfg.qkv_bias() {
            put("self_attn.q_proj.bias", vec![q]);
            put("self_attn.k_proj.bias", vec![kv]);
            put("self_attn.v_proj.bias", vec![kv]);
        }
        if cfg.o_bias() {
            put("self_attn.o_proj.bias", vec![h]);
        }
        if cfg.qk_norm() {
            put("self_attn.q_norm.weight", vec![hd]);
            put("self_attn.k_norm.weight", vec![hd]);
        }
        put("post_attention_layernorm.weight", vec![h]);
        match cfg.architecture {
            Architecture::Gemma2 | Architecture::Gemma3 => {
                put("pre_feedforward_layernorm.weight", vec![h]);
                put("post_feedforward_layernorm.weight", vec![h]);
            }
            Architecture::Glm4 => {
                put("post_self_attn_layernorm.weight", vec![h]);
                put("post_mlp_layernorm.weight", vec![h]);
            }
            _ => {}
        }
        let inter = cfg.intermediate_size;
        if cfg.fused_gate_up() {
            put("mlp.gate_up_proj.weight", vec![2 * inter, h]);
        } else {
            put("mlp.gate_proj.weight", vec![inter, h]);
            put("mlp.up_proj.weight", vec![inter, h]);
        }
        put("mlp.down_proj.weight", vec![h, inter]);
    }
    m
}

/// Loads a GGUF of any family in [`GGUF_ARCHS`] as an HF model: config, f32 tensors under HF
/// names (Llama q/k permutation undone, Gemma's `1 + w` norms back to `w`, tied lm_head left
/// out), tokenizer metadata. Every tensor must be one the architecture has, of the shape the
/// metadata implies, and none may be missing: errors name the file, the tensor and what was
/// expected.
pub fn load_gguf_model(
    path: impl AsRef<Path>,
) -> Result<(ModelConfig, BTreeMap<String, HostTensor>, GgufTokenizer)> {
    let f = GgufFile::open(path.as_ref())?;
    // The architecture first: an unknown one is the error, not its tokenizer or keys.
    let arch = file_arch(&f)?.0;
    let tok = GgufTokenizer::from_gguf(&f)?;
    let cfg = config_from_gguf(&f, &tok)?;
    let expected = expected_hf_shapes(&cfg);
    let mismatch = |tensor: &str, what: String| Error::ArchTensor {
        path: f.path.clone(),
        tensor: tensor.to_string(),
        arch: arch.to_string(),
        what,
    };
    let mut out = BTreeMap::new();
    for t in &f.tensors {
        // llama3 rope factors are recomputed from the config, not read as a weight.
        if t.name == "rope_freqs.weight" {
            continue;
        }
        // Older conversions (glm-4-9b-chat's own code, ChatGLM) fuse q, k and v in one tensor.
        if let Some(parts) = split_fused_qkv(&f, arch, t, &cfg).transpose() {
            for (gguf_name, part) in parts? {
                let hf_name = gguf_to_hf_arch(&gguf_name, cfg.architecture)
                    .filter(|h| expected.get(h) == Some(&part.shape))
                    .ok_or_else(|| {
                        mismatch(
                            &t.name,
                            format!(
                                "its part `{gguf_name}` {:?} is not a tensor of this architecture",
                                part.shape
                            ),
                        )
                    })?;
                out.insert(hf_name, part);
            }
            continue;
        }
        let Some(hf_name) =
            gguf_to_hf_arch(&t.name, cfg.architecture).filter(|h| expected.contains_key(h))
        else {
            let mut names: Vec<String> = expected
                .keys()
                .filter(|k| !k.starts_with("model.layers.") || k.starts_with("model.layers.0."))
                .filter_map(|k| hf_to_gguf_arch(k, cfg.architecture))
                .collect();
            names.sort();
            return Err(mismatch(
                &t.name,
                format!(
                    "not a tensor of this architecture with this metadata; expected {} (`blk.0.*` standing for each of the {} layers)",
                    names.join(", "),
                    cfg.num_hidden_layers
                ),
            ));
        };
        let want = &expected[&hf_name];
        if &t.hf_shape() != want {
            return Err(mismatch(
                &t.name,
                format!(
                    "shape {:?} (PyTorch order), expected {want:?} from the metadata",
                    t.hf_shape()
                ),
            ));
        }
        let mut ht = f.tensor_f32(t)?;
        if cfg.architecture == Architecture::Llama {
            if let Some(role) = qk_role_hf(&hf_name) {
                ht.data = permute_qk(&hf_name, &ht, role, &cfg, true)?;
            }
        }
        if norm_shift(&cfg, &hf_name) {
            ht.data.iter_mut().for_each(|v| *v -= 1.0);
        }
        out.insert(hf_name, ht);
    }
    if let Some(missing) = expected.keys().find(|k| !out.contains_key(*k)) {
        let g = hf_to_gguf_arch(missing, cfg.architecture).unwrap_or_else(|| missing.clone());
        return Err(mismatch(
            &g,
            format!(
                "missing (expected shape {:?} for Hugging Face `{missing}`)",
                expected[missing]
            ),
        ));
    }
    Ok((cfg, out, tok))
}

/// `blk.N.attn_qkv.{weight,bias}` split into its `attn_q`, `attn_k` and `attn_v` rows (in that
/// order, as llama.cpp's graph views them); `None` for any other tensor.
fn split_fused_qkv(
    f: &GgufFile,
    arch: &str,
    t: &crate::gguf::reader::TensorInfo,
    cfg: &ModelConfig,
) -> Result<Option<Vec<(String, HostTensor)>>> {
    let Some((block, param)) = t
        .name
        .strip_prefix("blk.")
        .and_then(|rest| rest.split_once(".attn_qkv."))
    else {
        return Ok(None);
    };
    if cfg.architecture == Architecture::Llama {
        return Ok(None); // its q/k rows would also need llama.cpp's permutation
    }
    let q_rows = cfg.num_attention_heads * cfg.head_dim;
    let kv_rows = cfg.num_key_value_heads * cfg.head_dim;
    let ht = f.tensor_f32(t)?;
    let rows = ht.shape.first().copied().unwrap_or(0);
    if rows != q_rows + 2 * kv_rows {
        return Err(Error::ArchTensor {
            path: f.path.clone(),
            tensor: t.name.clone(),
            arch: arch.to_string(),
            what: format!(
                "shape {:?}: expected {} rows (q {q_rows} + k {kv_rows} + v {kv_rows}) from the metadata",
                ht.shape,
                q_rows + 2 * kv_rows
            ),
        });
    }
    let row_len: usize = ht.shape.iter().skip(1).product();
    let mut start = 0;
    let parts = [("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)]
        .into_iter()
        .map(|(name, n)| {
            let mut shape = ht.shape.clone();
            shape[0] = n;
            let data = ht.data[start * row_len..(start + n) * row_len].to_vec();
            start += n;
            let part = HostTensor {
                shape,
                data,
                source_dtype: ht.source_dtype,
            };
            (format!("blk.{block}.{name}.{param}"), part)
        })
        .collect();
    Ok(Some(parts))
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

/// `{arch}.*` and `general.*` metadata as convert_hf_to_gguf.py writes it.
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
    if matches!(cfg.architecture, Architecture::Glm | Architecture::Glm4) {
        put(
            "rope.dimension_count",
            MetaValue::U32(cfg.rotary_dim() as u32),
        );
    }
    let v = &cfg.variant;
    if let Some(w) = v.sliding_window {
        // Gemma's key; for Mistral (`llama`) and Qwen llama.cpp has the key but does not read it.
        put("attention.sliding_window", MetaValue::U32(w as u32));
        let every_layer_slides = !v.layer_types.contains(&LayerType::Full);
        match (swa_period_of(cfg), default_swa_period(cfg.architecture)) {
            (_, None) if every_layer_slides => {}
            (Some(p), Some(default)) if p == default => {}
            (Some(p), Some(_)) => put("attention.sliding_window_pattern", MetaValue::U32(p as u32)),
            // Any other layout (Qwen's sliding layers from `max_window_layers` on): one bool per layer.
            _ => put(
                "attention.sliding_window_pattern",
                MetaValue::Array(
                    7,
                    v.layer_types
                        .iter()
                        .map(|t| MetaValue::Bool(*t == LayerType::Sliding))
                        .collect(),
                ),
            ),
        }
    }
    if let Some(c) = v.attn_logit_softcapping {
        put("attn_logit_softcapping", MetaValue::F32(c as f32));
    }
    if let Some(c) = v.final_logit_softcapping {
        put("final_logit_softcapping", MetaValue::F32(c as f32));
    }
    if let Some(t) = v.rope_local_theta {
        put("rope.freq_base_swa", MetaValue::F32(t as f32));
    }
    if let Some(q) = v.query_pre_attn_scalar {
        if q != llama_cpp_gemma_scalar(cfg) {
            put("attention.scale", MetaValue::F32((1.0 / q.sqrt()) as f32));
        }
    }
    m.push(("general.file_type".into(), MetaValue::U32(et.file_type())));
    if et.is_quantized() {
        m.push(("general.quantization_version".into(), MetaValue::U32(2)));
    }
    m
}

/// The period of a Gemma config's sliding layers as llama.cpp spells it, None when its
/// `layer_types` follow no period.
fn swa_period_of(cfg: &ModelConfig) -> Option<usize> {
    let n = cfg.num_hidden_layers;
    if cfg.variant.layer_types.is_empty() {
        return None;
    }
    (1..=n.max(1)).find(|&p| swa_pattern(n, p) == cfg.variant.layer_types)
}

/// Why a config cannot be written as a GGUF that reads back as the same model, if it cannot.
pub fn export_refusal(cfg: &ModelConfig) -> Option<String> {
    if gguf_arch(cfg).is_none() {
        return Some(format!(
            "GGUF export of a `{}` model is not supported",
            cfg.model_type
        ));
    }
    let v = &cfg.variant;
    if cfg.architecture == Architecture::Gemma2
        && (v.attn_logit_softcapping.is_none() || v.final_logit_softcapping.is_none())
    {
        return Some(
            "gemma2 without soft-capping: llama.cpp always caps Gemma 2's scores and logits".into(),
        );
    }
    if cfg.mlp_bias {
        return Some("MLP biases have no llama.cpp tensor in these architectures".into());
    }
    None
}

/// What llama.cpp will compute differently from runner for a GGUF of `cfg` (keys it does not
/// read), for a warning at export.
pub fn llama_cpp_caveats(cfg: &ModelConfig) -> Vec<String> {
    let v = &cfg.variant;
    let mut out = Vec::new();
    if default_swa_period(cfg.architecture).is_none() && v.sliding_window.is_some() {
        let arch = gguf_arch(cfg).unwrap_or("llama");
        out.push(format!(
            "llama.cpp's `{arch}` architecture ignores `{arch}.attention.sliding_window` ({}): it attends to the whole context (same results while prompt + output fit in the window); runner reads the window back",
            v.sliding_window.unwrap_or(0)
        ));
    }
    if default_swa_period(cfg.architecture).is_some()
        && v.sliding_window.is_some()
        && swa_period_of(cfg).is_none()
    {
        out.push(format!(
            "`{}`: the sliding layers {:?} are written as one bool per layer, which only newer llama.cpp reads",
            cfg.model_type, v.layer_types
        ));
    }
    if let Some(q) = v.query_pre_attn_scalar {
        let theirs = llama_cpp_gemma_scalar(cfg);
        if q != theirs {
            out.push(format!(
                "query_pre_attn_scalar {q} is not what llama.cpp derives for this `{}` ({theirs}): llama.cpp scales attention scores by 1/sqrt({theirs}); runner reads `attention.scale` back",
                cfg.model_type
            ));
        }
    }
    if cfg.architecture == Architecture::Gemma3 && v.rope_local_theta.is_some_and(|t| t != 10000.0)
    {
        out.push(
            "llama.cpp's gemma3 uses a local rope base of 10000 and ignores `rope.freq_base_swa`"
                .into(),
        );
    }
    if cfg.architecture == Architecture::Glm
        && cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size
    {
        out.push(format!(
            "llama.cpp's chatglm needs heads x head_dim = hidden ({} x {} != {}): llama.cpp will refuse to load this file; runner reads it",
            cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        ));
    }
    if cfg.architecture == Architecture::Gemma2 && !cfg.tie_word_embeddings {
        out.push("llama.cpp's gemma2 always uses the token embeddings as the output layer and ignores `output.weight`".into());
    }
    out
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
    if let Some(why) = export_refusal(cfg) {
        return Err(Error::ArchExport {
            model_type: cfg.model_type.clone(),
            why,
        });
    }
    for caveat in llama_cpp_caveats(cfg) {
        tracing::warn!("{}: {caveat}", path.display());
    }
    let mut named: Vec<(String, &String, &HostTensor)> = Vec::new();
    for (hf_name, t) in tensors {
        if hf_name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if hf_name == "lm_head.weight" && cfg.tie_word_embeddings {
            continue;
        }
        let g = hf_to_gguf_arch(hf_name, cfg.architecture).ok_or_else(|| Error::Shape {
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
            if let Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) = &cfg.rope_scaling
            {
                let values = [
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max_position_embeddings as f64,
                ];
                for (k, v) in LLAMA3_KEYS.iter().zip(values) {
                    w.set(k, MetaValue::F32(v as f32));
                }
            }
            w.add_tensor_f32("rope_freqs.weight", &[freqs.len()], GgmlType::F32, &freqs)?;
            written.push(("rope_freqs.weight".to_string(), GgmlType::F32));
        }
    }
    for (g, hf_name, t) in named {
        let changed;
        let data: &[f32] = match (cfg.architecture, qk_role_hf(hf_name)) {
            (Architecture::Llama, Some(role)) => {
                changed = permute_qk(hf_name, t, role, cfg, false)?;
                &changed
            }
            _ if norm_shift(cfg, hf_name) => {
                changed = t.data.iter().map(|v| v + 1.0).collect::<Vec<f32>>();
                &changed
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
