//! Training checkpoints `checkpoint-N/` (as transformers' `Trainer._save_checkpoint` names
//! them): `trainable.safetensors` (trained parameters by module path), `optimizer.safetensors`
//! (AdamW moments), and `trainer_state.json` (step, data position, per-parameter Adam steps,
//! the loss not yet logged). The data order and dropout RNG are functions of (seed, step), so
//! the step is the whole RNG state. A checkpoint is written to `checkpoint-N.tmp` and renamed,
//! so a crash never leaves a partial `checkpoint-N`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::hf::{load_safetensors_file, save_safetensors, DType, HostTensor};
use crate::train::config::Method;
use crate::train::Error;

pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
/// Bump when the files above change meaning.
pub const FORMAT_VERSION: u32 = 1;

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    pub format_version: u32,
    pub method: Method,
    /// Optimizer steps done; the next step to run has this 0-based index in the plan.
    pub step: u64,
    pub epoch: u64,
    pub total_steps: u64,
    pub seed: u64,
    pub num_train_examples: usize,
    pub tokens_seen: u64,
    /// Sum of step losses since the last logged row, and how many steps it holds.
    pub pending_loss_sum: f64,
    pub pending_steps: u64,
    /// Adam's step count per parameter path.
    pub adam_steps: BTreeMap<String, u64>,
}

/// A checkpoint read back.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub trainable: BTreeMap<String, HostTensor>,
    pub optimizer: BTreeMap<String, HostTensor>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `out_dir/checkpoint-{state.step}`; `extra` adds files (e.g. the peft adapter).
pub fn save_checkpoint(
    out_dir: &Path,
    state: &TrainerState,
    trainable: &BTreeMap<String, HostTensor>,
    optimizer: &BTreeMap<String, HostTensor>,
    extra: impl FnOnce(&Path) -> Result<(), Error>,
) -> Result<PathBuf, Error> {
    let dir = out_dir.join(format!("checkpoint-{}", state.step));
    let tmp = out_dir.join(format!("checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    save_safetensors(tmp.join(TRAINABLE_FILE), trainable, DType::F32)?;
    save_safetensors(tmp.join(OPTIMIZER_FILE), optimizer, DType::F32)?;
    extra(&tmp)?;
    let text = serde_json::to_string_pretty(state).expect("trainer state serializes");
    let state_path = tmp.join(STATE_FILE);
    std::fs::write(&state_path, text).map_err(io(&state_path))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    Ok(dir)
}

/// The complete checkpoint with the highest step in `out_dir`, if any.
pub fn latest_checkpoint(out_dir: &Path) -> Result<Option<PathBuf>, Error> {
    let entries = match std::fs::read_dir(out_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(out_dir)(e)),
    };
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in entries {
        let entry = entry.map_err(io(out_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() && best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Reads a checkpoint folder.
pub fn load_checkpoint(dir: &Path) -> Result<Checkpoint, Error> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(Error::Checkpoint {
            path: state_path,
            message: format!(
                "format_version {} (this build reads {FORMAT_VERSION})",
                state.format_version
            ),
        });
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        trainable: load_safetensors_file(&dir.join(TRAINABLE_FILE))?,
        optimizer: load_safetensors_file(&dir.join(OPTIMIZER_FILE))?,
    })
}
