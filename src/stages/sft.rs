//! `sft`: supervised fine-tuning (LoRA, QLoRA, full, P-Tuning v2) of a base model on tokenized
//! data. The training loop lives in [`crate::trainer`]; this stage wires artifacts to it.
//!
//! Output: `adapter/` (PEFT format; LoRA, QLoRA, prefix), `merged/` (LoRA) or `model/` (full),
//! `metrics.jsonl`, loss/learning-rate charts (SVG), `checkpoint-N/` and `sft.json`.

use super::tokenize::read_tokens;
use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::model::device::{
    resolves_to_cpu, run_on_device, run_on_device_bf16, BackendTask, DeviceChoice,
};
use crate::trainer::sft::{train_sft, BaseModel};
use crate::trainer::{Precision, SftConfig, TokenizedExample};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use std::path::{Path, PathBuf};

pub struct Sft;

/// Moves a training run's finished outputs from `work` into the artifact (the checkpoint folder
/// goes away with `work`), gives every model folder in it (`merged/`, `model/`, `adapter/`) the
/// base model's tokenizer files so it is usable on its own, and draws the training charts.
/// Shared by the `sft` and `grpo` stages.
pub(super) fn finish_training_artifact(
    ctx: &StageContext,
    work: &Path,
    base_dir: &Path,
) -> Result<(), StageError> {
    for entry in std::fs::read_dir(work)
        .map_err(|e| StageError::io(work, e))?
        .flatten()
    {
        let target = ctx.out_dir.join(entry.file_name());
        std::fs::rename(entry.path(), &target).map_err(|e| StageError::io(&target, e))?;
    }
    let _ = std::fs::remove_dir_all(work);
    for sub in ["merged", "model", "adapter"] {
        let dir = ctx.out(sub);
        if !dir.is_dir() {
            continue;
        }
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ] {
            let (from, to) = (base_dir.join(name), dir.join(name));
            if from.is_file() && !to.exists() {
                std::fs::copy(&from, &to).map_err(|e| StageError::io(&from, e))?;
            }
        }
    }
    if let Err(e) = crate::charts::write_training_charts(&ctx.out_dir) {
        tracing::warn!("could not draw training charts: {e}");
    }
    Ok(())
}

struct TrainTask<'a> {
    cfg: &'a SftConfig,
    model_dir: &'a Path,
    train: &'a [TokenizedExample],
    eval: &'a [TokenizedExample],
    out: &'a Path,
    progress: &'a indicatif::MultiProgress,
}

impl TrainTask<'_> {
    fn train<AB: AutodiffBackend>(
        self,
        device: &AB::Device,
    ) -> Result<crate::trainer::sft::SftReport, crate::trainer::Error> {
        let base = BaseModel::Dir(self.model_dir);
        train_sft::<AB>(
            self.cfg,
            base,
            self.train,
            self.eval,
            self.out,
            device,
            Some(self.progress),
        )
    }
}

impl BackendTask for TrainTask<'_> {
    type Output = Result<crate::trainer::sft::SftReport, crate::trainer::Error>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        // Activation checkpointing is the model's own (`CausalLm::checkpointing`), not burn's
        // checkpoint strategy, so one autodiff backend serves every setting.
        self.train::<Autodiff<B>>(&device)
    }
}

/// Runs a training task in `precision`: bf16 (with f32 masters) on CUDA; on the CPU, which
/// has no bf16, in f32 with a warning. Also says whether bf16 was used.
pub(super) fn run_with_precision<T: BackendTask>(
    device: DeviceChoice,
    precision: Precision,
    stage: &str,
    task: T,
) -> Result<(T::Output, bool), crate::model::device::DeviceError> {
    let bf16 = precision == Precision::Bf16 && !resolves_to_cpu(device);
    if precision == Precision::Bf16 && !bf16 {
        tracing::warn!(
            "{stage}: precision = \"bf16\" needs CUDA; device {device} runs on the CPU, training in f32"
        );
    }
    // An allocation failure anywhere in the task ends it as an error, not a crash.
    let output = crate::backend::memory::catch_out_of_memory(&device.to_string(), || {
        if bf16 {
            run_on_device_bf16(device, task)
        } else {
            run_on_device(device, task)
        }
    })??;
    Ok((output, bf16))
}

/// The inputs of a stage that trains on tokens: the data and the model it starts from (a model,
/// or a trained stage whose merged or full model it continues).
pub(super) const TRAINING_INPUTS: &[InputSlot] = &[
    InputSlot::one("input", &[ArtifactKind::Tokens]),
    InputSlot::one("model", &[ArtifactKind::Model, ArtifactKind::Trained]),
];

/// Keys of a training stage that change how it is logged and checkpointed, not what it computes.
pub(super) const TRAINING_OPERATIONAL_KEYS: &[&str] = &["resume", "save_steps", "logging_steps"];

/// The stage's work folder, created, and whether it holds an interrupted run of this very stage
/// (whose checkpoints the run then picks up).
pub(super) fn training_work_dir(ctx: &StageContext) -> Result<(PathBuf, bool), StageError> {
    let work = ctx.work_dir.clone();
    std::fs::create_dir_all(&work).map_err(|e| StageError::io(&work, e))?;
    let interrupted = work.join("metrics.jsonl").exists();
    Ok((work, interrupted))
}

/// The recipe's device.
pub(super) fn stage_device(ctx: &StageContext) -> Result<DeviceChoice, StageError> {
    ctx.device.parse().map_err(StageError::wrap)
}

/// [`run_with_precision`] with the device's and the training's errors as stage errors.
pub(super) fn train_with_precision<T, R, E>(
    device: DeviceChoice,
    precision: Precision,
    stage: &str,
    task: T,
) -> Result<(R, bool), StageError>
where
    T: BackendTask<Output = Result<R, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let (report, bf16) =
        run_with_precision(device, precision, stage, task).map_err(StageError::wrap)?;
    Ok((report.map_err(StageError::wrap)?, bf16))
}

fn examples(rows: Vec<super::tokenize::TokenRow>) -> Vec<TokenizedExample> {
    rows.into_iter()
        .map(|r| TokenizedExample {
            input_ids: r.input_ids,
            labels: r.labels,
        })
        .collect()
}

impl Stage for Sft {
    type Params = SftConfig;
    const KIND: &'static str = "sft";
    const VERSION: u32 = 2;
    const OUTPUT: ArtifactKind = ArtifactKind::Trained;
    const SUMMARY: &'static str = "supervised fine-tuning: LoRA, QLoRA, full or P-Tuning v2";

    fn operational_keys() -> &'static [&'static str] {
        TRAINING_OPERATIONAL_KEYS
    }

    fn input_slots() -> &'static [InputSlot] {
        TRAINING_INPUTS
    }

    fn validate(params: &SftConfig) -> Result<(), (String, String)> {
        params
            .validate()
            .map_err(|e| (String::new(), e.to_string()))
    }

    fn heavy() -> bool {
        true
    }

    fn run(params: &SftConfig, ctx: &StageContext) -> Result<(), StageError> {
        let data = ctx.input("input")?;
        let model = ctx.input("model")?;
        // A trained stage's merged or full model continues from where it ended (SFT, then GRPO).
        let model_dir = super::evaluate::model_folder(model.kind, &model.dir)?;
        let train = examples(read_tokens(
            &data.dir,
            data.output.as_deref().unwrap_or("train"),
        )?);
        let eval = if data.output.is_none() {
            examples(read_tokens(&data.dir, "test")?)
        } else {
            Vec::new()
        };
        if train.is_empty() {
            return Err(StageError::msg(
                "the tokenized input has no training examples",
            ));
        }
        let device = stage_device(ctx)?;
        let (work, interrupted) = training_work_dir(ctx)?;
        let mut cfg = params.clone();
        cfg.resume = cfg.resume || interrupted;
        let task = TrainTask {
            cfg: &cfg,
            model_dir: &model_dir,
            train: &train,
            eval: &eval,
            out: &work,
            progress: &ctx.progress,
        };
        let (report, bf16) = train_with_precision(device, cfg.precision, "sft", task)?;
        finish_training_artifact(ctx, &work, &model_dir)?;
        crate::util::write_json(
            &ctx.out("sft.json"),
            &serde_json::json!({
                "method": cfg.method,
                "steps": report.steps,
                "resumed_from": report.resumed_from,
                "last_loss": report.last_loss,
                "eval_loss": report.eval_loss,
                "trainable_params": report.trainable_params,
                "total_params": report.total_params,
                "tokens_seen": report.tokens_seen,
                "device": ctx.device,
                "precision": if bf16 { "bf16 (f32 masters)" } else { "f32" },
            }),
        )
    }
}
