//! The one training loop. It owns the steps, gradient accumulation, clipping, the AdamW step
//! and its schedule, logging, evaluation, checkpoints and resume; a [`StepSource`] says what a
//! step trains on: a fixed plan over a data set for SFT and the preference objectives
//! ([`crate::train::sft`]), completions sampled with the current policy for GRPO
//! ([`crate::train::grpo`]). A method with extra work around the optimizer step (AdaLoRA's
//! rank allocation) adds a [`StepHook`].
//!
//! Reference: transformers `Trainer._inner_training_loop` / `training_step` (logged loss = mean
//! of the step losses since the last log, grad_norm as `clip_grad_norm_` returns it before
//! clipping). The logged `lr` is the one the logged step used (transformers logs the next one's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::dist::{step_share, MicroBatchShare, World};
use crate::train::checkpoint::{
    latest_checkpoint, load_checkpoint, save_checkpoint, TrainerState, FORMAT_VERSION,
};
use crate::train::config::{Method, OptimizerKeys};
use crate::train::metrics_log::{MetricsLog, MetricsRow};
use crate::train::objective::{MicroLoss, Stat, StatWindow};
use crate::train::optim::{clip_scale, global_grad_norm, AdamW};
use crate::train::params::{assign_values, trainable_params, trainable_values};
use crate::train::sft::{resident_memory_mb, CausalModel};
use crate::train::Error;

/// Metrics keys that measure time or memory: they differ between any two runs of the same
/// training, so comparisons of runs (a resumed one against an uninterrupted one) leave them out.
pub const TIMING_KEYS: &[&str] = &[
    "tokens_per_s",
    "memory_mb",
    "gpu_memory_mb",
    "gpu_peak_mb",
    "step_s",
    "forward_s",
    "backward_s",
    "update_s",
    "other_s",
    "rollout_s",
    "sample_s",
    "eval_s",
];

/// The keys of a training stage that the loop reads, whatever the stage.
pub(crate) struct LoopSettings {
    pub method: Method,
    pub seed: u64,
    pub optimizer: OptimizerKeys,
    pub max_grad_norm: Option<f64>,
    pub logging_steps: u64,
    pub save_steps: u64,
    pub eval_steps: u64,
    pub resume: bool,
}

/// One run of the loop: its settings and where its outputs go.
pub(crate) struct LoopRun<'a> {
    pub settings: LoopSettings,
    pub out_dir: &'a Path,
    /// Stop after this optimizer step (tests: an interrupted run).
    pub stop_after: Option<u64>,
    pub progress: Option<&'a MultiProgress>,
}

/// The shape of one optimizer step, as its source prepared it.
pub(crate) struct StepShape {
    pub micro_batches: usize,
    pub epoch: u64,
}

/// What the steps train on.
pub(crate) trait StepSource<B: AutodiffBackend, M> {
    type Error: From<Error>;

    /// Names the run on the progress bar and in notes ("sft", "grpo").
    fn label(&self) -> &'static str;

    /// How many units (examples, prompts) the run trains on and what they are called; a
    /// checkpoint saved for another count is refused.
    fn units(&self) -> (usize, &'static str);

    fn total_steps(&self) -> u64;

    /// Called once before the first step with the step the run starts from (0, or the resumed
    /// checkpoint's), e.g. to open a log of its own.
    fn open(&mut self, _out_dir: &Path, _start: u64) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Prepares step `index` (0-based) with the current model: chooses its units, or samples
    /// the completions it trains on.
    fn begin_step(
        &mut self,
        model: &M,
        index: u64,
        device: &B::Device,
    ) -> Result<StepShape, Self::Error>;

    /// The loss of micro-batch `micro_batch` of the step begun last, normalised so that the
    /// step's loss is the sum over its micro-batches.
    fn micro_loss(&mut self, model: &M, micro_batch: usize, device: &B::Device) -> MicroLoss<B>;

    /// Values the host already has for the step begun last (rewards, sampling time), logged as
    /// their mean over the steps since the last log line.
    fn step_values(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }

    /// Whether the run evaluates (every `eval_steps` and after the last step).
    fn evaluates(&self) -> bool {
        false
    }

    /// Whether it also evaluates before the first step of a fresh run.
    fn evaluates_on_start(&self) -> bool {
        false
    }

    /// `row` with the evaluation's values.
    fn evaluate(
        &mut self,
        _model: &M,
        row: MetricsRow,
        _device: &B::Device,
    ) -> Result<MetricsRow, Self::Error> {
        Ok(row)
    }

    /// Sees every row written to metrics.jsonl.
    fn logged(&mut self, _row: &MetricsRow) {}

    /// Called after optimizer step `step` (1-based) is taken and logged.
    fn end_step(&mut self, _step: u64) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Work a method adds around the optimizer step (AdaLoRA's rank allocation), with its state in
/// checkpoints.
pub(crate) trait StepHook<B: AutodiffBackend, M> {
    /// Sees the step's accumulated gradients (and the clipping scale) before the update.
    fn before_step(
        &mut self,
        _model: &M,
        _grads: &GradientsParams,
        _clip_scale: Option<&Tensor<B::InnerBackend, 1>>,
    ) {
    }

    /// May change the model after the update of step `index` (0-based).
    fn after_step(&mut self, model: M, _index: u64) -> M {
        model
    }

    /// Writes the hook's state into a checkpoint folder.
    fn save(&self, _model: &M, _dir: &Path) -> Result<(), Error> {
        Ok(())
    }

    /// Reads what [`StepHook::save`] wrote.
    fn load(&mut self, _dir: &Path) -> Result<(), Error> {
        Ok(())
    }
}

impl<B: AutodiffBackend, M> StepHook<B, M> for () {}

/// Writes what a method saves besides its trainable tensors into a checkpoint folder (its
/// adapter files, so a checkpoint is usable on its own).
pub(crate) type SaveHook<'a, M> = dyn Fn(&M, &Path) -> Result<(), Error> + 'a;

/// What the loop did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoopReport {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    /// The mean loss of the last logged window.
    pub last_loss: Option<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub tokens_seen: u64,
    pub metrics_path: PathBuf,
}

/// Seconds the host spent in each phase of the steps since the last log line. On the CPU that is
/// the phase's compute; on a GPU the time to queue its kernels, which run behind, so a phase
/// that takes most of the step there means the step is bound by the host, not the device.
///
/// With `RUNNER_SYNC_PHASES=1` in the environment each phase waits for the device before the
/// clock stops, so the times are the device's (and the step slower): compare the two to see
/// which side bounds a step.
#[derive(Default)]
struct PhaseClock {
    forward_s: f64,
    backward_s: f64,
    update_s: f64,
    steps: u64,
}

impl PhaseClock {
    fn sync<B: Backend>(&self, device: &B::Device) {
        static SYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *SYNC.get_or_init(|| std::env::var("RUNNER_SYNC_PHASES").is_ok_and(|v| v == "1")) {
            // A failed sync surfaces at the next read of a device value; the clock only measures.
            let _ = B::sync(device);
        }
    }

    /// Adds the per-step means to `row` (`window_s`: the window's wall time, so `other_s` is
    /// what no phase accounts for: waiting on the device, sampling, logging, checkpoints) and
    /// restarts.
    fn take_into(&mut self, row: MetricsRow, window_s: f64) -> MetricsRow {
        let steps = self.steps.max(1) as f64;
        let issued = self.forward_s + self.backward_s + self.update_s;
        let row = row
            .with("step_s", window_s / steps)
            .with("forward_s", self.forward_s / steps)
            .with("backward_s", self.backward_s / steps)
            .with("update_s", self.update_s / steps)
            .with("other_s", (window_s - issued).max(0.0) / steps);
        *self = Self::default();
        row
    }
}

/// Host values of the steps since the last log line: sums and step counts by key.
#[derive(Default)]
struct ValueWindow(BTreeMap<String, (f64, u64)>);

impl ValueWindow {
    fn add(&mut self, values: Vec<(String, f64)>) {
        for (key, value) in values {
            let entry = self.0.entry(key).or_insert((0.0, 0));
            entry.0 += value;
            entry.1 += 1;
        }
    }

    fn take_into(&mut self, mut row: MetricsRow) -> MetricsRow {
        for (key, (sum, n)) in std::mem::take(&mut self.0) {
            row = row.with(&key, sum / n.max(1) as f64);
        }
        row
    }
}

/// Trains `model` on the steps of `source` and returns it with what the loop did.
pub(crate) fn train_loop<B, M, S>(
    run: &LoopRun<'_>,
    source: &mut S,
    mut model: M,
    device: &B::Device,
    save_extra: &SaveHook<'_, M>,
    hook: &mut dyn StepHook<B, M>,
) -> Result<(M, LoopReport), S::Error>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + CausalModel<B>,
    S: StepSource<B, M>,
{
    let cfg = &run.settings;
    // Data parallel: this rank's share of each step, gradients summed across the ranks; the
    // leader alone evaluates and writes (see `crate::dist`).
    let group = crate::dist::group();
    let world = group.as_ref().map_or(World::SOLO, |g| g.world());
    let leader = world.rank == 0;
    // `gpu_peak_mb` in the metrics counts from here (the model's weights included).
    crate::backend::reset_accelerator_peak::<B>();
    let total = source.total_steps();
    let (units, unit_name) = source.units();
    let schedule = cfg
        .optimizer
        .schedule
        .build(cfg.optimizer.learning_rate, total)
        .map_err(Error::from)?;
    let (trainable, total_params) = trainable_params::<B, M>(&model);
    // What the ranks sum each step, in the same order on each.
    let grad_layout: Vec<_> = trainable.iter().map(|p| (p.id, p.shape.clone())).collect();
    let trainable_count: usize = trainable
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    let mut opt = AdamW::<B::InnerBackend>::new(cfg.optimizer.adamw());
    let metrics_path = run.out_dir.join("metrics.jsonl");
    let (mut start, mut pending_sum, mut pending_steps, mut tokens_seen) = (0u64, 0f64, 0u64, 0u64);
    let mut resumed_from = None;
    if cfg.resume {
        if let Some(dir) = latest_checkpoint(run.out_dir)? {
            let ck = load_checkpoint(&dir)?;
            let bad = |message: String| Error::Checkpoint {
                path: dir.clone(),
                message,
            };
            if ck.state.method != cfg.method
                || ck.state.total_steps != total
                || ck.state.num_train_examples != units
            {
                return Err(bad(format!(
                    "saved for method {:?}, {} steps, {} {unit_name}; this run has {:?}, {total}, {units}",
                    ck.state.method, ck.state.total_steps, ck.state.num_train_examples, cfg.method,
                ))
                .into());
            }
            let (m, assigned) = assign_values::<B, M>(model, &ck.trainable, device);
            model = m;
            if let Some(missing) = trainable.iter().find(|p| !assigned.contains(&p.path)) {
                return Err(bad(format!(
                    "no saved tensor for trainable parameter `{}`",
                    missing.path
                ))
                .into());
            }
            opt.load_host(&ck.optimizer, &ck.state.adam_steps, device)
                .map_err(|name| bad(format!("optimizer tensor `{name}` is missing")))?;
            hook.load(&dir)?;
            start = ck.state.step;
            pending_sum = ck.state.pending_loss_sum;
            pending_steps = ck.state.pending_steps;
            tokens_seen = ck.state.tokens_seen;
            resumed_from = Some(start);
            // A resumed run must not look fresh.
            crate::console::say(
                run.progress,
                &format!("  resuming {} from checkpoint-{start}", source.label()),
            );
        }
    }
    let mut metrics = match (leader, start) {
        (false, _) => None,
        (true, 0) => Some(MetricsLog::create(&metrics_path).map_err(Error::from)?),
        (true, _) => Some(MetricsLog::resume(&metrics_path, start).map_err(Error::from)?),
    };
    if leader {
        source.open(run.out_dir, start)?;
    }
    let bar = match run.progress {
        Some(mp) => mp.add(ProgressBar::new(total)),
        None => ProgressBar::hidden(),
    };
    let template = format!(
        "{} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}",
        source.label()
    );
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar.set_position(start);
    // The last step whose loss and gradient norm were read back finite (a checkpoint's step).
    let mut checked_through = start;

    let mut loss_acc: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut last_loss = None;
    if let Some(log) = metrics.as_mut().filter(|_| start == 0) {
        if source.evaluates() && source.evaluates_on_start() {
            bar.set_message("evaluating");
            let row = source.evaluate(&model, MetricsRow::new(0), device)?;
            log.append(&row).map_err(Error::from)?;
            source.logged(&row);
        }
    }
    // Tokens of the steps since the last log line, over all ranks; this rank's since the last sum.
    let (mut window_tokens, mut local_tokens) = (0u64, 0u64);
    let mut window_start = Instant::now();
    let mut phases = PhaseClock::default();
    let mut stat_window = StatWindow::<B::InnerBackend>::default();
    let mut value_window = ValueWindow::default();
    for index in start..total {
        let shape = source.begin_step(&model, index, device)?;
        let profiled = crate::backend::profiled_step() == Some(index + 1);
        if profiled {
            let _ = B::sync(device);
            crate::backend::set_profiler(true);
        }
        let mut accumulator = GradientsAccumulator::<M>::new();
        let mut step_loss: Option<Tensor<B::InnerBackend, 1>> = None;
        let share = step_share(shape.micro_batches, world);
        // An idle rank's micro-batch counts zero in every sum.
        let idle = share == MicroBatchShare::Idle;
        for micro_batch in share.indices() {
            // Dropout masks depend on (seed, step, micro-batch) only, so a resumed run, or the
            // same step shared among ranks, draws the same ones.
            B::seed(
                device,
                cfg.seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(index + 1)
                    .wrapping_add((micro_batch as u64) << 40),
            );
            let forward_start = Instant::now();
            let mut micro = source.micro_loss(&model, micro_batch, device);
            if idle {
                micro.loss = micro.loss.mul_scalar(0.0);
                micro.tokens = 0;
                for s in &mut micro.stats {
                    (s.sum, s.count) = (s.sum.clone().mul_scalar(0.0), 0.0);
                }
            }
            local_tokens += micro.tokens as u64;
            stat_window.add(
                micro
                    .stats
                    .into_iter()
                    .map(|s| Stat {
                        name: s.name,
                        sum: s.sum.inner(),
                        count: s.count,
                    })
                    .collect(),
            );
            let mut loss = micro.loss;
            if let Some(reg) = model.regularizer().filter(|_| !idle) {
                // Once per optimizer step in total, spread over its micro-batches.
                loss = loss.add(reg.div_scalar(shape.micro_batches as f64));
            }
            let detached = loss.clone().inner();
            step_loss = Some(match step_loss {
                Some(acc) => acc.add(detached),
                None => detached,
            });
            phases.sync::<B>(device);
            let backward_start = Instant::now();
            phases.forward_s += (backward_start - forward_start).as_secs_f64();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
            phases.sync::<B>(device);
            phases.backward_s += backward_start.elapsed().as_secs_f64();
        }
        value_window.add(source.step_values());
        let update_start = Instant::now();
        let mut grads = accumulator.grads();
        if let Some(g) = &group {
            crate::dist::all_reduce_grads::<B::InnerBackend>(
                &grad_layout,
                &mut grads,
                g.as_ref(),
                device,
            )
            .map_err(Error::from)?;
        }
        let norm = global_grad_norm::<B, M>(&model, &grads, device);
        let scale = cfg
            .max_grad_norm
            .filter(|&m| m > 0.0)
            .map(|m| clip_scale(norm.clone(), m));
        let lr = schedule.lr_at(index);
        hook.before_step(&model, &grads, scale.as_ref());
        model = opt.step::<B, M>(model, &mut grads, lr, scale);
        model = hook.after_step(model, index);
        crate::backend::memory::check_limit::<B>(device).map_err(Error::from)?;
        phases.sync::<B>(device);
        phases.update_s += update_start.elapsed().as_secs_f64();
        if profiled {
            let _ = B::sync(device);
            crate::backend::set_profiler(false);
        }
        phases.steps += 1;
        let step = index + 1;
        if let Some(l) = step_loss {
            loss_acc = Some(match loss_acc {
                Some(acc) => acc.add(l),
                None => l,
            });
        }
        pending_steps += 1;
        bar.inc(1);

        let mut row = None;
        let logging = step % cfg.logging_steps == 0 || step == total;
        let saving = cfg.save_steps > 0 && step % cfg.save_steps == 0;
        // Read back only where the host needs the numbers anyway (a log row, a checkpoint):
        // a diverged step poisons every later loss, so the window's sum still shows it, and
        // nothing non-finite reaches a checkpoint.
        let mut norm_value = None;
        if logging || saving {
            let window: f64 = loss_acc.take().map_or(0.0, |t| t.into_scalar().elem());
            let (window, tokens) =
                crate::dist::sum_logged_window(group.as_deref(), window, local_tokens)
                    .map_err(Error::from)?;
            window_tokens += tokens;
            local_tokens = 0;
            pending_sum += window;
            let grad_norm: f64 = norm.clone().into_scalar().elem();
            for (what, value) in [("loss", pending_sum), ("gradient norm", grad_norm)] {
                if !value.is_finite() {
                    bar.abandon();
                    let first_step = checked_through + 1;
                    return Err(Error::NonFinite {
                        what,
                        first_step,
                        step,
                        lr,
                    }
                    .into());
                }
            }
            checked_through = step;
            norm_value = Some(grad_norm);
        }
        if logging {
            let loss = pending_sum / pending_steps as f64;
            let secs = window_start.elapsed().as_secs_f64();
            let tokens_per_s = (secs > 0.0).then(|| window_tokens as f64 / secs);
            tokens_seen += window_tokens;
            let mut r = MetricsRow::new(step).with("epoch", shape.epoch);
            r.loss = Some(loss);
            r.lr = Some(lr);
            r.grad_norm = norm_value;
            r.tokens_per_s = tokens_per_s;
            r = phases.take_into(r, secs);
            let mut stats = stat_window.take_sums();
            if let Some(g) = &group {
                crate::dist::sum_statistics(g.as_ref(), &mut stats).map_err(Error::from)?;
            }
            for (name, sum, count) in stats {
                if count > 0.0 {
                    r = r.with(name, sum / count);
                }
            }
            r = value_window.take_into(r);
            r.memory_mb = resident_memory_mb();
            if let Some(gpu) = crate::backend::accelerator_memory_mb::<B>() {
                r = r.with("gpu_memory_mb", gpu);
            }
            if let Some(peak) = crate::backend::accelerator_peak_mb::<B>() {
                r = r.with("gpu_peak_mb", peak);
            }
            bar.set_message(format!(
                "loss {loss:.4} {:.0} tok/s",
                tokens_per_s.unwrap_or(0.0)
            ));
            last_loss = Some(loss);
            (pending_sum, pending_steps, window_tokens) = (0.0, 0, 0);
            window_start = Instant::now();
            row = Some(r);
        }
        if leader
            && source.evaluates()
            && ((cfg.eval_steps > 0 && step % cfg.eval_steps == 0) || step == total)
        {
            bar.set_message("evaluating");
            let r = row.take().unwrap_or_else(|| MetricsRow::new(step));
            row = Some(source.evaluate(&model, r, device)?);
        }
        if let (Some(r), Some(log)) = (row, metrics.as_mut()) {
            log.append(&r).map_err(Error::from)?;
            source.logged(&r);
        }
        source.end_step(step)?;
        if saving && leader {
            let (optimizer, adam_steps) = opt.to_host();
            let state = TrainerState {
                format_version: FORMAT_VERSION,
                method: cfg.method,
                step,
                epoch: shape.epoch,
                total_steps: total,
                seed: cfg.seed,
                num_train_examples: units,
                tokens_seen: tokens_seen + window_tokens + local_tokens,
                pending_loss_sum: pending_sum,
                pending_steps,
                adam_steps,
            };
            save_checkpoint(
                run.out_dir,
                &state,
                &trainable_values::<B, M>(&model),
                &optimizer,
                |dir| {
                    save_extra(&model, dir)?;
                    hook.save(&model, dir)
                },
            )?;
        }
        if run.stop_after == Some(step) {
            break;
        }
    }
    bar.finish();
    let done = run.stop_after.map_or(total, |s| s.min(total)).max(start);
    Ok((
        model,
        LoopReport {
            steps: done,
            resumed_from,
            last_loss,
            trainable_params: trainable_count,
            total_params,
            tokens_seen: tokens_seen + window_tokens + local_tokens,
            metrics_path,
        },
    ))
}
