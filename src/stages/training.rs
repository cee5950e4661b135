//! What the training stages (`sft`, the preference kinds, `grpo`) share: their inputs and
//! operational keys, their work folder, the device and precision they train in (the one place
//! that chooses between the f32 and bf16 backends), and finishing their artifact.

use std::path::{Path, PathBuf};

use crate::model::device::{
    resolves_to_cpu, run_on_device, run_on_device_bf16, BackendTask, DeviceChoice,
};
use crate::stages::{ArtifactKind, InputSlot, StageContext, StageError};
use crate::train::Precision;

/// Moves a training run's finished outputs from `work` into the artifact (the checkpoint folder
/// goes away with `work`), gives every model folder in it (`merged/`, `model/`, `adapter/`) the
/// base model's tokenizer files so it is usable on its own, and draws the training charts.
/// Shared by the `sft` and `grpo` stages.
pub(crate) fn finish_training_artifact(
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

/// Runs a training task in `precision`: bf16 (with f32 masters) on CUDA; on the CPU, which
/// has no bf16, in f32 with a warning. Also says whether bf16 was used.
pub(crate) fn run_with_precision<T: BackendTask>(
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
pub(crate) const TRAINING_INPUTS: &[InputSlot] = &[
    InputSlot::one("input", &[ArtifactKind::Tokens]),
    InputSlot::one("model", &[ArtifactKind::Model, ArtifactKind::Trained]),
];

/// Keys of a training stage that change how it is logged and checkpointed, not what it computes.
pub(crate) const TRAINING_OPERATIONAL_KEYS: &[&str] = &["resume", "save_steps", "logging_steps"];

/// The stage's work folder, created, and whether it holds an interrupted run of this very stage
/// (whose checkpoints the run then picks up).
pub(crate) fn training_work_dir(ctx: &StageContext) -> Result<(PathBuf, bool), StageError> {
    let work = ctx.work_dir.clone();
    std::fs::create_dir_all(&work).map_err(|e| StageError::io(&work, e))?;
    let interrupted = work.join("metrics.jsonl").exists();
    Ok((work, interrupted))
}

/// The recipe's device.
pub(crate) fn stage_device(ctx: &StageContext) -> Result<DeviceChoice, StageError> {
    ctx.device.parse().map_err(StageError::wrap)
}

/// [`run_with_precision`] with the device's and the training's errors as stage errors.
pub(crate) fn train_with_precision<T, R, E>(
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
