//! The GRPO loop: sample a group of completions per prompt with the current policy (batched,
//! KV cache), score them with the configured rewards, turn the rewards into group-normalised
//! advantages, and take `num_iterations` clipped-surrogate steps on each generated batch, with a
//! k3 KL penalty to the reference policy. Gradient accumulation, clipping, AdamW, schedules,
//! `metrics.jsonl`, `completions.jsonl`, checkpoints and resume work as in [`crate::trainer::sft`].
//!
//! Reference: TRL `GRPOTrainer` (`_generate_and_score_completions`, `_compute_loss`, its buffer
//! of `steps_per_generation` = `gradient_accumulation_steps` micro-batches reused
//! `num_iterations` times) and Shao et al. 2024, "DeepSeekMath" (GRPO). The reference policy of
//! LoRA runs is the same weights with the adapters switched off (a clone of the module shares
//! the base tensors, so no second copy of the weights); a full fine-tune keeps the initial
//! weights as its reference (as TRL's separate `ref_model`) only when `beta > 0`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::generate::GenerateError;
use crate::model::hf::{load_hf_folder_tensors, save_hf_folder, DType};
use crate::train::metrics_log::{MetricsLog, MetricsRow};
use crate::train::peft_io::write_lora_adapter;
use crate::train::rewards::RewardSet;
use crate::trainer::adapters::{add_lora, lora_pairs, quantize_base_nf4, save_merged};
use crate::trainer::checkpoint::{
    latest_checkpoint, load_checkpoint, save_checkpoint, TrainerState, FORMAT_VERSION,
};
use crate::trainer::config::{Method, SaveDtype};
use crate::trainer::grpo_config::{GrpoConfig, LossType};
use crate::trainer::grpo_loss::{completion_logps, grpo_loss, row_batch, LossParams};
pub use crate::trainer::grpo_rollout::without_adapters;
use crate::trainer::grpo_rollout::{evaluate_rewards, reward_keys, rollout, Reference, Rollout};
use crate::trainer::optim::{clip_scale, global_grad_norm, AdamW};
use crate::trainer::params::{assign_values, trainable_params, trainable_values};
use crate::trainer::sft::BaseModel;

/// Errors of the GRPO stage.
#[derive(Debug, thiserror::Error)]
pub enum GrpoError {
    #[error("grpo: key `{key}`: {message}")]
    Config { key: &'static str, message: String },
    #[error("grpo: the prompt set is empty")]
    NoPrompts,
    #[error("grpo: {set} prompt {index}: {message}")]
    Prompt {
        /// "training" or "eval".
        set: &'static str,
        index: usize,
        message: String,
    },
    #[error("grpo: generation: {0}")]
    Generate(#[from] GenerateError),
    #[error("grpo: {0}")]
    Rewards(#[from] crate::train::rewards::Error),
    #[error(transparent)]
    Train(#[from] crate::trainer::Error),
    #[error("grpo: the CPU engine's sampling copy of the policy: {0}")]
    Sampling(#[from] crate::infer::InferError),
}

impl GrpoError {
    fn train(e: impl Into<crate::trainer::Error>) -> Self {
        GrpoError::Train(e.into())
    }
}

/// One training prompt: its token ids (chat template applied) and the reference the rewards
/// compare against (e.g. the GSM8K solution).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoPrompt {
    pub ids: Vec<u32>,
    pub reference: String,
}

/// Token ids the loop needs besides the prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoTokens {
    /// Generation ends after one of these (kept in the completion, as TRL's mask does).
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
}

/// Completion ids to text (special tokens skipped) for the rewards.
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> String;

/// What a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoReport {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    /// Mean total reward of the first and last logged rows.
    pub first_reward: Option<f64>,
    pub last_reward: Option<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Mean rewards on the eval prompts before the first step and after the last one. Both are
    /// empty without eval prompts; `eval_before` also after a resume (the first run logged it).
    pub eval_before: BTreeMap<String, f64>,
    pub eval_after: BTreeMap<String, f64>,
    pub metrics_path: PathBuf,
    pub adapter_dir: Option<PathBuf>,
    pub model_dir: Option<PathBuf>,
}

/// Runs GRPO on `base` and writes `metrics.jsonl`, `completions.jsonl`, checkpoints and the
/// method's outputs (`adapter/` + `merged/`, or `model/`) under `out_dir`.
#[allow(clippy::too_many_arguments)]
pub fn train_grpo<B: AutodiffBackend>(
    cfg: &GrpoConfig,
    base: BaseModel<'_>,
    prompts: &[GrpoPrompt],
    eval_prompts: &[GrpoPrompt],
    decode: Decode<'_>,
    tokens: &GrpoTokens,
    out_dir: &Path,
    device: &B::Device,
    progress: Option<&MultiProgress>,
) -> Result<GrpoReport, GrpoError> {
    run_grpo::<B>(
        cfg,
        base,
        prompts,
        eval_prompts,
        decode,
        tokens,
        out_dir,
        device,
        progress,
        None,
    )
}

/// [`train_grpo`] that stops after optimizer step `stop_after` (tests: an interrupted run).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_grpo<B: AutodiffBackend>(
    cfg: &GrpoConfig,
    base: BaseModel<'_>,
    prompts: &[GrpoPrompt],
    eval_prompts: &[GrpoPrompt],
    decode: Decode<'_>,
    tokens: &GrpoTokens,
    out_dir: &Path,
    device: &B::Device,
    progress: Option<&MultiProgress>,
    stop_after: Option<u64>,
) -> Result<GrpoReport, GrpoError> {
    cfg.validate()
        .map_err(|(key, message)| GrpoError::Config { key, message })?;
    let rewards = RewardSet::new(&cfg.rewards)?;
    if prompts.is_empty() {
        return Err(GrpoError::NoPrompts);
    }
    let (config, tensors, base_name) = match base {
        BaseModel::Dir(dir) => (
            ModelConfig::from_file(dir.join("config.json")).map_err(GrpoError::train)?,
            load_hf_folder_tensors(dir).map_err(GrpoError::train)?,
            Some(dir.display().to_string()),
        ),
        BaseModel::Loaded { config, tensors } => (config.clone(), tensors.clone(), None),
    };
    let kept = checked_prompts(prompts, "training", cfg, &config)?;
    let eval_limit = match cfg.eval_prompts {
        0 => eval_prompts.len(),
        n => n.min(eval_prompts.len()),
    };
    let eval_kept = checked_prompts(&eval_prompts[..eval_limit], "eval", cfg, &config)?;
    std::fs::create_dir_all(out_dir).map_err(|source| {
        GrpoError::train(crate::trainer::Error::Io {
            path: out_dir.to_path_buf(),
            source,
        })
    })?;
    let ctx = LoopCtx {
        cfg,
        rewards: &rewards,
        prompts: &kept,
        eval_prompts: &eval_kept,
        decode,
        tokens,
        out_dir,
        stop_after,
        progress,
    };
    let dtype = match cfg.dtype {
        SaveDtype::Float32 => DType::F32,
        SaveDtype::Bfloat16 => DType::BF16,
        SaveDtype::Float16 => DType::F16,
    };
    match cfg.method {
        Method::Lora | Method::Qlora => {
            let mut adapter = cfg.adapter_config();
            adapter.base_model_name_or_path = base_name;
            let mut model = if cfg.method == Method::Qlora {
                CausalLm::<B>::from_hf_tensors_nf4(&config, &tensors, device)
            } else {
                CausalLm::<B>::from_hf_tensors(&config, &tensors, device)
            }
            .map_err(GrpoError::train)?;
            drop(tensors);
            model.checkpointing = cfg.gradient_checkpointing;
            if cfg.method == Method::Qlora {
                // The frozen base held in NF4 on the device, as in SFT.
                model = quantize_base_nf4(model).map_err(GrpoError::train)?;
            }
            let (model, wrapped) = add_lora(model, &adapter, cfg.seed, device)?;
            if wrapped == 0 {
                return Err(GrpoError::train(crate::trainer::Error::NoTargets));
            }
            let save_adapter = |m: &CausalLm<B>, dir: &Path| -> Result<(), crate::trainer::Error> {
                Ok(write_lora_adapter(dir, &adapter, &lora_pairs(&m.valid()))?)
            };
            let (model, mut report) =
                train_loop::<B>(&ctx, model, Reference::AdaptersOff, device, &save_adapter)?;
            let adapter_dir = out_dir.join("adapter");
            save_adapter(&model, &adapter_dir)?;
            let model_dir =
                save_merged(out_dir, &config, model.valid(), dtype).map_err(GrpoError::train)?;
            report.adapter_dir = Some(adapter_dir);
            report.model_dir = Some(model_dir);
            Ok(report)
        }
        Method::Full => {
            let mut model = CausalLm::<B>::from_hf_tensors(&config, &tensors, device)
                .map_err(GrpoError::train)?;
            drop(tensors);
            model.checkpointing = cfg.gradient_checkpointing;
            let reference = if cfg.beta > 0.0 {
                Reference::Frozen(Box::new(model.valid()))
            } else {
                Reference::None
            };
            let (model, mut report) =
                train_loop::<B>(&ctx, model, reference, device, &|_, _| Ok(()))?;
            let model_dir = out_dir.join("model");
            save_hf_folder(&model_dir, &config, &model.valid().to_hf_tensors(), dtype)
                .map_err(GrpoError::train)?;
            report.model_dir = Some(model_dir);
            Ok(report)
        }
        Method::Prefix | Method::Adalora | Method::PromptTuning | Method::PTuning => {
            Err(GrpoError::Config {
                key: "method",
                message: "grpo trains `lora`, `qlora` or `full`".into(),
            })
        }
    }
}

/// `prompts` with every id inside the vocabulary, left-truncated to `max_prompt_length` (keeping
/// the generation prompt at the end, as TRL does).
fn checked_prompts(
    prompts: &[GrpoPrompt],
    set: &'static str,
    cfg: &GrpoConfig,
    config: &ModelConfig,
) -> Result<Vec<GrpoPrompt>, GrpoError> {
    let mut kept = Vec::with_capacity(prompts.len());
    for (index, p) in prompts.iter().enumerate() {
        if p.ids.is_empty() {
            return Err(GrpoError::Prompt {
                set,
                index,
                message: "no tokens".into(),
            });
        }
        if let Some(&id) = p.ids.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(GrpoError::Prompt {
                set,
                index,
                message: format!(
                    "token id {id} is outside the vocabulary ({})",
                    config.vocab_size
                ),
            });
        }
        let from = p.ids.len().saturating_sub(cfg.max_prompt_length);
        kept.push(GrpoPrompt {
            ids: p.ids[from..].to_vec(),
            reference: p.reference.clone(),
        });
    }
    Ok(kept)
}

pub(crate) struct LoopCtx<'a> {
    pub(crate) cfg: &'a GrpoConfig,
    pub(crate) rewards: &'a RewardSet,
    pub(crate) prompts: &'a [GrpoPrompt],
    /// Fixed prompts the policy is scored on (none: no evaluation).
    pub(crate) eval_prompts: &'a [GrpoPrompt],
    pub(crate) decode: Decode<'a>,
    pub(crate) tokens: &'a GrpoTokens,
    pub(crate) out_dir: &'a Path,
    pub(crate) stop_after: Option<u64>,
    pub(crate) progress: Option<&'a MultiProgress>,
}

/// Scores the policy on the eval prompts and appends the means as a metrics row of `step`.
fn log_eval<B: Backend>(
    ctx: &LoopCtx<'_>,
    policy: &CausalLm<B>,
    step: u64,
    metrics: &mut MetricsLog,
    bar: &ProgressBar,
) -> Result<BTreeMap<String, f64>, GrpoError> {
    bar.set_message("scoring the eval prompts");
    let started = Instant::now();
    let stats = evaluate_rewards(ctx, policy)?;
    let mut row = MetricsRow::new(step);
    for (k, v) in &stats {
        row = row.with(k, *v);
    }
    let row = row.with("eval_s", started.elapsed().as_secs_f64());
    metrics.append(&row).map_err(GrpoError::train)?;
    Ok(stats)
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem()
}

type SaveHook<'a, M> = dyn Fn(&M, &Path) -> Result<(), crate::trainer::Error> + 'a;

fn train_loop<B: AutodiffBackend>(
    ctx: &LoopCtx<'_>,
    mut model: CausalLm<B>,
    reference: Reference<B::InnerBackend>,
    device: &B::Device,
    save_extra: &SaveHook<'_, CausalLm<B>>,
) -> Result<(CausalLm<B>, GrpoReport), GrpoError> {
    let cfg = ctx.cfg;
    crate::backend::reset_accelerator_peak::<B>();
    let mu = cfg.num_iterations as u64;
    let per_epoch = ctx.prompts.len().div_ceil(cfg.prompts_per_generation()) as u64;
    let total = cfg.max_steps.unwrap_or(cfg.epochs * per_epoch * mu);
    let schedule = cfg
        .schedule_config()
        .build(cfg.learning_rate, total)
        .map_err(GrpoError::train)?;
    let (trainable, total_params) = trainable_params::<B, CausalLm<B>>(&model);
    let trainable_count: usize = trainable
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let mut opt = AdamW::<B::InnerBackend>::new(cfg.optimizer_keys().adamw());
    let metrics_path = ctx.out_dir.join("metrics.jsonl");
    let completions_path = ctx.out_dir.join("completions.jsonl");
    let (mut start, mut resumed_from) = (0u64, None);
    if cfg.resume {
        if let Some(dir) = latest_checkpoint(ctx.out_dir)? {
            let ck = load_checkpoint(&dir)?;
            let bad = |message: String| {
                GrpoError::train(crate::trainer::Error::Checkpoint {
                    path: dir.clone(),
                    message,
                })
            };
            if ck.state.method != cfg.method
                || ck.state.total_steps != total
                || ck.state.num_train_examples != ctx.prompts.len()
            {
                return Err(bad(format!(
                    "saved for method {:?}, {} steps, {} prompts; this run has {:?}, {total}, {}",
                    ck.state.method,
                    ck.state.total_steps,
                    ck.state.num_train_examples,
                    cfg.method,
                    ctx.prompts.len()
                )));
            }
            let (m, assigned) = assign_values::<B, CausalLm<B>>(model, &ck.trainable, device);
            model = m;
            if let Some(missing) = trainable.iter().find(|p| !assigned.contains(&p.path)) {
                return Err(bad(format!(
                    "no saved tensor for trainable parameter `{}`",
                    missing.path
                )));
            }
            opt.load_host(&ck.optimizer, &ck.state.adam_steps, device)
                .map_err(|name| bad(format!("optimizer tensor `{name}` is missing")))?;
            start = ck.state.step;
            resumed_from = Some(start);
        }
    }
    let open = |path: &Path| {
        if start > 0 {
            MetricsLog::resume(path, start)
        } else {
            MetricsLog::create(path)
        }
    };
    let mut metrics = open(&metrics_path).map_err(GrpoError::train)?;
    let mut samples = open(&completions_path).map_err(GrpoError::train)?;
    let bar = match ctx.progress {
        Some(mp) => mp.add(ProgressBar::new(total)),
        None => ProgressBar::hidden(),
    };
    if let Ok(style) = ProgressStyle::with_template(
        "grpo {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_position(start);
    let keys = reward_keys(ctx.rewards.names());
    let ga = cfg.gradient_accumulation_steps;
    let (eps_low, eps_high) = (cfg.epsilon, cfg.epsilon_high());
    let temperature = f64::from(cfg.temperature);
    let mut current: Option<Rollout<B::InnerBackend>> = None;
    let mut window: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    let (mut first_reward, mut last_reward) = (None, None);
    let evaluate = !ctx.eval_prompts.is_empty();
    let (mut eval_before, mut eval_after) = (BTreeMap::new(), BTreeMap::new());
    if evaluate && start == 0 {
        eval_before = log_eval(ctx, &model.valid(), 0, &mut metrics, &bar)?;
    }
    for index in start..total {
        let step_start = Instant::now();
        let mut rollout_s = 0.0;
        let generation = index / mu;
        if current.as_ref().map(|r| r.generation) != Some(generation) {
            current = Some(rollout(ctx, &model.valid(), &reference, generation)?);
            rollout_s = step_start.elapsed().as_secs_f64();
        }
        let Some(r) = current.as_ref() else { continue };
        // Dropout masks depend on (seed, step) only, so a resumed run draws the same ones.
        B::seed(
            device,
            cfg.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(index + 1),
        );
        let step_tokens: usize = r.completions.iter().map(Vec::len).sum();
        let rows: Vec<usize> = (0..r.completions.len()).collect();
        let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
        let (mut loss_sum, mut kl_sum, mut clipped) = (0.0, 0.0, 0.0);
        for (m, chunk) in rows.chunks(cfg.batch_size).enumerate() {
            let p: Vec<&[u32]> = chunk
                .iter()
                .map(|&i| ctx.prompts[r.prompt_index[i]].ids.as_slice())
                .collect();
            let c: Vec<&[u32]> = chunk.iter().map(|&i| r.completions[i].as_slice()).collect();
            let batch = row_batch::<B>(&p, &c, ctx.tokens.pad_id, device);
            let mb_tokens: usize = batch.lengths.iter().sum();
            let denominator = match cfg.loss_type {
                LossType::Grpo => rows.len() as f64,
                LossType::Bnpo => (mb_tokens.max(1) * ga) as f64,
                LossType::Dapo => step_tokens.max(1) as f64,
            };
            let adv: Vec<f32> = chunk.iter().map(|&i| r.advantages[i]).collect();
            let adv = Tensor::<B, 1>::from_data(TensorData::new(adv, [chunk.len()]), device);
            let logps = completion_logps(&model, &batch, temperature);
            let out = grpo_loss(
                logps,
                r.old[m].clone().map(Tensor::from_inner),
                r.reference[m].clone().map(Tensor::from_inner),
                adv,
                batch.mask.clone(),
                &LossParams {
                    epsilon_low: eps_low,
                    epsilon_high: eps_high,
                    beta: cfg.beta,
                    loss_type: cfg.loss_type,
                    denominator,
                },
            );
            loss_sum += scalar(out.loss.clone().inner());
            kl_sum += scalar(out.kl_sum.inner());
            clipped += scalar(out.clipped.inner());
            let grads = GradientsParams::from_grads(out.loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        let mut grads = accumulator.grads();
        let norm = global_grad_norm::<B, CausalLm<B>>(&model, &grads, device);
        let grad_norm = scalar(norm.clone());
        let scale = cfg
            .max_grad_norm
            .filter(|&m| m > 0.0)
            .map(|m| clip_scale(norm, m));
        let lr = schedule.lr_at(index);
        let step = index + 1;
        // Both are on the host already; a non-finite one would poison the policy.
        for (what, value) in [("loss", loss_sum), ("gradient norm", grad_norm)] {
            if !value.is_finite() {
                bar.abandon();
                return Err(GrpoError::Train(crate::trainer::Error::NonFinite {
                    what,
                    step,
                    lr,
                }));
            }
        }
        model = opt.step::<B, CausalLm<B>>(model, &mut grads, lr, scale);
        crate::backend::memory::check_limit::<B>(device).map_err(GrpoError::train)?;
        bar.inc(1);

        let mut add = |key: &str, v: f64| {
            let e = window.entry(key.to_string()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        };
        add("loss", loss_sum);
        add("grad_norm", grad_norm);
        // Wall time of the step and of its sampling (the host waits for the loss each step).
        add("step_s", step_start.elapsed().as_secs_f64());
        add("rollout_s", rollout_s);
        add("clip_ratio", clipped / step_tokens.max(1) as f64);
        if cfg.beta > 0.0 {
            add("kl", kl_sum / step_tokens.max(1) as f64);
        }
        for (k, v) in &r.stats {
            add(k, *v);
        }
        if step % cfg.logging_steps == 0 || step == total {
            let mean = |k: &str| window.get(k).map(|(s, n)| s / *n as f64);
            let mut row = MetricsRow::new(step).with("epoch", r.epoch);
            row.loss = mean("loss");
            row.lr = Some(lr);
            row.grad_norm = mean("grad_norm");
            row.memory_mb = crate::trainer::sft::resident_memory_mb();
            if let Some(gpu) = crate::backend::accelerator_memory_mb::<B>() {
                row = row.with("gpu_memory_mb", gpu);
            }
            if let Some(peak) = crate::backend::accelerator_peak_mb::<B>() {
                row = row.with("gpu_peak_mb", peak);
            }
            for (k, (s, n)) in &window {
                if !["loss", "grad_norm"].contains(&k.as_str()) {
                    row = row.with(k, s / *n as f64);
                }
            }
            let reward = mean("reward");
            first_reward = first_reward.or(reward);
            last_reward = reward;
            bar.set_message(format!("reward {:.3}", reward.unwrap_or(0.0)));
            metrics.append(&row).map_err(GrpoError::train)?;
            window.clear();
        }
        // The completions the step trained on (with num_iterations > 1, several steps share them).
        if cfg.log_completions_steps > 0 && (step == 1 || step % cfg.log_completions_steps == 0) {
            for i in 0..r.completions.len() {
                let prompt = &ctx.prompts[r.prompt_index[i]];
                let mut each = serde_json::Map::new();
                for (k, s) in keys.iter().zip(&r.scores[i]) {
                    let name = k.trim_start_matches("rewards/").to_string();
                    each.insert(name, f64::from(*s).into());
                }
                let row = MetricsRow::new(step)
                    .with("prompt", (ctx.decode)(&prompt.ids))
                    .with("completion", r.texts[i].clone())
                    .with("reference", prompt.reference.clone())
                    .with("reward", f64::from(r.totals[i]))
                    .with("rewards", serde_json::Value::Object(each))
                    .with("advantage", f64::from(r.advantages[i]));
                samples.append(&row).map_err(GrpoError::train)?;
            }
        }
        if cfg.save_steps > 0 && step % cfg.save_steps == 0 {
            let (optimizer, adam_steps) = opt.to_host();
            let state = TrainerState {
                format_version: FORMAT_VERSION,
                method: cfg.method,
                step,
                epoch: r.epoch,
                total_steps: total,
                seed: cfg.seed,
                num_train_examples: ctx.prompts.len(),
                tokens_seen: 0,
                pending_loss_sum: 0.0,
                pending_steps: 0,
                adam_steps,
            };
            save_checkpoint(
                ctx.out_dir,
                &state,
                &trainable_values::<B, CausalLm<B>>(&model),
                &optimizer,
                |dir| save_extra(&model, dir),
            )?;
        }
        if evaluate && (step == total || (cfg.eval_steps > 0 && step % cfg.eval_steps == 0)) {
            eval_after = log_eval(ctx, &model.valid(), step, &mut metrics, &bar)?;
        }
        if ctx.stop_after == Some(step) {
            break;
        }
    }
    bar.finish();
    let done = ctx.stop_after.map_or(total, |s| s.min(total)).max(start);
    Ok((
        model,
        GrpoReport {
            steps: done,
            resumed_from,
            first_reward,
            last_reward,
            trainable_params: trainable_count,
            total_params,
            eval_before,
            eval_after,
            metrics_path,
            adapter_dir: None,
            model_dir: None,
        },
    ))
}
