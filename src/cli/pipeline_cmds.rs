//! `run`, `plan`, `graph`, `path`, `cache`, `runs` and `rerun`.

use super::Failure;
use anyhow::{anyhow, Context};
use clap::{Args, Subcommand, ValueEnum};
use runner::pipeline::record::default_runs_dir;
use runner::pipeline::run::explain;
use runner::pipeline::{execute, Plan, RunOptions, RunRecord, StageState, Store};
use runner::recipe::{RawRecipe, SpanMap};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Args, Clone)]
pub struct StoreArgs {
    /// Artifact store folder (default .runner/store; env RUNNER_STORE).
    #[arg(long, global = true)]
    store: Option<PathBuf>,
}

impl StoreArgs {
    fn root(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(Store::default_root)
    }
    fn open(&self) -> Result<Store, Failure> {
        Ok(Store::open(&self.root())?)
    }
    fn runs_dir(&self) -> PathBuf {
        default_runs_dir(&self.root())
    }
}

#[derive(Args, Clone)]
pub struct RecipeArgs {
    /// The recipe file.
    recipe: PathBuf,
    /// Override any recipe key: --set stages.raw.encoding=gbk (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl RecipeArgs {
    /// The recipe's plan; with a store, its external files are hashed through the store's memo.
    fn plan(&self, store: Option<&Store>) -> Result<Plan, Failure> {
        let raw = RawRecipe::load(&self.recipe, &self.set)?;
        let Some(store) = store else {
            return Ok(Plan::build(raw, runner::stages::registry())?);
        };
        let hashes = store.file_hashes();
        let plan = Plan::build_with_hashes(raw, runner::stages::registry(), &hashes)?;
        hashes.save();
        Ok(plan)
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// Rebuild this stage even if it is cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Run only this stage (its inputs must already be built; repeatable).
    #[arg(long, value_name = "STAGE")]
    only: Vec<String>,
    /// Stages to run at once.
    #[arg(long, short = 'j', default_value_t = 2)]
    jobs: usize,
    /// cpu, cuda, cuda:N or auto (default: the recipe's `device`, else auto).
    #[arg(long)]
    device: Option<String>,
}

fn finish(record: &RunRecord, runs_dir: &Path) -> Result<(), Failure> {
    let ran = record
        .stages
        .iter()
        .filter(|s| s.state == StageState::Run)
        .count();
    let cached = record
        .stages
        .iter()
        .filter(|s| s.state == StageState::Cached)
        .count();
    let failed: Vec<&str> = record
        .stages
        .iter()
        .filter(|s| s.state == StageState::Failed)
        .map(|s| s.name.as_str())
        .collect();
    let report = match runner::report::write_report(runs_dir, &record.run_id, None, None) {
        Ok(path) => format!(", report {}", path.display()),
        Err(e) => {
            tracing::warn!("could not write the run report: {e}");
            String::new()
        }
    };
    eprintln!(
        "run {}: {ran} ran, {cached} cached, {} failed; record {}{report}",
        record.run_id,
        failed.len(),
        RunRecord::path(runs_dir, &record.run_id).display()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        let details: Vec<String> = record
            .stages
            .iter()
            .filter(|s| s.state == StageState::Failed)
            .map(|s| {
                format!(
                    "stage `{}` failed: {}",
                    s.name,
                    s.error.as_deref().unwrap_or("")
                )
            })
            .collect();
        Err(Failure {
            code: 1,
            error: anyhow!("{}", details.join("\n")),
        })
    }
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    let store = args.store.open()?;
    let plan = args.recipe.plan(Some(&store))?;
    let dist_error = |e: runner::dist::DistError| Failure {
        code: 1,
        error: anyhow!("data parallel: {e}"),
    };
    if runner::dist::World::from_env()
        .map_err(dist_error)?
        .is_none()
    {
        let (gpus, nodes) = plan.data_parallel_width(&args.only);
        if nodes > 1 {
            return Err(Failure {
                code: 2,
                error: anyhow!(
                    "a training stage asks for resources.nodes = {nodes}: ranks on several nodes \
                     start through Slurm (`runner submit`)"
                ),
            });
        }
        if gpus > 1 {
            // One GPU per rank; on the CPU (`device = "cpu"`, or no NVIDIA driver) the ranks
            // share the cores.
            let device = args.device.clone().unwrap_or_else(|| plan.device.clone());
            let on_cpu = device
                .parse::<runner::model::device::DeviceChoice>()
                .is_ok_and(runner::model::device::resolves_to_cpu);
            match runner::dist::visible_gpus().filter(|_| !on_cpu) {
                Some(have) if have < gpus as usize => {
                    return Err(Failure {
                        code: 2,
                        error: anyhow!(
                            "a training stage asks for resources.gpus = {gpus}, one rank per GPU, \
                             but this machine shows {have} (CUDA_VISIBLE_DEVICES or the driver): \
                             lower resources.gpus or run where there are more"
                        ),
                    });
                }
                Some(_) => {}
                None => eprintln!("on the CPU: the {gpus} ranks share its cores"),
            }
            return launch_local_ranks(gpus as usize);
        }
    }
    // One rank of several (RUNNER_RANK/RANK/SLURM_PROCID ...): the training stages run data
    // parallel with the other ranks (see `runner::dist`).
    let joined = runner::dist::join_from_env().map_err(dist_error)?;
    if let Some(world) = joined {
        tracing::info!(rank = world.rank, world = world.size, "joined the ranks");
    }
    let runs_dir = args.store.runs_dir();
    let opts = RunOptions {
        runs_dir: runs_dir.clone(),
        force: args.force,
        only: args.only,
        jobs: args.jobs,
        device: args.device.unwrap_or_else(|| plan.device.clone()),
        run_id: None,
    };
    let record = execute(&plan, &store, &opts)?;
    finish(&record, &runs_dir)
}

/// Runs this same command as `ranks` processes, rank i on GPU i (a training stage asked for
/// `resources.gpus = ranks`), joined through a free local port; fails with the first rank that
/// fails.
fn launch_local_ranks(ranks: usize) -> Result<(), Failure> {
    let exe = std::env::current_exe().context("locating the runner binary to start its ranks")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .context("finding a free port for the ranks to meet")?
        .port();
    eprintln!("starting {ranks} ranks (data parallel training, one GPU each)");
    let mut children = Vec::with_capacity(ranks);
    for rank in 0..ranks {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .env("RUNNER_RANK", rank.to_string())
            .env("RUNNER_WORLD_SIZE", ranks.to_string())
            .env("RUNNER_LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push(child);
    }
    let mut failure = None;
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = child
            .wait()
            .with_context(|| format!("waiting for rank {rank}"))?;
        if !status.success() && failure.is_none() {
            failure = Some(Failure {
                code: status
                    .code()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or(1),
                error: anyhow!("rank {rank} of {ranks} failed ({status})"),
            });
        }
    }
    failure.map_or(Ok(()), Err)
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// Print one JSON object per stage (name, kind, fingerprint, cached, reason, artifact).
    #[arg(long)]
    json: bool,
}

pub fn plan(args: PlanArgs) -> Result<(), Failure> {
    let store = args.store.open()?;
    let plan = args.recipe.plan(Some(&store))?;
    let records = RunRecord::list(&args.store.runs_dir());
    if args.json {
        for (i, s) in plan.stages.iter().enumerate() {
            let cached = store.contains(&s.fingerprint);
            println!(
                "{}",
                serde_json::json!({
                    "name": s.name,
                    "kind": s.kind,
                    "fingerprint": s.fingerprint,
                    "cached": cached,
                    "reason": if cached { None } else { Some(explain(&plan, &store, &records, i)) },
                    "artifact": store.artifact(&s.fingerprint),
                    "inputs": s.inputs.iter().map(|r| r.stage.clone()).collect::<Vec<_>>(),
                })
            );
        }
        return Ok(());
    }
    println!("recipe {} ({} stages)", plan.name, plan.stages.len());
    let mut will_run: HashSet<usize> = HashSet::new();
    for (i, s) in plan.stages.iter().enumerate() {
        let inputs: Vec<String> = s
            .inputs
            .iter()
            .map(|r| match &r.output {
                Some(o) => format!("{}.{o}", r.stage),
                None => r.stage.clone(),
            })
            .collect();
        let from = if inputs.is_empty() {
            String::new()
        } else {
            format!(" <- {}", inputs.join(", "))
        };
        if store.contains(&s.fingerprint) {
            println!(
                "  cached  {:<12} {:<9} {}{from}",
                s.name,
                s.kind,
                &s.fingerprint[..12]
            );
        } else {
            will_run.insert(i);
            let why = match s.deps.iter().find(|d| will_run.contains(d)) {
                Some(&d) if explain(&plan, &store, &records, i) == "not built before" => {
                    format!("input `{}` will be rebuilt", plan.stages[d].name)
                }
                _ => explain(&plan, &store, &records, i),
            };
            println!(
                "  run     {:<12} {:<9} {}{from}  ({why})",
                s.name,
                s.kind,
                &s.fingerprint[..12]
            );
        }
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
}

#[derive(Args)]
pub struct GraphArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    #[arg(long, value_enum, default_value = "dot")]
    format: GraphFormat,
}

pub fn graph(args: GraphArgs) -> Result<(), Failure> {
    let plan = args.recipe.plan(None)?;
    match args.format {
        GraphFormat::Dot => {
            println!(
                "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];",
                plan.name
            );
            for s in &plan.stages {
                println!("  \"{}\" [label=\"{}\\n({})\"];", s.name, s.name, s.kind);
            }
            for s in &plan.stages {
                for r in &s.inputs {
                    let label = r
                        .output
                        .as_deref()
                        .map(|o| format!(" [label=\"{o}\"]"))
                        .unwrap_or_default();
                    println!("  \"{}\" -> \"{}\"{label};", r.stage, s.name);
                }
            }
            println!("}}");
        }
        GraphFormat::Mermaid => {
            println!("flowchart LR");
            for s in &plan.stages {
                println!("  {}[\"{} ({})\"]", s.name, s.name, s.kind);
            }
            for s in &plan.stages {
                for r in &s.inputs {
                    match &r.output {
                        Some(o) => println!("  {} -->|{o}| {}", r.stage, s.name),
                        None => println!("  {} --> {}", r.stage, s.name),
                    }
                }
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct PathArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// The stage whose artifact folder to print.
    stage: String,
    #[command(flatten)]
    store: StoreArgs,
}

pub fn path(args: PathArgs) -> Result<(), Failure> {
    let store = args.store.open()?;
    let plan = args.recipe.plan(Some(&store))?;
    let stage = plan.require_stage(&args.stage)?;
    if !store.contains(&stage.fingerprint) {
        return Err(Failure {
            code: 1,
            error: anyhow!(
                "stage `{}` is not built for the recipe as it stands (fingerprint {}); run `runner run {}`",
                stage.name,
                &stage.fingerprint[..12],
                args.recipe.recipe.display()
            ),
        });
    }
    let dir = store.artifact(&stage.fingerprint);
    println!("{}", dir.canonicalize().unwrap_or(dir).display());
    Ok(())
}

#[derive(Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    action: CacheAction,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Subcommand)]
enum CacheAction {
    /// List artifacts with their stage, size and age.
    Ls,
    /// Re-hash every artifact file and report anything corrupt or incomplete.
    Verify,
    /// Delete artifacts no run record refers to, and leftovers of killed runs.
    Gc {
        /// Keep only artifacts of the newest N run records.
        #[arg(long)]
        keep_runs: Option<usize>,
    },
}

pub fn cache(args: CacheArgs) -> Result<(), Failure> {
    let store = args.store.open()?;
    match args.action {
        CacheAction::Ls => {
            for m in store.list() {
                let size: u64 = m.files.iter().map(|f| f.size).sum();
                println!(
                    "{}  {:<12} {:<9} {:>10}  {}",
                    &m.fingerprint[..12],
                    m.stage,
                    m.kind,
                    human_size(size),
                    m.created_at
                );
            }
        }
        CacheAction::Verify => {
            let problems = store.verify();
            let leftovers = store.abandoned_temps();
            for p in &problems {
                println!("CORRUPT {p}");
            }
            if !leftovers.is_empty() {
                println!(
                    "{} unfinished build folder(s) from interrupted runs (not artifacts; `runner cache gc` removes them)",
                    leftovers.len()
                );
            }
            let count = store.list().len();
            if problems.is_empty() {
                println!("{count} artifacts verified, none corrupt");
            } else {
                return Err(Failure {
                    code: 1,
                    error: anyhow!("{} problem(s) in {}", problems.len(), store.root.display()),
                });
            }
        }
        CacheAction::Gc { keep_runs } => {
            let records = RunRecord::list(&args.store.runs_dir());
            let kept_records: Vec<&RunRecord> = match keep_runs {
                Some(n) => records.iter().rev().take(n).collect(),
                None => records.iter().collect(),
            };
            let keep: HashSet<String> = kept_records
                .iter()
                .flat_map(|r| r.stages.iter().map(|s| s.fingerprint.clone()))
                .collect();
            let (removed, bytes) = store.gc(&keep)?;
            println!("removed {removed} item(s), {}", human_size(bytes));
        }
    }
    Ok(())
}

fn human_size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[derive(Args)]
pub struct RunsArgs {
    #[command(flatten)]
    store: StoreArgs,
}

pub fn runs(args: RunsArgs) -> Result<(), Failure> {
    for r in RunRecord::list(&args.store.runs_dir()) {
        let ran = r
            .stages
            .iter()
            .filter(|s| s.state == StageState::Run)
            .count();
        let cached = r
            .stages
            .iter()
            .filter(|s| s.state == StageState::Cached)
            .count();
        let failed = r
            .stages
            .iter()
            .filter(|s| s.state == StageState::Failed)
            .count();
        println!(
            "{}  {:<10} {:<10} {ran} ran, {cached} cached, {failed} failed  {}{}",
            r.run_id,
            r.recipe_name,
            r.status_now(),
            r.recipe_path,
            if r.overrides.is_empty() {
                String::new()
            } else {
                format!(" --set {}", r.overrides.join(" --set "))
            }
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct RerunArgs {
    /// The run id (see `runner runs`).
    run_id: String,
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    #[arg(long, short = 'j', default_value_t = 2)]
    jobs: usize,
}

pub fn rerun(args: RerunArgs) -> Result<(), Failure> {
    let runs_dir = args.store.runs_dir();
    let old = RunRecord::load(&runs_dir, &args.run_id)
        .with_context(|| format!("no run `{}` (see `runner runs`)", args.run_id))?;
    let table: toml::Table = serde_json::from_value(old.resolved_recipe.clone())
        .context("the record's resolved recipe is not a table")?;
    let raw = RawRecipe::from_table(
        table,
        SpanMap::default(),
        PathBuf::from(&old.recipe_path),
        PathBuf::from(&old.recipe_dir),
        &[],
    )?;
    let mut raw = raw;
    raw.overrides = old.overrides.clone();
    let plan = Plan::build(raw, runner::stages::registry())?;
    for s in &plan.stages {
        if let Some(prev) = old.stages.iter().find(|p| p.name == s.name) {
            if prev.fingerprint != s.fingerprint {
                eprintln!(
                    "note: stage `{}` differs from the recorded run (its input files or runner changed)",
                    s.name
                );
            }
        }
    }
    let store = args.store.open()?;
    let opts = RunOptions {
        runs_dir: runs_dir.clone(),
        force: args.force,
        only: Vec::new(),
        jobs: args.jobs,
        device: old.device.clone(),
        run_id: None,
    };
    let record = execute(&plan, &store, &opts)?;
    finish(&record, &runs_dir)
}
