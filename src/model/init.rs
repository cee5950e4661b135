//! `init:tiny`: a small random Qwen2 with transformers' initialisation, for tests and
//! smoke runs without downloaded weights.
//!
//! Reference: transformers `Qwen2PreTrainedModel._init_weights` (normal(0,
//! initializer_range) for linear and embedding weights, zero biases, unit RMSNorm weights).
//! Values come from a seeded ChaCha20 RNG (Box-Muller), so a seed fixes the checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::model::config::{Architecture, ModelConfig};
use crate::model::hf::{save_hf_folder, DType, HfError, HostTensor};

/// Dimensions of a tiny model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinyShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
}

impl Default for TinyShape {
    /// About 3.2 M parameters (tied embeddings, as Qwen2.5-0.5B).
    fn default() -> Self {
        Self {
            hidden: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            intermediate: 512,
            vocab: 16384,
        }
    }
}

/// The config of a tiny Qwen2 with `shape` (tied embeddings, rope_theta 1e6 as Qwen2.5).
pub fn tiny_qwen2_config(shape: TinyShape) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        model_type: "qwen2".into(),
        vocab_size: shape.vocab,
        hidden_size: shape.hidden,
        intermediate_size: shape.intermediate,
        num_hidden_layers: shape.layers,
        num_attention_heads: shape.heads,
        num_key_value_heads: shape.kv_heads,
        head_dim: shape.hidden / shape.heads.max(1),
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        max_position_embeddings: 32768,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        initializer_range: 0.02,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        pad_token_id: None,
        dtype: Some("float32".into()),
        variant: Default::default(),
    }
}

/// A tiny random Qwen2: its config and HF-named tensors.
pub fn init_tiny_qwen2(shape: TinyShape, seed: u64) -> (ModelConfig, BTreeMap<String, HostTensor>) {
    let config = tiny_qwen2_config(shape);
    let tensors = init_weights(&config, seed);
    (config, tensors)
}

/// transformers-style random weights for any resolved config.
pub fn init_weights(c: &ModelConfig, seed: u64) -> BTreeMap<String, HostTensor> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let std = c.initializer_range as f32;
    let mut normal = |shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| std * standard_normal(&mut rng)).collect();
        HostTensor::new(shape, data)
    };
    let mut out = BTreeMap::new();
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    out.insert(
        "model.embed_tokens.weight".into(),
        normal(vec![c.vocab_size, h]),
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let attn = [
            ("q_proj", q, h, c.qkv_bias()),
            ("k_proj", kv, h, c.qkv_bias()),
            ("v_proj", kv, h, c.qkv_bias()),
            ("o_proj", h, q, c.o_bias()),
        ];
        for (name, o, inp, bias) in attn {
            out.insert(format!("{p}.self_attn.{name}.weight"), normal(vec![o, inp]));
            if bias {
                out.insert(
                    format!("{p}.self_attn.{name}.bias"),
                    HostTensor::new(vec![o], vec![0.0; o]),
                );
            }
        }
        for (name, o, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            out.insert(format!("{p}.mlp.{name}.weight"), normal(vec![o, inp]));
            if c.mlp_bias {
                out.insert(
                    format!("{p}.mlp.{name}.bias"),
                    HostTensor::new(vec![o], vec![0.0; o]),
                );
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.insert(
                format!("{p}.{norm}.weight"),
                HostTensor::new(vec![h], vec![1.0; h]),
            );
        }
    }
    out.insert(
        "model.norm.weight".into(),
        HostTensor::new(vec![h], vec![1.0; h]),
    );
    if !c.tie_word_embeddings {
        out.insert("lm_head.weight".into(), normal(vec![c.vocab_size, h]));
    }
    out
}

/// Writes a tiny random Qwen2 as an HF folder (config.json, generation_config.json,
/// model.safetensors in f32) that transformers loads.
pub fn write_tiny_qwen2(dir: &Path, shape: TinyShape, seed: u64) -> Result<ModelConfig, HfError> {
    let (config, tensors) = init_tiny_qwen2(shape, seed);
    save_hf_folder(dir, &config, &tensors, DType::F32)?;
    Ok(config)
}

fn standard_normal(rng: &mut ChaCha20Rng) -> f32 {
    // Box-Muller; u1 in (0, 1] keeps ln finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::hf::load_hf_folder_tensors;

    #[test]
    fn default_is_a_few_million_params_and_statistics_match() {
        let (config, tensors) = init_tiny_qwen2(TinyShape::default(), 7);
        let count: usize = tensors.values().map(HostTensor::numel).sum();
        assert_eq!(count, config.num_parameters());
        assert!((2_000_000..6_000_000).contains(&count), "{count}");
        let emb = &tensors["model.embed_tokens.weight"].data;
        let mean = emb.iter().sum::<f32>() / emb.len() as f32;
        let var = emb.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / emb.len() as f32;
        assert!(
            mean.abs() < 1e-3 && (var.sqrt() - 0.02).abs() < 5e-4,
            "{mean} {var}"
        );
        assert!(tensors["model.layers.0.self_attn.q_proj.bias"]
            .data
            .iter()
            .all(|&x| x == 0.0));
        assert!(tensors["model.norm.weight"].data.iter().all(|&x| x == 1.0));
        // Same seed, same weights; another seed, others.
        assert_eq!(init_tiny_qwen2(TinyShape::default(), 7).1, tensors);
        let other = init_tiny_qwen2(TinyShape::default(), 8).1;
        assert_ne!(other["model.embed_tokens.weight"].data[..16], emb[..16]);
    }

    #[test]
    fn saved_folder_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let shape = TinyShape {
            hidden: 32,
            layers: 1,
            heads: 4,
            kv_heads: 2,
            intermediate: 64,
            vocab: 50,
        };
        let config = write_tiny_qwen2(dir.path(), shape, 1).unwrap();
        let back = ModelConfig::from_file(dir.path().join("config.json")).unwrap();
        assert_eq!(back, config);
        assert_eq!(
            load_hf_folder_tensors(dir.path()).unwrap(),
            init_tiny_qwen2(shape, 1).1
        );
        assert!(dir.path().join("generation_config.json").is_file());
    }
}
