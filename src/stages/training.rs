//! What the training stages (`sft`, the preference kinds, `grpo`) share: their inputs and
//! operational keys, their work folder, the device and precision they train in (the one place
//! that chooses between the f32 and bf16 backends), and finishing their artifact.

use std::path::Path;

use crate::model::device::{
    resolves_to_cpu, run_on_device, run_on_device_bf16, BackendTask, DeviceChoice,
};
use crate::stages::{ArtifactKind, InputSlot, StageContext, StageError};
use crate::train::Precision;

/// Trains in the stage's work folder unless it already holds this stage's finished training,
/// then makes the artifact from it. `train` gets the folder and whether it holds an interrupted
/// run (whose checkpoints it resumes) and returns the stage's summary, written last as
/// `summary_file`: its presence marks the training as finished. The folder outlives a failure
/// after training (a full disk while copying the tokenizer, a failed commit), so the rerun makes
/// the artifact without training again; the pipeline removes the folder once the artifact is
/// committed. Shared by the `sft`, preference and `grpo` stages.
pub(crate) fn train_in_work_folder(
    ctx: &StageContext,
    base_dir: &Path,
    summary_file: &str,
    train: impl FnOnce(&Path, bool) -> Result<serde_json::Value, StageError>,
) -> Result<(), StageError> {
    let work = ctx.work_dir.clone();
    std::fs::create_dir_all(&work).map_err(|e| StageError::io(&work, e))?;
    let summary_path = work.join(summary_file);
    if summary_path.is_file() {
        let note = format!(
            "  {}: training finished in an earlier run that failed after it; making the artifact from {}",
            ctx.stage_name,
            work.display()
        );
        // The rerun must not look as if it trained.
        crate::console::say(Some(&ctx.progress), &note);
    } else {
        let interrupted = work.join("metrics.jsonl").exists();
        let summary = train(&work, interrupted)?;
        // Data parallel: the other ranks trained beside rank 0, which writes the artifact.
        if !crate::dist::is_leader() {
            return Ok(());
        }
        // Through a temporary file, so a summary is either whole or absent.
        let partial = work.join(format!("{summary_file}.partial"));
        crate::stages::artifact::write_json(&partial, &summary)?;
        std::fs::rename(&partial, &summary_path).map_err(|e| StageError::io(&summary_path, e))?;
    }
    finish_training_artifact(ctx, &work, base_dir)
}

/// Links a finished training's outputs from `work` into the artifact (hard links, copies across
/// file systems; `work` stays whole until the commit), gives every model folder in it
/// (`merged/`, `model/`, `adapter/`) the base model's tokenizer files so it is usable on its own,
/// and draws the training charts.
fn finish_training_artifact(
    ctx: &StageContext,
    work: &Path,
    base_dir: &Path,
) -> Result<(), StageError> {
    link_tree(work, &ctx.out_dir)?;
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
    // Charts are new files of the artifact: written beside the links, never through them.
    if let Err(e) = crate::charts::write_training_charts(&ctx.out_dir) {
        tracing::warn!("could not draw training charts: {e}");
    }
    Ok(())
}

/// Recreates the tree under `from` in `to` with hard links (copies where linking fails, e.g.
/// across file systems), skipping temporary files (`*.tmp`, `*.partial`).
fn link_tree(from: &Path, to: &Path) -> Result<(), StageError> {
    std::fs::create_dir_all(to).map_err(|e| StageError::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| StageError::io(from, e))? {
        let entry = entry.map_err(|e| StageError::io(from, e))?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text.ends_with(".tmp") || text.ends_with(".partial") {
            continue;
        }
        let (source, target) = (entry.path(), to.join(&name));
        let kind = entry.file_type().map_err(|e| StageError::io(&source, e))?;
        if kind.is_dir() {
            link_tree(&source, &target)?;
        } else if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).map_err(|e| StageError::io(&target, e))?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn context(root: &Path) -> StageContext {
        StageContext {
            stage_name: "sft".into(),
            out_dir: root.join("out"),
            work_dir: root.join("work"),
            recipe_dir: root.to_path_buf(),
            seed: 1,
            device: "cpu".into(),
            inputs: Vec::new(),
            progress: indicatif::MultiProgress::with_draw_target(
                indicatif::ProgressDrawTarget::hidden(),
            ),
        }
    }

    /// What a training writes into its work folder.
    fn fake_training(work: &Path) -> Result<serde_json::Value, StageError> {
        std::fs::create_dir_all(work.join("model")).unwrap();
        std::fs::write(work.join("model/model.safetensors"), b"trained weights").unwrap();
        std::fs::create_dir_all(work.join("checkpoint-2")).unwrap();
        std::fs::write(work.join("checkpoint-2/trainer_state.json"), b"{}").unwrap();
        std::fs::write(work.join("metrics.jsonl"), "{\"step\":2,\"loss\":1.5}\n").unwrap();
        Ok(serde_json::json!({ "steps": 2 }))
    }

    #[test]
    fn a_failure_after_training_keeps_the_outputs_and_the_rerun_does_not_train_again() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("tokenizer.json"), b"{\"model\":{}}").unwrap();
        let ctx = context(dir.path());
        // The artifact folder cannot be made (a file is in its place): the failure comes after
        // training, as a full disk while copying the tokenizer would.
        std::fs::write(&ctx.out_dir, b"").unwrap();
        let trained = Cell::new(0);
        let train = |work: &Path, interrupted: bool| {
            assert!(!interrupted);
            trained.set(trained.get() + 1);
            fake_training(work)
        };
        assert!(train_in_work_folder(&ctx, &base, "sft.json", train).is_err());
        assert_eq!(trained.get(), 1);
        let work = &ctx.work_dir;
        assert_eq!(
            std::fs::read(work.join("model/model.safetensors")).unwrap(),
            b"trained weights"
        );
        assert!(work.join("sft.json").is_file());

        std::fs::remove_file(&ctx.out_dir).unwrap();
        train_in_work_folder(&ctx, &base, "sft.json", |_, _| {
            panic!("the finished training ran again")
        })
        .unwrap();
        let out = &ctx.out_dir;
        assert_eq!(
            std::fs::read(out.join("model/model.safetensors")).unwrap(),
            b"trained weights"
        );
        assert!(out.join("model/tokenizer.json").is_file());
        assert!(out.join("checkpoint-2/trainer_state.json").is_file());
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("sft.json")).unwrap()).unwrap();
        assert_eq!(summary["steps"], 2);
        // The work folder stays whole until the pipeline has committed the artifact.
        assert!(work.join("model/model.safetensors").is_file());
        assert!(!work.join("model/tokenizer.json").exists());
    }

    #[test]
    fn an_interrupted_training_resumes_and_a_half_written_summary_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        std::fs::create_dir_all(&ctx.work_dir).unwrap();
        std::fs::write(ctx.work_dir.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
        std::fs::write(ctx.work_dir.join("sft.json.partial"), "{\"ste").unwrap();
        let resumed = Cell::new(false);
        train_in_work_folder(&ctx, dir.path(), "sft.json", |work, interrupted| {
            resumed.set(interrupted);
            fake_training(work)
        })
        .unwrap();
        assert!(resumed.get());
        assert!(ctx.out_dir.join("sft.json").is_file());
        assert!(!ctx.out_dir.join("sft.json.partial").exists());
    }
}
