//! The GRPO objective on per-token log-probabilities, and the padded prompt + completion rows it
//! is computed on.
//!
//! Reference: TRL `GRPOTrainer._get_per_token_logps` (logits of the positions before each
//! completion token, divided by the sampling temperature, log-softmax, gather) and
//! `GRPOTrainer._compute_loss`: `ratio = exp(logp - old_logp)`, clipped to
//! `[1 - epsilon_low, 1 + epsilon_high]`, `per_token_kl = exp(ref - logp) - (ref - logp) - 1`
//! (Schulman's k3), `loss = -min(ratio A, clip(ratio) A) + beta kl`, masked to the completion
//! tokens (up to and including the first EOS), normalised per [`LossType`]. With one iteration
//! per batch `old_logp` is `logp` detached (ratio 1, gradient `A`), as TRL does.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::model::decoder::{positions_from_mask, CausalLm, GradientCheckpointing, KvCache};
use crate::train::grpo_config::LossType;

/// Prompts left-padded and completions right-padded into one `[rows, prompt + completion]` batch.
pub struct RowBatch<B: Backend> {
    pub input_ids: Tensor<B, 2, Int>,
    pub positions: Tensor<B, 2, Int>,
    /// True for real tokens (None when nothing is padded).
    pub attention_mask: Option<Tensor<B, 2, Bool>>,
    /// `[rows, completion_len]`: the completion ids (pad where masked).
    pub targets: Tensor<B, 2, Int>,
    /// `[rows, completion_len]`: 1.0 on completion tokens.
    pub mask: Tensor<B, 2>,
    pub prompt_len: usize,
    pub completion_len: usize,
    /// Completion tokens per row.
    pub lengths: Vec<usize>,
    /// The same rows with each distinct prompt once, when rows share prompts (a GRPO group
    /// shares one): the log-probs then run the shared prompt through the model once.
    pub shared: Option<SharedPrompts<B>>,
}

/// Rows that share prompts, split into the distinct prompts (left-padded, `[prompts,
/// prompt_len]`) and each row's completion (right-padded), with the row's prompt index.
pub struct SharedPrompts<B: Backend> {
    pub prompt_ids: Tensor<B, 2, Int>,
    pub prompt_positions: Tensor<B, 2, Int>,
    pub prompt_mask: Option<Tensor<B, 2, Bool>>,
    /// For each row, the index of its prompt.
    pub prompt_of_row: Vec<usize>,
    /// `[rows, completion_len - 1]`: every completion token but the last column (whose hidden
    /// state predicts nothing kept); `None` when completions are one token long.
    pub completion_inputs: Option<CompletionInputs<B>>,
}

/// The completion tokens fed after the cached prompts.
pub struct CompletionInputs<B: Backend> {
    pub ids: Tensor<B, 2, Int>,
    pub positions: Tensor<B, 2, Int>,
    pub mask: Option<Tensor<B, 2, Bool>>,
}

/// Builds the rows `prompts[i] ++ completions[i]` (every completion non-empty or not).
pub fn row_batch<B: Backend>(
    prompts: &[&[u32]],
    completions: &[&[u32]],
    pad_id: u32,
    device: &B::Device,
) -> RowBatch<B> {
    let rows = prompts.len();
    let lp = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    // At least one completion column so shapes stay valid for empty completions (masked).
    let lc = completions
        .iter()
        .map(|c| c.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let (mut ids, mut mask_host, mut targets, mut cmask) = (vec![], vec![], vec![], vec![]);
    for (p, c) in prompts.iter().zip(completions) {
        let mut row_mask = vec![0u8; lp - p.len()];
        row_mask.extend(std::iter::repeat_n(1u8, p.len() + c.len()));
        row_mask.extend(std::iter::repeat_n(0u8, lc - c.len()));
        ids.extend(std::iter::repeat_n(pad_id as i64, lp - p.len()));
        ids.extend(p.iter().chain(c.iter()).map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(pad_id as i64, lc - c.len()));
        targets.extend(c.iter().map(|&t| t as i64));
        targets.extend(std::iter::repeat_n(pad_id as i64, lc - c.len()));
        cmask.extend(std::iter::repeat_n(1f32, c.len()));
        cmask.extend(std::iter::repeat_n(0f32, lc - c.len()));
        mask_host.push(row_mask);
    }
    let padded = mask_host.iter().any(|m| m.contains(&0));
    let len = lp + lc;
    let positions: Vec<i64> = positions_from_mask(&mask_host)
        .into_iter()
        .flatten()
        .collect();
    let attention_mask = padded.then(|| {
        let flat: Vec<bool> = mask_host.iter().flatten().map(|&m| m != 0).collect();
        Tensor::from_data(TensorData::new(flat, [rows, len]), device)
    });
    RowBatch {
        input_ids: Tensor::from_data(TensorData::new(ids, [rows, len]), device),
        positions: Tensor::from_data(TensorData::new(positions, [rows, len]), device),
        attention_mask,
        targets: Tensor::from_data(TensorData::new(targets, [rows, lc]), device),
        mask: Tensor::from_data(TensorData::new(cmask, [rows, lc]), device),
        prompt_len: lp,
        completion_len: lc,
        lengths: completions.iter().map(|c| c.len()).collect(),
        shared: shared_prompts(prompts, completions, lc, pad_id, device),
    }
}

/// The [`SharedPrompts`] form of the rows, or `None` when no two rows share a prompt.
fn shared_prompts<B: Backend>(
    prompts: &[&[u32]],
    completions: &[&[u32]],
    lc: usize,
    pad_id: u32,
    device: &B::Device,
) -> Option<SharedPrompts<B>> {
    let mut distinct: Vec<&[u32]> = Vec::new();
    let prompt_of_row: Vec<usize> = prompts
        .iter()
        .map(|p| {
            distinct.iter().position(|d| d == p).unwrap_or_else(|| {
                distinct.push(p);
                distinct.len() - 1
            })
        })
        .collect();
    if distinct.len() == prompts.len() {
        return None;
    }
    let (d, lp) = (distinct.len(), distinct.iter().map(|p| p.len()).max()?);
    let mut ids = Vec::with_capacity(d * lp);
    let mut mask_host = Vec::with_capacity(d);
    for p in &distinct {
        ids.extend(std::iter::repeat_n(pad_id as i64, lp - p.len()));
        ids.extend(p.iter().map(|&t| t as i64));
        let mut row = vec![0u8; lp - p.len()];
        row.extend(std::iter::repeat_n(1u8, p.len()));
        mask_host.push(row);
    }
    let positions: Vec<i64> = positions_from_mask(&mask_host)
        .into_iter()
        .flatten()
        .collect();
    let prompt_mask = mask_host.iter().any(|m| m.contains(&0)).then(|| {
        let flat: Vec<bool> = mask_host.iter().flatten().map(|&m| m != 0).collect();
        Tensor::from_data(TensorData::new(flat, [d, lp]), device)
    });
    // Completion token j of row r sits at position len(prompt) + j.
    let fed = lc - 1;
    let completion_inputs = (fed > 0).then(|| {
        let rows = completions.len();
        let (mut ids, mut positions, mut mask) = (vec![], vec![], vec![]);
        for (r, c) in completions.iter().enumerate() {
            let start = distinct[prompt_of_row[r]].len() as i64;
            for j in 0..fed {
                let real = j < c.len();
                ids.push(if real { c[j] as i64 } else { pad_id as i64 });
                positions.push(if real { start + j as i64 } else { 1 });
                mask.push(real);
            }
        }
        let padded = mask.iter().any(|m| !m);
        CompletionInputs {
            ids: Tensor::from_data(TensorData::new(ids, [rows, fed]), device),
            positions: Tensor::from_data(TensorData::new(positions, [rows, fed]), device),
            mask: padded.then(|| Tensor::from_data(TensorData::new(mask, [rows, fed]), device)),
        }
    });
    Some(SharedPrompts {
        prompt_ids: Tensor::from_data(TensorData::new(ids, [d, lp]), device),
        prompt_positions: Tensor::from_data(TensorData::new(positions, [d, lp]), device),
        prompt_mask,
        prompt_of_row,
        completion_inputs,
    })
}

/// Log-probabilities of `targets` under `logits / temperature`.
///
/// # Shapes
/// - logits: `[rows, len, vocab]`, targets: `[rows, len]` -> `[rows, len]`
pub fn token_logps<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    temperature: f64,
) -> Tensor<B, 2> {
    let [rows, len, vocab] = logits.dims();
    let logp = log_softmax(
        logits.reshape([rows * len, vocab]).div_scalar(temperature),
        1,
    );
    logp.gather(1, targets.reshape([rows * len, 1]))
        .reshape([rows, len])
}

/// The completion tokens' log-probabilities under `model` (TRL `_get_per_token_logps`). Only
/// the completion positions go through the LM head (TRL's `logits_to_keep`).
pub fn completion_logps<B: Backend>(
    model: &CausalLm<B>,
    batch: &RowBatch<B>,
    temperature: f64,
) -> Tensor<B, 2> {
    // Checkpointing recomputes layers from their inputs and has no cache path: rows then run
    // whole.
    if let (Some(shared), GradientCheckpointing::Off) = (&batch.shared, model.checkpointing) {
        return shared_prompt_logps(model, shared, batch, temperature);
    }
    let hidden = model.hidden_states(
        batch.input_ids.clone(),
        batch.positions.clone(),
        batch.attention_mask.clone(),
        None,
    );
    let [rows, _, width] = hidden.dims();
    // The hidden state at position t predicts token t + 1.
    let start = batch.prompt_len - 1;
    let hidden = hidden.slice([0..rows, start..start + batch.completion_len, 0..width]);
    head_logps(model, hidden, batch.targets.clone(), temperature)
}

/// Logits the chunked head computes at once: 16 M (64 MB in f32), so a chunk's temporaries stay
/// small next to the model on either device.
const HEAD_CHUNK_LOGITS: usize = 1 << 24;

/// Log-probabilities of `targets [rows, len]` from the final hidden states `[rows, len, width]`:
/// through the chunked LM head ([`crate::backend::linear_token_logps`]: no `[rows, len, vocab]`
/// logits held, in the forward or the backward pass) when the head is a plain product, else
/// through the full logits.
fn head_logps<B: Backend>(
    model: &CausalLm<B>,
    hidden: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    temperature: f64,
) -> Tensor<B, 2> {
    let Some(weight) = model.plain_head_weight() else {
        return token_logps(model.lm_head(hidden), targets, temperature);
    };
    let [rows, len, width] = hidden.dims();
    let chunk = (HEAD_CHUNK_LOGITS / weight.dims()[0].max(1)).max(1);
    crate::backend::linear_token_logps(
        hidden.reshape([rows * len, width]),
        weight,
        targets.reshape([rows * len]),
        temperature,
        chunk,
    )
    .reshape([rows, len])
}

/// [`completion_logps`] with each distinct prompt run once: its keys and values are cached,
/// the cache's rows copied to the rows that share the prompt (gradients flow back through the
/// copy and add up), and the completions run after them. The same numbers as running every
/// row whole, up to rounding; a group of 12 completions of ~170 tokens after a ~170-token
/// prompt feeds about 45 % fewer tokens.
fn shared_prompt_logps<B: Backend>(
    model: &CausalLm<B>,
    shared: &SharedPrompts<B>,
    batch: &RowBatch<B>,
    temperature: f64,
) -> Tensor<B, 2> {
    let device = shared.prompt_ids.device();
    let [prompts, lp] = shared.prompt_ids.dims();
    let mut cache = KvCache::new(model.model.layers.len());
    let prompt_hidden = model.hidden_states(
        shared.prompt_ids.clone(),
        shared.prompt_positions.clone(),
        shared.prompt_mask.clone(),
        Some(&mut cache),
    );
    let width = prompt_hidden.dims()[2];
    let index: Vec<i64> = shared.prompt_of_row.iter().map(|&p| p as i64).collect();
    let rows = index.len();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows]), &device);
    // The last prompt position predicts the first completion token.
    let mut hidden = vec![prompt_hidden
        .slice([0..prompts, lp - 1..lp, 0..width])
        .select(0, index)];
    if let Some(inputs) = &shared.completion_inputs {
        cache.select_rows(prompts, &shared.prompt_of_row);
        hidden.push(model.hidden_states(
            inputs.ids.clone(),
            inputs.positions.clone(),
            inputs.mask.clone(),
            Some(&mut cache),
        ));
    }
    let hidden = Tensor::cat(hidden, 1);
    debug_assert_eq!(hidden.dims()[1], batch.completion_len);
    head_logps(model, hidden, batch.targets.clone(), temperature)
}

/// Clip range, KL weight and normalisation of [`grpo_loss`].
#[derive(Debug, Clone, Copy)]
pub struct LossParams {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
    pub loss_type: LossType,
    /// grpo: completions in the optimizer step; bnpo: this micro-batch's completion tokens x
    /// accumulation steps; dapo: completion tokens in the optimizer step.
    pub denominator: f64,
}

/// The loss of one micro-batch and detached sums for logging.
pub struct LossOutput<B: Backend> {
    pub loss: Tensor<B, 1>,
    /// Sum over completion tokens of the k3 KL estimate.
    pub kl_sum: Tensor<B, 1>,
    /// Completion tokens clipped in the direction of their advantage.
    pub clipped: Tensor<B, 1>,
}

/// TRL's GRPO loss (see the module doc). `old` defaults to `logps` detached; `reference` is
/// needed when `beta > 0` (its KL is still reported when given with beta 0).
///
/// # Shapes
/// - logps, old, reference, mask: `[rows, len]`; advantages: `[rows]`
pub fn grpo_loss<B: Backend>(
    logps: Tensor<B, 2>,
    old: Option<Tensor<B, 2>>,
    reference: Option<Tensor<B, 2>>,
    advantages: Tensor<B, 1>,
    mask: Tensor<B, 2>,
    p: &LossParams,
) -> LossOutput<B> {
    let [rows, len] = logps.dims();
    let old = old.unwrap_or_else(|| logps.clone().detach());
    let adv = advantages.reshape([rows, 1]).expand([rows, len]);
    let ratio = logps.clone().sub(old).exp();
    let clipped_ratio = ratio
        .clone()
        .clamp(1.0 - p.epsilon_low, 1.0 + p.epsilon_high);
    let l1 = ratio.clone().mul(adv.clone());
    let l2 = clipped_ratio.mul(adv.clone());
    let mut per_token = l1.min_pair(l2).neg();
    let device = logps.device();
    let kl_sum = match reference {
        Some(r) => {
            let d = r.sub(logps.clone());
            let kl = d.clone().exp().sub(d).sub_scalar(1.0);
            let sum = kl.clone().mul(mask.clone()).sum().detach();
            if p.beta != 0.0 {
                per_token = per_token.add(kl.mul_scalar(p.beta));
            }
            sum
        }
        None => Tensor::zeros([1], &device),
    };
    let masked = per_token.mul(mask.clone());
    let loss = match p.loss_type {
        LossType::Grpo => {
            let counts = mask.clone().sum_dim(1).clamp_min(1.0);
            masked
                .sum_dim(1)
                .div(counts)
                .sum()
                .div_scalar(p.denominator)
        }
        LossType::Bnpo | LossType::Dapo => masked.sum().div_scalar(p.denominator.max(1.0)),
    };
    let ratio = ratio.detach();
    let adv = adv.detach();
    let low = ratio
        .clone()
        .lower_elem(1.0 - p.epsilon_low)
        .bool_and(adv.clone().lower_elem(0.0));
    let high = ratio
        .greater_elem(1.0 + p.epsilon_high)
        .bool_and(adv.greater_elem(0.0));
    let clipped = low.bool_or(high).float().mul(mask).sum();
    LossOutput {
        loss,
        kl_sum,
        clipped,
    }
}
