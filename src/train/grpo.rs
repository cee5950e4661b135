//! The GRPO loop: sample a group of completions per prompt with the current policy (batched,
//! KV cache), score them with the configured rewards, turn the rewards into group-normalised
//! advantages, and take `num_iterations` clipped-surrogate steps on each generated batch, with a
//! k3 KL penalty to the reference policy. The steps are a [`StepSource`] of the one training
//! loop ([`crate::train::train_loop`]), which gives GRPO accumulation, clipping, AdamW,
//! schedules, `metrics.jsonl`, checkpoints and resume; GRPO adds `completions.jsonl`.
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
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use indicatif::MultiProgress;

use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::generate::GenerateError;
use crate::model::hf::{load_hf_folder_tensors, save_hf_folder, DType};
use crate::peft::lora::{add_lora, quantize_base_nf4, save_merged, write_model_adapter};
use crate::train::config::{Method, SaveDtype};
use crate::train::grpo_config::{GrpoConfig, LossType};
use crate::train::grpo_loss::{completion_logps, grpo_loss, row_batch, LossParams};
pub use crate::train::grpo_rollout::without_adapters;
use crate::train::grpo_rollout::{evaluate_rewards, reward_keys, rollout, Reference, Rollout};
use crate::train::metrics_log::{MetricsLog, MetricsRow};
use crate::train::objective::{MicroLoss, Stat};
use crate::train::rewards::RewardSet;
use crate::train::sft::BaseModel;
use crate::train::train_loop::{train_loop, LoopRun, SaveHook, StepShape, StepSource};

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
    Train(#[from] crate::train::Error),
    #[error("grpo: the CPU engine's sampling copy of the policy: {0}")]
    Sampling(#[from] crate::infer::InferError),
}

impl GrpoError {
    fn train(e: impl Into<crate::train::Error>) -> Self {
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
        GrpoError::train(crate::train::Error::Io {
            path: out_dir.to_path_buf(),
            source,
        })
    })?;
    let ctx = GrpoCtx {
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
            let (model, wrapped) =
                add_lora(model, &adapter, cfg.seed, device).map_err(GrpoError::train)?;
            if wrapped == 0 {
                return Err(GrpoError::train(crate::train::Error::NoTargets));
            }
            let save_adapter = |m: &CausalLm<B>, dir: &Path| -> Result<(), crate::train::Error> {
                Ok(write_model_adapter(dir, &adapter, &m.valid())?)
            };
            let (model, mut report) =
                train_policy::<B>(&ctx, model, Reference::AdaptersOff, device, &save_adapter)?;
            let adapter_dir = out_dir.join("adapter");
            // Data parallel: the ranks hold the same weights; the leader writes them.
            if crate::dist::is_leader() {
                save_adapter(&model, &adapter_dir)?;
                let model_dir = save_merged(out_dir, &config, model.valid(), dtype)
                    .map_err(GrpoError::train)?;
                report.model_dir = Some(model_dir);
            }
            report.adapter_dir = Some(adapter_dir);
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
                train_policy::<B>(&ctx, model, reference, device, &|_, _| Ok(()))?;
            let model_dir = out_dir.join("model");
            if crate::dist::is_leader() {
                save_hf_folder(&model_dir, &config, &model.valid().to_hf_tensors(), dtype)
                    .map_err(GrpoError::train)?;
            }
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

pub(crate) struct GrpoCtx<'a> {
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

/// GRPO's steps: every `num_iterations` steps a new batch of completions sampled with the
/// current policy and scored, then the clipped surrogate loss on it, micro-batch by micro-batch.
struct GrpoSteps<'a, B: AutodiffBackend> {
    ctx: &'a GrpoCtx<'a>,
    reference: Reference<B::InnerBackend>,
    total: u64,
    current: Option<Rollout<B::InnerBackend>>,
    /// Seconds the step begun last spent sampling (0 when it reuses the last batch).
    rollout_s: f64,
    /// Completion tokens of the current batch.
    step_tokens: usize,
    samples: Option<MetricsLog>,
    keys: Vec<String>,
    first_reward: Option<f64>,
    last_reward: Option<f64>,
    eval_before: BTreeMap<String, f64>,
    eval_after: BTreeMap<String, f64>,
}

impl<'a, B: AutodiffBackend> GrpoSteps<'a, B> {
    fn new(ctx: &'a GrpoCtx<'a>, reference: Reference<B::InnerBackend>) -> Self {
        let cfg = ctx.cfg;
        let mu = cfg.num_iterations as u64;
        let per_epoch = ctx.prompts.len().div_ceil(cfg.prompts_per_generation()) as u64;
        Self {
            ctx,
            reference,
            total: cfg.max_steps.unwrap_or(cfg.epochs * per_epoch * mu),
            current: None,
            rollout_s: 0.0,
            step_tokens: 0,
            samples: None,
            keys: reward_keys(ctx.rewards.names()),
            first_reward: None,
            last_reward: None,
            eval_before: BTreeMap::new(),
            eval_after: BTreeMap::new(),
        }
    }

    fn rollout(&self) -> &Rollout<B::InnerBackend> {
        self.current
            .as_ref()
            .expect("the loop begins a step before it asks for its losses")
    }
}

impl<B: AutodiffBackend> StepSource<B, CausalLm<B>> for GrpoSteps<'_, B> {
    type Error = GrpoError;

    fn label(&self) -> &'static str {
        "grpo"
    }

    fn units(&self) -> (usize, &'static str) {
        (self.ctx.prompts.len(), "prompts")
    }

    fn total_steps(&self) -> u64 {
        self.total
    }

    fn open(&mut self, out_dir: &Path, start: u64) -> Result<(), GrpoError> {
        let path = out_dir.join("completions.jsonl");
        let log = if start > 0 {
            MetricsLog::resume(&path, start)
        } else {
            MetricsLog::create(&path)
        };
        self.samples = Some(log.map_err(GrpoError::train)?);
        Ok(())
    }

    fn begin_step(
        &mut self,
        model: &CausalLm<B>,
        index: u64,
        _device: &B::Device,
    ) -> Result<StepShape, GrpoError> {
        let generation = index / self.ctx.cfg.num_iterations as u64;
        self.rollout_s = 0.0;
        if self.current.as_ref().map(|r| r.generation) != Some(generation) {
            let started = Instant::now();
            let fresh = rollout(self.ctx, &model.valid(), &self.reference, generation)?;
            self.rollout_s = started.elapsed().as_secs_f64();
            self.step_tokens = fresh.completions.iter().map(Vec::len).sum();
            self.current = Some(fresh);
        }
        let r = self.rollout();
        Ok(StepShape {
            micro_batches: r.completions.len().div_ceil(self.ctx.cfg.batch_size),
            epoch: r.epoch,
        })
    }

    fn micro_loss(
        &mut self,
        model: &CausalLm<B>,
        micro_batch: usize,
        device: &B::Device,
    ) -> MicroLoss<B> {
        let (ctx, cfg) = (self.ctx, self.ctx.cfg);
        let r = self.rollout();
        let rows = r.completions.len();
        let from = micro_batch * cfg.batch_size;
        let chunk = from..(from + cfg.batch_size).min(rows);
        let p: Vec<&[u32]> = chunk
            .clone()
            .map(|i| ctx.prompts[r.prompt_index[i]].ids.as_slice())
            .collect();
        let c: Vec<&[u32]> = chunk.clone().map(|i| r.completions[i].as_slice()).collect();
        let completion_tokens: usize = c.iter().map(|c| c.len()).sum();
        let batch = row_batch::<B>(&p, &c, ctx.tokens.pad_id, device);
        let mb_tokens: usize = batch.lengths.iter().sum();
        let denominator = match cfg.loss_type {
            LossType::Grpo => rows as f64,
            LossType::Bnpo => (mb_tokens.max(1) * cfg.gradient_accumulation_steps) as f64,
            LossType::Dapo => self.step_tokens.max(1) as f64,
        };
        let adv: Vec<f32> = chunk.clone().map(|i| r.advantages[i]).collect();
        let adv = Tensor::<B, 1>::from_data(TensorData::new(adv, [chunk.len()]), device);
        let logps = completion_logps(model, &batch, f64::from(cfg.temperature));
        let out = grpo_loss(
            logps,
            r.old[micro_batch].clone().map(Tensor::from_inner),
            r.reference[micro_batch].clone().map(Tensor::from_inner),
            adv,
            batch.mask.clone(),
            &LossParams {
                epsilon_low: cfg.epsilon,
                epsilon_high: cfg.epsilon_high(),
                beta: cfg.beta,
                loss_type: cfg.loss_type,
                denominator,
            },
        );
        // Per completion token over the logged window.
        let count = completion_tokens as f64;
        let mut stats = vec![Stat {
            name: "clip_ratio",
            sum: out.clipped,
            count,
        }];
        if cfg.beta > 0.0 {
            stats.push(Stat {
                name: "kl",
                sum: out.kl_sum,
                count,
            });
        }
        MicroLoss {
            loss: out.loss,
            tokens: mb_tokens,
            stats,
        }
    }

    fn step_values(&mut self) -> Vec<(String, f64)> {
        let mut values = vec![("rollout_s".to_string(), self.rollout_s)];
        values.extend(self.rollout().stats.iter().map(|(k, v)| (k.clone(), *v)));
        values
    }

    fn evaluates(&self) -> bool {
        !self.ctx.eval_prompts.is_empty()
    }

    fn evaluates_on_start(&self) -> bool {
        true
    }

    /// `row` with the policy's mean rewards on the eval prompts (`eval_reward`, ...).
    fn evaluate(
        &mut self,
        model: &CausalLm<B>,
        mut row: MetricsRow,
        _device: &B::Device,
    ) -> Result<MetricsRow, GrpoError> {
        let started = Instant::now();
        let stats = evaluate_rewards(self.ctx, &model.valid())?;
        for (k, v) in &stats {
            row = row.with(k, *v);
        }
        if row.step == 0 {
            self.eval_before = stats;
        } else {
            self.eval_after = stats;
        }
        Ok(row.with("eval_s", started.elapsed().as_secs_f64()))
    }

    fn logged(&mut self, row: &MetricsRow) {
        if let Some(reward) = row.extra.get("reward").and_then(|v| v.as_f64()) {
            self.first_reward = self.first_reward.or(Some(reward));
            self.last_reward = Some(reward);
        }
    }

    /// Writes the completions the step trained on to completions.jsonl (with num_iterations > 1,
    /// several steps share them).
    fn end_step(&mut self, step: u64) -> Result<(), GrpoError> {
        let every = self.ctx.cfg.log_completions_steps;
        if every == 0 || (step != 1 && !step.is_multiple_of(every)) {
            return Ok(());
        }
        let ctx = self.ctx;
        let (Some(r), Some(samples)) = (self.current.as_ref(), self.samples.as_mut()) else {
            return Ok(());
        };
        for i in 0..r.completions.len() {
            let prompt = &ctx.prompts[r.prompt_index[i]];
            let mut each = serde_json::Map::new();
            for (k, s) in self.keys.iter().zip(&r.scores[i]) {
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
        Ok(())
    }
}

/// Trains the policy with the one training loop on GRPO's steps.
fn train_policy<B: AutodiffBackend>(
    ctx: &GrpoCtx<'_>,
    model: CausalLm<B>,
    reference: Reference<B::InnerBackend>,
    device: &B::Device,
    save_extra: &SaveHook<'_, CausalLm<B>>,
) -> Result<(CausalLm<B>, GrpoReport), GrpoError> {
    let run = LoopRun {
        settings: ctx.cfg.loop_settings(),
        out_dir: ctx.out_dir,
        stop_after: ctx.stop_after,
        progress: ctx.progress,
    };
    let mut source = GrpoSteps::<B>::new(ctx, reference);
    let (model, done) = train_loop(&run, &mut source, model, device, save_extra, &mut ())?;
    Ok((
        model,
        GrpoReport {
            steps: done.steps,
            resumed_from: done.resumed_from,
            first_reward: source.first_reward,
            last_reward: source.last_reward,
            trainable_params: done.trainable_params,
            total_params: done.total_params,
            eval_before: source.eval_before,
            eval_after: source.eval_after,
            metrics_path: done.metrics_path,
            adapter_dir: None,
            model_dir: None,
        },
    ))
}
