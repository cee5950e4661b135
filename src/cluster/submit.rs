//! `submit`: writes one sbatch script per job (or per job array) into a submission folder and
//! queues them in dependency order with `--dependency=afterok:...` and
//! `--kill-on-invalid-dep=yes`, so a failed job cancels its dependants. Before that, resources
//! are fitted to what `sinfo` reports: GPUs are dropped (with a warning) where the cluster has no
//! GPU gres, and CPUs/memory are capped at the largest node, so recipes written for a GPU cluster
//! still run on the local test cluster.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster::commands::{render_command, Program};
use crate::cluster::plan::{dependency_arg, plan};
use crate::cluster::script::{file_safe, render};
use crate::cluster::{Error, Resources, Result, SlurmCommands};

/// One stage run to queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Unique within a submission, e.g. "sft@<fingerprint>"; `depends_on` refers to it.
    pub key: String,
    /// Slurm job name, usually the stage name; alike jobs of one name form an array.
    pub name: String,
    /// The command the job runs, e.g. ["/path/runner", "run", "recipe.toml", "--only", "sft"].
    pub argv: Vec<String>,
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    pub resources: Resources,
    /// Keys of other jobs of this submission, or ids of jobs already queued ("123", "123_4").
    pub depends_on: Vec<String>,
    /// Where the job's combined stdout/stderr log goes (created if missing).
    pub log_dir: PathBuf,
}

/// Makes `job`, a data-parallel (training) stage asking for several GPUs or nodes, run one rank
/// per GPU: `gpus` tasks on each of `nodes` nodes started by srun (which gives each its
/// SLURM_PROCID/SLURM_LOCALID; rank 0's host comes from SLURM_JOB_NODELIST), a rendezvous port
/// of its own, and NVLink multicast off for NCCL. Other jobs are left as they are.
pub fn spread_ranks(job: &mut JobSpec) {
    let (gpus, nodes) = (
        job.resources.gpus.unwrap_or(0),
        job.resources.nodes.unwrap_or(1),
    );
    if gpus <= 1 && nodes <= 1 {
        return;
    }
    job.resources.ranks_per_node = Some(gpus.max(1));
    job.argv.splice(
        0..0,
        ["srun".to_string(), "--kill-on-bad-exit=1".to_string()],
    );
    // 20000-39999 from the job's key (stage and fingerprint): two jobs on one node rarely meet.
    let port = 20000
        + job
            .key
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
            % 20000;
    job.env.push(("MASTER_PORT".into(), port.to_string()));
    job.env.push(("NCCL_NVLS_ENABLE".into(), "0".into()));
}

/// What to do with a job asking for GPUs when the target partition has no GPU gres.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuPolicy {
    /// Drop `--gpus` with a warning (the local test cluster has no GPUs).
    #[default]
    Auto,
    /// Pass `--gpus` on regardless; sbatch rejects the job if the cluster cannot satisfy it.
    Keep,
    /// Refuse to submit.
    Error,
}

/// How `submit` behaves.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    /// Submission folder for the sbatch scripts and `submission.json`.
    pub dir: PathBuf,
    pub commands: SlurmCommands,
    pub gpus: GpuPolicy,
    /// Cap cpus/mem at the largest node of the target partition (with a warning).
    pub fit_to_nodes: bool,
    /// Fold alike jobs into job arrays.
    pub arrays: bool,
    /// The cluster's partitions; probed with sinfo when `None`.
    pub cluster: Option<ClusterInfo>,
}

impl SubmitOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            commands: SlurmCommands::from_env(),
            gpus: GpuPolicy::Auto,
            fit_to_nodes: true,
            arrays: true,
            cluster: None,
        }
    }
}

/// A queued job: the Slurm id that runs `key`, and where its log will be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub key: String,
    /// The job id sbatch printed; for an array member, the array's id.
    pub job_id: u64,
    pub array_index: Option<u32>,
    pub log_path: PathBuf,
    pub script: PathBuf,
    /// Resource changes made to fit the cluster (also logged as tracing warnings).
    pub warnings: Vec<String>,
}

impl Submitted {
    /// The id Slurm tools accept for exactly this job: "123" or "123_4".
    pub fn slurm_id(&self) -> String {
        match self.array_index {
            Some(i) => format!("{}_{}", self.job_id, i),
            None => self.job_id.to_string(),
        }
    }
}

/// One line of `sinfo -h -o '%P|%c|%m|%G'`: a partition's node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub name: String,
    pub default: bool,
    pub cpus: u32,
    pub mem_mb: u64,
    /// Generic resources, e.g. ["gpu:a100:4(S:0-1)"]; empty for "(null)".
    pub gres: Vec<String>,
}

/// What the cluster offers, per partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub partitions: Vec<PartitionInfo>,
}

impl ClusterInfo {
    pub fn probe(commands: &SlurmCommands) -> Result<ClusterInfo> {
        let args: Vec<OsString> = ["-h", "-o", "%P|%c|%m|%G"]
            .iter()
            .map(OsString::from)
            .collect();
        let out = commands.run(Program::Sinfo, &args)?.ok()?;
        ClusterInfo::parse(&out)
    }

    pub fn parse(sinfo: &str) -> Result<ClusterInfo> {
        let leading_number = |s: &str| s.trim().trim_end_matches('+').parse::<u64>().ok();
        let mut partitions = Vec::new();
        for line in sinfo.lines().filter(|l| !l.trim().is_empty()) {
            let bad = |expected: &str| Error::Parse {
                what: "sinfo",
                line: line.to_string(),
                expected: expected.into(),
            };
            let [name, cpus, mem, gres] = line.split('|').collect::<Vec<_>>()[..] else {
                return Err(bad("4 fields PARTITION|CPUS|MEMORY|GRES"));
            };
            let gres = gres.trim();
            partitions.push(PartitionInfo {
                name: name.trim().trim_end_matches('*').to_string(),
                default: name.trim().ends_with('*'),
                cpus: leading_number(cpus).ok_or_else(|| bad("a CPU count in field 2"))? as u32,
                mem_mb: leading_number(mem).ok_or_else(|| bad("memory in MB in field 3"))?,
                gres: if gres.is_empty() || gres == "(null)" {
                    Vec::new()
                } else {
                    split_gres(gres)
                },
            });
        }
        Ok(ClusterInfo { partitions })
    }

    /// Node configurations jobs without `--partition` land on (the default partition's).
    fn targets(&self, partition: Option<&str>) -> Vec<&PartitionInfo> {
        match partition {
            Some(name) => self.partitions.iter().filter(|p| p.name == name).collect(),
            None if self.partitions.iter().any(|p| p.default) => {
                self.partitions.iter().filter(|p| p.default).collect()
            }
            None => self.partitions.iter().collect(),
        }
    }
}

/// Splits "gpu:a100:4(S:0-1),gpu:v100:2" on the commas outside parentheses.
fn split_gres(gres: &str) -> Vec<String> {
    let (mut parts, mut current, mut depth) = (Vec::new(), String::new(), 0usize);
    for c in gres.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
}

/// `resources` adjusted to `cluster`, with one warning per change.
pub(crate) fn fit_resources(
    key: &str,
    resources: &Resources,
    cluster: &ClusterInfo,
    gpus: GpuPolicy,
    fit_to_nodes: bool,
) -> Result<(Resources, Vec<String>)> {
    let targets = cluster.targets(resources.partition.as_deref());
    let partition_label = resources
        .partition
        .clone()
        .unwrap_or_else(|| "(default)".into());
    let mut fitted = resources.clone();
    let mut warnings = Vec::new();
    if targets.is_empty() {
        // Unknown partition: let sbatch say so.
        return Ok((fitted, warnings));
    }
    if let Some(n) = resources.gpus.filter(|n| *n > 0) {
        let has_gpus = targets
            .iter()
            .any(|p| p.gres.iter().any(|g| g.starts_with("gpu")));
        if !has_gpus {
            match gpus {
                GpuPolicy::Keep => {}
                GpuPolicy::Error => {
                    return Err(Error::NoGpus {
                        key: key.into(),
                        gpus: n,
                        partition: partition_label,
                    });
                }
                GpuPolicy::Auto => {
                    fitted.gpus = Some(0);
                    warnings.push(format!(
                        "{key}: dropped --gpus={n}: no node of partition {partition_label} has GPU gres"
                    ));
                }
            }
        }
    }
    if fit_to_nodes {
        let max_cpus = targets.iter().map(|p| p.cpus).max().unwrap_or(0);
        let max_mem = targets.iter().map(|p| p.mem_mb).max().unwrap_or(0);
        if let Some(c) = resources.cpus.filter(|c| *c > max_cpus && max_cpus > 0) {
            fitted.cpus = Some(max_cpus);
            warnings.push(format!(
                "{key}: cpus {c} -> {max_cpus}: the largest node of partition {partition_label} has {max_cpus} CPUs"
            ));
        }
        if let Some(mb) = resources
            .mem_mb()?
            .filter(|mb| *mb > max_mem && max_mem > 0)
        {
            fitted.mem = Some(format!("{max_mem}M"));
            warnings.push(format!(
                "{key}: mem {} -> {max_mem}M: the largest node of partition {partition_label} has {max_mem} MB ({mb} MB asked)",
                resources.mem.as_deref().unwrap_or_default()
            ));
        }
    }
    Ok((fitted, warnings))
}

/// Queues `jobs` and returns, per job in input order, its Slurm id and log path.
///
/// On a failed sbatch the jobs this call already queued are cancelled, so no half-submitted
/// pipeline keeps running.
pub fn submit(jobs: &[JobSpec], opts: &SubmitOptions) -> Result<Vec<Submitted>> {
    for job in jobs {
        job.resources.validate()?;
    }
    // Dependency errors surface before any Slurm command runs.
    plan(jobs, false)?;
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let needs_cluster = opts.fit_to_nodes
        || (opts.gpus != GpuPolicy::Keep && jobs.iter().any(|j| j.resources.gpus.unwrap_or(0) > 0));
    let cluster = match (&opts.cluster, needs_cluster) {
        (Some(c), _) => Some(c.clone()),
        (None, true) => {
            match ClusterInfo::probe(&opts.commands) {
                Ok(c) => Some(c),
                Err(e @ Error::NotFound { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!("could not query the cluster's partitions, submitting resources as given: {e}");
                    None
                }
            }
        }
        (None, false) => None,
    };
    let mut fitted_jobs = Vec::with_capacity(jobs.len());
    let mut warnings = Vec::with_capacity(jobs.len());
    for job in jobs {
        let (resources, w) = match &cluster {
            Some(c) => fit_resources(&job.key, &job.resources, c, opts.gpus, opts.fit_to_nodes)?,
            None => (job.resources.clone(), Vec::new()),
        };
        for line in &w {
            tracing::warn!("{line}");
        }
        warnings.push(w);
        // Slurm resolves relative --output paths against the job's workdir, not ours.
        fitted_jobs.push(JobSpec {
            resources,
            workdir: absolute(&job.workdir)?,
            log_dir: absolute(&job.log_dir)?,
            ..job.clone()
        });
    }

    let groups = plan(&fitted_jobs, opts.arrays)?;
    let submission_dir = absolute(&opts.dir)?;
    create_dir(&submission_dir)?;
    let mut group_ids: Vec<u64> = Vec::with_capacity(groups.len());
    let mut submitted: Vec<Option<Submitted>> = vec![None; jobs.len()];
    for (g, group) in groups.iter().enumerate() {
        let members: Vec<&JobSpec> = group.members.iter().map(|&i| &fitted_jobs[i]).collect();
        let first = members[0];
        let name = file_safe(&first.name);
        let script_path = submission_dir.join(format!("{g:03}-{name}.sbatch"));
        let is_array = members.len() > 1;
        let log_pattern = first.log_dir.join(if is_array {
            format!("{name}-%A_%a.log")
        } else {
            format!("{name}-%j.log")
        });

        let mut args: Vec<OsString> = vec![
            "--parsable".into(),
            format!("--job-name={}", first.name).into(),
        ];
        let mut output = OsString::from("--output=");
        output.push(log_pattern.as_os_str());
        let mut chdir = OsString::from("--chdir=");
        chdir.push(first.workdir.as_os_str());
        args.push(output);
        args.push(chdir);
        args.extend(
            first
                .resources
                .sbatch_args()
                .into_iter()
                .map(OsString::from),
        );
        if is_array {
            args.push(format!("--array=0-{}", members.len() - 1).into());
        }
        if let Some(dep) = dependency_arg(group, &group_ids) {
            args.push(format!("--dependency={dep}").into());
            args.push("--kill-on-invalid-dep=yes".into());
        }
        args.push(script_path.clone().into_os_string());

        let queue = || -> Result<u64> {
            create_dir(&first.log_dir)?;
            let script = render(&members, &render_command(&opts.commands.sbatch, &args))?;
            std::fs::write(&script_path, script).map_err(|source| Error::Io {
                path: script_path.clone(),
                source,
            })?;
            let out = opts.commands.run(Program::Sbatch, &args)?.ok()?;
            crate::cluster::parse::parse_sbatch_parsable(&out)
        };
        let job_id = match queue() {
            Ok(id) => id,
            Err(source) => {
                let cancelled: Vec<String> = group_ids.iter().map(u64::to_string).collect();
                if cancelled.is_empty() {
                    return Err(source);
                }
                if let Err(e) = crate::cluster::cancel(&cancelled, &opts.commands) {
                    tracing::warn!("could not cancel the jobs already queued ({cancelled:?}): {e}");
                }
                return Err(Error::Submit {
                    key: first.key.clone(),
                    source: Box::new(source),
                    cancelled,
                });
            }
        };
        group_ids.push(job_id);
        for (index, &i) in group.members.iter().enumerate() {
            let job = &fitted_jobs[i];
            let array_index = is_array.then_some(index as u32);
            let log_name = match array_index {
                Some(a) => format!("{name}-{job_id}_{a}.log"),
                None => format!("{name}-{job_id}.log"),
            };
            submitted[i] = Some(Submitted {
                key: job.key.clone(),
                job_id,
                array_index,
                log_path: job.log_dir.join(log_name),
                script: script_path.clone(),
                warnings: warnings[i].clone(),
            });
        }
    }
    let submitted: Vec<Submitted> = submitted.into_iter().flatten().collect();
    write_manifest(&submission_dir, jobs, &submitted)?;
    Ok(submitted)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// `submission.json`: the jobs as asked and as queued, for `runner` status commands and humans.
fn write_manifest(dir: &Path, jobs: &[JobSpec], submitted: &[Submitted]) -> Result<()> {
    let path = dir.join("submission.json");
    let manifest = serde_json::json!({ "jobs": jobs, "submitted": submitted });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Io {
        path: path.clone(),
        source: e.into(),
    })?;
    std::fs::write(&path, text + "\n").map_err(|source| Error::Io { path, source })
}

/// Reads back the `Submitted` records of a submission folder.
pub fn read_manifest(dir: &Path) -> Result<Vec<Submitted>> {
    let path = dir.join("submission.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    #[derive(Deserialize)]
    struct Manifest {
        submitted: Vec<Submitted>,
    }
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Io {
        path,
        source: e.into(),
    })?;
    Ok(manifest.submitted)
}
