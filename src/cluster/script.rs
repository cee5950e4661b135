//! The sbatch batch scripts runner writes: `cd` into the job's workdir, export its env, and exec
//! its argv; for a job array, a `case` on `$SLURM_ARRAY_TASK_ID` picks each member's argv (and
//! env, where members' envs differ).
//! All sbatch options travel on the sbatch command line (recorded in the script's header), so
//! paths with spaces never pass through `#SBATCH` parsing.

use std::fmt::Write as _;

use crate::cluster::{Error, JobSpec, Result};

/// Quotes `s` for POSIX sh when it holds anything beyond a safe set of characters.
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,@%+".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A job name usable in file names: everything outside `[A-Za-z0-9._-]` becomes `_`.
pub fn file_safe(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "job".to_string()
    } else {
        cleaned
    }
}

fn check_job(job: &JobSpec) -> Result<()> {
    let problem = |p: String| {
        Err(Error::InvalidJob {
            key: job.key.clone(),
            problem: p,
        })
    };
    if job.argv.is_empty() {
        return problem("argv is empty: a job needs a command to run".into());
    }
    for (name, value) in &job.env {
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return problem(format!(
                "environment variable name {name:?} is not a shell identifier"
            ));
        }
        if value.contains('\0') {
            return problem(format!("environment variable {name} holds a NUL byte"));
        }
    }
    if job.argv.iter().any(|a| a.contains('\0')) {
        return problem("argv holds a NUL byte".into());
    }
    Ok(())
}

/// Text for a `#` comment line: control characters (a newline would end the comment and start a
/// command) are written escaped.
fn comment_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn exec_line(argv: &[String]) -> String {
    format!(
        "exec {}",
        argv.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The batch script for `members` (one job, or the members of an array in index order).
/// `sbatch_line` is the command that submits it, kept as a comment for whoever reads the script.
pub fn render(members: &[&JobSpec], sbatch_line: &str) -> Result<String> {
    let first = members.first().ok_or_else(|| Error::InvalidJob {
        key: String::new(),
        problem: "no job to write a script for".into(),
    })?;
    for job in members {
        check_job(job)?;
    }
    let mut s = String::from("#!/bin/bash\n# Written by runner; submitted with:\n");
    let _ = writeln!(s, "#   {}", comment_text(sbatch_line));
    for (i, job) in members.iter().enumerate() {
        let _ = writeln!(
            s,
            "# job {}: {}",
            if members.len() > 1 {
                i.to_string()
            } else {
                "-".into()
            },
            comment_text(&job.key)
        );
    }
    s.push_str("set -eu\n");
    let _ = writeln!(s, "cd {}", shell_quote(&first.workdir.to_string_lossy()));
    let shared_env = members.iter().all(|m| m.env == first.env);
    if shared_env {
        for (name, value) in &first.env {
            let _ = writeln!(s, "export {name}={}", shell_quote(value));
        }
    }
    if members.len() == 1 {
        let _ = writeln!(s, "{}", exec_line(&first.argv));
    } else {
        s.push_str("case \"${SLURM_ARRAY_TASK_ID:-}\" in\n");
        for (i, job) in members.iter().enumerate() {
            let exports: String = if shared_env {
                String::new()
            } else {
                job.env
                    .iter()
                    .map(|(name, value)| format!("export {name}={}; ", shell_quote(value)))
                    .collect()
            };
            let _ = writeln!(s, "  {i}) {exports}{} ;;", exec_line(&job.argv));
        }
        s.push_str("  *) echo \"runner: no job for array index '${SLURM_ARRAY_TASK_ID:-}'\" >&2; exit 2 ;;\nesac\n");
    }
    Ok(s)
}
