//! The decoder-only transformer in burn, generic over `B: Backend`.
//!
//! One decoder serves every family, grown by configuration ([`ModelConfig`]): Qwen2 is Llama
//! with q/k/v biases, Qwen3 adds per-head q/k norms, Mistral a sliding window, Gemma 2/3
//! (1 + w) norms, scaled embeddings, GeGLU, norms on the attention and MLP outputs, soft-capping
//! and alternating local/global layers, GLM partial interleaved rotary embeddings and a fused
//! gate/up projection. Module fields mostly spell the HF safetensors keys
//! (`model.layers.N.self_attn.q_proj.weight`); [`HfLayerNames`] maps the norms whose HF names
//! differ between families, and GLM's `gate_up_proj` is split on load and joined on save. The KV cache is passed explicitly to
//! `forward(&self, ...)` (as candle's `llama.rs`), so training and sampling share one model.
//! Reference: transformers `models/llama/modeling_llama.py`, `models/qwen2/modeling_qwen2.py`.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::backend::checkpoint::{
    first_trainable, with_stand_ins, LayerReplay, ReplayMode, Replayed,
};
use crate::model::config::{Activation, Architecture, ModelConfig};
use crate::model::hf::HostTensor;
use crate::model::lora::LoraLinear;
use crate::model::nf4_linear::{BaseWeight, Nf4Weight};
use crate::model::rope::{apply_rotary_variant, RotaryEmbedding};

/// Errors building a model from named tensors.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing tensor `{tensor}`")]
    MissingTensor { tensor: String },
    #[error("tensor `{tensor}` has shape {got:?}; expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{tensor}`: NF4 quantization failed: {message}")]
    Quantize { tensor: String, message: String },
}

/// Score given to masked attention positions: exp() of it underflows to exactly 0 in f32,
/// bf16 and f16, and fully masked (padding) rows stay finite instead of NaN.
const MASKED_SCORE: f32 = -1.0e4;

/// Root-mean-square layer norm: `(weight + offset) * x / sqrt(mean(x^2) + eps)`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
    /// Gemma's norms scale by `1 + weight` (the stored weight stays as HF stores it).
    pub offset: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> same (any leading axes: the norm is over the last one)
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, h] = x.dims();
        let weight = if self.offset == 0.0 {
            self.weight.val()
        } else {
            self.weight.val().add_scalar(self.offset)
        };
        crate::backend::rms_norm(x.reshape([b * t, h]), weight, self.eps).reshape([b, t, h])
    }

    /// The norm over the last axis of a `[batch, seq, heads, head_dim]` tensor (Qwen3's and
    /// Gemma 3's per-head q/k norms).
    fn forward_heads(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, t, h, d] = x.dims();
        self.forward(x.reshape([b * t, h, d])).reshape([b, t, h, d])
    }
}

/// `x` unchanged, or through `norm` when there is one.
fn maybe_norm<B: Backend>(norm: &Option<RmsNorm<B>>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    match norm {
        Some(n) => n.forward(x),
        None => x,
    }
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Embedding<B> {
    /// # Shapes
    /// - ids: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(self.weight.val(), ids)
    }
}

/// Gated feed-forward: `down(act(gate(x)) * up(x))` (SwiGLU, or GeGLU for Gemma).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: LoraLinear<B>,
    pub up_proj: LoraLinear<B>,
    pub down_proj: LoraLinear<B>,
    #[module(skip)]
    pub activation: Activation,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let gate = self.gate_proj.forward(x.clone());
        let up = self.up_proj.forward(x);
        let inter = gate.dims()[2];
        let hidden = match self.activation {
            Activation::Silu => {
                let out = self
                    .down_proj
                    .forward_swiglu(gate.reshape([b * t, inter]), up.reshape([b * t, inter]));
                return out.reshape([b, t, self.down_proj.out_features()]);
            }
            Activation::GeluTanh => gelu_tanh(gate).mul(up),
            Activation::Gelu => burn::tensor::activation::gelu(gate).mul(up),
        };
        self.down_proj.forward(hidden)
    }
}

/// GELU with the tanh approximation (torch's `gelu(approximate="tanh")`):
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
fn gelu_tanh<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let inner = x
        .clone()
        .add(x.clone().powi_scalar(3).mul_scalar(0.044715))
        .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    x.mul(inner.tanh().add_scalar(1.0)).mul_scalar(0.5)
}

/// Per-layer keys and values plus the key padding mask, grown by each forward.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Per layer: keys and values, `None` until the first forward pass.
    layers: Vec<Option<LayerKv<B>>>,
    /// `[batch, len]`, true for real tokens; `None` while nothing was padded.
    key_mask: Option<Tensor<B, 2, Bool>>,
    len: usize,
}

/// One layer's keys and values, `[batch * kv_heads, capacity, head_dim]`: the first `len`
/// positions of the cache hold tokens, the rest is room that [`KvCache::reserve`] made, so
/// decoding writes each new token in place instead of copying the whole cache every step.
#[derive(Debug, Clone)]
struct LayerKv<B: Backend> {
    keys: Tensor<B, 3>,
    values: Tensor<B, 3>,
}

impl<B: Backend> LayerKv<B> {
    fn capacity(&self) -> usize {
        self.keys.dims()[1]
    }

    /// The first `len` positions (a view, no copy, when there is room after them).
    fn first(&self, len: usize) -> (Tensor<B, 3>, Tensor<B, 3>) {
        if len == self.capacity() {
            return (self.keys.clone(), self.values.clone());
        }
        (
            crate::backend::narrow(self.keys.clone(), len),
            crate::backend::narrow(self.values.clone(), len),
        )
    }

    /// The first `len` positions followed by `extra` positions of room.
    fn with_room(&self, len: usize, extra: usize) -> Self {
        let (keys, values) = self.first(len);
        let grow = |x: Tensor<B, 3>| {
            let [rows, _, d] = x.dims();
            let room = Tensor::zeros([rows, extra, d], (&x.device(), x.dtype()));
            Tensor::cat(vec![x, room], 1)
        };
        Self {
            keys: grow(keys),
            values: grow(values),
        }
    }
}

/// Where one layer's forward pass keeps its keys and values.
struct CacheSlot<'a, B: Backend> {
    layer: &'a mut Option<LayerKv<B>>,
    /// Positions already cached (where the new ones go).
    past: usize,
}

impl<B: Backend> CacheSlot<'_, B> {
    /// Stores the new keys and values `[batch * kv_heads, t, head_dim]` after the cached ones
    /// and returns all of them, `[batch * kv_heads, past + t, head_dim]`.
    fn append(self, keys: Tensor<B, 3>, values: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [rows, t, d] = keys.dims();
        let total = self.past + t;
        let stored = match self.layer.take() {
            None => LayerKv { keys, values },
            Some(old) if old.capacity() >= total => {
                // In place when nothing else holds the buffers (burn copies them otherwise).
                let range = [0..rows, self.past..total, 0..d];
                LayerKv {
                    keys: old.keys.slice_assign(range.clone(), keys),
                    values: old.values.slice_assign(range, values),
                }
            }
            Some(old) => {
                let (old_keys, old_values) = old.first(self.past);
                LayerKv {
                    keys: Tensor::cat(vec![old_keys, keys], 1),
                    values: Tensor::cat(vec![old_values, values], 1),
                }
            }
        };
        let all = stored.first(total);
        *self.layer = Some(stored);
        all
    }
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            key_mask: None,
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `additional` more positions in every layer (one copy now), so that the
    /// forward passes that fill them write in place.
    pub fn reserve(&mut self, additional: usize) {
        let len = self.len;
        for layer in self.layers.iter_mut().flatten() {
            if layer.capacity() < len + additional {
                *layer = layer.with_room(len, additional);
            }
        }
    }

    /// Rebuilds the cache of `batch` rows with row `i` a copy of row `rows[i]` (prompts that
    /// several rows share are prefilled once).
    pub fn select_rows(&mut self, batch: usize, rows: &[usize]) {
        let pick = |x: Tensor<B, 3>| {
            let per_row = x.dims()[0] / batch.max(1);
            let index: Vec<i64> = rows
                .iter()
                .flat_map(|&r| (r * per_row..(r + 1) * per_row).map(|i| i as i64))
                .collect();
            let n = index.len();
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [n]), &x.device());
            x.select(0, index)
        };
        let len = self.len;
        for layer in self.layers.iter_mut().flatten() {
            let (keys, values) = layer.first(len);
            *layer = LayerKv {
                keys: pick(keys),
                values: pick(values),
            };
        }
        if let Some(mask) = self.key_mask.take() {
            let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let n = index.len();
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [n]), &mask.device());
            self.key_mask = Some(mask.select(0, index));
        }
    }

    /// A cache that starts with given keys and values in every layer (P-Tuning v2 / peft
    /// prefix tuning: the prefix is attended by every query and takes no rotary embedding).
    ///
    /// # Shapes
    /// - layers: per layer `(keys, values)`, each `[batch, kv_heads, prefix_len, head_dim]`
    pub fn from_prefix(layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>) -> Self {
        let len = layers.first().map_or(0, |(k, _)| k.dims()[2]);
        Self {
            layers: layers
                .into_iter()
                .map(|(keys, values)| {
                    Some(LayerKv {
                        keys: merge_heads(keys),
                        values: merge_heads(values),
                    })
                })
                .collect(),
            key_mask: None,
            len,
        }
    }
}

/// The keys and values one attention call reads.
enum KeysValues<B: Backend> {
    /// This pass's own, `[batch, kv_heads, t, head_dim]` (no cache).
    Fresh(Tensor<B, 4>, Tensor<B, 4>),
    /// Every cached position, `[batch * kv_heads, s, head_dim]`: views of the cache's buffers.
    Cached(Tensor<B, 3>, Tensor<B, 3>),
}

impl<B: Backend> KeysValues<B> {
    /// `[batch, kv_heads, s, head_dim]` (the fused kernels read the cache's views in place).
    fn split_heads(self, batch: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match self {
            Self::Fresh(k, v) => (k, v),
            Self::Cached(k, v) => {
                let [rows, s, d] = k.dims();
                let shape = [batch, rows / batch, s, d];
                (k.reshape(shape), v.reshape(shape))
            }
        }
    }

    /// `[batch * kv_heads, s, head_dim]`. The batch axes are merged before the keys are
    /// transposed: reshaping a transposed view would copy it.
    fn merged(self) -> (Tensor<B, 3>, Tensor<B, 3>) {
        match self {
            Self::Fresh(k, v) => (merge_heads(k), merge_heads(v)),
            Self::Cached(k, v) => (k, v),
        }
    }
}

/// `[batch, heads, seq, d]` -> `[batch * heads, seq, d]`.
fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, s, d] = x.dims();
    x.reshape([b * h, s, d])
}

/// How the layers of one forward pass mask attention.
#[derive(Clone)]
enum LayerMask<B: Backend> {
    /// The composed attention: a mask in the layout of the scores (see
    /// [`Attention::score_mask`]), true = masked; `None` when nothing is masked.
    Scores(Option<Tensor<B, 4, Bool>>),
    /// The fused kernel: causal by position, plus the key padding mask `[batch, past + seq]`
    /// (1 = real token) when there is padding.
    Fused(Option<Tensor<B, 2, Int>>),
}

/// Grouped-query self-attention with RoPE.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: LoraLinear<B>,
    pub k_proj: LoraLinear<B>,
    pub v_proj: LoraLinear<B>,
    pub o_proj: LoraLinear<B>,
    /// Per-head RMSNorm of queries and keys before the rotary embedding (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Scale of the scores (`head_dim^-0.5`, Gemma's `query_pre_attn_scalar^-0.5`).
    pub scale: f64,
    /// Gemma 2's `tanh(s / cap) * cap` on the scaled scores.
    pub softcap: Option<f64>,
    /// Keys more than this many positions back are not attended (sliding-window layers).
    pub window: Option<usize>,
    /// Leading dimensions of each head that rotate (GLM rotates half).
    pub rotary_dim: usize,
    /// Rotary pairs are adjacent dimensions (GLM) rather than the two halves.
    pub rope_interleaved: bool,
}

impl<B: Backend> Attention<B> {
    /// A `[batch | 1, 1, seq, keys]` mask in the layout of the scores, `[batch, kv_heads,
    /// rep * seq, keys]`, where the `rep` query heads of a KV head are extra rows.
    fn score_mask(&self, mask: Tensor<B, 4, Bool>, batch: usize) -> Tensor<B, 4, Bool> {
        let [mb, _, t, s] = mask.dims();
        let (kvh, rep) = (self.num_kv_heads, self.num_heads / self.num_kv_heads);
        mask.reshape([mb, 1, 1, t, s])
            .expand([batch, kvh, rep, t, s])
            .reshape([batch, kvh, rep * t, s])
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]`; cos, sin: `[batch, 1, seq, head_dim]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &LayerMask<B>,
        cache: Option<CacheSlot<'_, B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let head_norm = |norm: &Option<RmsNorm<B>>, y: Tensor<B, 4>| match norm {
            Some(n) => n.forward_heads(y),
            None => y,
        };
        let q = head_norm(
            &self.q_norm,
            self.q_proj.forward(x.clone()).reshape([b, t, h, d]),
        )
        .swap_dims(1, 2);
        let k = head_norm(
            &self.k_norm,
            self.k_proj.forward(x.clone()).reshape([b, t, kvh, d]),
        )
        .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, t, kvh, d])
            .swap_dims(1, 2);
        let rotate = |y| apply_rotary_variant(y, cos, sin, self.rotary_dim, self.rope_interleaved);
        let q = rotate(q);
        let k = rotate(k);
        let kv = match cache {
            Some(slot) => {
                let (k, v) = slot.append(merge_heads(k), merge_heads(v));
                KeysValues::Cached(k, v)
            }
            None => KeysValues::Fresh(k, v),
        };
        let scale = self.scale;
        let mask = match mask {
            LayerMask::Fused(key_valid) => {
                let spec = crate::backend::FusedAttentionSpec {
                    scale,
                    causal: true,
                };
                let (k, v) = kv.split_heads(b);
                let out = crate::backend::fused_attention(q, k, v, key_valid.clone(), spec);
                return self.o_proj.forward(out.reshape([b, t, h * d]));
            }
            LayerMask::Scores(mask) => mask,
        };
        let (k, v) = kv.merged();
        let rep = h / kvh;
        // The `rep` query heads that read one KV head (HF's repeat_kv) become extra rows of one
        // product with that head's keys: `[b * kvh, rep * t, d]`, no copies of K and V.
        let q = q.reshape([b * kvh, rep * t, d]);
        let s = k.dims()[1];
        let scores = crate::backend::matmul(q, k.swap_dims(1, 2)).reshape([b, kvh, rep * t, s]);
        let (scores, scale) = match self.softcap {
            Some(cap) => (scores.mul_scalar(scale / cap).tanh().mul_scalar(cap), 1.0),
            None => (scores, scale),
        };
        let probs =
            crate::backend::masked_softmax(scores, mask.clone(), scale, MASKED_SCORE as f64);
        let out =
            crate::backend::matmul(probs.reshape([b * kvh, rep * t, s]), v).reshape([b, h, t, d]);
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, t, h * d]))
    }
}

/// Pre-norm decoder block: attention and MLP, each with a residual.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
    /// Norm of the attention output before its residual add (Gemma, GLM-4).
    pub attn_output_norm: Option<RmsNorm<B>>,
    /// Norm of the MLP output before its residual add (Gemma, GLM-4).
    pub mlp_output_norm: Option<RmsNorm<B>>,
}

impl<B: Backend> DecoderLayer<B> {
    /// Attention and MLP, each with its residual.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> same; cos, sin: `[batch, 1, seq, head_dim]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &LayerMask<B>,
        cache: Option<CacheSlot<'_, B>>,
    ) -> Tensor<B, 3> {
        let h = self.self_attn.forward(
            self.input_layernorm.forward(x.clone()),
            cos,
            sin,
            mask,
            cache,
        );
        let x = x.add(maybe_norm(&self.attn_output_norm, h));
        let h = self
            .mlp
            .forward(self.post_attention_layernorm.forward(x.clone()));
        x.add(maybe_norm(&self.mlp_output_norm, h))
    }
}

impl<B: Backend> DecoderLayer<B> {
    fn projections(&self) -> [&LoraLinear<B>; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// Whether a training pass through the layer draws dropout masks.
    fn draws_dropout(&self) -> bool {
        self.projections().iter().any(|p| p.dropout.prob > 0.0)
    }
}

/// One decoder layer's call in a training forward pass, kept so that the backward pass can run
/// it again (see [`crate::backend::checkpoint`]).
struct LayerCall<B: Backend> {
    layer: DecoderLayer<B>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    mask: LayerMask<B>,
    /// With dropout: the backend RNG's seed for this call, set before the forward pass and
    /// again before the recompute, so that both draw the same masks (torch's checkpoint
    /// restores the RNG state the same way).
    dropout_seed: Option<u64>,
}

impl<B: Backend> LayerCall<B> {
    fn new(
        layer: &DecoderLayer<B>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &LayerMask<B>,
    ) -> Self {
        let dropout_seed = layer.draws_dropout().then(|| {
            // Drawn from the backend RNG, which the trainer seeds per step, so runs repeat.
            let draw = Tensor::<B, 1, Int>::random(
                [2],
                burn::tensor::Distribution::Uniform(0.0, f64::from(u32::MAX)),
                &cos.device(),
            );
            let v = draw
                .into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .unwrap_or_default();
            v.iter().fold(0u64, |acc, x| (acc << 32) ^ (*x as u64))
        });
        Self {
            layer: layer.clone(),
            cos: cos.clone(),
            sin: sin.clone(),
            mask: mask.clone(),
            dropout_seed,
        }
    }
}

impl<B: Backend> LayerReplay<B> for LayerCall<B> {
    fn replay(&self, inputs: Vec<Tensor<B, 3>>, mode: ReplayMode) -> Replayed<B> {
        if let Some(seed) = self.dropout_seed {
            B::seed(&self.cos.device(), seed);
        }
        let (layer, stand_ins) = match mode {
            ReplayMode::Plain => (self.layer.clone(), Vec::new()),
            ReplayMode::Untracked => (self.layer.clone().no_grad(), Vec::new()),
            ReplayMode::StandIns => with_stand_ins(self.layer.clone()),
        };
        let x = inputs
            .into_iter()
            .next()
            .expect("a decoder layer's replay takes its hidden states");
        Replayed {
            output: layer.forward(x, &self.cos, &self.sin, &self.mask, None),
            stand_ins,
        }
    }

    fn anchor(&self) -> Option<FloatTensor<B>> {
        first_trainable(&self.layer)
    }
}

/// How a training forward pass keeps the activations of its decoder layers: the recipe's
/// `gradient_checkpointing = false | true | "offload"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradientCheckpointing {
    /// Every activation the backward pass needs stays in memory.
    #[default]
    Off,
    /// Only each decoder layer's input is kept; the layer runs again in the backward pass.
    Layers,
    /// As [`Self::Layers`], with the kept inputs in host memory until their layer's backward.
    Offload,
}

impl serde::Serialize for GradientCheckpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Off => s.serialize_bool(false),
            Self::Layers => s.serialize_bool(true),
            Self::Offload => s.serialize_str("offload"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for GradientCheckpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = GradientCheckpointing;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("false, true or \"offload\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(if v {
                    GradientCheckpointing::Layers
                } else {
                    GradientCheckpointing::Off
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "offload" => Ok(GradientCheckpointing::Offload),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl std::fmt::Display for GradientCheckpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Layers => "layers",
            Self::Offload => "offload",
        })
    }
}

/// The transformer body (HF `model.*`).
#[derive(Module, Debug)]
pub struct DecoderModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// Decoder with its language-model head (HF `*ForCausalLM`).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: DecoderModel<B>,
    /// `None` when the embeddings are tied.
    pub lm_head: Option<LoraLinear<B>>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    pub rope: RotaryEmbedding,
    /// The sliding layers' own rotary embedding (Gemma 3's local base); `None`: they use `rope`.
    #[module(skip)]
    pub rope_local: Option<RotaryEmbedding>,
    /// Activation checkpointing of the decoder layers in passes that record a graph (no
    /// effect elsewhere, nor on passes that fill a KV cache).
    #[module(skip)]
    pub checkpointing: GradientCheckpointing,
}

impl<B: Backend> CausalLm<B> {
    /// Final hidden states after the last norm.
    ///
    /// `attention_mask` marks real tokens (true) among this call's `input_ids` (left padding
    /// for batched prompts); the cache remembers it for later calls. `positions` are absolute
    /// (see [`positions_from_mask`]).
    ///
    /// # Shapes
    /// - input_ids, positions, attention_mask: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden_states(
        &self,
        input_ids: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let x = self.embed(input_ids);
        self.hidden_states_from_embeds(x, positions, attention_mask, cache)
    }

    /// Token embeddings as the model's input layer gives them (Gemma scales them by
    /// `sqrt(hidden_size)`).
    ///
    /// # Shapes
    /// - ids: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = self.model.embed_tokens.forward(input_ids);
        match self.config.embed_scale() {
            Some(scale) => x.mul_scalar(scale),
            None => x,
        }
    }

    /// [`Self::hidden_states`] from input embeddings instead of token ids (transformers'
    /// `inputs_embeds`: prompt tuning prepends trained virtual-token embeddings).
    ///
    /// # Shapes
    /// - embeds: `[batch, seq, hidden]`; positions, attention_mask: `[batch, seq]`
    pub fn hidden_states_from_embeds(
        &self,
        embeds: Tensor<B, 3>,
        positions: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let device = embeds.device();
        let [b, t, _] = embeds.dims();
        let past = cache.as_ref().map_or(0, |c| c.len);
        let s = past + t;
        // Key padding mask over past + new keys.
        let key_mask = match (
            cache.as_ref().and_then(|c| c.key_mask.clone()),
            attention_mask,
        ) {
            (None, None) => None,
            (Some(old), None) => Some(Tensor::cat(
                vec![old, Tensor::<B, 2, Bool>::ones([b, t], &device)],
                1,
            )),
            (None, Some(new)) if past > 0 => Some(Tensor::cat(
                vec![Tensor::<B, 2, Bool>::ones([b, past], &device), new],
                1,
            )),
            (None, Some(new)) => Some(new),
            (Some(old), Some(new)) => Some(Tensor::cat(vec![old, new], 1)),
        };
        // The fused kernel knows neither soft-capping nor windows; a window no query reaches
        // past (s <= window) masks nothing.
        let windows: Vec<Option<usize>> = self
            .model
            .layers
            .iter()
            .map(|l| l.self_attn.window.filter(|&w| s > w))
            .collect();
        let plain = windows.iter().all(Option::is_none)
            && self
                .model
                .layers
                .iter()
                .all(|l| l.self_attn.softcap.is_none());
        let fused = plain
            && crate::backend::fused_attention_supported::<B>(embeds.dtype(), self.config.head_dim);
        let score_mask = |window: Option<usize>| -> LayerMask<B> {
            // Query i (absolute past + i) sees key j iff j <= past + i, and with a window w
            // iff also j > past + i - w (transformers' sliding_window_overlay).
            let causal =
                (t > 1).then(|| Tensor::<B, 2, Bool>::tril_mask([t, s], past as i64, &device));
            let outside = window.map(|w| {
                Tensor::<B, 2, Bool>::triu_mask([t, s], past as i64 - w as i64 + 1, &device)
            });
            let causal = match (causal, outside) {
                (Some(c), Some(o)) => Some(c.bool_or(o)),
                (c, o) => c.or(o),
            };
            let mask = match (causal, &key_mask) {
                (None, None) => None,
                (Some(c), None) => Some(c.reshape([1, 1, t, s])),
                (c, Some(k)) => {
                    let pad = k
                        .clone()
                        .bool_not()
                        .reshape([b, 1, 1, s])
                        .expand([b, 1, t, s]);
                    Some(match c {
                        Some(c) => pad.bool_or(c.reshape([1, 1, t, s]).expand([b, 1, t, s])),
                        None => pad,
                    })
                }
            };
            // Built once for all layers: each layer's softmax keeps it for its backward pass.
            LayerMask::Scores(match (mask, self.model.layers.first()) {
                (Some(m), Some(layer)) => Some(layer.self_attn.score_mask(m, b)),
                _ => None,
            })
        };
        let full_mask = if fused {
            LayerMask::Fused(key_mask.clone().map(|m| m.int()))
        } else {
            score_mask(None)
        };
        // One mask per distinct window (Gemma and Mistral have one).
        let mut window_masks: Vec<(usize, LayerMask<B>)> = Vec::new();
        for w in windows.iter().flatten() {
            if !window_masks.iter().any(|(seen, _)| seen == w) {
                window_masks.push((*w, score_mask(Some(*w))));
            }
        }
        let (cos, sin) = self.rope.cos_sin(positions.clone());
        let local = self.rope_local.as_ref().map(|r| r.cos_sin(positions));
        let mut x = embeds;
        let checkpoint = self.checkpointing != GradientCheckpointing::Off
            && cache.is_none()
            && B::ad_enabled(&device);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let mask = match windows[i] {
                Some(w) => {
                    &window_masks
                        .iter()
                        .find(|(seen, _)| *seen == w)
                        .expect("a mask was built for every window")
                        .1
                }
                None => &full_mask,
            };
            let (cos, sin) = match (&local, layer.self_attn.window) {
                (Some((lc, ls)), Some(_)) => (lc, ls),
                _ => (&cos, &sin),
            };
            if checkpoint {
                let call = LayerCall::new(layer, cos, sin, mask);
                let offload = self.checkpointing == GradientCheckpointing::Offload;
                x = crate::backend::checkpoint::checkpointed(vec![x], Box::new(call), offload);
                continue;
            }
            let slot = cache.as_deref_mut().map(|c| CacheSlot {
                layer: &mut c.layers[i],
                past,
            });
            x = layer.forward(x, cos, sin, mask, slot);
        }
        if let Some(c) = cache {
            c.len = s;
            c.key_mask = key_mask;
        }
        self.model.norm.forward(x)
    }

    /// The weight `W [vocab, hidden]` when the logits are exactly `hidden @ W^T` (tied or
    /// plain head); `None` for a head with an adapter or a bias, or soft-capped logits (Gemma 2),
    /// which the chunked head losses do not reproduce.
    pub fn plain_head_weight(&self) -> Option<Tensor<B, 2>> {
        if self.config.variant.final_logit_softcapping.is_some() {
            return None;
        }
        match &self.lm_head {
            None => Some(self.model.embed_tokens.weight.val()),
            Some(head) if head.lora_a.is_none() && head.bias.is_none() => Some(head.weight.val()),
            Some(_) => None,
        }
    }

    /// Projects hidden states to vocabulary logits (tied: through the embedding table).
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]` -> `[batch, seq, vocab]`
    pub fn lm_head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, t, h] = hidden.dims();
                let w = self.model.embed_tokens.weight.val();
                let v = w.dims()[0];
                crate::backend::linear(hidden.reshape([b * t, h]), w).reshape([b, t, v])
            }
        };
        match self.config.variant.final_logit_softcapping {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    /// Logits for every position: [`Self::hidden_states`] then [`Self::lm_head`].
    ///
    /// # Shapes
    /// - output: `[batch, seq, vocab]`
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.lm_head(self.hidden_states(input_ids, positions, attention_mask, cache))
    }

    /// Logits of the last position only (what generation needs).
    ///
    /// # Shapes
    /// - output: `[batch, vocab]`
    pub fn forward_last(
        &self,
        input_ids: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 2> {
        let hidden = self.hidden_states(input_ids, positions, attention_mask, cache);
        let [b, t, h] = hidden.dims();
        let last = hidden.slice([0..b, t - 1..t, 0..h]);
        let logits = self.lm_head(last);
        let v = logits.dims()[2];
        logits.reshape([b, v])
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.model.layers.len())
    }

    /// Builds the model from HF-named tensors, checking every expected name and shape.
    /// Extra tensors (e.g. a redundant `lm_head.weight` when tied) are ignored.
    pub fn from_hf_tensors(
        config: &ModelConfig,
        tensors: &BTreeMap<String, HostTensor>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        Self::load(config, tensors, device, false)
    }

    /// [`Self::from_hf_tensors`] with the seven decoder projections of every layer quantized to
    /// NF4 on the host as they are loaded (QLoRA): the device never holds the dense model, so
    /// its peak while loading is the NF4 model plus the embeddings and head.
    pub fn from_hf_tensors_nf4(
        config: &ModelConfig,
        tensors: &BTreeMap<String, HostTensor>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        Self::load(config, tensors, device, true)
    }

    fn load(
        config: &ModelConfig,
        tensors: &BTreeMap<String, HostTensor>,
        device: &B::Device,
        nf4_projections: bool,
    ) -> Result<Self, ModelError> {
        let c = config;
        let get = |name: &str, shape: &[usize]| -> Result<TensorData, ModelError> {
            let t = tensors.get(name).ok_or_else(|| ModelError::MissingTensor {
                tensor: name.to_string(),
            })?;
            if t.shape != shape {
                return Err(ModelError::ShapeMismatch {
                    tensor: name.to_string(),
                    expected: shape.to_vec(),
                    got: t.shape.clone(),
                });
            }
            Ok(TensorData::new(t.data.clone(), t.shape.clone()))
        };
        let t1 = |name: &str, n: usize| -> Result<Tensor<B, 1>, ModelError> {
            Ok(Tensor::from_data(get(name, &[n])?, device))
        };
        let t2 = |name: &str, o: usize, i: usize| -> Result<Tensor<B, 2>, ModelError> {
            Ok(Tensor::from_data(get(name, &[o, i])?, device))
        };
        let dense =
            |prefix: &str, o: usize, i: usize, bias: bool| -> Result<LoraLinear<B>, ModelError> {
                let w = t2(&format!("{prefix}.weight"), o, i)?;
                let b = if bias {
                    Some(t1(&format!("{prefix}.bias"), o)?)
                } else {
                    None
                };
                Ok(LoraLinear::new(w, b))
            };
        // A decoder projection: dense, or NF4 straight from the host values.
        let linear =
            |prefix: &str, o: usize, i: usize, bias: bool| -> Result<LoraLinear<B>, ModelError> {
                if !nf4_projections {
                    return dense(prefix, o, i, bias);
                }
                let name = format!("{prefix}.weight");
                let data = get(&name, &[o, i])?;
                let values = data.as_slice::<f32>().map_err(|e| ModelError::Quantize {
                    tensor: name.clone(),
                    message: format!("{e:?}"),
                })?;
                let weight = Nf4Weight::quantize_host(values, &[o, i], device).map_err(|e| {
                    ModelError::Quantize {
                        tensor: name.clone(),
                        message: e.to_string(),
                    }
                })?;
                let b = if bias {
                    Some(t1(&format!("{prefix}.bias"), o)?)
                } else {
                    None
                };
                Ok(LoraLinear::with_base(BaseWeight::Nf4(weight), b))
            };
        let sized_norm = |name: &str, n: usize| -> Result<RmsNorm<B>, ModelError> {
            Ok(RmsNorm {
                weight: Param::from_tensor(t1(name, n)?),
                eps: c.rms_norm_eps,
                offset: c.norm_offset(),
            })
        };
        let norm = |name: &str| sized_norm(name, c.hidden_size);
        let names = HfLayerNames::of(c);
        // GLM's fused `gate_up_proj` [2 * inter, hidden]: its first half is the gate.
        let gate_up = |p: &str| -> Result<(LoraLinear<B>, LoraLinear<B>), ModelError> {
            if !c.fused_gate_up() {
                let gate = linear(
                    &format!("{p}.mlp.gate_proj"),
                    c.intermediate_size,
                    c.hidden_size,
                    c.mlp_bias,
                )?;
                let up = linear(
                    &format!("{p}.mlp.up_proj"),
                    c.intermediate_size,
                    c.hidden_size,
                    c.mlp_bias,
                )?;
                return Ok((gate, up));
            }
            let name = format!("{p}.mlp.gate_up_proj.weight");
            let (i, h) = (c.intermediate_size, c.hidden_size);
            let fused = get(&name, &[2 * i, h])?;
            let values = fused.as_slice::<f32>().map_err(|e| ModelError::Quantize {
                tensor: name.clone(),
                message: format!("{e:?}"),
            })?;
            let half = |k: usize| {
                let part = values[k * i * h..(k + 1) * i * h].to_vec();
                if nf4_projections {
                    Nf4Weight::quantize_host(&part, &[i, h], device)
                        .map(|w| LoraLinear::with_base(BaseWeight::Nf4(w), None))
                        .map_err(|e| ModelError::Quantize {
                            tensor: name.clone(),
                            message: e.to_string(),
                        })
                } else {
                    Ok(LoraLinear::new(
                        Tensor::from_data(TensorData::new(part, [i, h]), device),
                        None,
                    ))
                }
            };
            Ok((half(0)?, half(1)?))
        };
        let (hd, q_out, kv_out) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let head_norm = |n: &str| -> Result<Option<RmsNorm<B>>, ModelError> {
                c.qk_norm()
                    .then(|| sized_norm(&format!("{p}.self_attn.{n}.weight"), c.head_dim))
                    .transpose()
            };
            let output_norm = |n: Option<&str>| -> Result<Option<RmsNorm<B>>, ModelError> {
                n.map(|n| norm(&format!("{p}.{n}.weight"))).transpose()
            };
            let (gate_proj, up_proj) = gate_up(&p)?;
            layers.push(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: linear(&format!("{p}.self_attn.q_proj"), q_out, hd, c.qkv_bias())?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj"), kv_out, hd, c.qkv_bias())?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj"), kv_out, hd, c.qkv_bias())?,
                    o_proj: linear(&format!("{p}.self_attn.o_proj"), hd, q_out, c.o_bias())?,
                    q_norm: head_norm("q_norm")?,
                    k_norm: head_norm("k_norm")?,
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    scale: c.attention_scale(),
                    softcap: c.variant.attn_logit_softcapping,
                    window: c.layer_window(i),
                    rotary_dim: c.rotary_dim(),
                    rope_interleaved: c.rope_interleaved(),
                },
                post_attention_layernorm: norm(&format!("{p}.{}.weight", names.pre_mlp))?,
                mlp: Mlp {
                    gate_proj,
                    up_proj,
                    down_proj: linear(
                        &format!("{p}.mlp.down_proj"),
                        hd,
                        c.intermediate_size,
                        c.mlp_bias,
                    )?,
                    activation: c.variant.hidden_act,
                },
                attn_output_norm: output_norm(names.attn_output)?,
                mlp_output_norm: output_norm(names.mlp_output)?,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            // The head stays dense under QLoRA, as bitsandbytes leaves it.
            Some(dense("lm_head", c.vocab_size, hd, false)?)
        };
        Ok(Self {
            model: DecoderModel {
                embed_tokens: Embedding {
                    weight: Param::from_tensor(t2("model.embed_tokens.weight", c.vocab_size, hd)?),
                },
                layers,
                norm: norm("model.norm.weight")?,
            },
            lm_head,
            config: config.clone(),
            rope: RotaryEmbedding::new(config),
            rope_local: RotaryEmbedding::local(config),
            checkpointing: GradientCheckpointing::Off,
        })
    }

    /// The base weights under their HF names (adapters are not included; merge first to
    /// export a fine-tuned model).
    pub fn to_hf_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
            out.insert(name, HostTensor::new(shape, data));
        };
        let host2 = |t: Tensor<B, 2>| (t.dims().to_vec(), crate::backend::host_f32(t));
        let host1 = |t: Tensor<B, 1>| (t.dims().to_vec(), crate::backend::host_f32(t));
        let linear =
            |put: &mut dyn FnMut(String, Vec<usize>, Vec<f32>), p: String, l: &LoraLinear<B>| {
                let (shape, data) = host2(l.weight.val());
                put(format!("{p}.weight"), shape, data);
                if let Some(b) = &l.bias {
                    let (shape, data) = host1(b.val());
                    put(format!("{p}.bias"), shape, data);
                }
            };
        let (shape, data) = host2(self.model.embed_tokens.weight.val());
        put("model.embed_tokens.weight".into(), shape, data);
        let (shape, data) = host1(self.model.norm.weight.val());
        put("model.norm.weight".into(), shape, data);
        if let Some(h) = &self.lm_head {
            linear(&mut put, "lm_head".into(), h);
        }
        let names = HfLayerNames::of(&self.config);
        for (i, l) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut norm = |name: String, n: &RmsNorm<B>| {
                let (shape, data) = host1(n.weight.val());
                put(name, shape, data)
            };
            norm(format!("{p}.input_layernorm.weight"), &l.input_layernorm);
            norm(
                format!("{p}.{}.weight", names.pre_mlp),
                &l.post_attention_layernorm,
            );
            for (name, n) in [
                (names.attn_output, &l.attn_output_norm),
                (names.mlp_output, &l.mlp_output_norm),
            ] {
                if let (Some(name), Some(n)) = (name, n) {
                    norm(format!("{p}.{name}.weight"), n);
                }
            }
            let a = &l.self_attn;
            for (name, n) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
                if let Some(n) = n {
                    norm(format!("{p}.self_attn.{name}.weight"), n);
                }
            }
            for (n, lin) in [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("o_proj", &a.o_proj),
            ] {
                linear(&mut put, format!("{p}.self_attn.{n}"), lin);
            }
            let m = &l.mlp;
            if self.config.fused_gate_up() {
                let fused = Tensor::cat(vec![m.gate_proj.weight.val(), m.up_proj.weight.val()], 0);
                let (shape, data) = host2(fused);
                put(format!("{p}.mlp.gate_up_proj.weight"), shape, data);
                linear(&mut put, format!("{p}.mlp.down_proj"), &m.down_proj);
                continue;
            }
            for (n, lin) in [
                ("gate_proj", &m.gate_proj),
                ("up_proj", &m.up_proj),
                ("down_proj", &m.down_proj),
            ] {
                linear(&mut put, format!("{p}.mlp.{n}"), lin);
            }
        }
        out
    }
}

/// HF names of a layer's norms where the families differ (relative to `model.layers.N`).
pub struct HfLayerNames {
    /// The norm before the MLP.
    pub pre_mlp: &'static str,
    /// The norm of the attention output, where there is one.
    pub attn_output: Option<&'static str>,
    /// The norm of the MLP output, where there is one.
    pub mlp_output: Option<&'static str>,
}

impl HfLayerNames {
    pub fn of(config: &ModelConfig) -> Self {
        match config.architecture {
            Architecture::Gemma2 | Architecture::Gemma3 => Self {
                pre_mlp: "pre_feedforward_layernorm",
                attn_output: Some("post_attention_layernorm"),
                mlp_output: Some("post_feedforward_layernorm"),
            },
            Architecture::Glm4 => Self {
                pre_mlp: "post_attention_layernorm",
                attn_output: Some("post_self_attn_layernorm"),
                mlp_output: Some("post_mlp_layernorm"),
            },
            _ => Self {
                pre_mlp: "post_attention_layernorm",
                attn_output: None,
                mlp_output: None,
            },
        }
    }
}

impl<B: Backend> CausalLm<B> {
    /// The linear layers of the decoder under their HF names (`model.layers.N.self_attn.q_proj`).
    fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut l.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }

    /// Freezes every base parameter (burn `no_grad`) and adds fresh LoRA adapters to the
    /// linears whose last name segment is in `targets` (peft `target_modules`, e.g.
    /// `["q_proj", "v_proj"]`). Returns the model and how many layers were wrapped.
    pub fn with_lora(
        self,
        targets: &[&str],
        rank: usize,
        alpha: f64,
        dropout: f64,
    ) -> (Self, usize) {
        let mut model = self.no_grad();
        let mut wrapped = 0;
        for (name, lin) in model.linears_mut() {
            let last = name.rsplit('.').next().unwrap_or("");
            if targets.contains(&last) {
                let placeholder = LoraLinear::new(lin.weight.val(), None);
                let base = std::mem::replace(lin, placeholder);
                *lin = base.with_lora(rank, alpha, dropout);
                wrapped += 1;
            }
        }
        (model, wrapped)
    }

    /// Whether any projection carries a LoRA adapter (unmerged).
    pub fn has_lora(&self) -> bool {
        self.clone()
            .linears_mut()
            .iter()
            .any(|(_, l)| l.lora_a.is_some())
    }

    /// Adapter tensors under peft's names
    /// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`).
    pub fn lora_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        let host = |t: Tensor<B, 2>| {
            let d = t.into_data();
            let shape = d.shape.to_vec();
            HostTensor::new(
                shape,
                d.convert::<f32>().into_vec::<f32>().unwrap_or_default(),
            )
        };
        let mut me = self.clone();
        for (name, lin) in me.linears_mut() {
            if let (Some(a), Some(b)) = (&lin.lora_a, &lin.lora_b) {
                out.insert(
                    format!("base_model.model.{name}.lora_A.weight"),
                    host(a.val()),
                );
                out.insert(
                    format!("base_model.model.{name}.lora_B.weight"),
                    host(b.val()),
                );
            }
        }
        out
    }
}

/// HF generate's position ids for a (left-)padded batch: `cumsum(mask) - 1`, padding set to 1.
///
/// # Shapes
/// - mask: `[batch, seq]` (1 = real token) -> `[batch, seq]`
pub fn positions_from_mask(mask: &[Vec<u8>]) -> Vec<Vec<i64>> {
    mask.iter()
        .map(|row| {
            let mut seen = 0i64;
            row.iter()
                .map(|&m| {
                    seen += i64::from(m != 0);
                    if m != 0 {
                        seen - 1
                    } else {
                        1
                    }
                })
                .collect()
        })
        .collect()
}
