//! What a running stage sees: its output folder, its resolved inputs and run-wide settings.

use crate::pipeline::stage::{ArtifactKind, StageError};
use std::path::PathBuf;

/// One resolved input artifact.
#[derive(Debug, Clone)]
pub struct StageInput {
    /// The slot key (`input`, `model`, ...).
    pub slot: String,
    pub stage: String,
    /// The named sub-output (`test` in `raw.test`), if any.
    pub output: Option<String>,
    pub kind: ArtifactKind,
    pub dir: PathBuf,
    pub fingerprint: String,
}

pub struct StageContext {
    pub stage_name: String,
    /// Where the stage writes its artifact (a temporary folder, committed after `run`).
    pub out_dir: PathBuf,
    /// A folder of this fingerprint that outlives a killed or failed run (training checkpoints,
    /// so a rerun resumes); `--force` empties it first.
    pub work_dir: PathBuf,
    pub recipe_dir: PathBuf,
    pub seed: u64,
    pub device: String,
    pub inputs: Vec<StageInput>,
    pub progress: indicatif::MultiProgress,
}

impl StageContext {
    /// The single input of `slot`; an error naming the stage and slot when missing.
    pub fn input(&self, slot: &str) -> Result<&StageInput, StageError> {
        self.inputs.iter().find(|i| i.slot == slot).ok_or_else(|| {
            StageError::msg(format!(
                "stage `{}` needs an input `{slot}`",
                self.stage_name
            ))
        })
    }

    pub fn optional_input(&self, slot: &str) -> Option<&StageInput> {
        self.inputs.iter().find(|i| i.slot == slot)
    }

    pub fn inputs_of(&self, slot: &str) -> Vec<&StageInput> {
        self.inputs.iter().filter(|i| i.slot == slot).collect()
    }

    pub fn out(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }

    /// A progress bar attached to the run's display (hidden when stderr is not a terminal).
    pub fn progress_bar(&self, len: u64, what: &str) -> indicatif::ProgressBar {
        let bar = self.progress.add(indicatif::ProgressBar::new(len));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(self.stage_name.clone());
        bar.set_message(what.to_string());
        bar
    }
}
