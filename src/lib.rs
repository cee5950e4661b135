//! runner: reproducible LLM fine-tuning pipelines from TOML recipes.
//!
//! The crate is organised by concern: [`recipe`] (TOML, includes, overrides), [`pipeline`] (DAG,
//! fingerprints, store, scheduler, run records), [`stages`] (one file per stage kind), [`data`]
//! (decoding and tables).

pub mod backend;
pub mod charts;
pub mod cluster;
pub mod console;
pub mod data;
pub mod dist;
pub mod export;
pub mod gguf;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod peft;
pub mod pipeline;
pub mod recipe;
pub mod report;
pub mod stages;
pub mod text;
pub mod train;

#[cfg(test)]
mod testing;
