//! The end-to-end tests through the `runner` binary, in one test binary (one link of the
//! library instead of one per file): the pipeline core, the shipped recipes, and Slurm.
//! `tests/preference_losses.rs` stays a binary of its own (it needs burn's f64 CPU backend for
//! the whole process).

mod data_parallel;
mod pipeline;
mod recipes;
mod slurm;
