//! One GRPO generation step: choose the batch's prompts (a seeded shuffle per epoch), sample
//! `num_generations` completions of each with the current policy (batched, KV cache), score them,
//! compute group advantages, and precompute what the loss needs per micro-batch: the old
//! policy's log-probs (`num_iterations` > 1) and the reference policy's (`beta` > 0).
//!
//! Reference: TRL `GRPOTrainer._generate_and_score_completions` (rewards summed with
//! `reward_weights`, `advantages = (r - mean) / (std + 1e-4)` per group, logged `reward`,
//! `reward_std` = mean of group stds, `rewards/<name>`, completion lengths).

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::model::decoder::CausalLm;
use crate::model::generate::{generate, GenerateOptions, SamplingParams};
use crate::train::rewards::group_advantages;
use crate::trainer::adapters::{merged_for_sampling, projections_mut};
use crate::trainer::data::epoch_order;
use crate::trainer::grpo::{GrpoError, LoopCtx};
use crate::trainer::grpo_loss::{completion_logps, row_batch};

/// Where the reference log-probabilities come from.
pub(crate) enum Reference<B: Backend> {
    /// The policy with its LoRA adapters switched off.
    AdaptersOff,
    /// The initial weights of a full fine-tune.
    Frozen(Box<CausalLm<B>>),
    None,
}

/// `model` with every LoRA adapter removed: the base policy. Cloning a burn module shares its
/// tensors, so this holds no second copy of the base weights.
pub fn without_adapters<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    for (_, _, lin) in projections_mut(&mut model) {
        lin.lora_a = None;
        lin.lora_b = None;
        lin.scaling = 0.0;
    }
    model
}

/// One generated batch: `num_generations` completions of each of its prompts, with what the
/// loss needs per micro-batch (old and reference log-probs) and what the log reports.
pub(crate) struct Rollout<B: Backend> {
    pub(crate) generation: u64,
    pub(crate) epoch: u64,
    pub(crate) prompt_index: Vec<usize>,
    pub(crate) completions: Vec<Vec<u32>>,
    pub(crate) texts: Vec<String>,
    pub(crate) scores: Vec<Vec<f32>>,
    pub(crate) totals: Vec<f32>,
    pub(crate) advantages: Vec<f32>,
    pub(crate) old: Vec<Option<Tensor<B, 2>>>,
    pub(crate) reference: Vec<Option<Tensor<B, 2>>>,
    pub(crate) stats: BTreeMap<String, f64>,
}

/// Unique log keys for the reward functions (`rewards/regex`, `rewards/regex_2` for a second).
pub(crate) fn reward_keys(names: &[String]) -> Vec<String> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    names
        .iter()
        .map(|n| {
            let count = seen.entry(n).or_insert(0);
            *count += 1;
            if *count == 1 {
                format!("rewards/{n}")
            } else {
                format!("rewards/{n}_{count}")
            }
        })
        .collect()
}

pub(crate) fn rollout<B: Backend>(
    ctx: &LoopCtx<'_>,
    policy: &CausalLm<B>,
    reference: &Reference<B>,
    generation: u64,
) -> Result<Rollout<B>, GrpoError> {
    let cfg = ctx.cfg;
    let (n, per) = (ctx.prompts.len(), cfg.prompts_per_generation());
    let mut prompt_index = Vec::with_capacity(per * cfg.num_generations);
    let mut epoch = 0;
    let mut order: Option<(u64, Vec<usize>)> = None;
    for j in 0..per {
        let k = generation as usize * per + j;
        epoch = (k / n) as u64;
        if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            order = Some((epoch, epoch_order(n, cfg.seed, epoch)));
        }
        let idx = order.as_ref().map_or(0, |(_, o)| o[k % n]);
        prompt_index.extend(std::iter::repeat_n(idx, cfg.num_generations));
    }
    let rows: Vec<Vec<u32>> = prompt_index
        .iter()
        .map(|&i| ctx.prompts[i].ids.clone())
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: cfg.max_completion_length,
        sampling: SamplingParams {
            temperature: cfg.temperature,
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            repetition_penalty: 1.0,
            // Row i draws from seed + i: a distinct stream per generated batch and row.
            seed: cfg
                .seed
                .wrapping_mul(0x2545_F491_4F6C_DD1D)
                .wrapping_add(generation.wrapping_mul(1 << 20)),
            greedy: false,
        },
        stop_token_ids: ctx.tokens.eos_ids.clone(),
        stop_strings: Vec::new(),
        budget: None,
        pad_token_id: ctx.tokens.pad_id,
    };
    // Sampling from the merged weights draws from the same policy up to rounding; the loss's
    // log-probs below (old, reference) and the training step use the unmerged model.
    let merged = if cfg.merge_adapters_for_sampling {
        merged_for_sampling(policy)
    } else {
        None
    };
    let completions: Vec<Vec<u32>> =
        generate(merged.as_ref().unwrap_or(policy), &rows, &opts, None)?
            .into_iter()
            .map(|g| g.token_ids)
            .collect();
    drop(merged);
    let mut texts = Vec::with_capacity(rows.len());
    let mut scores = Vec::with_capacity(rows.len());
    let mut totals = Vec::with_capacity(rows.len());
    for (c, &i) in completions.iter().zip(&prompt_index) {
        let text = format!("{}{}", cfg.response_prefix, (ctx.decode)(c));
        let (s, total) = ctx.rewards.score_total(&text, &ctx.prompts[i].reference);
        texts.push(text);
        scores.push(s);
        totals.push(total);
    }
    let advantages = group_advantages(&totals, cfg.num_generations)?;

    let reference_model = match reference {
        _ if cfg.beta == 0.0 => None,
        Reference::AdaptersOff => Some(without_adapters(policy.clone())),
        Reference::Frozen(m) => Some(m.as_ref().clone()),
        Reference::None => None,
    };
    let device = policy.model.embed_tokens.weight.device();
    let temperature = f64::from(cfg.temperature);
    let (mut old, mut refs) = (Vec::new(), Vec::new());
    for chunk in (0..rows.len()).collect::<Vec<_>>().chunks(cfg.batch_size) {
        let p: Vec<&[u32]> = chunk.iter().map(|&r| rows[r].as_slice()).collect();
        let c: Vec<&[u32]> = chunk.iter().map(|&r| completions[r].as_slice()).collect();
        let batch = row_batch::<B>(&p, &c, ctx.tokens.pad_id, &device);
        old.push((cfg.num_iterations > 1).then(|| completion_logps(policy, &batch, temperature)));
        refs.push(
            reference_model
                .as_ref()
                .map(|m| completion_logps(m, &batch, temperature)),
        );
    }

    let mut stats = BTreeMap::new();
    let count = rows.len() as f64;
    let mean = |v: &mut dyn Iterator<Item = f64>| v.sum::<f64>() / count;
    for (f, key) in reward_keys(ctx.rewards.names()).into_iter().enumerate() {
        stats.insert(key, mean(&mut scores.iter().map(|s| f64::from(s[f]))));
    }
    stats.insert(
        "reward".into(),
        mean(&mut totals.iter().map(|&t| f64::from(t))),
    );
    let group_std = |g: &[f32]| {
        let m = g.iter().map(|&x| f64::from(x)).sum::<f64>() / g.len() as f64;
        let ss: f64 = g.iter().map(|&x| (f64::from(x) - m).powi(2)).sum();
        if g.len() > 1 {
            (ss / (g.len() - 1) as f64).sqrt()
        } else {
            0.0
        }
    };
    let groups: Vec<f64> = totals.chunks(cfg.num_generations).map(group_std).collect();
    stats.insert(
        "reward_std".into(),
        groups.iter().sum::<f64>() / groups.len() as f64,
    );
    stats.insert(
        "completion_length".into(),
        mean(&mut completions.iter().map(|c| c.len() as f64)),
    );
    Ok(Rollout {
        generation,
        epoch,
        prompt_index,
        completions,
        texts,
        scores,
        totals,
        advantages,
        old,
        reference: refs,
        stats,
    })
}
