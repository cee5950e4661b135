//! The engine's copy of a decoder's weights in device memory, filled from the burn model's own
//! CUDA tensors by device-to-device copies (no host round trip): q, k and v side by side in one
//! matrix, gate and up in another, so a layer is four cuBLAS products.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

use super::device::{DevBuf, Elem, Kernels, MAX_HEAD_DIM};
use crate::backend::Error;
use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::lora::LoraLinear;

/// The projection's weight with its adapter folded in (LoRA, DoRA, AdaLoRA; an NF4 base
/// dequantized): one projection at a time, so no second full-precision model is ever held.
fn folded<B: Backend>(l: &LoraLinear<B>) -> Tensor<B, 2> {
    if l.lora_a.is_some() || l.magnitude.is_some() {
        l.clone().merged().weight.val()
    } else {
        l.weight.val()
    }
}

/// One decoder layer's weights.
pub(super) struct LayerWeights {
    pub attn_norm: DevBuf,
    pub ffn_norm: DevBuf,
    /// `[(nh + 2 nkv) d, H]`: q, k, v projections stacked.
    pub qkv: DevBuf,
    pub qkv_bias: Option<DevBuf>,
    pub q_norm: Option<DevBuf>,
    pub k_norm: Option<DevBuf>,
    /// `[H, nh d]`.
    pub o: DevBuf,
    pub o_bias: Option<DevBuf>,
    /// `[2 I, H]`: gate then up.
    pub gate_up: DevBuf,
    /// `[H, I]`.
    pub down: DevBuf,
    pub scale: f32,
    /// Sliding-window size (0: none).
    pub window: i32,
}

/// Sizes the kernels need.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub vocab: usize,
    pub layers: usize,
    pub eps: f32,
}

impl Dims {
    /// Width of the stacked q, k, v products.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// A decoder held by the GPU engine.
pub struct GpuModel {
    pub config: ModelConfig,
    pub(super) ordinal: usize,
    pub(super) elem: Elem,
    pub(super) kernels: Kernels,
    pub(super) dims: Dims,
    pub(super) embed: DevBuf,
    /// `None`: tied to the embeddings.
    pub(super) head: Option<DevBuf>,
    pub(super) norm: DevBuf,
    pub(super) inv_freq: DevBuf,
    pub(super) layers: Vec<LayerWeights>,
}

/// Why the engine does not take `model` (it then decodes through burn), or `None`.
pub fn unsupported<B: Backend>(model: &CausalLm<B>) -> Option<String> {
    if crate::backend::accelerator_memory_mb::<B>().is_none() {
        return Some("the model is not on a CUDA device".into());
    }
    if let Some(reason) = crate::infer::unsupported_reason(&model.config) {
        return Some(reason);
    }
    if model.rope_local.is_some() {
        return Some("a second rotary embedding".into());
    }
    let c = &model.config;
    if c.head_dim > MAX_HEAD_DIM || c.num_attention_heads == 0 {
        return Some(format!("head size {} (at most {MAX_HEAD_DIM})", c.head_dim));
    }
    for layer in &model.model.layers {
        let a = &layer.self_attn;
        if a.softcap.is_some() || a.rotary_dim != a.head_dim || a.rope_interleaved {
            return Some("soft-capped or partially rotary attention".into());
        }
        if a.q_proj.bias.is_some() != a.k_proj.bias.is_some() {
            return Some("uneven attention biases".into());
        }
        if a.q_norm.is_some() != a.k_norm.is_some() {
            return Some("a norm on only one of q and k".into());
        }
        if layer.mlp.gate_proj.bias.is_some()
            || layer.mlp.up_proj.bias.is_some()
            || layer.mlp.down_proj.bias.is_some()
        {
            return Some("MLP biases".into());
        }
    }
    match model.model.embed_tokens.weight.val().dtype() {
        DType::F32 | DType::BF16 => None,
        other => Some(format!("weights of dtype {other:?}")),
    }
}

fn shape_error(what: &str, expected: usize, got: usize) -> Error {
    Error::Shape {
        op: "GPU decode engine",
        what: "weight size",
        expected: format!("{what}: {expected} values"),
        got: got.to_string(),
    }
}

/// Fills device buffers from burn tensors of the model's own dtype `elem`.
struct Filler {
    ordinal: usize,
    elem: Elem,
}

impl Filler {
    /// A buffer holding the given tensors one after the other (each flattened).
    fn stacked<B: Backend, const D: usize>(
        &self,
        what: &str,
        parts: Vec<Tensor<B, D>>,
    ) -> Result<DevBuf, Error> {
        let total: usize = parts.iter().map(|t| t.shape().num_elements()).sum();
        let buf = DevBuf::new(self.ordinal, total * self.elem.size())?;
        let mut at = 0;
        for t in parts {
            let n = t.shape().num_elements();
            let t = match (self.elem, t.dtype()) {
                (Elem::Bf16, DType::BF16) | (Elem::F32, DType::F32) => t,
                (Elem::Bf16, _) => t.cast(FloatDType::BF16),
                (Elem::F32, _) => t.cast(FloatDType::F32),
            };
            if !crate::backend::copy_to_device_memory(t, buf.at(at, self.elem.size())) {
                return Err(shape_error(what, total, 0));
            }
            at += n;
        }
        Ok(buf)
    }

    fn one<B: Backend, const D: usize>(
        &self,
        what: &str,
        t: Tensor<B, D>,
        expected: usize,
    ) -> Result<DevBuf, Error> {
        let n = t.shape().num_elements();
        if n != expected {
            return Err(shape_error(what, expected, n));
        }
        self.stacked(what, vec![t])
    }
}

impl GpuModel {
    /// The engine's copy of `model` on CUDA device 0, or `Ok(None)` (with the reason logged at
    /// debug level) when the engine does not run it.
    pub fn from_model<B: Backend>(model: &CausalLm<B>) -> Result<Option<Self>, Error> {
        if let Some(reason) = unsupported(model) {
            tracing::debug!("the GPU decode engine does not run this model: {reason}");
            return Ok(None);
        }
        let ordinal = 0;
        let c = &model.config;
        let elem = match model.model.embed_tokens.weight.val().dtype() {
            DType::BF16 => Elem::Bf16,
            _ => Elem::F32,
        };
        let per_layer =
            (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim * c.hidden_size
                + c.num_attention_heads * c.head_dim * c.hidden_size
                + 3 * c.intermediate_size * c.hidden_size;
        let heads = if model.lm_head.is_some() { 2 } else { 1 };
        let need = (per_layer * model.model.layers.len() + heads * c.vocab_size * c.hidden_size)
            * elem.size();
        let (free, _) = crate::backend::cuda::device_memory_info(ordinal)?;
        // Room for the copy, its cache and scratch; otherwise burn decodes from the model itself.
        if need + (1 << 30) > free {
            tracing::debug!(
                "the GPU decode engine needs {} MiB for weights, {} MiB free: decoding through burn",
                need >> 20,
                free >> 20
            );
            return Ok(None);
        }
        let kernels = Kernels::load(ordinal, elem)?;
        let dims = Dims {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            inter: c.intermediate_size,
            vocab: c.vocab_size,
            layers: model.model.layers.len(),
            eps: c.rms_norm_eps as f32,
        };
        let fill = Filler { ordinal, elem };
        let (h, d) = (dims.hidden, dims.head_dim);
        let embed = fill.one(
            "embed_tokens",
            model.model.embed_tokens.weight.val(),
            dims.vocab * h,
        )?;
        let head = match &model.lm_head {
            Some(l) => Some(fill.one("lm_head", folded(l), dims.vocab * h)?),
            None => None,
        };
        let norm = fill.one("norm", model.model.norm.weight.val(), h)?;
        let mut layers = Vec::with_capacity(dims.layers);
        for (i, l) in model.model.layers.iter().enumerate() {
            let a = &l.self_attn;
            let name = |what: &str| format!("layer {i} {what}");
            let qkv_rows = dims.qkv_width();
            let qkv = fill.stacked(
                &name("qkv"),
                vec![folded(&a.q_proj), folded(&a.k_proj), folded(&a.v_proj)],
            )?;
            if qkv.bytes != qkv_rows * h * elem.size() {
                return Err(shape_error(
                    &name("qkv"),
                    qkv_rows * h,
                    qkv.bytes / elem.size(),
                ));
            }
            let qkv_bias = match (&a.q_proj.bias, &a.k_proj.bias, &a.v_proj.bias) {
                (Some(q), Some(k), Some(v)) => {
                    Some(fill.stacked(&name("qkv bias"), vec![q.val(), k.val(), v.val()])?)
                }
                (None, None, None) => None,
                _ => return Err(shape_error(&name("qkv bias"), qkv_rows, 0)),
            };
            let norm_of = |n: &Option<crate::model::decoder::RmsNorm<B>>, what: &str| {
                n.as_ref()
                    .map(|n| fill.one(&name(what), n.weight.val(), d))
                    .transpose()
            };
            let m = &l.mlp;
            let gate_up = fill.stacked(
                &name("gate_up"),
                vec![folded(&m.gate_proj), folded(&m.up_proj)],
            )?;
            if gate_up.bytes != 2 * dims.inter * h * elem.size() {
                return Err(shape_error(
                    &name("gate_up"),
                    2 * dims.inter * h,
                    gate_up.bytes / elem.size(),
                ));
            }
            layers.push(LayerWeights {
                attn_norm: fill.one(&name("input_layernorm"), l.input_layernorm.weight.val(), h)?,
                ffn_norm: fill.one(
                    &name("post_attention_layernorm"),
                    l.post_attention_layernorm.weight.val(),
                    h,
                )?,
                qkv,
                qkv_bias,
                q_norm: norm_of(&a.q_norm, "q_norm")?,
                k_norm: norm_of(&a.k_norm, "k_norm")?,
                o: fill.one(&name("o_proj"), folded(&a.o_proj), h * dims.heads * d)?,
                o_bias: a
                    .o_proj
                    .bias
                    .as_ref()
                    .map(|b| fill.one(&name("o_proj bias"), b.val(), h))
                    .transpose()?,
                gate_up,
                down: fill.one(&name("down_proj"), folded(&m.down_proj), h * dims.inter)?,
                scale: a.scale as f32,
                window: a.window.map_or(0, |w| w as i32),
            });
        }
        let inv_freq = DevBuf::from_host(ordinal, &model.rope.inv_freq)?;
        if model.rope.inv_freq.len() != d / 2 {
            return Err(shape_error("inv_freq", d / 2, model.rope.inv_freq.len()));
        }
        // The copies were queued in order with burn's kernels; wait for them to land.
        let device = model.model.embed_tokens.weight.val().device();
        B::sync(&device).map_err(|e| Error::Cuda {
            call: "sync after the weight copies",
            detail: format!("{e:?}"),
        })?;
        crate::backend::cuda::queue::raise_queued_failure();
        // The copies ran on the streams of the tensors they read; the engine's stream must not
        // start before all of them have.
        crate::backend::cuda::cublas::with_state(ordinal, |_| {
            cudarc::driver::result::ctx::synchronize()
                .map_err(super::device::cuda_err("cuCtxSynchronize"))
        })?;
        Ok(Some(Self {
            config: c.clone(),
            ordinal,
            elem,
            kernels,
            dims,
            embed,
            head,
            norm,
            inv_freq,
            layers,
        }))
    }

    /// Bytes of device memory the weights take.
    pub fn weight_bytes(&self) -> usize {
        let opt = |b: &Option<DevBuf>| b.as_ref().map_or(0, |b| b.bytes);
        self.embed.bytes
            + opt(&self.head)
            + self.norm.bytes
            + self
                .layers
                .iter()
                .map(|l| {
                    l.attn_norm.bytes
                        + l.ffn_norm.bytes
                        + l.qkv.bytes
                        + opt(&l.qkv_bias)
                        + opt(&l.q_norm)
                        + opt(&l.k_norm)
                        + l.o.bytes
                        + opt(&l.o_bias)
                        + l.gate_up.bytes
                        + l.down.bytes
                })
                .sum::<usize>()
    }
}
