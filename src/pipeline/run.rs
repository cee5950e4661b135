//! The local scheduler ([`execute`], deciding from a `Schedule`): runs the stages the store
//! lacks, in dependency order, independent stages in parallel, at most one accelerator-heavy
//! stage at a time. A failed stage stops only its dependants; everything that finished stays
//! committed.

use super::context::{StageContext, StageInput};
use super::plan::Plan;
use super::record::{git_revision, new_run_id, RunRecord, StageRecord, StageState};
use super::store::{Manifest, Store};
use super::PipelineError;
use crate::console::say;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

pub struct RunOptions {
    pub runs_dir: PathBuf,
    /// Stages to rebuild even when cached.
    pub force: Vec<String>,
    /// Run only these stages (their inputs must be cached); empty means all.
    pub only: Vec<String>,
    /// Stages run at once at most.
    pub jobs: usize,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    pub run_id: Option<String>,
}

enum Outcome {
    Built { seconds: f64 },
    FoundCached,
    Failed(String),
}

/// Why a stage will run: what differs from the last build of a stage with the same name.
/// `records` are the run records, oldest first ([`RunRecord::list`]), read once by the caller.
pub fn explain(plan: &Plan, store: &Store, records: &[RunRecord], index: usize) -> String {
    let stage = &plan.stages[index];
    let previous = records
        .iter()
        .rev()
        .filter(|r| r.recipe_name == plan.name)
        .flat_map(|r| r.stages.iter())
        .find(|s| {
            s.name == stage.name
                && s.fingerprint != stage.fingerprint
                && store.contains(&s.fingerprint)
        });
    let Some(previous) = previous.and_then(|p| store.manifest(&p.fingerprint)) else {
        return "not built before".into();
    };
    let mut changes = super::fingerprint::diff(&previous.fingerprint_doc, &stage.fingerprint_doc);
    for change in &mut changes {
        if change.starts_with("inputs.") {
            let slot = change
                .trim_start_matches("inputs.")
                .split([':', '.', ' '])
                .next()
                .unwrap_or("")
                .to_string();
            let upstream: Vec<&str> = stage
                .inputs
                .iter()
                .filter(|i| i.slot == slot)
                .map(|i| i.stage.as_str())
                .collect();
            *change = format!("input `{}` changed", upstream.join(", "));
        } else if change.starts_with("external") {
            *change = "input files changed".into();
        }
    }
    changes.dedup();
    if changes.is_empty() {
        "not in store".into()
    } else {
        changes.join("; ")
    }
}

/// Where each stage of one run stands, and what the scheduler decides from: which stages the
/// run wants, their states, why each runs, and how each ended.
struct Schedule<'p> {
    plan: &'p Plan,
    wanted: Vec<bool>,
    state: Vec<StageState>,
    reason: Vec<Option<String>>,
    durations: Vec<f64>,
    errors: Vec<Option<String>>,
}

impl<'p> Schedule<'p> {
    /// Cached stages are settled; the others the run wants are pending with the reason they run.
    /// With `--only`, every input of a wanted stage must be wanted too or already built.
    fn new(plan: &'p Plan, store: &Store, opts: &RunOptions) -> Result<Self, PipelineError> {
        let n = plan.stages.len();
        for name in opts.force.iter().chain(opts.only.iter()) {
            plan.require_stage(name)?;
        }
        let wanted: Vec<bool> = plan
            .stages
            .iter()
            .map(|s| opts.only.is_empty() || opts.only.contains(&s.name))
            .collect();
        let mut state = vec![StageState::Pending; n];
        let mut reason: Vec<Option<String>> = vec![None; n];
        let records = RunRecord::list(&opts.runs_dir);
        for (i, s) in plan.stages.iter().enumerate() {
            if store.contains(&s.fingerprint) && !opts.force.contains(&s.name) {
                state[i] = StageState::Cached;
            } else if wanted[i] {
                reason[i] = Some(if opts.force.contains(&s.name) {
                    "forced with --force".into()
                } else {
                    explain(plan, store, &records, i)
                });
            }
        }
        for (s, _) in plan.stages.iter().zip(&wanted).filter(|(_, &w)| w) {
            for &d in &s.deps {
                if state[d] != StageState::Cached && !wanted[d] {
                    return Err(PipelineError::Store(format!(
                        "stage `{}` needs `{}`, which is not built; run it first (or drop --only)",
                        s.name, plan.stages[d].name
                    )));
                }
            }
        }
        Ok(Self {
            plan,
            wanted,
            state,
            reason,
            durations: vec![0.0; n],
            errors: vec![None; n],
        })
    }

    /// The run's record as it starts: every wanted stage, cached or pending.
    fn record(&self, store: &Store, opts: &RunOptions) -> RunRecord {
        let plan = self.plan;
        RunRecord {
            run_id: opts.run_id.clone().unwrap_or_else(new_run_id),
            recipe_path: plan.recipe.path.to_string_lossy().to_string(),
            recipe_dir: plan.recipe.dir.to_string_lossy().to_string(),
            recipe_name: plan.name.clone(),
            resolved_recipe: serde_json::to_value(&plan.recipe.table).unwrap_or_default(),
            overrides: plan.recipe.overrides.clone(),
            started_at: chrono::Utc::now().to_rfc3339(),
            finished_at: None,
            status: "running".into(),
            runner_version: env!("CARGO_PKG_VERSION").into(),
            git_revision: git_revision(&plan.recipe.dir),
            host: crate::pipeline::host::host_name(),
            device: opts.device.clone(),
            store: store
                .root
                .canonicalize()
                .unwrap_or(store.root.clone())
                .to_string_lossy()
                .to_string(),
            executor: "local".into(),
            pid: Some(std::process::id()),
            stages: plan
                .stages
                .iter()
                .enumerate()
                .filter(|(i, _)| self.wanted[*i])
                .map(|(i, s)| StageRecord {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                    fingerprint: s.fingerprint.clone(),
                    inputs: s
                        .inputs
                        .iter()
                        .map(|r| match &r.output {
                            Some(o) => format!("{}.{o}", r.stage),
                            None => r.stage.clone(),
                        })
                        .collect(),
                    state: self.state[i],
                    reason: self.reason[i].clone(),
                    duration_s: 0.0,
                    artifact: store.artifact(&s.fingerprint).to_string_lossy().to_string(),
                    error: None,
                    job_id: None,
                    log_path: None,
                })
                .collect(),
        }
    }

    /// Whether stage `i` can start now: wanted, pending, its inputs built, and no other heavy
    /// stage running if it is heavy.
    fn ready(&self, i: usize, heavy_running: bool) -> bool {
        let stage = &self.plan.stages[i];
        self.wanted[i]
            && self.state[i] == StageState::Pending
            && stage
                .deps
                .iter()
                .all(|&d| matches!(self.state[d], StageState::Run | StageState::Cached))
            && !(stage.stage.heavy() && heavy_running)
    }

    /// Takes what became of stage `i`; a failure skips the stages that depend on it.
    fn settle(&mut self, i: usize, outcome: Outcome, progress: &indicatif::MultiProgress) {
        let s = &self.plan.stages[i];
        match outcome {
            Outcome::Built { seconds } => {
                self.state[i] = StageState::Run;
                self.durations[i] = seconds;
                say(
                    Some(progress),
                    &format!(
                        "  done     {:<12} {:<9} {:.2}s  {}",
                        s.name,
                        s.kind,
                        seconds,
                        &s.fingerprint[..12]
                    ),
                );
            }
            Outcome::FoundCached => {
                self.state[i] = StageState::Cached;
                say(
                    Some(progress),
                    &format!(
                        "  cached   {:<12} {:<9} (built by another run)",
                        s.name, s.kind
                    ),
                );
            }
            Outcome::Failed(message) => {
                self.state[i] = StageState::Failed;
                say(
                    Some(progress),
                    &format!("  FAILED   {:<12} {:<9} {message}", s.name, s.kind),
                );
                self.errors[i] = Some(message);
                for d in self.plan.dependants(i) {
                    if self.state[d] == StageState::Pending {
                        self.state[d] = StageState::Skipped;
                        self.errors[d] = Some(format!("not run: `{}` failed", s.name));
                    }
                }
            }
        }
    }

    /// Copies the stages' states, durations and errors into `record`.
    fn update(&self, record: &mut RunRecord) {
        for r in record.stages.iter_mut() {
            if let Some(j) = self.plan.index_of(&r.name) {
                r.state = self.state[j];
                r.duration_s = self.durations[j];
                r.error = self.errors[j].clone();
            }
        }
    }
}

/// Runs `plan`: builds what the store lacks (independent stages at once, up to `opts.jobs`, one
/// heavy stage at a time), keeping the run record up to date after every stage.
pub fn execute(plan: &Plan, store: &Store, opts: &RunOptions) -> Result<RunRecord, PipelineError> {
    let mut schedule = Schedule::new(plan, store, opts)?;
    let mut record = schedule.record(store, opts);
    record.save(&opts.runs_dir)?;

    let progress = indicatif::MultiProgress::new();
    for (i, s) in plan.stages.iter().enumerate() {
        if schedule.wanted[i] && schedule.state[i] == StageState::Cached {
            say(
                Some(&progress),
                &format!(
                    "  cached   {:<12} {:<9} {}",
                    s.name,
                    s.kind,
                    &s.fingerprint[..12]
                ),
            );
        }
    }

    let mut heavy_running = false;
    let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
    std::thread::scope(|scope| {
        let mut running: HashSet<usize> = HashSet::new();
        loop {
            for i in 0..plan.stages.len() {
                if running.len() >= opts.jobs.max(1) || !schedule.ready(i, heavy_running) {
                    continue;
                }
                heavy_running |= plan.stages[i].stage.heavy();
                running.insert(i);
                schedule.state[i] = StageState::Submitted;
                say(
                    Some(&progress),
                    &format!(
                        "  running  {:<12} {:<9} ({})",
                        plan.stages[i].name,
                        plan.stages[i].kind,
                        schedule.reason[i].as_deref().unwrap_or("")
                    ),
                );
                let tx = tx.clone();
                let progress = progress.clone();
                let force = opts.force.contains(&plan.stages[i].name);
                let device = opts.device.clone();
                scope.spawn(move || {
                    let outcome = build_stage(plan, store, i, force, &device, progress);
                    let _ = tx.send((i, outcome));
                });
            }
            if running.is_empty() {
                break;
            }
            let Ok((i, outcome)) = rx.recv() else { break };
            running.remove(&i);
            if plan.stages[i].stage.heavy() {
                heavy_running = false;
            }
            schedule.settle(i, outcome, &progress);
            schedule.update(&mut record);
            let _ = record.save(&opts.runs_dir);
        }
    });

    schedule.update(&mut record);
    let failed = record
        .stages
        .iter()
        .filter(|s| s.state == StageState::Failed)
        .count();
    record.status = if failed > 0 { "failed" } else { "succeeded" }.into();
    record.finished_at = Some(chrono::Utc::now().to_rfc3339());
    record.save(&opts.runs_dir)?;
    Ok(record)
}

fn build_stage(
    plan: &Plan,
    store: &Store,
    index: usize,
    force: bool,
    device: &str,
    progress: indicatif::MultiProgress,
) -> Outcome {
    let stage = &plan.stages[index];
    // A data-parallel stage in a process of several ranks runs in all of them at once (see
    // `crate::dist`): rank 0 holds the lock, decides whether to build, and commits; the others
    // follow its decision, train beside it, and wait for its commit.
    let group = if stage.stage.data_parallel() {
        crate::dist::process_group()
    } else {
        None
    };
    let leader = group.as_ref().is_none_or(|g| g.world().rank == 0);
    let lock = if leader {
        match store.lock(&stage.fingerprint, |owner| {
            say(
                Some(&progress),
                &format!(
                    "  waiting  {:<12} another run is building it ({} pid {})",
                    stage.name, owner.host, owner.pid
                ),
            )
        }) {
            Ok(l) => Some(l),
            Err(e) => return Outcome::Failed(e.to_string()),
        }
    } else {
        None
    };
    let mut build = force || !store.contains(&stage.fingerprint);
    let work_dir = store.work_dir(&stage.fingerprint);
    if leader && build && force && work_dir.exists() {
        // --force means from scratch: not a resume from an earlier run's checkpoints.
        if let Err(e) = std::fs::remove_dir_all(&work_dir) {
            return Outcome::Failed(format!("{}: {e}", work_dir.display()));
        }
    }
    if let Some(g) = &group {
        // Rank 0's decision, reached after it cleared the work folder.
        match crate::dist::leader_says(g.as_ref(), build) {
            Ok(decided) => build = decided,
            Err(e) => return Outcome::Failed(e.to_string()),
        }
    }
    if !build {
        return Outcome::FoundCached;
    }
    let temp = match store.new_temp(&stage.fingerprint) {
        Ok(t) => t,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let inputs: Vec<StageInput> = stage
        .inputs
        .iter()
        .filter_map(|r| {
            let upstream = plan.stage(&r.stage)?;
            Some(StageInput {
                slot: r.slot.clone(),
                stage: r.stage.clone(),
                output: r.output.clone(),
                kind: upstream.stage.output(),
                dir: store.artifact(&upstream.fingerprint),
                fingerprint: upstream.fingerprint.clone(),
            })
        })
        .collect();
    let ctx = StageContext {
        stage_name: stage.name.clone(),
        out_dir: temp.clone(),
        work_dir,
        recipe_dir: plan.recipe.dir.clone(),
        seed: plan.seed,
        device: device.to_string(),
        inputs,
        progress,
    };
    let started = Instant::now();
    let _span = tracing::info_span!("stage", name = %stage.name, kind = %stage.kind).entered();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        stage.stage.run(&stage.params, &ctx)
    }));
    let seconds = started.elapsed().as_secs_f64();
    let failure = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(panic) => Some(format!(
            "stage panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    };
    if let Some(message) = failure {
        let _ = std::fs::remove_dir_all(&temp);
        if let (Some(g), true) = (&group, leader) {
            // Releases ranks waiting for the commit (a rank still training fails on the
            // mismatched sum).
            let _ = crate::dist::leader_says(g.as_ref(), false);
        }
        drop(lock);
        return Outcome::Failed(message);
    }
    if let (Some(g), false) = (&group, leader) {
        // A follower's outputs were scratch; the artifact is rank 0's.
        let _ = std::fs::remove_dir_all(&temp);
        return match crate::dist::leader_says(g.as_ref(), false) {
            Ok(true) => Outcome::Built { seconds },
            Ok(false) => Outcome::Failed("rank 0 could not build or commit the artifact".into()),
            Err(e) => Outcome::Failed(e.to_string()),
        };
    }
    let manifest = Manifest {
        fingerprint: stage.fingerprint.clone(),
        stage: stage.name.clone(),
        kind: stage.kind.clone(),
        version: stage.stage.version(),
        params: stage.params.clone(),
        inputs: stage
            .inputs
            .iter()
            .filter_map(|r| Some((r.stage.clone(), plan.stage(&r.stage)?.fingerprint.clone())))
            .collect::<BTreeMap<_, _>>(),
        files: Vec::new(),
        created_at: chrono::Utc::now().to_rfc3339(),
        duration_s: seconds,
        fingerprint_doc: stage.fingerprint_doc.clone(),
    };
    let outcome = match store.commit(&temp, manifest) {
        Ok(_) => {
            // The artifact holds what the work folder kept for a rerun (training outputs,
            // checkpoints): no longer needed once committed.
            let work_dir = store.work_dir(&stage.fingerprint);
            if work_dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&work_dir) {
                    tracing::warn!("could not remove {}: {e}", work_dir.display());
                }
            }
            Outcome::Built { seconds }
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&temp);
            Outcome::Failed(e.to_string())
        }
    };
    if let Some(g) = &group {
        let built = matches!(outcome, Outcome::Built { .. });
        if let Err(e) = crate::dist::leader_says(g.as_ref(), built) {
            tracing::warn!("the other ranks did not hear of the commit: {e}");
        }
    }
    drop(lock);
    outcome
}
