//! Adapters, as peft has them: LoRA/DoRA placed on the decoder's projections and initialised as
//! peft does, QLoRA's NF4 base (`lora.rs`), peft's files for LoRA/DoRA, prefix and prompt
//! learning (`files.rs`) and AdaLoRA (`adalora_files.rs`: its keys, budget schedule and files).
//! The layers the adapters live in (`LoraLinear`, NF4) are [`crate::model`]'s; training them is
//! [`crate::train`]'s.

pub mod adalora_files;
pub mod files;
pub mod lora;

/// An adapter that does not fit its model, or a model that cannot take one.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter: {0}")]
    Mismatch(String),
    #[error("target_modules: {0}")]
    TargetRegex(#[from] regex::Error),
    #[error(transparent)]
    Files(#[from] files::Error),
    #[error(transparent)]
    Hf(#[from] crate::model::hf::HfError),
    #[error(transparent)]
    Nf4(#[from] crate::model::nf4::Error),
}
