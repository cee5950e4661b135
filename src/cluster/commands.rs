//! Locating and running the Slurm client programs (sbatch, squeue, scontrol, scancel, sinfo,
//! sacct), each overridable through an environment variable so tests can substitute fakes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::{Error, Result};

/// Paths (or PATH-resolved names) of the Slurm client programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmCommands {
    pub sbatch: PathBuf,
    pub squeue: PathBuf,
    pub scontrol: PathBuf,
    pub scancel: PathBuf,
    pub sinfo: PathBuf,
    pub sacct: PathBuf,
}

/// What a finished command printed, and whether it succeeded.
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    pub command: String,
    pub success: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// The output if the command succeeded, else an error naming it, its status and its stderr.
    pub fn ok(self) -> Result<String> {
        if self.success {
            Ok(self.stdout)
        } else {
            Err(Error::Command {
                command: self.command,
                status: self.status,
                stderr: self.stderr.trim().to_string(),
            })
        }
    }
}

/// The Slurm client programs runner calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Program {
    Sbatch,
    Squeue,
    Scontrol,
    Scancel,
    Sinfo,
    Sacct,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Sbatch => "sbatch",
            Program::Squeue => "squeue",
            Program::Scontrol => "scontrol",
            Program::Scancel => "scancel",
            Program::Sinfo => "sinfo",
            Program::Sacct => "sacct",
        }
    }

    fn env_var(self) -> &'static str {
        match self {
            Program::Sbatch => "RUNNER_SBATCH",
            Program::Squeue => "RUNNER_SQUEUE",
            Program::Scontrol => "RUNNER_SCONTROL",
            Program::Scancel => "RUNNER_SCANCEL",
            Program::Sinfo => "RUNNER_SINFO",
            Program::Sacct => "RUNNER_SACCT",
        }
    }
}

impl Default for SlurmCommands {
    fn default() -> Self {
        Self::from_env()
    }
}

impl SlurmCommands {
    /// Programs from PATH, each replaced by `RUNNER_<PROGRAM>` (e.g. `RUNNER_SBATCH`) when set.
    pub fn from_env() -> Self {
        let pick = |p: Program| {
            std::env::var_os(p.env_var())
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(p.name()))
        };
        Self {
            sbatch: pick(Program::Sbatch),
            squeue: pick(Program::Squeue),
            scontrol: pick(Program::Scontrol),
            scancel: pick(Program::Scancel),
            sinfo: pick(Program::Sinfo),
            sacct: pick(Program::Sacct),
        }
    }

    fn path(&self, program: Program) -> &PathBuf {
        match program {
            Program::Sbatch => &self.sbatch,
            Program::Squeue => &self.squeue,
            Program::Scontrol => &self.scontrol,
            Program::Scancel => &self.scancel,
            Program::Sinfo => &self.sinfo,
            Program::Sacct => &self.sacct,
        }
    }

    /// Runs `program args...` and captures its output; a missing program is `Error::NotFound`.
    pub(crate) fn run(&self, which: Program, args: &[OsString]) -> Result<Captured> {
        let program = self.path(which);
        let command = render_command(program, args);
        let output = Command::new(program)
            .args(args)
            .output()
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    Error::NotFound {
                        program: program.display().to_string(),
                        env_var: which.env_var().to_string(),
                    }
                } else {
                    Error::Spawn {
                        command: command.clone(),
                        source,
                    }
                }
            })?;
        let status = match output.status.code() {
            Some(code) => format!("exit status {code}"),
            None => format!("{}", output.status),
        };
        Ok(Captured {
            command,
            success: output.status.success(),
            status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// A copy-pastable rendering of a command line, for error messages and the submission manifest.
pub(crate) fn render_command(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| crate::cluster::script::shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}
