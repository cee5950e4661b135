//! Adapters, as peft has them: LoRA/DoRA placed on the decoder's projections and initialised as
//! peft does, QLoRA's NF4 base (`lora.rs`), peft's files for LoRA/DoRA, prefix and prompt
//! learning (`files.rs`) and AdaLoRA (`adalora.rs`; `adalora_files.rs`: its keys, budget
//! schedule and files), merging an adapter folder into host weights (`merge.rs`), and a trained
//! model loaded with its adapter in effect (`trained.rs`: `Adapter::read`, `load_trained`).
//! The layers the adapters live in (`LoraLinear`, NF4) are [`crate::model`]'s; training them is
//! [`crate::train`]'s.

pub mod adalora;
pub mod adalora_files;
pub mod files;
pub mod lora;
pub mod merge;
pub mod trained;

use std::path::PathBuf;

/// An adapter that does not fit its model, or a model that cannot take one.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter: {0}")]
    Mismatch(String),
    /// An adapter file that is not what peft writes.
    #[error("adapter {path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] crate::model::decoder::ModelError),
    #[error(transparent)]
    Prompt(#[from] crate::model::prompt::PromptAdapterError),
    #[error("target_modules: {0}")]
    TargetRegex(#[from] regex::Error),
    #[error(transparent)]
    Files(#[from] files::Error),
    #[error(transparent)]
    Hf(#[from] crate::model::hf::HfError),
    #[error(transparent)]
    Nf4(#[from] crate::model::nf4::Error),
}
