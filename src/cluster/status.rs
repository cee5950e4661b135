//! Job state lookup and cancellation. Live and recently finished jobs come from
//! `squeue -t all -r` (slurmctld keeps finished jobs for MinJobAge); ids it no longer knows are
//! asked of `scontrol show job`, then `sacct` where accounting runs, then the jobcomp/filetxt file
//! named by `scontrol show config` (the local cluster has no slurmdbd).

use std::ffi::OsString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cluster::commands::{Captured, Program};
use crate::cluster::parse::{
    parse_config, parse_key_value_jobs, parse_sacct, parse_squeue, JobRef, Record, SACCT_FORMAT,
    SQUEUE_FORMAT,
};
use crate::cluster::{Result, SlurmCommands};

/// Where a job stands, in runner's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Running,
    Done,
    /// Ran and failed; `exit_code` is None when a signal ended it (the reason says which).
    Failed {
        exit_code: Option<i32>,
        reason: Option<String>,
    },
    /// Never ran or was stopped; "DependencyNeverSatisfied" when an upstream job failed.
    Cancelled {
        reason: Option<String>,
    },
    Unknown,
}

impl JobState {
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed { .. } | JobState::Cancelled { .. }
        )
    }

    /// "exit 1, OUT_OF_MEMORY" for a failed job ("exit -" when a signal ended it); None for the
    /// other states.
    pub fn failure_detail(&self) -> Option<String> {
        let JobState::Failed { exit_code, reason } = self else {
            return None;
        };
        Some(format!(
            "exit {}{}",
            exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
            reason
                .as_deref()
                .map(|r| format!(", {r}"))
                .unwrap_or_default()
        ))
    }
}

/// The state of one requested job id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The id as requested ("123" or "123_4").
    pub job_id: String,
    pub state: JobState,
    /// Slurm's own state name(s), e.g. "PENDING" or, for a whole array, "COMPLETED,FAILED".
    pub slurm_state: Option<String>,
    /// Slurm's reason, e.g. "Dependency", "Resources", "NonZeroExitCode".
    pub reason: Option<String>,
    pub log_path: Option<PathBuf>,
}

/// Maps one Slurm state name (job_state_string) onto [`JobState`].
pub(crate) fn classify(
    state: &str,
    reason: Option<&str>,
    exit: Option<crate::cluster::parse::ExitInfo>,
) -> JobState {
    let reason_or_state = || {
        reason
            .map(str::to_string)
            .or_else(|| (state != "FAILED").then(|| state.to_string()))
    };
    match state {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD"
        | "CONFIGURING" => JobState::Pending,
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "STOPPED" | "SIGNALING" | "STAGE_OUT"
        | "RESIZING" => JobState::Running,
        "COMPLETED" => JobState::Done,
        "CANCELLED" => JobState::Cancelled {
            reason: reason.filter(|r| !is_wait_reason(r)).map(str::to_string),
        },
        "FAILED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY" | "BOOT_FAIL" | "DEADLINE"
        | "PREEMPTED" | "SPECIAL_EXIT" => match exit {
            Some(e) if e.signal != 0 => JobState::Failed {
                exit_code: None,
                reason: Some(format!(
                    "{} (signal {})",
                    reason_or_state().unwrap_or_else(|| state.into()),
                    e.signal
                )),
            },
            Some(e) => JobState::Failed {
                exit_code: Some(e.code),
                reason: reason_or_state(),
            },
            None => JobState::Failed {
                exit_code: None,
                reason: reason_or_state(),
            },
        },
        _ => JobState::Unknown,
    }
}

/// Reasons a job was waiting (squeue's pending reasons). A job cancelled while pending keeps its
/// last one, which says nothing about why it was cancelled.
fn is_wait_reason(reason: &str) -> bool {
    const WAITING: [&str; 14] = [
        "Priority",
        "Resources",
        "Dependency",
        "JobArrayTaskLimit",
        "BeginTime",
        "JobHeldUser",
        "JobHeldAdmin",
        "Reservation",
        "Licenses",
        "PartitionDown",
        "PartitionInactive",
        "NodeDown",
        "Prolog",
        "Cleaning",
    ];
    WAITING.contains(&reason)
        || ["ReqNodeNotAvail", "QOS", "Assoc", "Partition"]
            .iter()
            .any(|p| reason.starts_with(p))
}

/// Folds the records that make up `r` (one job, one task, or every task of an array).
pub(crate) fn summarize(r: &JobRef, records: &[&Record]) -> JobStatus {
    let job_id = r.to_string();
    let states: Vec<JobState> = records
        .iter()
        .map(|rec| classify(&rec.state, rec.reason.as_deref(), rec.exit))
        .collect();
    if let ([rec], [state]) = (records, states.as_slice()) {
        return JobStatus {
            job_id,
            state: state.clone(),
            slurm_state: Some(rec.state.clone()),
            reason: rec.reason.clone(),
            log_path: rec.log_path(r).map(PathBuf::from),
        };
    }
    if records.is_empty() {
        return JobStatus {
            job_id,
            state: JobState::Unknown,
            slurm_state: None,
            reason: None,
            log_path: None,
        };
    }
    // A whole array: live while any task is, else its worst outcome (lowest failing index).
    let mut records = records.to_vec();
    records.sort_by_key(|rec| rec.tasks.as_ref().and_then(|t| t.0.first().map(|r| r.0)));
    let states: Vec<JobState> = records
        .iter()
        .map(|rec| classify(&rec.state, rec.reason.as_deref(), rec.exit))
        .collect();
    let has = |pred: fn(&JobState) -> bool| states.iter().position(pred);
    let pick = has(|s| matches!(s, JobState::Running))
        .or_else(|| has(|s| matches!(s, JobState::Pending)))
        .or_else(|| has(|s| matches!(s, JobState::Unknown)))
        .or_else(|| has(|s| matches!(s, JobState::Failed { .. })))
        .or_else(|| has(|s| matches!(s, JobState::Cancelled { .. })))
        .unwrap_or(0);
    let mut names: Vec<String> = records.iter().map(|rec| rec.state.clone()).collect();
    names.sort();
    names.dedup();
    JobStatus {
        job_id,
        state: states[pick].clone(),
        slurm_state: Some(names.join(",")),
        reason: records[pick].reason.clone(),
        log_path: None,
    }
}

/// True when a Slurm tool failed only because it no longer (or never) knew the ids.
fn invalid_id_only(c: &Captured) -> bool {
    !c.success && c.stderr.contains("Invalid job id")
}

/// The state of each of `job_ids` ("123", "123_4"), in the same order.
pub fn status(job_ids: &[String], commands: &SlurmCommands) -> Result<Vec<JobStatus>> {
    let refs = job_ids
        .iter()
        .map(|id| JobRef::parse(id))
        .collect::<Result<Vec<_>>>()?;
    if refs.is_empty() {
        return Ok(Vec::new());
    }
    let mut jobs: Vec<u64> = refs.iter().map(|r| r.job).collect();
    jobs.sort_unstable();
    jobs.dedup();
    let job_list = jobs
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let args: Vec<OsString> = [
        "-h",
        "-r",
        "-t",
        "all",
        "-j",
        &job_list,
        "-O",
        SQUEUE_FORMAT,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let captured = commands.run(Program::Squeue, &args)?;
    let mut records = if invalid_id_only(&captured) {
        Vec::new()
    } else {
        parse_squeue(&captured.ok()?)?
    };

    let missing = |records: &[Record]| -> Vec<JobRef> {
        refs.iter()
            .filter(|r| !records.iter().any(|rec| rec.matches(r)))
            .copied()
            .collect()
    };
    for r in missing(&records) {
        let args: Vec<OsString> = vec![
            "-o".into(),
            "show".into(),
            "job".into(),
            r.to_string().into(),
        ];
        let captured = commands.run(Program::Scontrol, &args)?;
        if !invalid_id_only(&captured) {
            records.extend(parse_key_value_jobs(&captured.ok()?, "scontrol show job")?);
        }
    }
    let still_missing = missing(&records);
    if !still_missing.is_empty() {
        records.extend(finished_from_sacct(&still_missing, commands));
    }
    let still_missing = missing(&records);
    if !still_missing.is_empty() {
        records.extend(finished_from_jobcomp(commands)?);
    }
    Ok(refs
        .iter()
        .map(|r| {
            let mut matching: Vec<&Record> = records.iter().filter(|rec| rec.matches(r)).collect();
            // The same job can appear in several sources (and in jobcomp after a requeue): keep
            // the first, which comes from the most live source / the oldest line.
            let mut seen = std::collections::BTreeSet::new();
            matching
                .retain(|rec| seen.insert((rec.raw_id, rec.tasks.as_ref().map(|t| t.0.clone()))));
            if matching.len() > 1 && r.task.is_some() {
                matching.truncate(1);
            }
            summarize(r, &matching)
        })
        .collect())
}

/// sacct records, or none where accounting storage is disabled or sacct is missing.
fn finished_from_sacct(refs: &[JobRef], commands: &SlurmCommands) -> Vec<Record> {
    let ids = refs
        .iter()
        .map(JobRef::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let args: Vec<OsString> = ["-n", "-P", "-X", "-j", &ids, "-o", SACCT_FORMAT]
        .iter()
        .map(OsString::from)
        .collect();
    match commands
        .run(Program::Sacct, &args)
        .and_then(Captured::ok)
        .and_then(|out| parse_sacct(&out))
    {
        Ok(records) => records,
        Err(e) => {
            tracing::debug!("sacct unavailable: {e}");
            Vec::new()
        }
    }
}

/// Records of the jobcomp/filetxt file, newest last, when the cluster writes one.
pub(crate) fn finished_from_jobcomp(commands: &SlurmCommands) -> Result<Vec<Record>> {
    let args: Vec<OsString> = vec!["show".into(), "config".into()];
    let config = parse_config(&commands.run(Program::Scontrol, &args)?.ok()?);
    if config.get("JobCompType").map(String::as_str) != Some("jobcomp/filetxt") {
        return Ok(Vec::new());
    }
    let Some(path) = config.get("JobCompLoc").map(PathBuf::from) else {
        return Ok(Vec::new());
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!("cannot read jobcomp file {}: {e}", path.display());
            return Ok(Vec::new());
        }
    };
    let mut records = parse_key_value_jobs(&text, "jobcomp/filetxt")?;
    // Job ids restart when a cluster's state is wiped: the newest line about an id wins.
    records.reverse();
    Ok(records)
}

/// Cancels `job_ids` ("123" cancels a whole array, "123_4" one task).
pub fn cancel(job_ids: &[String], commands: &SlurmCommands) -> Result<()> {
    for id in job_ids {
        JobRef::parse(id)?;
    }
    if job_ids.is_empty() {
        return Ok(());
    }
    let args: Vec<OsString> = job_ids.iter().map(OsString::from).collect();
    commands.run(Program::Scancel, &args)?.ok().map(|_| ())
}
