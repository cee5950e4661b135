//! Slurm batch layer: turns runner's stages into sbatch jobs (one job per stage, one job array per
//! sweep of alike stages), chains them with `--dependency=afterok`, and reads their state back.
//!
//! Reference: Slurm 22.05 man pages for sbatch(1) (`--parsable`, `--array`, `--dependency`,
//! `--kill-on-invalid-dep`), squeue(1) (`-O`, `-r`, `-t all`), scontrol(1) `show job`, sinfo(1),
//! and slurm.conf(5) `JobCompType=jobcomp/filetxt`. A local single-node cluster for tests and users
//! is started by `scripts/slurm/start-local-cluster.sh`.

mod commands;
mod parse;
mod plan;
mod resources;
mod script;
mod status;
mod submit;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use commands::SlurmCommands;
pub use parse::JobRef;
pub use resources::Resources;
pub use status::{cancel, status, JobState, JobStatus};
pub use submit::{
    read_manifest, spread_ranks, submit, ClusterInfo, GpuPolicy, JobSpec, PartitionInfo,
    SubmitOptions, Submitted,
};

pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the Slurm layer; each names the command, key or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{program} not found: is Slurm installed? see scripts/slurm/start-local-cluster.sh (or set {env_var})")]
    NotFound { program: String, env_var: String },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not parse {what} output line {line:?}: {expected}")]
    Parse {
        what: &'static str,
        line: String,
        expected: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("resources.{key} = {value:?} is invalid: expected {expected}")]
    InvalidResource {
        key: &'static str,
        value: String,
        expected: String,
    },
    #[error("job {key:?}: {problem}")]
    InvalidJob { key: String, problem: String },
    #[error("two jobs share the key {key:?}; job keys must be unique within a submission")]
    DuplicateKey { key: String },
    #[error("job {key:?} depends on {dependency:?}, which is neither a job key of this submission nor a Slurm job id (123 or 123_4)")]
    UnknownDependency { key: String, dependency: String },
    #[error("dependency cycle among jobs {keys:?}")]
    DependencyCycle { keys: Vec<String> },
    #[error("job {key:?} asks for {gpus} GPU(s) but no node of partition {partition} has GPU gres (gpu policy: error)")]
    NoGpus {
        key: String,
        gpus: u32,
        partition: String,
    },
    #[error("invalid Slurm job id {id:?}: expected a number, optionally with an array index (123 or 123_4)")]
    InvalidJobId { id: String },
    #[error("submitting job {key:?} failed: {source}; cancelled the {} job(s) this submission had already queued: {cancelled:?}", cancelled.len())]
    Submit {
        key: String,
        source: Box<Error>,
        cancelled: Vec<String>,
    },
}
