//! Rotary position embeddings (RoPE) with HF's `rotate_half` convention.
//!
//! Reference: Su et al. 2021, "RoFormer"; transformers `modeling_rope_utils.py`
//! (`_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
//! `_compute_llama3_parameters`) and `models/llama/modeling_llama.py`
//! (`LlamaRotaryEmbedding`, `rotate_half`, `apply_rotary_pos_emb`).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::config::{ModelConfig, RopeScaling};

/// Inverse frequencies `[rotary_dim / 2]`, scaling applied, computed once on the host.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    pub inv_freq: Vec<f32>,
    /// Tables for adjacent pairs (`[f0, f0, f1, f1, ..]`, GLM) instead of halves.
    pub interleaved: bool,
}

impl RotaryEmbedding {
    pub fn new(config: &ModelConfig) -> Self {
        Self::with_base(config, config.rope_theta, config.rope_scaling.as_ref())
    }

    /// The sliding layers' embedding when they have a base of their own (Gemma 3).
    pub fn local(config: &ModelConfig) -> Option<Self> {
        config
            .variant
            .rope_local_theta
            .map(|theta| Self::with_base(config, theta, None))
    }

    fn with_base(config: &ModelConfig, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        let dim = config.rotary_dim();
        // HF computes base ** (2i / dim) in f32; f64 here differs by < 1 ulp after rounding.
        let mut inv: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        match scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => inv.iter_mut().for_each(|f| *f /= factor),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Self {
            inv_freq: inv.into_iter().map(|f| f as f32).collect(),
            interleaved: config.rope_interleaved(),
        }
    }

    /// cos and sin tables for `positions`.
    ///
    /// # Shapes
    /// - positions: `[batch, seq]`
    /// - output: two `[batch, 1, seq, rotary_dim]` tensors
    pub fn cos_sin<B: Backend>(
        &self,
        positions: Tensor<B, 2, Int>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let device = positions.device();
        let [b, t] = positions.dims();
        let half = self.inv_freq.len();
        let inv =
            Tensor::<B, 1>::from_data(TensorData::new(self.inv_freq.clone(), [half]), &device);
        let freqs = positions
            .float()
            .reshape([b, t, 1])
            .mul(inv.reshape([1, 1, half]));
        let emb = if self.interleaved {
            let pairs = freqs.reshape([b, t, half, 1]);
            Tensor::cat(vec![pairs.clone(), pairs], 3).reshape([b, 1, t, 2 * half])
        } else {
            Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([b, 1, t, 2 * half])
        };
        (emb.clone().cos(), emb.sin())
    }
}

/// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]`; cos, sin: `[batch, 1, seq, head_dim]`
pub fn apply_rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    crate::backend::rope(x, cos.clone(), sin.clone())
}

/// The rotary embedding on the first `rotary_dim` dimensions of each head, the rest passed
/// through (GLM's partial rotary); `interleaved` rotates adjacent pairs, transformers' GLM
/// `rotate_half(x) = stack(-x[1::2], x[0::2])`. Whole heads in halves take the fused kernel.
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]`; cos, sin: `[batch, 1, seq, rotary_dim]`
pub fn apply_rotary_variant<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    rotary_dim: usize,
    interleaved: bool,
) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    if rotary_dim == d && !interleaved {
        return apply_rotary(x, cos, sin);
    }
    let (rot, pass) = if rotary_dim == d {
        (x, None)
    } else {
        (
            x.clone().slice([0..b, 0..h, 0..t, 0..rotary_dim]),
            Some(x.slice([0..b, 0..h, 0..t, rotary_dim..d])),
        )
    };
    let half = rotary_dim / 2;
    let rotated = if interleaved {
        let pairs = rot.clone().reshape([b, h, t, half, 2]);
        let even = pairs.clone().slice([0..b, 0..h, 0..t, 0..half, 0..1]);
        let odd = pairs.slice([0..b, 0..h, 0..t, 0..half, 1..2]);
        Tensor::cat(vec![odd.neg(), even], 4).reshape([b, h, t, rotary_dim])
    } else {
        let x1 = rot.clone().slice([0..b, 0..h, 0..t, 0..half]);
        let x2 = rot.clone().slice([0..b, 0..h, 0..t, half..rotary_dim]);
        Tensor::cat(vec![x2.neg(), x1], 3)
    };
    let out = rot.mul(cos.clone()).add(rotated.mul(sin.clone()));
    match pass {
        Some(pass) => Tensor::cat(vec![out, pass], 3),
        None => out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;

    fn config(scaling: Option<RopeScaling>) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            model_type: "llama".into(),
            vocab_size: 10,
            hidden_size: 64,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: scaling,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_ids: vec![],
            pad_token_id: None,
            dtype: None,
            variant: Default::default(),
        }
    }

    #[test]
    fn llama3_scaling_matches_transformers() {
        // HF's `_compute_llama3_parameters` formula re-run in numpy (f32) for head_dim 16,
        // theta 1e4, factor 4, low 1, high 4, original 32: wavelengths 6.3 (kept), 19.9
        // (smoothed) and >= 62.8 (divided by 4). The Llama fixture checks the model end to end.
        let expected = [
            1.0f32,
            0.12732396,
            0.025,
            0.007_905_695,
            0.0025,
            0.00079056947,
            0.000_25,
            7.905695e-5,
        ];
        let mut c = config(None);
        c.rope_theta = 10000.0;
        let base = RotaryEmbedding::new(&c).inv_freq;
        c.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        });
        let r = RotaryEmbedding::new(&c);
        // Frequencies with wavelength < 8 are kept, > 32 divided by 4, between smoothed.
        assert_eq!(r.inv_freq[0], base[0]);
        for (i, (got, want)) in r.inv_freq.iter().zip(expected).enumerate() {
            assert!((got / want - 1.0).abs() < 1e-5, "{i}: {got} vs {want}");
        }
    }
}
