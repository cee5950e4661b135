//! Prompt tuning (Lester et al. 2021, peft PROMPT_TUNING) and P-Tuning (Liu et al. 2021, "GPT
//! Understands, Too"; peft P_TUNING): `num_virtual_tokens` trained embeddings go before the input
//! embeddings of a frozen decoder. Prompt tuning trains them directly (initialised N(0, 1) as
//! torch's `nn.Embedding`, or from the embeddings of an init text); P-Tuning produces them with a
//! prompt encoder from an embedding table: peft's `PromptEncoder`, an MLP
//! (`Linear(d, h)-ReLU-Linear(h, h)-ReLU-Linear(h, d)`) or a bidirectional LSTM
//! (`encoder_num_layers` layers of width h, torch's gate order i, f, g, o) followed by
//! `Linear(2h, 2h)-ReLU-Linear(2h, d)`.
//!
//! As `PeftModelForCausalLM.forward`, positions run 0..n+len over virtual and real tokens. The
//! logits returned are those of the real tokens, so the loss counts labels 1.. as for a plain
//! model; peft also scores label 0 from the last virtual token, which changes nothing when the
//! first label is -100 (every prompt/response example).
//! Reference: peft `tuners/prompt_tuning/model.py`, `tuners/p_tuning/model.py`, torch `nn.LSTM`.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::activation::{relu, sigmoid, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};

use crate::model::decoder::CausalLm;
use crate::model::lora::LoraLinear;
use crate::model::prompt::{
    with_virtual_tokens, write_prompt_adapter, PromptAdapterConfig, PromptKind,
};
use crate::train::config::{Method, PromptInit, Reparameterization, SftConfig};
use crate::train::data::positions;
use crate::train::prefix::host_tensor;
use crate::train::sft::CausalModel;
use crate::train::Error;

/// One direction of one LSTM layer, torch's parameters (`weight_ih_l{k}[_reverse]`, ...).
#[derive(Module, Debug)]
pub struct LstmCell<B: Backend> {
    /// `[4h, in]`, gate rows i, f, g, o.
    pub weight_ih: Param<Tensor<B, 2>>,
    /// `[4h, h]`.
    pub weight_hh: Param<Tensor<B, 2>>,
    pub bias_ih: Param<Tensor<B, 1>>,
    pub bias_hh: Param<Tensor<B, 1>>,
}

impl<B: Backend> LstmCell<B> {
    /// Runs over `x` `[len, in]` (one sequence) from zero states, backwards when `reverse`;
    /// returns the hidden states `[len, h]` in time order.
    fn run(&self, x: Tensor<B, 2>, reverse: bool) -> Tensor<B, 2> {
        let [len, _] = x.dims();
        let h4 = self.weight_hh.dims()[0];
        let hs = h4 / 4;
        let device = x.device();
        let bias = self
            .bias_ih
            .val()
            .add(self.bias_hh.val())
            .unsqueeze_dim::<2>(0);
        let xw = x.matmul(self.weight_ih.val().transpose()).add(bias);
        let w_hh = self.weight_hh.val().transpose();
        let mut h = Tensor::<B, 2>::zeros([1, hs], &device);
        let mut c = Tensor::<B, 2>::zeros([1, hs], &device);
        let mut outs: Vec<Option<Tensor<B, 2>>> = vec![None; len];
        let order: Vec<usize> = if reverse {
            (0..len).rev().collect()
        } else {
            (0..len).collect()
        };
        for t in order {
            let g = xw
                .clone()
                .slice([t..t + 1, 0..h4])
                .add(h.matmul(w_hh.clone()));
            let gate = |k: usize| g.clone().slice([0..1, k * hs..(k + 1) * hs]);
            let (i, f, gg, o) = (
                sigmoid(gate(0)),
                sigmoid(gate(1)),
                tanh(gate(2)),
                sigmoid(gate(3)),
            );
            c = f.mul(c).add(i.mul(gg));
            h = o.mul(tanh(c.clone()));
            outs[t] = Some(h.clone());
        }
        Tensor::cat(outs.into_iter().flatten().collect(), 0)
    }
}

/// A bidirectional LSTM layer.
#[derive(Module, Debug)]
pub struct LstmLayer<B: Backend> {
    pub fwd: LstmCell<B>,
    pub rev: LstmCell<B>,
}

/// peft's P-Tuning `PromptEncoder` heads (without its embedding table).
#[derive(Module, Debug)]
pub struct PromptEncoder<B: Backend> {
    /// Empty for the MLP encoder.
    pub lstm: Vec<LstmLayer<B>>,
    /// `mlp_head` linears, ReLU between consecutive ones.
    pub mlp: Vec<LoraLinear<B>>,
}

impl<B: Backend> PromptEncoder<B> {
    /// # Shapes
    /// - x: `[n, token_dim]` -> `[n, token_dim]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut x = x;
        for layer in &self.lstm {
            x = Tensor::cat(
                vec![layer.fwd.run(x.clone(), false), layer.rev.run(x, true)],
                1,
            );
        }
        let last = self.mlp.len().saturating_sub(1);
        for (k, lin) in self.mlp.iter().enumerate() {
            x = lin.forward(x);
            if k < last {
                x = relu(x);
            }
        }
        x
    }
}

/// The virtual-token embeddings (and P-Tuning's encoder) plus the frozen decoder.
#[derive(Module, Debug)]
pub struct PromptLm<B: Backend> {
    pub base: CausalLm<B>,
    /// `[num_virtual_tokens, hidden]`: the virtual tokens, or the encoder's input.
    pub embedding: Param<Tensor<B, 2>>,
    pub encoder: Option<PromptEncoder<B>>,
}

/// `U(-1/sqrt(fan), 1/sqrt(fan))`, torch's default for `nn.Linear` and `nn.LSTM`.
fn uniform<B: Backend, const D: usize>(
    shape: [usize; D],
    fan: usize,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let bound = 1.0 / (fan as f64).sqrt();
    Param::from_tensor(Tensor::random(
        shape,
        Distribution::Uniform(-bound, bound),
        device,
    ))
}

fn linear<B: Backend>(o: usize, i: usize, device: &B::Device) -> LoraLinear<B> {
    LoraLinear::new(
        uniform::<B, 2>([o, i], i, device).val(),
        Some(uniform::<B, 1>([o], i, device).val()),
    )
}

fn lstm_cell<B: Backend>(input: usize, h: usize, device: &B::Device) -> LstmCell<B> {
    LstmCell {
        weight_ih: uniform([4 * h, input], h, device),
        weight_hh: uniform([4 * h, h], h, device),
        bias_ih: uniform([4 * h], h, device),
        bias_hh: uniform([4 * h], h, device),
    }
}

impl<B: Backend> PromptEncoder<B> {
    /// A fresh encoder for `token_dim` with torch's default initialisation.
    pub fn new(
        kind: Reparameterization,
        token_dim: usize,
        hidden: usize,
        lstm_layers: usize,
        device: &B::Device,
    ) -> Self {
        match kind {
            Reparameterization::Mlp => Self {
                lstm: Vec::new(),
                mlp: vec![
                    linear(hidden, token_dim, device),
                    linear(hidden, hidden, device),
                    linear(token_dim, hidden, device),
                ],
            },
            Reparameterization::Lstm => Self {
                lstm: (0..lstm_layers)
                    .map(|k| {
                        let input = if k == 0 { token_dim } else { 2 * hidden };
                        LstmLayer {
                            fwd: lstm_cell(input, hidden, device),
                            rev: lstm_cell(input, hidden, device),
                        }
                    })
                    .collect(),
                mlp: vec![
                    linear(2 * hidden, 2 * hidden, device),
                    linear(token_dim, 2 * hidden, device),
                ],
            },
        }
    }
}

/// peft's TEXT init ids: the init text's ids cut or repeated to `n`.
pub fn text_init_ids(ids: &[u32], n: usize) -> Vec<u32> {
    ids.iter().copied().cycle().take(n).collect()
}

/// Prompt tuning's TEXT init: the base tokenizer's ids of `prompt_tuning_init_text` (special
/// tokens added, as `tokenizer(text)`), cut or repeated to `num_virtual_tokens`.
pub fn prompt_init_ids(
    cfg: &SftConfig,
    tokenizer_dir: Option<&Path>,
) -> Result<Option<Vec<u32>>, Error> {
    if cfg.method != Method::PromptTuning || cfg.prompt_tuning_init != PromptInit::Text {
        return Ok(None);
    }
    let bad = |message: String| Error::Config {
        key: "prompt_tuning_init_text",
        message,
    };
    let dir = tokenizer_dir
        .ok_or_else(|| bad("the TEXT init needs a base model folder with a tokenizer".into()))?;
    let tok = crate::text::TextTokenizer::from_dir(dir)
        .map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    let text = cfg.prompt_tuning_init_text.as_deref().unwrap_or("");
    let ids = tok.encode(text).map_err(|e| bad(e.to_string()))?;
    if ids.is_empty() {
        return Err(bad(format!("`{text}` has no tokens")));
    }
    Ok(Some(text_init_ids(&ids, cfg.num_virtual_tokens)))
}

impl<B: Backend> PromptLm<B> {
    /// Freezes `base` and adds fresh virtual tokens (and P-Tuning's encoder) for `cfg.method`.
    /// `init_ids` (prompt tuning's TEXT init, already cut to length) pick the embedding rows
    /// to start from. Values come from the backend RNG seeded with `cfg.seed`.
    pub fn new(
        base: CausalLm<B>,
        cfg: &SftConfig,
        init_ids: Option<&[u32]>,
        device: &B::Device,
    ) -> Self {
        B::seed(device, cfg.seed);
        let base = base.no_grad();
        let d = base.config.hidden_size;
        let n = cfg.num_virtual_tokens;
        let embedding = match init_ids {
            Some(ids) => {
                let ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
                let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), device);
                // As peft's `word_embeddings(ids)`: the input layer's (scaled for Gemma).
                let rows = base.embed(ids).reshape([n, d]);
                Tensor::from_data(rows.into_data(), device)
            }
            None => Tensor::random([n, d], Distribution::Normal(0.0, 1.0), device),
        };
        let encoder = (cfg.method == Method::PTuning).then(|| {
            PromptEncoder::new(
                cfg.encoder_reparameterization_type,
                d,
                cfg.encoder_hidden_size.unwrap_or(d),
                cfg.encoder_num_layers,
                device,
            )
        });
        Self {
            base,
            embedding: Param::from_tensor(embedding),
            encoder,
        }
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.dims()[0]
    }

    /// The virtual-token embeddings `[n, hidden]` (peft's `get_prompt_embedding_to_save`).
    pub fn virtual_tokens(&self) -> Tensor<B, 2> {
        let e = self.embedding.val();
        match &self.encoder {
            Some(enc) => enc.forward(e),
            None => e,
        }
    }
}

impl<B: Backend> CausalModel<B> for PromptLm<B> {
    fn logits(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = input_ids.dims();
        let n = self.num_virtual_tokens();
        let h = self.base.config.hidden_size;
        let pos = positions::<B>(b, n + t, 0, &input_ids.device());
        let embeds = with_virtual_tokens(&self.base, self.virtual_tokens(), input_ids);
        let hidden = self
            .base
            .hidden_states_from_embeds(embeds, pos, None, None)
            .slice([0..b, n..n + t, 0..h]);
        self.base.lm_head(hidden)
    }
}

/// Writes peft's PROMPT_TUNING or P_TUNING adapter (`prompt_embeddings`: the virtual tokens).
pub fn write_virtual_adapter<B: Backend>(
    model: &PromptLm<B>,
    cfg: &SftConfig,
    base_name: Option<&str>,
    dir: &Path,
) -> Result<(), Error> {
    let kind = match cfg.method {
        Method::PTuning => PromptKind::PTuning,
        _ => PromptKind::PromptTuning,
    };
    let c = &model.base.config;
    let mut config = PromptAdapterConfig::new(kind, model.num_virtual_tokens(), c);
    config.base_model_name_or_path = base_name.map(str::to_string);
    config.encoder_hidden_size = cfg.encoder_hidden_size.unwrap_or(c.hidden_size);
    config.encoder_num_layers = cfg.encoder_num_layers;
    config.encoder_reparameterization_type = match cfg.encoder_reparameterization_type {
        Reparameterization::Mlp => "MLP".into(),
        Reparameterization::Lstm => "LSTM".into(),
    };
    if cfg.prompt_tuning_init == PromptInit::Text {
        config.prompt_tuning_init = "TEXT".into();
        config.prompt_tuning_init_text = cfg.prompt_tuning_init_text.clone();
        config.tokenizer_name_or_path = base_name.map(str::to_string);
    }
    write_prompt_adapter(dir, &config, host_tensor(model.virtual_tokens()))?;
    Ok(())
}
