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

use crate::dist::{step_share, Collective, DistError, World};
use crate::model::decoder::CausalLm;
use crate::model::generate::{GenerateOptions, SamplingParams};
use crate::peft::lora::{merged_for_sampling, projections_mut};
use crate::train::data::epoch_order;
use crate::train::grpo::{GrpoCtx, GrpoError};
use crate::train::grpo_loss::{completion_logps, row_batch};
use crate::train::rewards::group_advantages;

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
    ctx: &GrpoCtx<'_>,
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
    let seed = cfg
        .seed
        .wrapping_mul(0x2545_F491_4F6C_DD1D)
        .wrapping_add(generation.wrapping_mul(1 << 20));
    // Data parallel: each rank samples its run of the rows (row i still draws from seed + i,
    // and the CPU engine's rows do not depend on their batch) and the ranks gather them.
    let group = crate::dist::group();
    let world = group.as_ref().map_or(World::SOLO, |g| g.world());
    let (lo, hi) = (
        rows.len() * world.rank / world.size,
        rows.len() * (world.rank + 1) / world.size,
    );
    let sample_start = std::time::Instant::now();
    let merged = merged_sampler(ctx, policy);
    let sampler = Sampler::new(merged.as_ref().unwrap_or(policy))?;
    let mine = sample_completions(ctx, &sampler, &rows[lo..hi], seed.wrapping_add(lo as u64))?;
    drop(sampler);
    drop(merged);
    let completions = match &group {
        Some(g) => gather_rows(g.as_ref(), &mine, lo, rows.len(), cfg.max_completion_length)
            .map_err(|e| GrpoError::Train(e.into()))?,
        None => mine,
    };
    let sample_s = sample_start.elapsed().as_secs_f64();
    let references: Vec<&str> = prompt_index
        .iter()
        .map(|&i| ctx.prompts[i].reference.as_str())
        .collect();
    let Scored {
        texts,
        scores,
        totals,
    } = score(ctx, &completions, &references);
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
    let indices: Vec<usize> = (0..rows.len()).collect();
    // A rank needs the log-probs of the micro-batches the training loop deals it.
    let needed = step_share(rows.len().div_ceil(cfg.batch_size), world).indices();
    for (m, chunk) in indices.chunks(cfg.batch_size).enumerate() {
        if !needed.contains(&m) {
            old.push(None);
            refs.push(None);
            continue;
        }
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

    let mut stats = reward_means(ctx, &scores, &totals, &completions, "");
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
    // Of the rollout's wall time, the part spent generating (the rest: scoring and the old and
    // reference log-probs).
    stats.insert("sample_s".into(), sample_s);
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

/// Every rank's sampled rows, from each rank's run `lo..lo + mine.len()` of the `rows` rows
/// (completions of at most `max_len` tokens): a sum over the ranks of buffers that hold only
/// the rank's own rows (ids below 2^24 are exact in f32).
fn gather_rows(
    group: &dyn Collective,
    mine: &[Vec<u32>],
    lo: usize,
    rows: usize,
    max_len: usize,
) -> Result<Vec<Vec<u32>>, DistError> {
    let width = max_len + 1;
    let mut flat = vec![0f32; rows * width];
    for (i, ids) in mine.iter().enumerate() {
        let row = &mut flat[(lo + i) * width..(lo + i + 1) * width];
        row[0] = ids.len() as f32;
        for (slot, &id) in row[1..].iter_mut().zip(ids) {
            *slot = id as f32;
        }
    }
    group.all_reduce_sum(&mut flat)?;
    Ok(flat
        .chunks(width)
        .map(|row| {
            let n = (row[0] as usize).min(max_len);
            row[1..=n].iter().map(|&v| v as u32).collect()
        })
        .collect())
}

/// The policy with its adapters folded in, to sample from (`merge_adapters_for_sampling`). It
/// draws from the same policy up to rounding; the loss's log-probs (old, reference) and the
/// training step use the unmerged model.
fn merged_sampler<B: Backend>(ctx: &GrpoCtx<'_>, policy: &CausalLm<B>) -> Option<CausalLm<B>> {
    // The GPU decode engine folds the adapters into its own copy, a projection at a time.
    #[cfg(feature = "cuda")]
    if crate::infer::gpu::enabled() && crate::infer::gpu::unsupported(policy).is_none() {
        return None;
    }
    if ctx.cfg.merge_adapters_for_sampling {
        merged_for_sampling(policy)
    } else {
        None
    }
}

/// What completions are sampled from: on the f32 CPU backend the CPU engine's copy of the
/// (merged) policy when it can run it (SIMD kernels, an in-place cache: rollouts are most of a
/// CPU step), else the policy through burn.
enum Sampler<'a, B: Backend> {
    Burn(&'a CausalLm<B>),
    Engine(Box<crate::infer::QuantModel>),
}

impl<'a, B: Backend> Sampler<'a, B> {
    fn new(model: &'a CausalLm<B>) -> Result<Self, GrpoError> {
        let copy = crate::infer::sampling_copy(model)?;
        Ok(match copy {
            Some(engine) => Self::Engine(Box::new(engine)),
            None => Self::Burn(model),
        })
    }
}

/// Samples one completion per row of `rows` (prompt ids) from `sampler`; row i draws from
/// `seed + i`.
fn sample_completions<B: Backend>(
    ctx: &GrpoCtx<'_>,
    sampler: &Sampler<'_, B>,
    rows: &[Vec<u32>],
    seed: u64,
) -> Result<Vec<Vec<u32>>, GrpoError> {
    let cfg = ctx.cfg;
    let opts = GenerateOptions {
        max_new_tokens: cfg.max_completion_length,
        sampling: SamplingParams {
            temperature: cfg.temperature,
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            repetition_penalty: 1.0,
            seed,
            greedy: false,
        },
        stop_token_ids: ctx.tokens.eos_ids.clone(),
        stop_strings: Vec::new(),
        budget: None,
        pad_token_id: ctx.tokens.pad_id,
    };
    let generated = match sampler {
        Sampler::Burn(model) => {
            crate::infer::Generator::new(model, None).generate(rows, &opts, None)?
        }
        Sampler::Engine(engine) => crate::infer::generate::<crate::model::device::CpuBackend>(
            engine,
            rows,
            &opts,
            None,
            &Default::default(),
        )?,
    };
    Ok(generated.into_iter().map(|g| g.token_ids).collect())
}

/// Completion texts (the response prefix and the decoded ids) with their scores.
struct Scored {
    texts: Vec<String>,
    /// Per completion, one score per reward function.
    scores: Vec<Vec<f32>>,
    /// Per completion, the weighted sum.
    totals: Vec<f32>,
}

fn score(ctx: &GrpoCtx<'_>, completions: &[Vec<u32>], references: &[&str]) -> Scored {
    let mut out = Scored {
        texts: Vec::with_capacity(completions.len()),
        scores: Vec::with_capacity(completions.len()),
        totals: Vec::with_capacity(completions.len()),
    };
    for (c, reference) in completions.iter().zip(references) {
        let text = format!("{}{}", ctx.cfg.response_prefix, (ctx.decode)(c));
        let (s, total) = ctx.rewards.score_total(&text, reference);
        out.texts.push(text);
        out.scores.push(s);
        out.totals.push(total);
    }
    out
}

/// `{prefix}rewards/<name>`, `{prefix}reward` and `{prefix}completion_length`: means over the
/// completions.
fn reward_means(
    ctx: &GrpoCtx<'_>,
    scores: &[Vec<f32>],
    totals: &[f32],
    completions: &[Vec<u32>],
    prefix: &str,
) -> BTreeMap<String, f64> {
    let count = totals.len().max(1) as f64;
    let mut stats = BTreeMap::new();
    for (f, key) in reward_keys(ctx.rewards.names()).into_iter().enumerate() {
        let sum: f64 = scores.iter().map(|s| f64::from(s[f])).sum();
        stats.insert(format!("{prefix}{key}"), sum / count);
    }
    let sum: f64 = totals.iter().map(|&t| f64::from(t)).sum();
    stats.insert(format!("{prefix}reward"), sum / count);
    let tokens: usize = completions.iter().map(Vec::len).sum();
    stats.insert(format!("{prefix}completion_length"), tokens as f64 / count);
    stats
}

/// Rows generated at once by an evaluation (bounds the KV cache of a large eval set).
const EVAL_CHUNK: usize = 64;

/// The policy's mean rewards on the eval prompts (`eval_reward`, `eval_rewards/<name>`,
/// `eval_completion_length`), `eval_group()` completions of each. Every evaluation draws with
/// the same seeds (common random numbers), so two evaluations differ by what training changed
/// in the policy rather than by sampling luck: one training step's few completions are too
/// noisy to show a small change, and the eval set is fixed.
pub(crate) fn evaluate_rewards<B: Backend>(
    ctx: &GrpoCtx<'_>,
    policy: &CausalLm<B>,
) -> Result<BTreeMap<String, f64>, GrpoError> {
    let group = ctx.cfg.eval_group();
    let index: Vec<usize> = (0..ctx.eval_prompts.len())
        .flat_map(|i| std::iter::repeat_n(i, group))
        .collect();
    let seed = ctx.cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED_E7A1;
    // Merged once for all chunks.
    let merged = merged_sampler(ctx, policy);
    let sampler = Sampler::new(merged.as_ref().unwrap_or(policy))?;
    let mut completions = Vec::with_capacity(index.len());
    for (c, chunk) in index.chunks(EVAL_CHUNK).enumerate() {
        let rows: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&i| ctx.eval_prompts[i].ids.clone())
            .collect();
        let offset = (c * EVAL_CHUNK) as u64;
        completions.extend(sample_completions(
            ctx,
            &sampler,
            &rows,
            seed.wrapping_add(offset),
        )?);
    }
    let references: Vec<&str> = index
        .iter()
        .map(|&i| ctx.eval_prompts[i].reference.as_str())
        .collect();
    let scored = score(ctx, &completions, &references);
    Ok(reward_means(
        ctx,
        &scored.scores,
        &scored.totals,
        &completions,
        "eval_",
    ))
}

#[cfg(test)]
mod gather_tests {
    use std::sync::Arc;

    use crate::dist::{Collective, LocalGroup};

    #[test]
    fn each_rank_gets_every_ranks_rows_in_order() {
        let rows: Vec<Vec<u32>> = vec![vec![5, 6], vec![], vec![49151, 1, 2], vec![7]];
        let members = LocalGroup::new(2);
        let got: Vec<Vec<Vec<u32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = members
                .into_iter()
                .map(|m| {
                    let rows = &rows;
                    s.spawn(move || {
                        let m: Arc<dyn Collective> = m;
                        let lo = 2 * m.world().rank;
                        super::gather_rows(m.as_ref(), &rows[lo..lo + 2], lo, 4, 3).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, vec![rows.clone(), rows]);
    }
}
