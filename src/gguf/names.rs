//! Tensor names between Hugging Face (transformers Llama/Qwen2/Qwen3, Gemma 2/3, GLM/GLM-4) and
//! llama.cpp's GGUF (gguf-py/gguf/tensor_mapping.py, constants.py MODEL_TENSOR names), and the
//! q/k row permutation llama.cpp's converter applies for Llama (convert_hf_to_gguf.py
//! `LlamaModel.permute`), undone when reading back.

use crate::model::config::Architecture;

/// Per-layer HF suffix ↔ GGUF suffix.
const LAYER_MAP: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    // Qwen3's per-head query/key norms.
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Per-family names that differ from [`LAYER_MAP`], looked up before it (tensor_mapping.py:
/// Gemma's `post_attention_layernorm` is ATTN_POST_NORM and its `pre_feedforward_layernorm` the
/// FFN_NORM; GLM-4's `post_self_attn_layernorm`/`post_mlp_layernorm`; GLM's fused
/// `gate_up_proj` stays fused as `ffn_up`, gate rows first).
fn arch_layer_map(arch: Architecture) -> &'static [(&'static str, &'static str)] {
    match arch {
        Architecture::Gemma2 | Architecture::Gemma3 => &[
            ("post_attention_layernorm", "post_attention_norm"),
            ("pre_feedforward_layernorm", "ffn_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
        ],
        Architecture::Glm4 => &[
            ("post_self_attn_layernorm", "post_attention_norm"),
            ("post_mlp_layernorm", "post_ffw_norm"),
            ("mlp.gate_up_proj", "ffn_up"),
        ],
        Architecture::Glm => &[("mlp.gate_up_proj", "ffn_up")],
        _ => &[],
    }
}

const GLOBAL_MAP: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
];

fn split_param(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('.')
        .filter(|(_, p)| *p == "weight" || *p == "bias")
}

/// GGUF name for an HF tensor name of a Llama/Qwen model; None for tensors llama.cpp does not
/// store (rotary inv_freq).
pub fn hf_to_gguf(name: &str) -> Option<String> {
    hf_to_gguf_arch(name, Architecture::Llama)
}

/// HF name for a GGUF tensor name of a Llama/Qwen model; None for tensors with no HF
/// counterpart (e.g. rope_freqs).
pub fn gguf_to_hf(name: &str) -> Option<String> {
    gguf_to_hf_arch(name, Architecture::Llama)
}

/// GGUF name for an HF tensor name of a model of family `arch`.
pub fn hf_to_gguf_arch(name: &str, arch: Architecture) -> Option<String> {
    let (stem, param) = split_param(name)?;
    if let Some((_, g)) = GLOBAL_MAP.iter().find(|(h, _)| *h == stem) {
        return Some(format!("{g}.{param}"));
    }
    let rest = stem.strip_prefix("model.layers.")?;
    let (layer, sub) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, g) = arch_layer_map(arch)
        .iter()
        .chain(LAYER_MAP)
        .find(|(h, _)| *h == sub)?;
    Some(format!("blk.{layer}.{g}.{param}"))
}

/// HF name for a GGUF tensor name of a model of family `arch`.
pub fn gguf_to_hf_arch(name: &str, arch: Architecture) -> Option<String> {
    let (stem, param) = split_param(name)?;
    if let Some((h, _)) = GLOBAL_MAP.iter().find(|(_, g)| *g == stem) {
        return Some(format!("{h}.{param}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, sub) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (h, _) = arch_layer_map(arch)
        .iter()
        .chain(LAYER_MAP)
        .find(|(_, g)| *g == sub)?;
    Some(format!("model.layers.{layer}.{h}.{param}"))
}

/// Layer index of a `blk.N.*` name.
pub fn gguf_layer(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Which head count governs a q/k tensor's permutation, if the name is one.
pub enum QkRole {
    Query,
    Key,
}

pub fn qk_role_hf(name: &str) -> Option<QkRole> {
    if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
        Some(QkRole::Query)
    } else if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias") {
        Some(QkRole::Key)
    } else {
        None
    }
}

/// Row permutation of `LlamaModel.permute(w, n_head)`: rows viewed as (n_head, 2, half) become
/// (n_head, half, 2). `inverse` undoes it. `row_len` is the product of the trailing dims.
pub fn permute_rows(
    data: &[f32],
    n_rows: usize,
    row_len: usize,
    n_head: usize,
    inverse: bool,
) -> Option<Vec<f32>> {
    if n_head == 0 || !n_rows.is_multiple_of(2 * n_head) || data.len() != n_rows * row_len {
        return None;
    }
    let head_dim = n_rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let hf_row = h * head_dim + j * half + i;
                let gguf_row = h * head_dim + 2 * i + j;
                let (src, dst) = if inverse {
                    (gguf_row, hf_row)
                } else {
                    (hf_row, gguf_row)
                };
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    Some(out)
}
