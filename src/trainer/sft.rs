//! The SFT loop: plan, micro-batches, gradient accumulation, clipping, AdamW, logging,
//! evaluation, checkpoints and resume, then the method's outputs.
//!
//! Reference: transformers `Trainer._inner_training_loop` / `training_step` (loss scaled by
//! `num_items_in_batch`, logged loss = mean of step losses since the last log, grad_norm as
//! `clip_grad_norm_` returns it before clipping). Differences: the logged `lr` is the one used
//! by the logged step (transformers logs the next step's), and `eval_loss` is the token mean
//! over the whole eval set (transformers averages per-batch means).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::model::config::ModelConfig;
use crate::model::decoder::{CausalLm, GradientCheckpointing};
use crate::model::hf::{load_hf_folder_tensors, save_hf_folder, DType, HostTensor};
use crate::train::metrics_log::{MetricsLog, MetricsRow};
use crate::train::peft_io::{write_adapter_with_magnitudes, LoraAdapterConfig};
use crate::trainer::adapters::{
    add_lora, lora_magnitudes, lora_pairs, quantize_base_nf4, save_merged,
};
use crate::trainer::checkpoint::{
    latest_checkpoint, load_checkpoint, save_checkpoint, TrainerState, FORMAT_VERSION,
};
use crate::trainer::config::{Method, SaveDtype, SftConfig};
use crate::trainer::data::{
    plan_steps, positions, row_log_probs, summed_cross_entropy, Batch, TokenizedExample,
};
use crate::trainer::objective::{evaluate_objective, totals, Objective, Stat, StatWindow};
use crate::trainer::optim::{clip_scale, global_grad_norm, AdamW};
use crate::trainer::params::{assign_values, trainable_params, trainable_values};
use crate::trainer::prefix::{write_prefix_adapter, PrefixLm};
use crate::trainer::prompt::{prompt_init_ids, write_virtual_adapter, PromptLm};
use crate::trainer::Error;

/// Where the base model comes from.
pub enum BaseModel<'a> {
    /// An HF folder (config.json + safetensors).
    Dir(&'a Path),
    /// A config and HF-named tensors already in memory.
    Loaded {
        config: &'a ModelConfig,
        tensors: &'a BTreeMap<String, HostTensor>,
    },
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SftReport {
    /// Optimizer steps done in total (including those before a resume).
    pub steps: u64,
    pub resumed_from: Option<u64>,
    /// Last logged training loss.
    pub last_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub tokens_seen: u64,
    pub metrics_path: PathBuf,
    /// peft adapter folder (LoRA, QLoRA, prefix).
    pub adapter_dir: Option<PathBuf>,
    /// HF model folder: merged (LoRA, QLoRA) or fine-tuned (full).
    pub model_dir: Option<PathBuf>,
}

/// A causal LM the loop can train: logits for right-padded token rows.
pub trait CausalModel<B: Backend> {
    /// # Shapes
    /// - input_ids: `[rows, len]` -> `[rows, len, vocab]`
    fn logits(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3>;

    /// Sum of the token cross-entropies of `batch`'s counted targets, `[1]`. The default goes
    /// through the full logits; a model may compute it without holding them.
    fn summed_loss(&self, batch: &Batch<B>) -> Tensor<B, 1> {
        summed_cross_entropy(self.logits(batch.input_ids.clone()), batch)
    }

    /// Summed log-probability of each row's counted targets, `[rows]` (preference losses). The
    /// default goes through the full logits.
    fn row_log_probs(&self, batch: &Batch<B>) -> Tensor<B, 1> {
        row_log_probs(self.logits(batch.input_ids.clone()), batch)
    }

    /// A term added to each optimizer step's loss (AdaLoRA's orthogonality penalty).
    fn regularizer(&self) -> Option<Tensor<B, 1>> {
        None
    }
}

/// Per-method work around the optimizer step (AdaLoRA's rank allocation); `()` does nothing.
pub(crate) trait StepHook<B: AutodiffBackend, M> {
    /// The step's gradients (times `grad_scale` when clipped), before the optimizer takes them.
    fn before_step(
        &mut self,
        _model: &M,
        _grads: &GradientsParams,
        _grad_scale: Option<&Tensor<B::InnerBackend, 1>>,
    ) {
    }
    /// After the optimizer step of 0-based `index`.
    fn after_step(&mut self, model: M, _index: u64) -> M {
        model
    }
    /// Writes the hook's state into a checkpoint folder.
    fn save(&self, _model: &M, _dir: &Path) -> Result<(), Error> {
        Ok(())
    }
    /// Reads what [`StepHook::save`] wrote.
    fn load(&mut self, _dir: &Path) -> Result<(), Error> {
        Ok(())
    }
}

impl<B: AutodiffBackend, M> StepHook<B, M> for () {}

/// Rows of logits the chunked loss computes at once: about 64 M logits (256 MB in f32).
const LOSS_CHUNK_LOGITS: usize = 1 << 26;

impl<B: Backend> CausalModel<B> for CausalLm<B> {
    fn logits(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [rows, len] = input_ids.dims();
        let pos = positions(rows, len, 0, &input_ids.device());
        self.forward(input_ids, pos, None, None)
    }

    /// Through the LM head in chunks of tokens ([`crate::backend::linear_cross_entropy`]), so
    /// the `[tokens, vocab]` logits (5 GB in f32 for 8 x 1024 tokens of Qwen2.5) never exist at
    /// once, in the forward or the backward pass. A head with an adapter or a bias takes the
    /// default path, as do soft-capped logits (Gemma 2), which the chunked loss does not cap.
    fn summed_loss(&self, batch: &Batch<B>) -> Tensor<B, 1> {
        let Some((hidden, weight, labels, chunk)) = self.chunked_head_inputs(batch) else {
            return summed_cross_entropy(self.logits(batch.input_ids.clone()), batch);
        };
        let mean = crate::backend::linear_cross_entropy(hidden, weight, labels, chunk);
        mean.mul_scalar(batch.num_items.max(1) as f64)
    }

    /// Row by row through the chunked LM-head loss (the hidden states of all rows come from one
    /// forward pass), so no `[rows, len, vocab]` logits are held; the same fallbacks as
    /// [`CausalModel::summed_loss`].
    fn row_log_probs(&self, batch: &Batch<B>) -> Tensor<B, 1> {
        let Some((hidden, weight, labels, chunk)) = self.chunked_head_inputs(batch) else {
            return row_log_probs(self.logits(batch.input_ids.clone()), batch);
        };
        let (len, hidden_size) = (batch.len, hidden.dims()[1]);
        let per_row: Vec<Tensor<B, 1>> = (0..batch.rows)
            .map(|r| {
                let span = r * len..(r + 1) * len;
                crate::backend::linear_cross_entropy(
                    hidden.clone().slice([span.clone(), 0..hidden_size]),
                    weight.clone(),
                    labels.clone().slice([span]),
                    chunk,
                )
                .mul_scalar(-(batch.row_items[r] as f64))
            })
            .collect();
        Tensor::cat(per_row, 0)
    }
}

impl<B: Backend> CausalLm<B> {
    /// What the chunked LM-head loss takes for `batch`: hidden states `[rows * len, hidden]`, the
    /// head's weight, labels with ignored targets at -100, and the chunk length. `None` where the
    /// logits need more than a plain matmul: a head with an adapter or a bias, or soft-capped
    /// logits (Gemma 2), which the chunked loss does not cap.
    #[allow(clippy::type_complexity)]
    fn chunked_head_inputs(
        &self,
        batch: &Batch<B>,
    ) -> Option<(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1, Int>, usize)> {
        if self.config.variant.final_logit_softcapping.is_some() {
            return None;
        }
        let weight = match &self.lm_head {
            None => self.model.embed_tokens.weight.val(),
            Some(head) if head.lora_a.is_none() && head.bias.is_none() => head.weight.val(),
            Some(_) => return None,
        };
        let (rows, len) = (batch.rows, batch.len);
        let device = batch.input_ids.device();
        let hidden = self.hidden_states(
            batch.input_ids.clone(),
            positions(rows, len, 0, &device),
            None,
            None,
        );
        let hidden_size = hidden.dims()[2];
        let ignored = batch.weights.clone().equal_elem(0.0);
        let labels = batch
            .targets
            .clone()
            .reshape([rows * len])
            .mask_fill(ignored, crate::backend::cross_entropy::IGNORE_INDEX);
        let vocab = weight.dims()[0].max(1);
        Some((
            hidden.reshape([rows * len, hidden_size]),
            weight,
            labels,
            (LOSS_CHUNK_LOGITS / vocab).max(1),
        ))
    }
}

/// Fine-tunes `base` on `train` and writes checkpoints, `metrics.jsonl` and the method's
/// outputs (`adapter/`, `merged/` or `model/`) under `out_dir`.
pub fn train_sft<B: AutodiffBackend>(
    cfg: &SftConfig,
    base: BaseModel<'_>,
    train: &[TokenizedExample],
    eval: &[TokenizedExample],
    out_dir: &Path,
    device: &B::Device,
    progress: Option<&MultiProgress>,
) -> Result<SftReport, Error> {
    run_sft::<B, [TokenizedExample]>(cfg, base, train, eval, out_dir, device, progress, None)
}

/// [`train_sft`] that stops after optimizer step `stop_after` (tests: an interrupted run).
/// The base model for training, with the recipe's activation checkpointing; under QLoRA its
/// projections are quantized as they load.
pub(crate) fn training_base<B: AutodiffBackend>(
    cfg: &SftConfig,
    config: &ModelConfig,
    tensors: &std::collections::BTreeMap<String, crate::model::hf::HostTensor>,
    device: &B::Device,
) -> Result<CausalLm<B>, Error> {
    let mut model = if cfg.method == Method::Qlora {
        CausalLm::<B>::from_hf_tensors_nf4(config, tensors, device)?
    } else {
        CausalLm::<B>::from_hf_tensors(config, tensors, device)?
    };
    model.checkpointing = cfg.gradient_checkpointing;
    Ok(model)
}

/// Trains `base` with `cfg`'s method on the objective of `train` (SFT examples, preference
/// pairs), evaluating on `eval`, and writes the method's outputs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_sft<B: AutodiffBackend, O: Objective + ?Sized>(
    cfg: &SftConfig,
    base: BaseModel<'_>,
    train: &O,
    eval: &O,
    out_dir: &Path,
    device: &B::Device,
    progress: Option<&MultiProgress>,
    stop_after: Option<u64>,
) -> Result<SftReport, Error> {
    cfg.validate()?;
    let base_dir = match base {
        BaseModel::Dir(dir) => Some(dir.to_path_buf()),
        BaseModel::Loaded { .. } => None,
    };
    let (config, tensors, base_name) = match base {
        BaseModel::Dir(dir) => (
            ModelConfig::from_file(dir.join("config.json"))?,
            load_hf_folder_tensors(dir)?,
            Some(dir.display().to_string()),
        ),
        BaseModel::Loaded { config, tensors } => (config.clone(), tensors.clone(), None),
    };
    if train.is_empty() {
        return Err(Error::NoExamples);
    }
    train.validate("train", config.vocab_size)?;
    eval.validate("eval", config.vocab_size)?;
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let ctx = LoopCtx {
        cfg,
        train,
        eval,
        out_dir,
        pad_id: config.pad_token_id.unwrap_or(0),
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
            let mut adapter =
                LoraAdapterConfig::new(cfg.lora_r, cfg.lora_alpha, cfg.target_modules.clone());
            adapter.lora_dropout = cfg.lora_dropout;
            adapter.use_rslora = cfg.use_rslora;
            adapter.use_dora = cfg.use_dora;
            adapter.base_model_name_or_path = base_name;
            let mut model = training_base::<B>(cfg, &config, &tensors, device)?;
            drop(tensors);
            if cfg.method == Method::Qlora {
                model = quantize_base_nf4(model)?;
            }
            let (model, wrapped) = add_lora(model, &adapter, cfg.seed, device)?;
            if wrapped == 0 {
                return Err(Error::NoTargets);
            }
            let save_adapter = |m: &CausalLm<B>, dir: &Path| -> Result<(), Error> {
                let m = m.valid();
                Ok(write_adapter_with_magnitudes(
                    dir,
                    &adapter,
                    &lora_pairs(&m),
                    &lora_magnitudes(&m),
                )?)
            };
            let (model, mut report) =
                train_loop::<B, _, O>(&ctx, model, device, &save_adapter, &mut ())?;
            let adapter_dir = out_dir.join("adapter");
            save_adapter(&model, &adapter_dir)?;
            report.adapter_dir = Some(adapter_dir);
            if cfg.write_merged {
                report.model_dir = Some(save_merged(out_dir, &config, model.valid(), dtype)?);
            }
            Ok(report)
        }
        Method::Full => {
            let model = training_base::<B>(cfg, &config, &tensors, device)?;
            drop(tensors);
            let (model, mut report) =
                train_loop::<B, _, O>(&ctx, model, device, &|_, _| Ok(()), &mut ())?;
            let model_dir = out_dir.join("model");
            save_hf_folder(&model_dir, &config, &model.valid().to_hf_tensors(), dtype)?;
            report.model_dir = Some(model_dir);
            Ok(report)
        }
        Method::Prefix => {
            if cfg.gradient_checkpointing != GradientCheckpointing::Off {
                // The prefix enters every layer through the KV cache, which the checkpointed
                // layers do not take; the layers keep their activations.
                tracing::warn!(
                    "sft: gradient_checkpointing = {} has no effect with method = \"prefix\"",
                    cfg.gradient_checkpointing
                );
            }
            let base = training_base::<B>(cfg, &config, &tensors, device)?;
            drop(tensors);
            let model = PrefixLm::new(base, cfg, device);
            let save = |m: &PrefixLm<B>, dir: &Path| {
                write_prefix_adapter(&m.valid(), cfg, base_name.as_deref(), dir)
            };
            let (model, mut report) = train_loop::<B, _, O>(&ctx, model, device, &save, &mut ())?;
            let adapter_dir = out_dir.join("adapter");
            save(&model, &adapter_dir)?;
            report.adapter_dir = Some(adapter_dir);
            Ok(report)
        }
        Method::Adalora => {
            crate::trainer::adalora::run::<B, O>(&ctx, &config, tensors, base_name, dtype, device)
        }
        Method::PromptTuning | Method::PTuning => {
            let init_ids = prompt_init_ids(cfg, base_dir.as_deref())?;
            let base = training_base::<B>(cfg, &config, &tensors, device)?;
            drop(tensors);
            let model = PromptLm::new(base, cfg, init_ids.as_deref(), device);
            let save = |m: &PromptLm<B>, dir: &Path| {
                write_virtual_adapter(&m.valid(), cfg, base_name.as_deref(), dir)
            };
            let (model, mut report) = train_loop::<B, _, O>(&ctx, model, device, &save, &mut ())?;
            let adapter_dir = out_dir.join("adapter");
            save(&model, &adapter_dir)?;
            report.adapter_dir = Some(adapter_dir);
            Ok(report)
        }
    }
}

/// What one training run works on: the settings, the data sets and their objective
/// ([`Objective`]: SFT examples by default, preference pairs, ...), where outputs go.
pub(crate) struct LoopCtx<'a, O: Objective + ?Sized = [TokenizedExample]> {
    pub cfg: &'a SftConfig,
    pub train: &'a O,
    pub eval: &'a O,
    pub out_dir: &'a Path,
    pub pad_id: u32,
    pub stop_after: Option<u64>,
    pub progress: Option<&'a MultiProgress>,
}

/// Seconds the host spent in each phase of the steps since the last log line. On the CPU that is
/// the phase's compute; on a GPU the time to queue its kernels, which run behind, so a phase
/// that takes most of the step there means the step is bound by the host, not the device.
///
/// With `RUNNER_SYNC_PHASES=1` in the environment each phase waits for the device before the
/// clock stops, so the times are the device's (and the step slower): compare the two to see
/// which side bounds a step.
#[derive(Default)]
struct PhaseClock {
    forward_s: f64,
    backward_s: f64,
    update_s: f64,
    steps: u64,
}

impl PhaseClock {
    fn sync<B: Backend>(&self, device: &B::Device) {
        static SYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *SYNC.get_or_init(|| std::env::var("RUNNER_SYNC_PHASES").is_ok_and(|v| v == "1")) {
            // A failed sync surfaces at the next read of a device value; the clock only measures.
            let _ = B::sync(device);
        }
    }

    /// Adds the per-step means to `row` (`window_s`: the window's wall time, so `other_s` is
    /// what no phase accounts for: waiting on the device, logging, checkpoints) and restarts.
    fn take_into(&mut self, row: MetricsRow, window_s: f64) -> MetricsRow {
        let steps = self.steps.max(1) as f64;
        let issued = self.forward_s + self.backward_s + self.update_s;
        let row = row
            .with("forward_s", self.forward_s / steps)
            .with("backward_s", self.backward_s / steps)
            .with("update_s", self.update_s / steps)
            .with("other_s", (window_s - issued).max(0.0) / steps);
        *self = Self::default();
        row
    }
}

/// Token-mean cross-entropy over `examples` (one host read at the end).
pub fn evaluate<B: Backend, M: CausalModel<B>>(
    model: &M,
    examples: &[TokenizedExample],
    batch_size: usize,
    max_tokens: Option<usize>,
    pad_id: u32,
    device: &B::Device,
) -> Option<f64> {
    if examples.iter().all(|e| e.num_items() == 0) {
        return None;
    }
    evaluate_objective(model, examples, batch_size, max_tokens, pad_id, device).map(|(l, _)| l)
}

pub(crate) fn resident_memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub(crate) type SaveHook<'a, M> = dyn Fn(&M, &Path) -> Result<(), Error> + 'a;

/// `row` with the evaluation set's loss and statistics (as `eval_*`), `last_eval` set to the loss.
fn eval_row<B, M, O>(
    model: &M,
    ctx: &LoopCtx<'_, O>,
    mut row: MetricsRow,
    device: &B::Device,
    last_eval: &mut Option<f64>,
) -> MetricsRow
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    M::InnerModule: CausalModel<B::InnerBackend>,
    O: Objective + ?Sized,
{
    let cfg = ctx.cfg;
    let evaluated = evaluate_objective(
        &model.valid(),
        ctx.eval,
        cfg.batch_size,
        cfg.max_tokens_per_batch,
        ctx.pad_id,
        device,
    );
    if let Some((loss, stats)) = evaluated {
        *last_eval = Some(loss);
        row.eval_loss = Some(loss);
        for (name, value) in stats {
            row = row.with(&format!("eval_{name}"), value);
        }
    }
    row
}

pub(crate) fn train_loop<B, M, O>(
    ctx: &LoopCtx<'_, O>,
    mut model: M,
    device: &B::Device,
    save_extra: &SaveHook<'_, M>,
    hook: &mut dyn StepHook<B, M>,
) -> Result<(M, SftReport), Error>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + CausalModel<B>,
    M::InnerModule: CausalModel<B::InnerBackend>,
    O: Objective + ?Sized,
{
    let cfg = ctx.cfg;
    // `gpu_peak_mb` in the metrics counts from here (the model's weights included).
    crate::backend::reset_accelerator_peak::<B>();
    let lengths: Vec<usize> = (0..ctx.train.len()).map(|i| ctx.train.tokens(i)).collect();
    let plan = plan_steps(
        &lengths,
        cfg.seed,
        cfg.batch_size,
        cfg.max_tokens_per_batch,
        cfg.gradient_accumulation_steps,
        cfg.epochs,
        cfg.max_steps,
    );
    let total = plan.len() as u64;
    let schedule = cfg.schedule_config().build(cfg.learning_rate, total)?;
    let (trainable, total_params) = trainable_params::<B, M>(&model);
    let trainable_count: usize = trainable
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let mut opt = AdamW::<B::InnerBackend>::new(cfg.optimizer_keys().adamw());
    let metrics_path = ctx.out_dir.join("metrics.jsonl");
    let (mut start, mut pending_sum, mut pending_steps, mut tokens_seen) = (0u64, 0f64, 0u64, 0u64);
    let mut resumed_from = None;
    if cfg.resume {
        if let Some(dir) = latest_checkpoint(ctx.out_dir)? {
            let ck = load_checkpoint(&dir)?;
            let bad = |message: String| Error::Checkpoint {
                path: dir.clone(),
                message,
            };
            if ck.state.method != cfg.method
                || ck.state.total_steps != total
                || ck.state.num_train_examples != ctx.train.len()
            {
                return Err(bad(format!(
                    "saved for method {:?}, {} steps, {} examples; this run has {:?}, {total}, {}",
                    ck.state.method,
                    ck.state.total_steps,
                    ck.state.num_train_examples,
                    cfg.method,
                    ctx.train.len()
                )));
            }
            let (m, assigned) = assign_values::<B, M>(model, &ck.trainable, device);
            model = m;
            if let Some(missing) = trainable.iter().find(|p| !assigned.contains(&p.path)) {
                return Err(bad(format!(
                    "no saved tensor for trainable parameter `{}`",
                    missing.path
                )));
            }
            opt.load_host(&ck.optimizer, &ck.state.adam_steps, device)
                .map_err(|name| bad(format!("optimizer tensor `{name}` is missing")))?;
            hook.load(&dir)?;
            start = ck.state.step;
            pending_sum = ck.state.pending_loss_sum;
            pending_steps = ck.state.pending_steps;
            tokens_seen = ck.state.tokens_seen;
            resumed_from = Some(start);
            // Said on the console, not only in the log: a resumed run must not look fresh.
            let note = format!("resuming sft from checkpoint-{start}");
            match ctx.progress {
                Some(mp) if !mp.is_hidden() => {
                    let _ = mp.println(format!("  {note}"));
                }
                Some(_) => eprintln!("  {note}"),
                None => tracing::info!("{note}"),
            }
        }
    }
    let mut metrics = if start > 0 {
        MetricsLog::resume(&metrics_path, start)?
    } else {
        MetricsLog::create(&metrics_path)?
    };
    let bar = match ctx.progress {
        Some(mp) => mp.add(ProgressBar::new(total)),
        None => ProgressBar::hidden(),
    };
    if let Ok(style) = ProgressStyle::with_template(
        "sft {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_position(start);

    let mut loss_acc: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut last_loss = None;
    let mut last_eval = None;
    if start == 0 && cfg.eval_on_start && !ctx.eval.is_empty() {
        let r = eval_row(&model, ctx, MetricsRow::new(0), device, &mut last_eval);
        metrics.append(&r)?;
    }
    let mut window_tokens = 0u64;
    let mut window_start = Instant::now();
    let mut phases = PhaseClock::default();
    let mut stat_window = StatWindow::<B::InnerBackend>::default();
    for index in start..total {
        let planned = &plan[index as usize];
        // Dropout masks depend on (seed, step) only, so a resumed run draws the same ones.
        B::seed(
            device,
            cfg.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(index + 1),
        );
        let step_totals = totals(ctx.train, planned.micro_batches.iter().flatten().copied());
        let profiled = crate::backend::profiled_step() == Some(index + 1);
        if profiled {
            let _ = B::sync(device);
            crate::backend::set_profiler(true);
        }
        let mut accumulator = GradientsAccumulator::<M>::new();
        let mut step_loss: Option<Tensor<B::InnerBackend, 1>> = None;
        for mb in &planned.micro_batches {
            let forward_start = Instant::now();
            let micro = ctx
                .train
                .micro_loss(&model, mb, step_totals, ctx.pad_id, device);
            window_tokens += micro.tokens as u64;
            stat_window.add(
                micro
                    .stats
                    .into_iter()
                    .map(|s| Stat {
                        name: s.name,
                        sum: s.sum.inner(),
                        count: s.count,
                    })
                    .collect(),
            );
            let mut loss = micro.loss;
            if let Some(reg) = model.regularizer() {
                // Once per optimizer step in total, spread over its micro-batches.
                loss = loss.add(reg.div_scalar(planned.micro_batches.len() as f64));
            }
            let detached = loss.clone().inner();
            step_loss = Some(match step_loss {
                Some(acc) => acc.add(detached),
                None => detached,
            });
            phases.sync::<B>(device);
            let backward_start = Instant::now();
            phases.forward_s += (backward_start - forward_start).as_secs_f64();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
            phases.sync::<B>(device);
            phases.backward_s += backward_start.elapsed().as_secs_f64();
        }
        let update_start = Instant::now();
        let mut grads = accumulator.grads();
        let norm = global_grad_norm::<B, M>(&model, &grads, device);
        let scale = cfg
            .max_grad_norm
            .filter(|&m| m > 0.0)
            .map(|m| clip_scale(norm.clone(), m));
        let lr = schedule.lr_at(index);
        hook.before_step(&model, &grads, scale.as_ref());
        model = opt.step::<B, M>(model, &mut grads, lr, scale);
        model = hook.after_step(model, index);
        crate::backend::memory::check_limit::<B>(device)?;
        phases.sync::<B>(device);
        phases.update_s += update_start.elapsed().as_secs_f64();
        if profiled {
            let _ = B::sync(device);
            crate::backend::set_profiler(false);
        }
        phases.steps += 1;
        let step = index + 1;
        if let Some(l) = step_loss {
            loss_acc = Some(match loss_acc {
                Some(acc) => acc.add(l),
                None => l,
            });
        }
        pending_steps += 1;
        bar.inc(1);

        let mut row = None;
        let logging = step % cfg.logging_steps == 0 || step == total;
        let saving = cfg.save_steps > 0 && step % cfg.save_steps == 0;
        // Read back only where the host needs the numbers anyway (a log row, a checkpoint):
        // a diverged step poisons every later loss, so the window's sum still shows it, and
        // nothing non-finite reaches a checkpoint.
        let mut norm_value = None;
        if logging || saving {
            let window: f64 = loss_acc.take().map_or(0.0, |t| t.into_scalar().elem());
            pending_sum += window;
            let grad_norm: f64 = norm.clone().into_scalar().elem();
            for (what, value) in [("loss", pending_sum), ("gradient norm", grad_norm)] {
                if !value.is_finite() {
                    bar.abandon();
                    return Err(Error::NonFinite { what, step, lr });
                }
            }
            norm_value = Some(grad_norm);
        }
        if logging {
            let loss = pending_sum / pending_steps as f64;
            let secs = window_start.elapsed().as_secs_f64();
            let tokens_per_s = (secs > 0.0).then(|| window_tokens as f64 / secs);
            tokens_seen += window_tokens;
            let mut r = MetricsRow::new(step).with("epoch", planned.epoch);
            r.loss = Some(loss);
            r.lr = Some(lr);
            r.grad_norm = norm_value;
            r.tokens_per_s = tokens_per_s;
            r = phases.take_into(r, secs);
            for (name, value) in stat_window.take() {
                r = r.with(name, value);
            }
            r.memory_mb = resident_memory_mb();
            if let Some(gpu) = crate::backend::accelerator_memory_mb::<B>() {
                r = r.with("gpu_memory_mb", gpu);
            }
            if let Some(peak) = crate::backend::accelerator_peak_mb::<B>() {
                r = r.with("gpu_peak_mb", peak);
            }
            bar.set_message(format!(
                "loss {loss:.4} {:.0} tok/s",
                tokens_per_s.unwrap_or(0.0)
            ));
            last_loss = Some(loss);
            (pending_sum, pending_steps, window_tokens) = (0.0, 0, 0);
            window_start = Instant::now();
            row = Some(r);
        }
        if !ctx.eval.is_empty()
            && ((cfg.eval_steps > 0 && step % cfg.eval_steps == 0) || step == total)
        {
            let r = row.take().unwrap_or_else(|| MetricsRow::new(step));
            let r = eval_row(&model, ctx, r, device, &mut last_eval);
            row = Some(r);
        }
        if let Some(r) = row {
            metrics.append(&r)?;
        }
        if saving {
            let (optimizer, adam_steps) = opt.to_host();
            let state = TrainerState {
                format_version: FORMAT_VERSION,
                method: cfg.method,
                step,
                epoch: planned.epoch,
                total_steps: total,
                seed: cfg.seed,
                num_train_examples: ctx.train.len(),
                tokens_seen: tokens_seen + window_tokens,
                pending_loss_sum: pending_sum,
                pending_steps,
                adam_steps,
            };
            save_checkpoint(
                ctx.out_dir,
                &state,
                &trainable_values::<B, M>(&model),
                &optimizer,
                |dir| {
                    save_extra(&model, dir)?;
                    hook.save(&model, dir)
                },
            )?;
        }
        if ctx.stop_after == Some(step) {
            break;
        }
    }
    bar.finish();
    let done = ctx.stop_after.map_or(total, |s| s.min(total)).max(start);
    Ok((
        model,
        SftReport {
            steps: done,
            resumed_from,
            last_loss,
            eval_loss: last_eval,
            trainable_params: trainable_count,
            total_params,
            tokens_seen: tokens_seen + window_tokens,
            metrics_path,
            adapter_dir: None,
            model_dir: None,
        },
    ))
}
