//! Parsers for the text Slurm prints: job ids (`123`, `123_4`, `123_[1-3,5%2]`), `sbatch
//! --parsable`, `squeue -O` lines, `scontrol -o show job` and jobcomp/filetxt `Key=Value`
//! records, `sacct -P`, `sinfo -o` and `scontrol show config`. Fixtures captured from Slurm 22.05
//! live in tests/fixtures/cluster/.

use std::collections::BTreeMap;
use std::fmt;

use crate::cluster::{Error, Result};

/// A Slurm job id as a user names it: a job (or a whole array), or one task of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobRef {
    pub job: u64,
    pub task: Option<u32>,
}

impl JobRef {
    pub fn parse(id: &str) -> Result<JobRef> {
        let bad = || Error::InvalidJobId { id: id.to_string() };
        let id_trimmed = id.trim();
        let (job, task) = match id_trimmed.split_once('_') {
            Some((j, t)) => (j, Some(t)),
            None => (id_trimmed, None),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(job) || task.is_some_and(|t| !digits(t)) {
            return Err(bad());
        }
        Ok(JobRef {
            job: job.parse().map_err(|_| bad())?,
            task: task.map(|t| t.parse()).transpose().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for JobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.task {
            Some(t) => write!(f, "{}_{}", self.job, t),
            None => write!(f, "{}", self.job),
        }
    }
}

/// The array indices of a record: "3", "1-3", "[1-3,5]", "0-7%2" (the `%N` throttle is dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSet(pub Vec<(u32, u32)>);

impl TaskSet {
    pub fn parse(text: &str) -> Option<TaskSet> {
        let text = text.trim().trim_start_matches('[').trim_end_matches(']');
        let text = text.split('%').next()?;
        let mut ranges = Vec::new();
        for part in text.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo.parse().ok()?, hi.parse().ok()?),
                None => {
                    let v = part.parse().ok()?;
                    (v, v)
                }
            };
            ranges.push((lo, hi));
        }
        Some(TaskSet(ranges))
    }

    pub fn contains(&self, task: u32) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&task))
    }

    /// The single index, when this set holds exactly one.
    pub fn single(&self) -> Option<u32> {
        match self.0.as_slice() {
            [(lo, hi)] if lo == hi => Some(*lo),
            _ => None,
        }
    }
}

/// How a job ended: exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: i32,
    pub signal: i32,
}

impl ExitInfo {
    /// "1:0" (scontrol, jobcomp, sacct: code:signal).
    pub fn parse_pair(text: &str) -> Option<ExitInfo> {
        let (code, signal) = text.split_once(':')?;
        Some(ExitInfo {
            code: code.parse().ok()?,
            signal: signal.parse().ok()?,
        })
    }

    /// squeue's `exit_code`: a raw wait(2) status (256 = exit 1, 9 = SIGKILL).
    pub fn from_wait_status(status: i32) -> ExitInfo {
        if status & 0x7f != 0 {
            ExitInfo {
                code: 0,
                signal: status & 0x7f,
            }
        } else {
            ExitInfo {
                code: (status >> 8) & 0xff,
                signal: 0,
            }
        }
    }
}

/// One job (or pending array remainder) as any Slurm tool reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The job's own id (SLURM_JOB_ID); for a pending array remainder, the array's id.
    pub raw_id: u64,
    pub array_job_id: Option<u64>,
    pub tasks: Option<TaskSet>,
    /// Slurm's state name, e.g. "PENDING", "FAILED", "CANCELLED" ("CANCELLED by 0" is cut).
    pub state: String,
    pub reason: Option<String>,
    pub exit: Option<ExitInfo>,
    /// stdout path, possibly still holding `%A`-style patterns (squeue prints them unexpanded).
    pub stdout: Option<String>,
}

impl Record {
    /// Whether this record is (part of) what `r` names.
    pub fn matches(&self, r: &JobRef) -> bool {
        match r.task {
            None => self.raw_id == r.job || self.array_job_id == Some(r.job),
            Some(t) => {
                self.array_job_id == Some(r.job)
                    && self.tasks.as_ref().is_some_and(|s| s.contains(t))
            }
        }
    }

    /// The stdout path with sbatch's `%A %a %j %%` patterns filled in for `r`'s task.
    pub fn log_path(&self, r: &JobRef) -> Option<String> {
        let pattern = self
            .stdout
            .as_deref()
            .filter(|s| !s.is_empty() && *s != "(null)")?;
        let task = r
            .task
            .or_else(|| self.tasks.as_ref().and_then(TaskSet::single));
        let mut out = String::new();
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('A') => out.push_str(&self.array_job_id.unwrap_or(self.raw_id).to_string()),
                Some('a') => match task {
                    Some(t) => out.push_str(&t.to_string()),
                    None => out.push_str("%a"),
                },
                Some('j') => out.push_str(&self.raw_id.to_string()),
                Some('%') => out.push('%'),
                Some(other) => {
                    out.push('%');
                    out.push(other);
                }
                None => out.push('%'),
            }
        }
        Some(out)
    }
}

fn optional(value: &str) -> Option<String> {
    let v = value.trim();
    (!v.is_empty() && v != "None" && v != "(null)" && v != "N/A").then(|| v.to_string())
}

/// The fields runner asks squeue for; `STDOUT` is last so a `|` in a path cannot shift columns.
pub const SQUEUE_FORMAT: &str =
    "JobArrayID:|,JobID:|,ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,exit_code:|,STDOUT:";

/// Parses squeue output in [`SQUEUE_FORMAT`].
pub fn parse_squeue(output: &str) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let bad = |expected: &str| Error::Parse {
            what: "squeue",
            line: line.to_string(),
            expected: expected.to_string(),
        };
        let fields: Vec<&str> = line.splitn(8, '|').collect();
        let [_, raw, array_job, task, state, reason, exit, stdout] = fields.as_slice() else {
            return Err(bad("8 fields separated by '|'"));
        };
        let raw_id = raw
            .trim()
            .parse()
            .map_err(|_| bad("a numeric JobID in field 2"))?;
        let tasks = optional(task)
            .map(|t| TaskSet::parse(&t).ok_or_else(|| bad("an array task set in field 4")))
            .transpose()?;
        let array_job_id = match tasks {
            Some(_) => Some(
                array_job
                    .trim()
                    .parse()
                    .map_err(|_| bad("a numeric ArrayJobID in field 3"))?,
            ),
            None => None,
        };
        records.push(Record {
            raw_id,
            array_job_id,
            tasks,
            state: state.trim().to_string(),
            reason: optional(reason),
            exit: exit.trim().parse().ok().map(ExitInfo::from_wait_status),
            stdout: optional(stdout),
        });
    }
    Ok(records)
}

/// Splits a `Key=Value Key=Value` record; a value may hold spaces as long as the text after a
/// space does not itself look like `Key=`.
pub fn key_values(line: &str) -> BTreeMap<String, String> {
    let is_key_start = |rest: &str| {
        let key_len = rest.find('=').unwrap_or(0);
        key_len > 0
            && rest[..key_len].starts_with(|c: char| c.is_ascii_alphabetic())
            && rest[..key_len]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/:_.".contains(c))
    };
    let mut map = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for word in line.split(' ') {
        if is_key_start(word) {
            if let Some((k, v)) = current.take() {
                map.insert(k, v.trim_end().to_string());
            }
            let (k, v) = word.split_once('=').unwrap_or((word, ""));
            current = Some((k.to_string(), v.to_string()));
        } else if let Some((_, v)) = current.as_mut() {
            // A space inside a value (a path with spaces); text before the first key is dropped.
            v.push(' ');
            v.push_str(word);
        }
    }
    if let Some((k, v)) = current {
        map.insert(k, v.trim_end().to_string());
    }
    map
}

/// Parses `scontrol -o show job` (one line per job) or jobcomp/filetxt lines: both are
/// `Key=Value` records with JobId, ArrayJobId, ArrayTaskId, JobState, ExitCode and, for scontrol,
/// Reason and StdOut.
pub fn parse_key_value_jobs(output: &str, what: &'static str) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let bad = |expected: &str| Error::Parse {
            what,
            line: line.to_string(),
            expected: expected.to_string(),
        };
        let kv = key_values(line.trim_end());
        let raw_id = kv
            .get("JobId")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("a numeric JobId="))?;
        let state = kv.get("JobState").ok_or_else(|| bad("a JobState="))?;
        let tasks = kv
            .get("ArrayTaskId")
            .and_then(|t| optional(t))
            .and_then(|t| TaskSet::parse(&t));
        let array_job_id = if tasks.is_some() {
            kv.get("ArrayJobId").and_then(|v| v.parse().ok())
        } else {
            None
        };
        records.push(Record {
            raw_id,
            array_job_id,
            tasks,
            state: state.trim().to_string(),
            reason: kv.get("Reason").and_then(|r| optional(r)),
            exit: kv.get("ExitCode").and_then(|e| ExitInfo::parse_pair(e)),
            stdout: kv.get("StdOut").and_then(|s| optional(s)),
        });
    }
    Ok(records)
}

/// Fields runner asks sacct for (`sacct -n -P -X -o ...`).
pub const SACCT_FORMAT: &str = "JobID,JobIDRaw,State,ExitCode";

/// Parses `sacct -n -P -X -o JobID,JobIDRaw,State,ExitCode` (JobID "123", "123_4" or "123_[1-3]").
pub fn parse_sacct(output: &str) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let bad = |expected: &str| Error::Parse {
            what: "sacct",
            line: line.to_string(),
            expected: expected.to_string(),
        };
        let [id, raw, state, exit] = line.split('|').collect::<Vec<_>>()[..] else {
            return Err(bad("4 fields separated by '|'"));
        };
        let raw_id = raw
            .trim()
            .parse()
            .map_err(|_| bad("a numeric JobIDRaw in field 2"))?;
        let (array_job_id, tasks) = match id.split_once('_') {
            Some((job, task)) => (
                Some(
                    job.parse()
                        .map_err(|_| bad("a numeric array job id in field 1"))?,
                ),
                Some(TaskSet::parse(task).ok_or_else(|| bad("an array task set in field 1"))?),
            ),
            None => (None, None),
        };
        // "CANCELLED by 1000" names the user who cancelled.
        let state = state.split_whitespace().next().unwrap_or("").to_string();
        records.push(Record {
            raw_id,
            array_job_id,
            tasks,
            state,
            reason: None,
            exit: ExitInfo::parse_pair(exit),
            stdout: None,
        });
    }
    Ok(records)
}

/// The job id printed by `sbatch --parsable` ("123" or "123;cluster").
pub fn parse_sbatch_parsable(output: &str) -> Result<u64> {
    let line = output
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    line.split(';')
        .next()
        .and_then(|id| id.trim().parse().ok())
        .ok_or_else(|| Error::Parse {
            what: "sbatch --parsable",
            line: output.trim().to_string(),
            expected: "a job id, optionally followed by ;cluster".to_string(),
        })
}

/// `Key = Value` lines of `scontrol show config`.
pub fn parse_config(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|l| l.split_once(" = ").or_else(|| l.split_once('=')))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}
