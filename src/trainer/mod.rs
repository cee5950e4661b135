//! Supervised fine-tuning of the decoder: LoRA, QLoRA, full fine-tuning and P-Tuning v2 on a
//! burn `AutodiffBackend`, with torch-style AdamW, transformers' schedules and loss
//! normalisation, checkpoints that resume bit-exactly on CPU, metrics.jsonl and peft outputs.
//!
//! Gradient checkpointing (`gradient_checkpointing = true | "offload"`) keeps only each decoder
//! layer's input and recomputes the layer in the backward pass (see
//! [`crate::backend::checkpoint`] and `CausalLm::checkpointing`); gradients equal those of a
//! pass that keeps everything.

pub mod adalora;
pub mod adapters;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod grpo;
pub mod grpo_config;
pub mod grpo_loss;
pub mod grpo_rollout;
pub mod objective;
pub mod optim;
pub mod params;
pub mod preference;
pub mod prefix;
pub mod prompt;
pub mod sft;
pub mod train_loop;

#[cfg(test)]
mod checkpointing_tests;
#[cfg(test)]
mod dora_tests;
#[cfg(test)]
mod grpo_tests;
#[cfg(test)]
mod learning_tests;
#[cfg(test)]
mod prompt_tests;
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
    /// The loss or gradient norm stopped being a number: training diverged.
    #[error("non-finite {what} at step {step} (learning rate {lr:e}): training diverged, nothing was saved after the last good checkpoint; lower `learning_rate`")]
    NonFinite {
        what: &'static str,
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
    #[error(transparent)]
    Hf(#[from] crate::model::hf::HfError),
    #[error(transparent)]
    Model(#[from] crate::model::decoder::ModelError),
    #[error(transparent)]
    Peft(#[from] crate::train::peft_io::Error),
    #[error(transparent)]
    PromptAdapter(#[from] crate::model::prompt::PromptAdapterError),
    #[error(transparent)]
    Metrics(#[from] crate::train::metrics_log::Error),
    #[error(transparent)]
    Nf4(#[from] crate::train::nf4::Error),
    #[error(transparent)]
    Schedule(#[from] crate::train::schedule::Error),
    #[error(transparent)]
    OutOfMemory(#[from] crate::backend::memory::OutOfMemory),
}
