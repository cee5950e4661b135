//! Training: the one loop ([`train_loop`]) and what plugs into it — SFT and the preference
//! objectives over a fixed step plan (`sft.rs`, `objective.rs`, `preference.rs`), GRPO's sampled
//! steps (`grpo*.rs`), the methods whose trainable parameters are not plain LoRA (`prefix.rs`,
//! `prompt.rs`, `adalora.rs`) — with torch-style AdamW (`optim.rs`), transformers' schedules
//! (`schedule.rs`), checkpoints that resume bit-exactly on CPU (`checkpoint.rs`), GRPO's rewards
//! and `metrics.jsonl`. Adapters themselves (placing, files, merging) are [`crate::peft`]'s.
//!
//! Gradient checkpointing (`gradient_checkpointing = true | "offload"`) keeps only each decoder
//! layer's input and recomputes the layer in the backward pass (see
//! [`crate::backend::checkpoint`] and `CausalLm::checkpointing`); gradients equal those of a
//! pass that keeps everything.

pub mod adalora;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod grpo;
pub mod grpo_config;
pub mod grpo_loss;
pub mod grpo_rollout;
pub mod metrics_log;
pub mod objective;
pub mod optim;
pub mod params;
pub mod preference;
pub mod prefix;
pub mod prompt;
pub mod rewards;
pub mod schedule;
pub mod sft;
pub mod train_loop;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use config::{Method, Precision, SaveDtype, SftConfig};
pub use data::TokenizedExample;
pub use sft::{train_sft, BaseModel, SftReport};

/// Errors of the SFT stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sft: key `{key}`: {message}")]
    Config { key: &'static str, message: String },
    #[error("sft: {set} example {index}: {message}")]
    Example {
        set: &'static str,
        index: usize,
        message: String,
    },
    #[error("sft: the training set is empty")]
    NoExamples,
    /// The loss or gradient norm stopped being a number: training diverged. It is read back only
    /// at logging and checkpoint steps, so the bad step lies in `first_step..=step`.
    #[error("non-finite {what} {} (learning rate {lr:e}): training diverged, nothing was saved after the last good checkpoint; lower `learning_rate`", steps_text(*.first_step, *.step))]
    NonFinite {
        what: &'static str,
        first_step: u64,
        step: u64,
        lr: f64,
    },
    #[error("sft: target_modules matched no projection of the model")]
    NoTargets,
    #[error("sft: target_modules: {0}")]
    TargetRegex(#[from] regex::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error(transparent)]
    ModelConfig(#[from] crate::model::config::ConfigError),
    #[error("data parallel: {0}")]
    Distributed(#[from] crate::dist::DistError),
    #[error(transparent)]
    Hf(#[from] crate::model::hf::HfError),
    #[error(transparent)]
    Model(#[from] crate::model::decoder::ModelError),
    #[error(transparent)]
    Peft(#[from] crate::peft::files::Error),
    #[error(transparent)]
    Adapter(#[from] crate::peft::AdapterError),
    #[error(transparent)]
    PromptAdapter(#[from] crate::model::prompt::PromptAdapterError),
    #[error(transparent)]
    Metrics(#[from] crate::train::metrics_log::Error),
    #[error(transparent)]
    Nf4(#[from] crate::model::nf4::Error),
    #[error(transparent)]
    Schedule(#[from] crate::train::schedule::Error),
    #[error(transparent)]
    OutOfMemory(#[from] crate::backend::memory::OutOfMemory),
}

/// "at step 7", or "in steps 3–7 (read back at step 7)" when several steps ran unchecked.
fn steps_text(first_step: u64, step: u64) -> String {
    if first_step >= step {
        format!("at step {step}")
    } else {
        format!("in steps {first_step}–{step} (read back at step {step}; set `logging_steps = 1` to find the first)")
    }
}
