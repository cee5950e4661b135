//! `submit`, `status` and `cancel`: recipes and parameter sweeps as Slurm jobs, one per stage.
//!
//! Each sweep point is planned like `runner run`; stages are unified by fingerprint, so a stage
//! shared by several points becomes one job, and cached stages become no job at all. A job runs
//! `runner run RECIPE --only STAGE --set ...` against the shared store.

use super::jobs::SubmitFlags;
use super::Failure;
use anyhow::{anyhow, Context};
use clap::Args;
use runner::cluster::{self, JobSpec, JobState, Resources, SlurmCommands};
use runner::pipeline::record::{default_runs_dir, git_revision, new_run_id};
use runner::pipeline::{Plan, RunRecord, StageRecord, StageState, Store};
use runner::recipe::RawRecipe;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct SubmitArgs {
    /// The recipe file.
    recipe: PathBuf,
    /// Override a recipe key for every sweep point (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Sweep a key over values: --sweep stages.sft.learning_rate=1e-4,2e-4 (repeatable; the
    /// points are the cartesian product).
    #[arg(long, value_name = "KEY=V1,V2,...")]
    sweep: Vec<String>,
    /// Artifact store shared by the cluster nodes (default .runner/store; env RUNNER_STORE).
    #[arg(long)]
    store: Option<PathBuf>,
    #[command(flatten)]
    flags: SubmitFlags,
}

/// The override lists of every sweep point.
pub fn sweep_points(base: &[String], sweeps: &[String]) -> Result<Vec<Vec<String>>, Failure> {
    let mut points = vec![base.to_vec()];
    for sweep in sweeps {
        let (key, values) = sweep
            .split_once('=')
            .ok_or_else(|| anyhow!("--sweep {sweep}: expected KEY=V1,V2,..."))?;
        let values: Vec<&str> = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(anyhow!("--sweep {sweep}: no values").into());
        }
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut q = p.clone();
                    q.push(format!("{key}={v}"));
                    q
                })
            })
            .collect();
    }
    Ok(points)
}

struct UniqueStage {
    name: String,
    kind: String,
    overrides: Vec<String>,
    upstream: Vec<String>,
    resources: Option<toml::Value>,
    /// Trains with one rank per GPU when it asks for several (see `runner::dist`).
    data_parallel: bool,
    points: Vec<usize>,
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

pub fn submit(args: SubmitArgs) -> Result<(), Failure> {
    let store_root = absolute(&args.store.clone().unwrap_or_else(Store::default_root));
    let store = Store::open(&store_root)?;
    let runs_dir = default_runs_dir(&store_root);
    let recipe_abs = absolute(&args.recipe);
    let points = sweep_points(&args.set, &args.sweep)?;
    let mut unique: BTreeMap<String, UniqueStage> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut first_plan: Option<Plan> = None;
    // A sweep plans the recipe once per point: its model files are hashed once.
    let hashes = store.file_hashes();
    for (p, overrides) in points.iter().enumerate() {
        let plan = Plan::build_with_hashes(
            RawRecipe::load(&args.recipe, overrides)?,
            runner::stages::registry(),
            &hashes,
        )?;
        for s in &plan.stages {
            let entry = unique.entry(s.fingerprint.clone()).or_insert_with(|| {
                order.push(s.fingerprint.clone());
                UniqueStage {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                    overrides: overrides.clone(),
                    upstream: s
                        .deps
                        .iter()
                        .map(|&d| plan.stages[d].fingerprint.clone())
                        .collect(),
                    resources: s.resources.clone(),
                    data_parallel: s.stage.data_parallel(),
                    points: Vec::new(),
                }
            });
            entry.points.push(p);
        }
        first_plan.get_or_insert(plan);
    }
    hashes.save();
    let plan = first_plan.ok_or_else(|| anyhow!("nothing to submit"))?;
    let run_id = new_run_id();
    let log_dir = runs_dir.join(&run_id).join("logs");
    let exe = std::env::current_exe().context("cannot find the runner executable")?;
    let workdir = std::env::current_dir().context("no current folder")?;

    let key = |fp: &str| format!("{}@{}", unique[fp].name, &fp[..12]);
    let mut jobs = Vec::new();
    for fp in &order {
        let s = &unique[fp];
        if store.contains(fp) {
            continue;
        }
        let recipe_resources: Option<Resources> = match &s.resources {
            None => None,
            Some(v) => Some(
                v.clone()
                    .try_into()
                    .map_err(|e| anyhow!("stages.{}.resources: {e}", s.name))?,
            ),
        };
        let resources = Resources::for_stage(&s.kind, recipe_resources.as_ref())
            .with_context(|| format!("stages.{}.resources", s.name))?;
        let mut argv = vec![
            exe.to_string_lossy().to_string(),
            "run".into(),
            recipe_abs.to_string_lossy().to_string(),
            "--only".into(),
            s.name.clone(),
            "--store".into(),
            store_root.to_string_lossy().to_string(),
        ];
        for o in &s.overrides {
            argv.push("--set".into());
            argv.push(o.clone());
        }
        let mut job = JobSpec {
            key: key(fp),
            name: s.name.clone(),
            argv,
            workdir: workdir.clone(),
            env: vec![(
                "RUNNER_STORE".into(),
                store_root.to_string_lossy().to_string(),
            )],
            resources,
            depends_on: s
                .upstream
                .iter()
                .filter(|u| !store.contains(u))
                .map(|u| key(u))
                .collect(),
            log_dir: log_dir.clone(),
        };
        if s.data_parallel {
            cluster::spread_ranks(&mut job);
        }
        jobs.push(job);
    }

    let submitted = if jobs.is_empty() {
        Vec::new()
    } else {
        let opts = args.flags.options(&format!("{}-{run_id}", plan.name));
        cluster::submit(&jobs, &opts)?
    };
    for s in &submitted {
        for w in &s.warnings {
            eprintln!("warning: {}: {w}", s.key);
        }
    }
    let by_key: BTreeMap<&str, &cluster::Submitted> =
        submitted.iter().map(|s| (s.key.as_str(), s)).collect();
    let sweep_label = |s: &UniqueStage| {
        if points.len() > 1 && s.points.len() < points.len() {
            let extra: Vec<&str> = s.overrides[args.set.len()..]
                .iter()
                .map(String::as_str)
                .collect();
            format!("{}[{}]", s.name, extra.join(","))
        } else {
            s.name.clone()
        }
    };
    let mut stages = Vec::new();
    for fp in &order {
        let s = &unique[fp];
        let job = by_key.get(key(fp).as_str());
        let cached = store.contains(fp);
        stages.push(StageRecord {
            name: sweep_label(s),
            kind: s.kind.clone(),
            fingerprint: fp.clone(),
            inputs: s.upstream.iter().map(|u| sweep_label(&unique[u])).collect(),
            state: if cached {
                StageState::Cached
            } else {
                StageState::Submitted
            },
            reason: None,
            duration_s: 0.0,
            artifact: store.artifact(fp).to_string_lossy().to_string(),
            error: None,
            job_id: job.map(|j| j.slurm_id()),
            log_path: job.map(|j| j.log_path.to_string_lossy().to_string()),
        });
        let state = match job {
            Some(j) => format!("job {}", j.slurm_id()),
            None => "cached".into(),
        };
        eprintln!("  {:<28} {:<9} {state}", sweep_label(s), s.kind);
    }
    let record = RunRecord {
        run_id: run_id.clone(),
        recipe_path: args.recipe.to_string_lossy().to_string(),
        recipe_dir: plan.recipe.dir.to_string_lossy().to_string(),
        recipe_name: plan.name.clone(),
        resolved_recipe: serde_json::to_value(&plan.recipe.table).unwrap_or_default(),
        overrides: args.set.iter().chain(args.sweep.iter()).cloned().collect(),
        started_at: chrono::Utc::now().to_rfc3339(),
        finished_at: None,
        status: if submitted.is_empty() {
            "succeeded".into()
        } else {
            "submitted".into()
        },
        runner_version: env!("CARGO_PKG_VERSION").into(),
        git_revision: git_revision(&plan.recipe.dir),
        host: runner::pipeline::host::host_name(),
        device: plan.device.clone(),
        store: store_root.to_string_lossy().to_string(),
        executor: "slurm".into(),
        pid: None,
        stages,
    };
    record.save(&runs_dir)?;
    eprintln!(
        "submission {run_id}: {} job(s) for {} sweep point(s); `runner status {run_id}` follows them",
        submitted.len(),
        points.len()
    );
    println!("{run_id}");
    Ok(())
}

#[derive(Args)]
pub struct StatusArgs {
    /// A run id (see `runner runs`).
    run_id: String,
    #[arg(long)]
    store: Option<PathBuf>,
}

fn load_record(store: &Option<PathBuf>, run_id: &str) -> Result<(RunRecord, PathBuf), Failure> {
    let root = store.clone().unwrap_or_else(Store::default_root);
    let runs_dir = default_runs_dir(&root);
    let record = RunRecord::load(&runs_dir, run_id)
        .with_context(|| format!("no run `{run_id}` (see `runner runs`)"))?;
    Ok((record, runs_dir))
}

pub fn status(args: StatusArgs) -> Result<(), Failure> {
    let (mut record, runs_dir) = load_record(&args.store, &args.run_id)?;
    let store = Store::open(Path::new(&record.store))?;
    let ids: Vec<String> = record
        .stages
        .iter()
        .filter_map(|s| s.job_id.clone())
        .collect();
    let statuses = if ids.is_empty() {
        Vec::new()
    } else {
        cluster::status(&ids, &SlurmCommands::from_env())?
    };
    let mut failed = 0;
    let mut unfinished = 0;
    for stage in &mut record.stages {
        let status = stage
            .job_id
            .as_ref()
            .and_then(|id| statuses.iter().find(|s| &s.job_id == id));
        let text = match (stage.job_id.as_ref(), status.map(|s| &s.state)) {
            (None, _) => "cached".to_string(),
            (Some(_), Some(JobState::Done)) => {
                stage.state = if store.contains(&stage.fingerprint) {
                    StageState::Run
                } else {
                    StageState::Failed
                };
                if stage.state == StageState::Failed {
                    failed += 1;
                    stage.error = Some("job finished but left no artifact".into());
                    "failed (no artifact)".into()
                } else {
                    "done".into()
                }
            }
            (Some(_), Some(job @ JobState::Failed { .. })) => {
                failed += 1;
                stage.state = StageState::Failed;
                stage.error = Some(format!(
                    "job failed ({}); log: {}",
                    job.failure_detail().unwrap_or_default(),
                    stage.log_path.as_deref().unwrap_or("?")
                ));
                format!("failed: {}", stage.error.as_deref().unwrap_or(""))
            }
            (Some(_), Some(JobState::Cancelled { reason })) => {
                failed += 1;
                stage.state = StageState::Skipped;
                let why = match reason.as_deref() {
                    Some("DependencyNeverSatisfied") => "a stage it depends on failed".to_string(),
                    Some(r) => r.to_string(),
                    None => "cancelled".to_string(),
                };
                stage.error = Some(format!("cancelled: {why}"));
                format!("cancelled ({why})")
            }
            (Some(_), Some(JobState::Pending)) => {
                unfinished += 1;
                "pending".into()
            }
            (Some(_), Some(JobState::Running)) => {
                unfinished += 1;
                "running".into()
            }
            (Some(_), _) => {
                unfinished += 1;
                "unknown".into()
            }
        };
        println!(
            "{:<28} {:<9} {:<12} {}",
            stage.name,
            stage.kind,
            stage.job_id.as_deref().unwrap_or("-"),
            text
        );
    }
    // A run is only failed once Slurm has settled every job (dependants get cancelled after).
    record.status = if unfinished > 0 {
        "submitted".into()
    } else if failed > 0 {
        "failed".into()
    } else {
        "succeeded".into()
    };
    if unfinished == 0 {
        record
            .finished_at
            .get_or_insert_with(|| chrono::Utc::now().to_rfc3339());
    }
    record.save(&runs_dir)?;
    println!("run {}: {}", record.run_id, record.status);
    Ok(())
}

pub fn cancel(args: StatusArgs) -> Result<(), Failure> {
    let (record, _) = load_record(&args.store, &args.run_id)?;
    let ids: Vec<String> = record
        .stages
        .iter()
        .filter_map(|s| s.job_id.clone())
        .collect();
    if ids.is_empty() {
        println!("run {} has no cluster jobs", record.run_id);
        return Ok(());
    }
    let commands = SlurmCommands::from_env();
    let live: Vec<String> = cluster::status(&ids, &commands)?
        .into_iter()
        .filter(|s| !s.state.is_finished())
        .map(|s| s.job_id)
        .collect();
    if live.is_empty() {
        println!("nothing left to cancel");
    } else {
        cluster::cancel(&live, &commands)?;
        println!("cancelled {}", live.join(" "));
    }
    Ok(())
}
