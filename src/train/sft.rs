//! Supervised training: each method's model built from the base (LoRA, QLoRA, DoRA, full,
//! prefix, prompt learning; AdaLoRA in `adalora.rs`), trained by the one loop
//! ([`crate::train::train_loop`]) on a step plan over an [`Objective`] (SFT examples,
//! preference pairs), then the method's outputs.
//!
//! Reference: transformers `Trainer` (loss scaled by `num_items_in_batch`). `eval_loss` is the
//! token mean over the whole eval set (transformers averages per-batch means).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use indicatif::MultiProgress;

use crate::model::config::ModelConfig;
use crate::model::decoder::{CausalLm, GradientCheckpointing};
use crate::model::hf::{load_hf_folder_tensors, save_hf_folder, DType, HostTensor};
use crate::peft::files::LoraAdapterConfig;
use crate::peft::lora::{add_lora, quantize_base_nf4, save_merged, write_model_adapter};
use crate::train::config::{Method, SaveDtype, SftConfig};
use crate::train::data::{
    plan_steps, positions, row_log_probs, summed_cross_entropy, Batch, PlannedStep,
    TokenizedExample,
};
use crate::train::metrics_log::MetricsRow;
use crate::train::objective::{evaluate_objective, totals, MicroLoss, Objective, StepTotals};
use crate::train::prefix::{write_prefix_adapter, PrefixLm};
use crate::train::prompt::{prompt_init_ids, write_virtual_adapter, PromptLm};
use crate::train::train_loop::{train_loop, LoopRun, StepShape, StepSource};
pub(crate) use crate::train::train_loop::{SaveHook, StepHook};
use crate::train::Error;

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
        let weight = self.plain_head_weight()?;
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
                Ok(write_model_adapter(dir, &adapter, &m.valid())?)
            };
            let (model, mut report) = train_adapter::<B, _, O>(&ctx, model, device, &save_adapter)?;
            if cfg.write_merged && crate::dist::is_leader() {
                report.model_dir = Some(save_merged(out_dir, &config, model.valid(), dtype)?);
            }
            Ok(report)
        }
        Method::Full => {
            let model = training_base::<B>(cfg, &config, &tensors, device)?;
            drop(tensors);
            let (model, mut report) =
                train_objective::<B, _, O>(&ctx, model, device, &|_, _| Ok(()), &mut ())?;
            let model_dir = out_dir.join("model");
            if crate::dist::is_leader() {
                save_hf_folder(&model_dir, &config, &model.valid().to_hf_tensors(), dtype)?;
            }
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
            Ok(train_adapter::<B, _, O>(&ctx, model, device, &save)?.1)
        }
        Method::Adalora => {
            crate::train::adalora::run::<B, O>(&ctx, &config, tensors, base_name, dtype, device)
        }
        Method::PromptTuning | Method::PTuning => {
            let init_ids = prompt_init_ids(cfg, base_dir.as_deref())?;
            let base = training_base::<B>(cfg, &config, &tensors, device)?;
            drop(tensors);
            let model = PromptLm::new(base, cfg, init_ids.as_deref(), device);
            let save = |m: &PromptLm<B>, dir: &Path| {
                write_virtual_adapter(&m.valid(), cfg, base_name.as_deref(), dir)
            };
            Ok(train_adapter::<B, _, O>(&ctx, model, device, &save)?.1)
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

impl<O: Objective + ?Sized> LoopCtx<'_, O> {
    /// The optimizer steps of this run: its training units batched, accumulated and repeated
    /// over the epochs as the settings say (the same plan for a given seed).
    pub fn step_plan(&self) -> Vec<PlannedStep> {
        let cfg = self.cfg;
        let lengths: Vec<usize> = (0..self.train.len())
            .map(|i| self.train.tokens(i))
            .collect();
        plan_steps(
            &lengths,
            cfg.seed,
            cfg.batch_size,
            cfg.max_tokens_per_batch,
            cfg.gradient_accumulation_steps,
            cfg.epochs,
            cfg.max_steps,
        )
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

/// Trains a method whose output is an adapter (LoRA, prefix, prompt learning): checkpoints
/// carry it (`save`), and the trained one is written to `adapter/`.
fn train_adapter<B, M, O>(
    ctx: &LoopCtx<'_, O>,
    model: M,
    device: &B::Device,
    save: &SaveHook<'_, M>,
) -> Result<(M, SftReport), Error>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + CausalModel<B>,
    M::InnerModule: CausalModel<B::InnerBackend>,
    O: Objective + ?Sized,
{
    let (model, mut report) = train_objective::<B, M, O>(ctx, model, device, save, &mut ())?;
    let adapter_dir = ctx.out_dir.join("adapter");
    // Data parallel: the ranks hold the same weights; the leader writes them.
    if crate::dist::is_leader() {
        save(&model, &adapter_dir)?;
    }
    report.adapter_dir = Some(adapter_dir);
    Ok((model, report))
}

/// SFT's and the preference objectives' steps: a plan over the training set fixed before the
/// first step (shuffled per epoch, cut into micro-batches by size and token budget), evaluated
/// on the eval set's loss.
struct PlannedSteps<'a, O: Objective + ?Sized> {
    ctx: &'a LoopCtx<'a, O>,
    plan: Vec<PlannedStep>,
    current: usize,
    totals: StepTotals,
    last_eval: Option<f64>,
}

impl<'a, O: Objective + ?Sized> PlannedSteps<'a, O> {
    fn new(ctx: &'a LoopCtx<'a, O>) -> Self {
        let plan = ctx.step_plan();
        Self {
            ctx,
            plan,
            current: 0,
            totals: StepTotals::default(),
            last_eval: None,
        }
    }
}

impl<B, M, O> StepSource<B, M> for PlannedSteps<'_, O>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + CausalModel<B>,
    M::InnerModule: CausalModel<B::InnerBackend>,
    O: Objective + ?Sized,
{
    type Error = Error;

    fn label(&self) -> &'static str {
        "sft"
    }

    fn units(&self) -> (usize, &'static str) {
        (self.ctx.train.len(), "examples")
    }

    fn total_steps(&self) -> u64 {
        self.plan.len() as u64
    }

    fn begin_step(
        &mut self,
        _model: &M,
        index: u64,
        _device: &B::Device,
    ) -> Result<StepShape, Error> {
        self.current = index as usize;
        let planned = &self.plan[self.current];
        self.totals = totals(
            self.ctx.train,
            planned.micro_batches.iter().flatten().copied(),
        );
        Ok(StepShape {
            micro_batches: planned.micro_batches.len(),
            epoch: planned.epoch,
        })
    }

    fn micro_loss(&mut self, model: &M, micro_batch: usize, device: &B::Device) -> MicroLoss<B> {
        let units = &self.plan[self.current].micro_batches[micro_batch];
        self.ctx
            .train
            .micro_loss(model, units, self.totals, self.ctx.pad_id, device)
    }

    fn evaluates(&self) -> bool {
        !self.ctx.eval.is_empty()
    }

    fn evaluates_on_start(&self) -> bool {
        self.ctx.cfg.eval_on_start
    }

    /// `row` with the evaluation set's loss and statistics (as `eval_*`).
    fn evaluate(
        &mut self,
        model: &M,
        mut row: MetricsRow,
        device: &B::Device,
    ) -> Result<MetricsRow, Error> {
        let cfg = self.ctx.cfg;
        let evaluated = evaluate_objective(
            &model.valid(),
            self.ctx.eval,
            cfg.batch_size,
            cfg.max_tokens_per_batch,
            self.ctx.pad_id,
            device,
        );
        if let Some((loss, stats)) = evaluated {
            self.last_eval = Some(loss);
            row.eval_loss = Some(loss);
            for (name, value) in stats {
                row = row.with(&format!("eval_{name}"), value);
            }
        }
        Ok(row)
    }
}

/// Trains `model` on `ctx`'s objective with the one training loop.
pub(crate) fn train_objective<B, M, O>(
    ctx: &LoopCtx<'_, O>,
    model: M,
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
    let run = LoopRun {
        settings: ctx.cfg.loop_settings(),
        out_dir: ctx.out_dir,
        stop_after: ctx.stop_after,
        progress: ctx.progress,
    };
    let mut source = PlannedSteps::new(ctx);
    let (model, done) = train_loop::<B, M, _>(&run, &mut source, model, device, save_extra, hook)?;
    Ok((
        model,
        SftReport {
            steps: done.steps,
            resumed_from: done.resumed_from,
            last_loss: done.last_loss,
            eval_loss: source.last_eval,
            trainable_params: done.trainable_params,
            total_params: done.total_params,
            tokens_seen: done.tokens_seen,
            metrics_path: done.metrics_path,
            adapter_dir: None,
            model_dir: None,
        },
    ))
}
