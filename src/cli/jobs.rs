//! CLI pieces for the Slurm layer: flags `runner submit` flattens into its own arguments, and the
//! `runner jobs` subcommand (status / cancel of a submission folder or of Slurm ids).

use std::path::PathBuf;

use anyhow::Context as _;

use runner::cluster::{
    cancel, read_manifest, status, GpuPolicy, JobState, SlurmCommands, SubmitOptions,
};

/// Submission flags for `runner submit` (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitFlags {
    /// Folder for the sbatch scripts and submission.json.
    #[arg(long, default_value = "runs/slurm")]
    pub submit_dir: PathBuf,
    /// Jobs asking for GPUs on a cluster without GPU gres: drop --gpus with a warning (auto),
    /// pass it on (keep), or refuse (error).
    #[arg(long, value_enum, default_value = "auto")]
    pub gpus: GpuFlag,
    /// Keep cpus/mem as written even when they exceed the largest node.
    #[arg(long)]
    pub no_fit: bool,
    /// Submit every job on its own instead of folding sweeps into job arrays.
    #[arg(long)]
    pub no_arrays: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuFlag {
    Auto,
    Keep,
    Error,
}

impl SubmitFlags {
    /// Options for [`runner::cluster::submit`], with Slurm programs from PATH / `RUNNER_<PROGRAM>`.
    pub fn options(&self, submission_name: &str) -> SubmitOptions {
        let mut opts = SubmitOptions::new(self.submit_dir.join(submission_name));
        opts.gpus = match self.gpus {
            GpuFlag::Auto => GpuPolicy::Auto,
            GpuFlag::Keep => GpuPolicy::Keep,
            GpuFlag::Error => GpuPolicy::Error,
        };
        opts.fit_to_nodes = !self.no_fit;
        opts.arrays = !self.no_arrays;
        opts
    }
}

/// `runner jobs`: state of submitted jobs, or cancel them.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsArgs {
    /// A submission folder (holding submission.json) or Slurm job ids (123, 123_4).
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// Cancel the jobs instead of showing their state.
    #[arg(long)]
    pub cancel: bool,
}

pub fn run(args: &JobsArgs) -> anyhow::Result<()> {
    let commands = SlurmCommands::from_env();
    // (label shown to the user, Slurm id)
    let mut jobs: Vec<(String, String)> = Vec::new();
    for target in &args.targets {
        let path = PathBuf::from(target);
        if path.join("submission.json").is_file() {
            let submitted = read_manifest(&path)
                .with_context(|| format!("reading submission {}", path.display()))?;
            jobs.extend(submitted.iter().map(|s| (s.key.clone(), s.slurm_id())));
        } else {
            jobs.push((target.clone(), target.clone()));
        }
    }
    let ids: Vec<String> = jobs.iter().map(|(_, id)| id.clone()).collect();
    if args.cancel {
        cancel(&ids, &commands)?;
        println!("cancelled {}", ids.join(" "));
        return Ok(());
    }
    for ((label, _), st) in jobs.iter().zip(status(&ids, &commands)?) {
        let state = match &st.state {
            failed @ JobState::Failed { .. } => {
                format!("failed ({})", failed.failure_detail().unwrap_or_default())
            }
            JobState::Cancelled { reason } => {
                format!(
                    "cancelled{}",
                    reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )
            }
            other => format!("{other:?}").to_lowercase(),
        };
        let log = st
            .log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        println!("{:<12} {:<32} {:<40} {}", st.job_id, label, state, log);
    }
    Ok(())
}
