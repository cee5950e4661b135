//! P-Tuning v2 (Liu et al. 2021; ChatGLM-6B `ptuning/` `PrefixEncoder`): `pre_seq_len` trained
//! key/value vectors prepended in every attention layer of a frozen decoder, optionally produced
//! by a two-layer tanh MLP from a smaller embedding (`prefix_projection`). Layout as peft's
//! `PrefixEncoder` / `get_prompt`: `[pre_seq_len, num_layers * 2 * kv_dim]`, viewed as
//! `[pre_seq_len, num_layers * 2, kv_heads, head_dim]`, layer i's key at 2i and value at 2i+1.
//! Prefix keys take no rotary embedding; the input tokens sit at positions `pre_seq_len..`,
//! as transformers computes positions after a cache of that length.
//!
//! The decoder's attention takes its past keys only through its private `KvCache`, so the
//! layer loop is repeated here from `model::decoder` (same ops, same masking value).

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::activation::{softmax, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Distribution, Int, Tensor};
use serde_json::json;

use crate::model::decoder::{Attention, CausalLm};
use crate::model::hf::{save_safetensors, DType, HostTensor};
use crate::model::lora::LoraLinear;
use crate::model::rope::apply_rotary;
use crate::trainer::config::SftConfig;
use crate::trainer::data::positions;
use crate::trainer::sft::CausalModel;
use crate::trainer::Error;

/// Same as the decoder's masked score.
const MASKED_SCORE: f32 = -1.0e4;

/// The prefix encoder plus the frozen decoder.
#[derive(Module, Debug)]
pub struct PrefixLm<B: Backend> {
    pub base: CausalLm<B>,
    /// `[pre_seq_len, num_layers * 2 * kv_dim]`, or `[pre_seq_len, hidden]` with a projection.
    pub embedding: Param<Tensor<B, 2>>,
    /// hidden -> prefix_hidden (tanh) -> num_layers * 2 * kv_dim.
    pub trans: Option<(LoraLinear<B>, LoraLinear<B>)>,
}

impl<B: Backend> PrefixLm<B> {
    /// Freezes `base` and adds a fresh prefix encoder (embedding N(0, 1) as torch's
    /// `nn.Embedding`; projection weights U(-1/sqrt(in), 1/sqrt(in)) as `nn.Linear`).
    /// Values come from the backend RNG; call `B::seed` first for a fixed start.
    pub fn new(base: CausalLm<B>, cfg: &SftConfig, device: &B::Device) -> Self {
        B::seed(device, cfg.seed);
        let base = base.no_grad();
        let c = &base.config;
        let out = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim;
        let linear = |o: usize, i: usize| {
            let bound = 1.0 / (i as f64).sqrt();
            LoraLinear::new(
                Tensor::random([o, i], Distribution::Uniform(-bound, bound), device),
                Some(Tensor::random(
                    [o],
                    Distribution::Uniform(-bound, bound),
                    device,
                )),
            )
        };
        let (embedding, trans) = if cfg.prefix_projection {
            let hidden = c.hidden_size;
            let mid = cfg.prefix_hidden_size.unwrap_or(hidden);
            let e = Tensor::random(
                [cfg.pre_seq_len, hidden],
                Distribution::Normal(0.0, 1.0),
                device,
            );
            (e, Some((linear(mid, hidden), linear(out, mid))))
        } else {
            let e = Tensor::random(
                [cfg.pre_seq_len, out],
                Distribution::Normal(0.0, 1.0),
                device,
            );
            (e, None)
        };
        Self {
            base,
            embedding: Param::from_tensor(embedding),
            trans,
        }
    }

    pub fn pre_seq_len(&self) -> usize {
        self.embedding.dims()[0]
    }

    /// The per-layer past keys and values, `[pre_seq_len, num_layers * 2 * kv_dim]`.
    pub fn prompt_embeddings(&self) -> Tensor<B, 2> {
        let e = self.embedding.val();
        match &self.trans {
            Some((first, second)) => second.forward(tanh(first.forward(e))),
            None => e,
        }
    }
}

fn attend<B: Backend>(
    attn: &Attention<B>,
    x: Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    mask: &Tensor<B, 4, Bool>,
    past: (Tensor<B, 4>, Tensor<B, 4>),
) -> Tensor<B, 3> {
    let [b, t, _] = x.dims();
    let (h, kvh, d) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
    let q = attn
        .q_proj
        .forward(x.clone())
        .reshape([b, t, h, d])
        .swap_dims(1, 2);
    let k = attn
        .k_proj
        .forward(x.clone())
        .reshape([b, t, kvh, d])
        .swap_dims(1, 2);
    let v = attn
        .v_proj
        .forward(x)
        .reshape([b, t, kvh, d])
        .swap_dims(1, 2);
    let q = apply_rotary(q, cos, sin);
    let k = Tensor::cat(vec![past.0, apply_rotary(k, cos, sin)], 2);
    let v = Tensor::cat(vec![past.1, v], 2);
    let s = k.dims()[2];
    let rep = h / kvh;
    let expand = |t: Tensor<B, 4>| {
        if rep == 1 {
            t
        } else {
            t.unsqueeze_dim::<5>(2)
                .expand([b, kvh, rep, s, d])
                .reshape([b, h, s, d])
        }
    };
    let scores = q
        .matmul(expand(k).swap_dims(2, 3))
        .mul_scalar(1.0 / (d as f64).sqrt())
        .mask_fill(mask.clone().expand([b, h, t, s]), MASKED_SCORE);
    let out = softmax(scores, 3).matmul(expand(v));
    attn.o_proj
        .forward(out.swap_dims(1, 2).reshape([b, t, h * d]))
}

impl<B: Backend> CausalModel<B> for PrefixLm<B> {
    fn logits(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let device = input_ids.device();
        let [b, t] = input_ids.dims();
        let p = self.pre_seq_len();
        let c = &self.base.config;
        let (layers, kvh, d) = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim);
        // [p, layers * 2, kvh, d] -> [layers * 2, kvh, p, d]
        let past = self
            .prompt_embeddings()
            .reshape([p, layers * 2, kvh, d])
            .permute([1, 2, 0, 3]);
        let (cos, sin) = self.base.rope.cos_sin(positions::<B>(b, t, p, &device));
        let mask = Tensor::<B, 2, Bool>::tril_mask([t, p + t], p as i64, &device).reshape([
            1,
            1,
            t,
            p + t,
        ]);
        let mut x = self.base.model.embed_tokens.forward(input_ids);
        for (i, layer) in self.base.model.layers.iter().enumerate() {
            let pick = |j: usize| {
                past.clone()
                    .slice([j..j + 1, 0..kvh, 0..p, 0..d])
                    .expand([b, kvh, p, d])
            };
            let h = attend(
                &layer.self_attn,
                layer.input_layernorm.forward(x.clone()),
                &cos,
                &sin,
                &mask,
                (pick(2 * i), pick(2 * i + 1)),
            );
            x = x.add(h);
            let h = layer
                .mlp
                .forward(layer.post_attention_layernorm.forward(x.clone()));
            x = x.add(h);
        }
        self.base.lm_head(self.base.model.norm.forward(x))
    }
}

/// Writes peft's PREFIX_TUNING adapter: `adapter_config.json` and `adapter_model.safetensors`
/// with `prompt_embeddings` (the encoder's output, as `get_prompt_embedding_to_save`).
pub fn write_prefix_adapter<B: Backend>(
    model: &PrefixLm<B>,
    cfg: &SftConfig,
    base_name: Option<&str>,
    dir: &Path,
) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let c = &model.base.config;
    let kv_dim = c.num_key_value_heads * c.head_dim;
    let config = json!({
        "auto_mapping": null,
        "base_model_name_or_path": base_name,
        "encoder_hidden_size": cfg.prefix_hidden_size.unwrap_or(c.hidden_size),
        "inference_mode": true,
        "num_attention_heads": c.num_key_value_heads,
        "num_layers": c.num_hidden_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.pre_seq_len,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": false,
        "revision": null,
        "task_type": "CAUSAL_LM",
        "token_dim": kv_dim,
    });
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialize");
    std::fs::write(&path, text).map_err(|source| Error::Io { path, source })?;
    let data = model.prompt_embeddings().into_data();
    let shape = data.shape.to_vec();
    let values = data.convert::<f32>().into_vec::<f32>().unwrap_or_default();
    let tensors = [(
        "prompt_embeddings".to_string(),
        HostTensor::new(shape, values),
    )]
    .into_iter()
    .collect();
    save_safetensors(dir.join("adapter_model.safetensors"), &tensors, DType::F32)?;
    Ok(())
}
