//! `dpo`, `orpo`, `simpo` and `kto`: preference training of a base (or SFT-trained) model on
//! tokenized preference data — chosen/rejected pairs from `tokenize` (a `format` stage with
//! `fields.rejected` or `rejected_from`), or for `kto` also unpaired completions with labels.
//! The losses live in [`crate::train::preference`], the loop is the one `sft` trains with.
//!
//! Parameters: every `sft` key (method, optimizer, schedule, adapters; `learning_rate` defaults
//! to TRL's 1e-6) plus the kind's own: `dpo` — `beta`, `loss_type` (sigmoid, ipo, hinge, robust),
//! `label_smoothing`; `orpo` — `beta` (λ); `simpo` — `beta`, `gamma`, `label_smoothing`; `kto` —
//! `beta`, `desirable_weight`, `undesirable_weight`.
//! Output: as `sft` (`adapter/`, `merged/` or `model/`, `metrics.jsonl` with `rewards/*` and
//! `logps/*`, charts, `checkpoint-N/`) and `<kind>.json`.

use super::artifact::{read_tokens, TokenRow};
use super::training::{
    stage_device, train_in_work_folder, train_with_precision, TRAINING_INPUTS,
    TRAINING_OPERATIONAL_KEYS,
};
use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::model::device::BackendTask;
use crate::train::data::TokenizedExample;
use crate::train::metrics_log::read_metrics;
use crate::train::preference::{
    train_preference, PreferenceConfig, PreferenceData, PreferenceKind,
};
use crate::train::sft::{BaseModel, SftReport};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use std::marker::PhantomData;
use std::path::Path;

/// One preference stage kind.
pub trait KindMarker: Send + Sync + 'static {
    const KIND: PreferenceKind;
    const NAME: &'static str;
    const SUMMARY: &'static str;
}

pub struct DpoKind;
pub struct OrpoKind;
pub struct SimpoKind;
pub struct KtoKind;

impl KindMarker for DpoKind {
    const KIND: PreferenceKind = PreferenceKind::Dpo;
    const NAME: &'static str = "dpo";
    const SUMMARY: &'static str =
        "direct preference optimization (sigmoid, IPO, hinge, robust) on chosen/rejected pairs";
}
impl KindMarker for OrpoKind {
    const KIND: PreferenceKind = PreferenceKind::Orpo;
    const NAME: &'static str = "orpo";
    const SUMMARY: &'static str =
        "odds-ratio preference optimization: SFT and preference in one loss, no reference";
}
impl KindMarker for SimpoKind {
    const KIND: PreferenceKind = PreferenceKind::Simpo;
    const NAME: &'static str = "simpo";
    const SUMMARY: &'static str =
        "simple preference optimization: length-normalized rewards with a margin, no reference";
}
impl KindMarker for KtoKind {
    const KIND: PreferenceKind = PreferenceKind::Kto;
    const NAME: &'static str = "kto";
    const SUMMARY: &'static str =
        "Kahneman-Tversky optimization on desirable/undesirable completions (pairs are unpaired)";
}

/// The stage of preference kind `K`.
pub struct Preference<K>(PhantomData<K>);

/// Reads one split of a `tokenize` artifact as preference data: pairs where its rows have a
/// rejected response, else KTO's labelled completions.
fn preference_data(rows: Vec<TokenRow>, split: &str) -> Result<PreferenceData, StageError> {
    let paired = rows
        .iter()
        .filter(|r| r.rejected_input_ids.is_some())
        .count();
    if paired > 0 {
        if paired != rows.len() {
            return Err(StageError::msg(format!(
                "{split}: {} of {} rows have no rejected response",
                rows.len() - paired,
                rows.len()
            )));
        }
        let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
        for row in rows {
            chosen.push(TokenizedExample {
                input_ids: row.input_ids,
                labels: row.labels,
            });
            rejected.push(TokenizedExample {
                input_ids: row.rejected_input_ids.unwrap_or_default(),
                labels: row.rejected_labels.unwrap_or_default(),
            });
        }
        return Ok(PreferenceData::Pairs { chosen, rejected });
    }
    let (mut completions, mut desirable) = (Vec::new(), Vec::new());
    for (i, row) in rows.into_iter().enumerate() {
        let label = row.label.ok_or_else(|| {
            StageError::msg(format!(
                "{split} row {}: neither a rejected response nor a label; preference data needs \
                 `fields.rejected` (or `rejected_from`) or, for kto, `fields.label` in its format stage",
                i + 1
            ))
        })?;
        completions.push(TokenizedExample {
            input_ids: row.input_ids,
            labels: row.labels,
        });
        desirable.push(label);
    }
    Ok(PreferenceData::Unpaired {
        completions,
        desirable,
    })
}

struct TrainTask<'a> {
    cfg: &'a PreferenceConfig,
    kind: PreferenceKind,
    model_dir: &'a Path,
    train: PreferenceData,
    eval: PreferenceData,
    out: &'a Path,
    progress: &'a indicatif::MultiProgress,
}

impl BackendTask for TrainTask<'_> {
    type Output = Result<SftReport, crate::train::Error>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        train_preference::<Autodiff<B>>(
            self.cfg,
            self.kind,
            BaseModel::Dir(self.model_dir),
            self.train,
            self.eval,
            self.out,
            &device,
            Some(self.progress),
        )
    }
}

/// Mean of `key` over the first and the last `n` logged rows that have it.
fn first_and_last(metrics: &Path, key: &str, n: usize) -> Option<(f64, f64)> {
    let rows = read_metrics(metrics).ok()?;
    let values: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.extra.get(key).and_then(|v| v.as_f64()))
        .collect();
    if values.is_empty() {
        return None;
    }
    let n = n.min(values.len());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Some((mean(&values[..n]), mean(&values[values.len() - n..])))
}

impl<K: KindMarker> Stage for Preference<K> {
    type Params = PreferenceConfig;
    const KIND: &'static str = K::NAME;
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Trained;
    const SUMMARY: &'static str = K::SUMMARY;

    fn operational_keys() -> &'static [&'static str] {
        TRAINING_OPERATIONAL_KEYS
    }

    fn input_slots() -> &'static [InputSlot] {
        TRAINING_INPUTS
    }

    fn validate(params: &PreferenceConfig) -> Result<(), (String, String)> {
        let keyed = |e: crate::train::Error| match e {
            crate::train::Error::Config { key, message } => (key.to_string(), message),
            other => (String::new(), other.to_string()),
        };
        params.train.validate().map_err(keyed)?;
        params.loss(K::KIND).map(|_| ()).map_err(keyed)
    }

    fn heavy() -> bool {
        true
    }

    fn data_parallel() -> bool {
        true
    }

    fn run(params: &PreferenceConfig, ctx: &StageContext) -> Result<(), StageError> {
        let data = ctx.input("input")?;
        let model = ctx.input("model")?;
        let model_dir = super::artifact::model_folder(model.kind, &model.dir)?;
        let split = data.output.as_deref().unwrap_or("train");
        let train = preference_data(read_tokens(&data.dir, split)?, split)?;
        let eval = if data.output.is_none() {
            preference_data(read_tokens(&data.dir, "test")?, "test")?
        } else {
            PreferenceData::Pairs {
                chosen: Vec::new(),
                rejected: Vec::new(),
            }
        };
        if train.is_empty() {
            return Err(StageError::msg(
                "the tokenized input has no training examples",
            ));
        }
        let device = stage_device(ctx)?;
        train_in_work_folder(
            ctx,
            &model_dir,
            &format!("{}.json", K::NAME),
            |work, interrupted| {
                let mut cfg = params.clone();
                cfg.train.resume = cfg.train.resume || interrupted;
                let loss = cfg.loss(K::KIND).map_err(StageError::wrap)?;
                let task = TrainTask {
                    cfg: &cfg,
                    kind: K::KIND,
                    model_dir: &model_dir,
                    train,
                    eval,
                    out: work,
                    progress: &ctx.progress,
                };
                let (report, bf16) =
                    train_with_precision(device, cfg.train.precision, K::NAME, task)?;
                let metrics = work.join("metrics.jsonl");
                let trend = |key: &str| {
                    first_and_last(&metrics, key, 3)
                        .map(|(first, last)| serde_json::json!({ "first": first, "last": last }))
                };
                Ok(serde_json::json!({
                    "kind": K::NAME,
                    "method": cfg.train.method,
                    "loss": loss,
                    "steps": report.steps,
                    "resumed_from": report.resumed_from,
                    "last_loss": report.last_loss,
                    "eval_loss": report.eval_loss,
                    "rewards/accuracies": trend("rewards/accuracies"),
                    "rewards/margins": trend("rewards/margins"),
                    "trainable_params": report.trainable_params,
                    "total_params": report.total_params,
                    "tokens_seen": report.tokens_seen,
                    "device": ctx.device,
                    "precision": if bf16 { "bf16 (f32 masters)" } else { "f32" },
                }))
            },
        )
    }
}
