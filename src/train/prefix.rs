//! P-Tuning v2 (Liu et al. 2021; ChatGLM-6B `ptuning/` `PrefixEncoder`): `pre_seq_len` trained
//! key/value vectors prepended in every attention layer of a frozen decoder, optionally produced
//! by a two-layer tanh MLP from a smaller embedding (`prefix_projection`). Layout as peft's
//! `PrefixEncoder` / `get_prompt`: `[pre_seq_len, num_layers * 2 * kv_dim]`, viewed as
//! `[pre_seq_len, num_layers * 2, kv_heads, head_dim]`, layer i's key at 2i and value at 2i+1.
//! Prefix keys take no rotary embedding; the input tokens sit at positions `pre_seq_len..`,
//! as transformers computes positions after a cache of that length.
//! The prefix runs through the decoder's own KV cache ([`prefix_cache`]).

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::activation::tanh;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};

use crate::model::decoder::CausalLm;
use crate::model::hf::HostTensor;
use crate::model::lora::LoraLinear;
use crate::model::prompt::{prefix_cache, write_prompt_adapter, PromptAdapterConfig, PromptKind};
use crate::train::config::SftConfig;
use crate::train::data::positions;
use crate::train::sft::CausalModel;
use crate::train::Error;

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

impl<B: Backend> CausalModel<B> for PrefixLm<B> {
    fn logits(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = input_ids.dims();
        let p = self.pre_seq_len();
        let mut cache = prefix_cache(self.prompt_embeddings(), &self.base.config, b);
        let pos = positions::<B>(b, t, p, &input_ids.device());
        self.base.forward(input_ids, pos, None, Some(&mut cache))
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
    let mut config =
        PromptAdapterConfig::new(PromptKind::Prefix, cfg.pre_seq_len, &model.base.config);
    config.base_model_name_or_path = base_name.map(str::to_string);
    if let Some(h) = cfg.prefix_hidden_size.filter(|_| cfg.prefix_projection) {
        config.encoder_hidden_size = h;
    }
    write_prompt_adapter(dir, &config, host_tensor(model.prompt_embeddings()))?;
    Ok(())
}

/// A device tensor as an f32 host tensor.
pub(crate) fn host_tensor<B: Backend>(t: Tensor<B, 2>) -> HostTensor {
    let data = t.into_data();
    let shape = data.shape.to_vec();
    let values = data.convert::<f32>().into_vec::<f32>().unwrap_or_default();
    HostTensor::new(shape, values)
}
