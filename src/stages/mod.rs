//! Stage kinds: one file per kind, each declaring its parameters, inputs and output (the
//! [`Stage`] trait of [`crate::pipeline::stage`]). They share code only through `artifact.rs`
//! (what artifacts hold) and `training.rs` (what the training stages have in common).
//!
//! The pipeline only sees the [`DynStage`] objects of [`registry`]; it knows no stage by name.

pub mod artifact;
pub mod evaluate;
mod export;
mod format;
mod grpo;
mod ingest;
mod model;
mod preference;
mod sft;
pub mod tokenize;
mod training;

pub use crate::pipeline::context::{StageContext, StageInput};
pub use crate::pipeline::stage::{
    erase, ArtifactKind, DynStage, InputSlot, ParamError, Stage, StageError,
};

/// Every stage kind runner knows.
pub fn registry() -> Vec<Box<dyn DynStage>> {
    vec![
        erase::<ingest::Ingest>(),
        erase::<format::Format>(),
        erase::<model::Model>(),
        erase::<tokenize::Tokenize>(),
        erase::<sft::Sft>(),
        erase::<grpo::Grpo>(),
        erase::<preference::Preference<preference::DpoKind>>(),
        erase::<preference::Preference<preference::OrpoKind>>(),
        erase::<preference::Preference<preference::SimpoKind>>(),
        erase::<preference::Preference<preference::KtoKind>>(),
        erase::<evaluate::Evaluate>(),
        erase::<export::Export>(),
    ]
}
