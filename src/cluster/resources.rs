//! Per-stage Slurm resources (`[stages.<name>.resources]` in a recipe): defaults per stage kind,
//! merging of recipe values over them, and validation of the sbatch `--mem` / `--time` syntax
//! (sbatch(1): memory is a number with an optional K/M/G/T suffix, megabytes by default; time is
//! "M", "M:S", "H:M:S", "D-H", "D-H:M" or "D-H:M:S").

use serde::{Deserialize, Serialize};

use crate::cluster::{Error, Result};

/// Resources one job asks for. `None` leaves the choice to the cluster's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPUs (`--gpus`); 0 asks for none. For a data-parallel (training) stage, GPUs per node,
    /// one rank each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Nodes (`--nodes`); a data-parallel stage runs `gpus` ranks on each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Tasks per node (`--ntasks-per-node`; its GPUs then go per node, `--gpus-per-node`): set
    /// by the submitter for a data-parallel stage's ranks ([`crate::cluster::spread_ranks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks_per_node: Option<u32>,
    /// CPUs for the one task (`--cpus-per-task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory per node (`--mem`), e.g. "64G".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// Wall-clock limit (`--time`), e.g. "4:00:00" or "1-12:00:00".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Partition (`--partition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Further sbatch options passed verbatim, e.g. ["--qos=normal"].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<String>,
}

/// sbatch options that runner sets itself; overriding them through `extra` would break the
/// bookkeeping of job ids, logs and dependencies.
const RESERVED_OPTIONS: [&str; 9] = [
    "--array",
    "-a",
    "--dependency",
    "-d",
    "--output",
    "-o",
    "--error",
    "-e",
    "--parsable",
];

impl Resources {
    /// Defaults for a stage kind: training stages get a GPU and a long limit, data stages a few
    /// CPUs and a short one. The partition is left to the cluster's default.
    pub fn default_for_kind(kind: &str) -> Resources {
        let (gpus, cpus, mem, time) = match kind {
            "sft" | "grpo" | "train" => (1, 8, "64G", "4:00:00"),
            "evaluate" | "eval" => (1, 4, "32G", "1:00:00"),
            "export" => (0, 4, "32G", "1:00:00"),
            "tokenize" => (0, 4, "8G", "1:00:00"),
            "ingest" | "format" => (0, 2, "4G", "0:30:00"),
            _ => (0, 2, "4G", "1:00:00"),
        };
        Resources {
            gpus: Some(gpus),
            nodes: None,
            ranks_per_node: None,
            cpus: Some(cpus),
            mem: Some(mem.to_string()),
            time: Some(time.to_string()),
            partition: None,
            extra: Vec::new(),
        }
    }

    /// These values over `defaults`: each field set here wins; `extra` is the defaults' followed
    /// by these (sbatch keeps the last of repeated options).
    pub fn merged_over(&self, defaults: &Resources) -> Resources {
        Resources {
            gpus: self.gpus.or(defaults.gpus),
            nodes: self.nodes.or(defaults.nodes),
            ranks_per_node: self.ranks_per_node.or(defaults.ranks_per_node),
            cpus: self.cpus.or(defaults.cpus),
            mem: self.mem.clone().or_else(|| defaults.mem.clone()),
            time: self.time.clone().or_else(|| defaults.time.clone()),
            partition: self
                .partition
                .clone()
                .or_else(|| defaults.partition.clone()),
            extra: defaults.extra.iter().chain(&self.extra).cloned().collect(),
        }
    }

    /// The recipe's resources for a stage of `kind` merged over that kind's defaults, validated.
    pub fn for_stage(kind: &str, recipe: Option<&Resources>) -> Result<Resources> {
        let defaults = Resources::default_for_kind(kind);
        let merged = match recipe {
            Some(r) => r.merged_over(&defaults),
            None => defaults,
        };
        merged.validate()?;
        Ok(merged)
    }

    /// Checks every field against sbatch's syntax.
    pub fn validate(&self) -> Result<()> {
        if self.cpus == Some(0) {
            return Err(invalid("cpus", "0", "at least 1"));
        }
        if self.nodes == Some(0) {
            return Err(invalid("nodes", "0", "at least 1"));
        }
        if let Some(mem) = &self.mem {
            parse_mem_mb(mem)?;
        }
        if let Some(time) = &self.time {
            parse_time_seconds(time)?;
        }
        if let Some(p) = &self.partition {
            if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c == ',') {
                return Err(invalid(
                    "partition",
                    p,
                    "one partition name without spaces or commas",
                ));
            }
        }
        for option in &self.extra {
            if !option.starts_with('-') {
                return Err(invalid(
                    "extra",
                    option,
                    "sbatch options starting with '-', e.g. \"--qos=normal\"",
                ));
            }
            let name = option.split('=').next().unwrap_or(option);
            // "-o" style short options may carry their value glued on ("-ofile").
            let reserved = RESERVED_OPTIONS.iter().any(|r| {
                name == *r || (r.len() == 2 && !option.starts_with("--") && option.starts_with(r))
            });
            if reserved {
                return Err(invalid(
                    "extra",
                    option,
                    "no --array/--dependency/--output/--error/--parsable: runner sets those itself",
                ));
            }
        }
        Ok(())
    }

    /// Memory in megabytes, if set.
    pub fn mem_mb(&self) -> Result<Option<u64>> {
        self.mem.as_deref().map(parse_mem_mb).transpose()
    }

    /// Time limit in seconds: `None` when unset, `Some(None)` when unlimited.
    pub fn time_seconds(&self) -> Result<Option<Option<u64>>> {
        self.time.as_deref().map(parse_time_seconds).transpose()
    }

    /// The sbatch options these resources stand for, in a fixed order.
    pub fn sbatch_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(p) = &self.partition {
            args.push(format!("--partition={p}"));
        }
        if let Some(c) = self.cpus {
            args.push(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = &self.mem {
            args.push(format!("--mem={m}"));
        }
        if let Some(t) = &self.time {
            args.push(format!("--time={t}"));
        }
        if let Some(n) = self.nodes.filter(|n| *n > 1) {
            args.push(format!("--nodes={n}"));
        }
        let gpus = self.gpus.filter(|g| *g > 0);
        match (self.ranks_per_node, gpus) {
            (Some(r), g) => {
                args.push(format!("--ntasks-per-node={r}"));
                if let Some(g) = g {
                    args.push(format!("--gpus-per-node={g}"));
                }
            }
            (None, Some(g)) => args.push(format!("--gpus={g}")),
            (None, None) => {}
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

fn invalid(key: &'static str, value: &str, expected: &str) -> Error {
    Error::InvalidResource {
        key,
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

const MEM_EXPECTED: &str = "a whole number with an optional K, M, G or T suffix (megabytes without one), e.g. \"64G\" or \"512M\"";

/// Parses sbatch's `--mem` syntax into megabytes (K rounds up to whole megabytes).
pub fn parse_mem_mb(mem: &str) -> Result<u64> {
    let digits_end = mem.find(|c: char| !c.is_ascii_digit()).unwrap_or(mem.len());
    let (number, suffix) = mem.split_at(digits_end);
    let value: u64 = number
        .parse()
        .map_err(|_| invalid("mem", mem, MEM_EXPECTED))?;
    let mb = match suffix.to_ascii_uppercase().as_str() {
        "" | "M" => Some(value),
        "K" => Some(value.div_ceil(1024)),
        "G" => value.checked_mul(1024),
        "T" => value.checked_mul(1024 * 1024),
        _ => None,
    };
    match mb {
        Some(mb) if mb > 0 => Ok(mb),
        _ => Err(invalid("mem", mem, MEM_EXPECTED)),
    }
}

const TIME_EXPECTED: &str = "minutes, \"M:S\", \"H:M:S\", \"D-H\", \"D-H:M\", \"D-H:M:S\" or \"UNLIMITED\", e.g. \"4:00:00\"";

/// Parses sbatch's `--time` syntax into seconds; `None` means unlimited.
pub fn parse_time_seconds(time: &str) -> Result<Option<u64>> {
    let err = || invalid("time", time, TIME_EXPECTED);
    if matches!(time.to_ascii_uppercase().as_str(), "UNLIMITED" | "INFINITE") {
        return Ok(None);
    }
    let number = |s: &str| -> Result<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        s.parse().map_err(|_| err())
    };
    let (days, rest) = match time.split_once('-') {
        Some((d, rest)) => (Some(number(d)?), rest),
        None => (None, time),
    };
    let parts = rest.split(':').map(number).collect::<Result<Vec<u64>>>()?;
    let seconds = match (days, parts.as_slice()) {
        (None, [m]) => m * 60,
        (None, [m, s]) => m * 60 + s,
        (None, [h, m, s]) => h * 3600 + m * 60 + s,
        (Some(d), [h]) => d * 86400 + h * 3600,
        (Some(d), [h, m]) => d * 86400 + h * 3600 + m * 60,
        (Some(d), [h, m, s]) => d * 86400 + h * 3600 + m * 60 + s,
        _ => return Err(err()),
    };
    if seconds == 0 {
        return Err(err());
    }
    Ok(Some(seconds))
}
