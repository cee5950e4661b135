//! Preference training — DPO (sigmoid, IPO, hinge, robust), ORPO, SimPO and KTO — as
//! [`Objective`]s of the shared training loop, so every method (LoRA, QLoRA, DoRA, full, AdaLoRA,
//! prompt learning), checkpoints, resume and logging come from [`run_sft`].
//!
//! References: TRL `DPOTrainer.dpo_loss` (IPO on length-averaged log-probs, as TRL computes
//! them), `ORPOTrainer.odds_ratio_loss`, `CPOTrainer.cpo_loss` with `loss_type = "simpo"` (no NLL
//! term: SimPO as its paper states it), `KTOTrainer.kto_loss`. Metrics carry TRL's names
//! (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
//! `logps/chosen`, `logps/rejected`).
//!
//! The reference model is frozen, so its log-probs of every sequence are computed once, before
//! the first step, from the base the method starts from (TRL's `precompute_ref_log_probs`): the
//! base without adapters for LoRA, QLoRA (its NF4 base), AdaLoRA and prompt learning; the
//! starting weights for full fine-tuning. No second model is kept during training, and a
//! resumed run recomputes the same values.

use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use indicatif::MultiProgress;
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::hf::load_hf_folder_tensors;
use crate::peft::lora::quantize_base_nf4;
use crate::train::config::{Method, SftConfig};
use crate::train::data::{
    make_batch, make_batch_rows, validate_examples, Batch, TokenizedExample, IGNORE_INDEX,
};
use crate::train::objective::{MicroLoss, Objective, Stat, StepTotals};
use crate::train::sft::{run_sft, BaseModel, CausalModel, SftReport};
use crate::train::Error;

/// The preference stage kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferenceKind {
    Dpo,
    Orpo,
    Simpo,
    Kto,
}

impl PreferenceKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Dpo => "dpo",
            Self::Orpo => "orpo",
            Self::Simpo => "simpo",
            Self::Kto => "kto",
        }
    }

    /// The preference keys this kind takes.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Self::Dpo => &["beta", "loss_type", "label_smoothing"],
            Self::Orpo => &["beta"],
            Self::Simpo => &["beta", "gamma", "label_smoothing"],
            Self::Kto => &["beta", "desirable_weight", "undesirable_weight"],
        }
    }

    /// TRL's defaults (DPO, ORPO, KTO: 0.1); SimPO's paper uses β = 2.
    fn default_beta(self) -> f64 {
        match self {
            Self::Simpo => 2.0,
            _ => 0.1,
        }
    }

    /// Whether the loss compares the policy with a reference model.
    pub fn needs_reference(self) -> bool {
        matches!(self, Self::Dpo | Self::Kto)
    }
}

/// DPO's `loss_type` (TRL's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    /// −log σ(β·h), with conservative label smoothing (cDPO).
    #[default]
    Sigmoid,
    /// (h − 1/(2β))² on length-averaged log-probs.
    Ipo,
    /// max(0, 1 − β·h) (RSO).
    Hinge,
    /// The unbiased loss under label noise (rDPO).
    Robust,
}

/// The preference keys of a stage, besides the training keys it shares with `sft`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PreferenceKeys {
    /// DPO/KTO: the strength of the KL constraint; ORPO: λ, the weight of the odds-ratio term;
    /// SimPO: the reward scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_type: Option<DpoLossType>,
    /// The assumed probability that a pair's labels are flipped (sigmoid, robust, SimPO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// SimPO's target reward margin γ (TRL's `simpo_gamma`, default 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desirable_weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undesirable_weight: Option<f64>,
}

pub const PREFERENCE_KEYS: [&str; 6] = [
    "beta",
    "loss_type",
    "label_smoothing",
    "gamma",
    "desirable_weight",
    "undesirable_weight",
];

impl PreferenceKeys {
    fn set_keys(&self) -> Vec<&'static str> {
        let set = [
            self.beta.is_some(),
            self.loss_type.is_some(),
            self.label_smoothing.is_some(),
            self.gamma.is_some(),
            self.desirable_weight.is_some(),
            self.undesirable_weight.is_some(),
        ];
        PREFERENCE_KEYS
            .iter()
            .zip(set)
            .filter(|(_, s)| *s)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// A preference stage's parameters: the `sft` keys (method, optimizer, schedule, adapters; the
/// learning rate defaults to TRL's 1e-6) and the [`PreferenceKeys`], in one flat table.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceConfig {
    pub train: SftConfig,
    pub keys: PreferenceKeys,
}

impl Default for PreferenceConfig {
    fn default() -> Self {
        Self {
            train: SftConfig {
                learning_rate: 1e-6,
                ..SftConfig::default()
            },
            keys: PreferenceKeys::default(),
        }
    }
}

impl<'de> Deserialize<'de> for PreferenceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut rest = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let mut own = serde_json::Map::new();
        for key in PREFERENCE_KEYS {
            if let Some(v) = rest.remove(key) {
                own.insert(key.to_string(), v);
            }
        }
        rest.entry("learning_rate")
            .or_insert(serde_json::Value::from(1e-6));
        let keys: PreferenceKeys = serde_path_to_error::deserialize(serde_json::Value::Object(own))
            .map_err(|e| D::Error::custom(format!("{}: {}", e.path(), e.inner())))?;
        let train: SftConfig = serde_path_to_error::deserialize(serde_json::Value::Object(rest))
            .map_err(|e| {
                let message = e.inner().to_string();
                // serde lists the `sft` keys; the preference keys are valid too.
                if message.starts_with("unknown field") {
                    let ours: Vec<String> =
                        PREFERENCE_KEYS.iter().map(|k| format!("`{k}`")).collect();
                    return D::Error::custom(format!("{message}, {}", ours.join(", ")));
                }
                D::Error::custom(format!("{}: {message}", e.path()))
            })?;
        Ok(Self { train, keys })
    }
}

impl Serialize for PreferenceConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let mut map = match serde_json::to_value(&self.train).map_err(S::Error::custom)? {
            serde_json::Value::Object(m) => m,
            _ => return Err(S::Error::custom("sft keys are not a table")),
        };
        if let serde_json::Value::Object(own) =
            serde_json::to_value(&self.keys).map_err(S::Error::custom)?
        {
            map.extend(own);
        }
        map.serialize(serializer)
    }
}

/// The loss of a preference stage with its settings resolved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PreferenceLoss {
    Dpo {
        loss_type: DpoLossType,
        beta: f64,
        label_smoothing: f64,
    },
    Orpo {
        beta: f64,
    },
    Simpo {
        beta: f64,
        gamma: f64,
        label_smoothing: f64,
    },
    Kto {
        beta: f64,
        desirable_weight: f64,
        undesirable_weight: f64,
    },
}

impl PreferenceConfig {
    /// The loss of stage kind `kind`; refuses keys of other kinds and values out of range.
    pub fn loss(&self, kind: PreferenceKind) -> Result<PreferenceLoss, Error> {
        let bad = |key: &'static str, message: String| Err(Error::Config { key, message });
        if let Some(key) = self
            .keys
            .set_keys()
            .into_iter()
            .find(|k| !kind.keys().contains(k))
        {
            let owners: Vec<&str> = [
                PreferenceKind::Dpo,
                PreferenceKind::Orpo,
                PreferenceKind::Simpo,
                PreferenceKind::Kto,
            ]
            .into_iter()
            .filter(|k| k.keys().contains(&key))
            .map(PreferenceKind::name)
            .collect();
            return bad(
                key,
                format!(
                    "is a key of {}, not of `{}` (its keys: {})",
                    owners.join(", "),
                    kind.name(),
                    kind.keys().join(", ")
                ),
            );
        }
        let beta = self.keys.beta.unwrap_or(kind.default_beta());
        if !(beta.is_finite() && beta > 0.0) {
            return bad("beta", format!("must be > 0, got {beta}"));
        }
        let label_smoothing = self.keys.label_smoothing.unwrap_or(0.0);
        if !(0.0..0.5).contains(&label_smoothing) {
            return bad(
                "label_smoothing",
                format!("must be in [0, 0.5), got {label_smoothing}"),
            );
        }
        let loss_type = self.keys.loss_type.unwrap_or_default();
        if label_smoothing > 0.0 && matches!(loss_type, DpoLossType::Ipo | DpoLossType::Hinge) {
            return bad(
                "label_smoothing",
                "applies to loss_type = \"sigmoid\" and \"robust\" only".into(),
            );
        }
        let weight = |key: &'static str, value: Option<f64>| -> Result<f64, Error> {
            let w = value.unwrap_or(1.0);
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::Config {
                    key,
                    message: format!("must be >= 0, got {w}"),
                });
            }
            Ok(w)
        };
        Ok(match kind {
            PreferenceKind::Dpo => PreferenceLoss::Dpo {
                loss_type,
                beta,
                label_smoothing,
            },
            PreferenceKind::Orpo => PreferenceLoss::Orpo { beta },
            PreferenceKind::Simpo => {
                let gamma = self.keys.gamma.unwrap_or(0.5);
                if !gamma.is_finite() {
                    return bad("gamma", format!("must be a number, got {gamma}"));
                }
                PreferenceLoss::Simpo {
                    beta,
                    gamma,
                    label_smoothing,
                }
            }
            PreferenceKind::Kto if self.train.batch_size < 2 => {
                return bad(
                    "batch_size",
                    "kto estimates its KL term from the other completions of a micro-batch: \
                     needs batch_size >= 2"
                        .into(),
                );
            }
            PreferenceKind::Kto => PreferenceLoss::Kto {
                beta,
                desirable_weight: weight("desirable_weight", self.keys.desirable_weight)?,
                undesirable_weight: weight("undesirable_weight", self.keys.undesirable_weight)?,
            },
        })
    }
}

/// Per-pair losses of a paired objective and the implicit rewards logged with them.
pub struct PairTerms<B: Backend> {
    pub losses: Tensor<B, 1>,
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
}

/// log σ(x) = min(x, 0) − log(1 + e^−|x|), stable for either sign. burn's own `log_sigmoid`
/// loses precision in its backward pass (it subtracts 1 from 1 + e^−x), which shows at the
/// 1e-8 level against TRL's float64 gradients.
fn log_sigmoid<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    x.clone().clamp_max(0.0).sub(x.abs().neg().exp().log1p())
}

/// −(1 − ε)·log σ(β·h) − ε·log σ(−β·h): the sigmoid loss with label smoothing (DPO, SimPO).
fn smoothed_sigmoid<B: Backend>(h: Tensor<B, 1>, beta: f64, eps: f64) -> Tensor<B, 1> {
    let scaled = h.mul_scalar(beta);
    log_sigmoid(scaled.clone())
        .mul_scalar(-(1.0 - eps))
        .sub(log_sigmoid(scaled.neg()).mul_scalar(eps))
}

/// DPO's per-pair losses from the log-probs of the policy (`pc`, `pr`) and the reference
/// (`rc`, `rr`), each `[pairs]` (summed over the response, or length-averaged for IPO).
pub fn dpo_terms<B: Backend>(
    loss_type: DpoLossType,
    beta: f64,
    label_smoothing: f64,
    [pc, pr, rc, rr]: [Tensor<B, 1>; 4],
) -> PairTerms<B> {
    let chosen_ratio = pc.sub(rc);
    let rejected_ratio = pr.sub(rr);
    let h = chosen_ratio.clone().sub(rejected_ratio.clone());
    let eps = label_smoothing;
    let losses = match loss_type {
        DpoLossType::Sigmoid => smoothed_sigmoid(h, beta, eps),
        DpoLossType::Robust => {
            let scaled = h.mul_scalar(beta);
            log_sigmoid(scaled.clone())
                .mul_scalar(-(1.0 - eps))
                .add(log_sigmoid(scaled.neg()).mul_scalar(eps))
                .div_scalar(1.0 - 2.0 * eps)
        }
        DpoLossType::Hinge => relu(h.mul_scalar(-beta).add_scalar(1.0)),
        DpoLossType::Ipo => h.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2),
    };
    PairTerms {
        losses,
        chosen_rewards: chosen_ratio.detach().mul_scalar(beta),
        rejected_rewards: rejected_ratio.detach().mul_scalar(beta),
    }
}

/// ORPO's odds-ratio terms from length-averaged policy log-probs: β·log σ(log-odds) per pair
/// (subtracted from the NLL) and the log-odds themselves.
pub fn orpo_terms<B: Backend>(
    beta: f64,
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
) -> (PairTerms<B>, Tensor<B, 1>) {
    // log(1 − p) for p = exp(average log-prob) < 1.
    let log_not = |x: Tensor<B, 1>| x.exp().neg().log1p();
    let log_odds = chosen
        .clone()
        .sub(rejected.clone())
        .sub(log_not(chosen.clone()).sub(log_not(rejected.clone())));
    let terms = PairTerms {
        losses: log_sigmoid(log_odds.clone()).mul_scalar(beta),
        chosen_rewards: chosen.detach().mul_scalar(beta),
        rejected_rewards: rejected.detach().mul_scalar(beta),
    };
    (terms, log_odds)
}

/// SimPO's per-pair losses from length-averaged policy log-probs.
pub fn simpo_terms<B: Backend>(
    beta: f64,
    gamma: f64,
    label_smoothing: f64,
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
) -> PairTerms<B> {
    let h = chosen
        .clone()
        .sub(rejected.clone())
        .sub_scalar(gamma / beta);
    PairTerms {
        losses: smoothed_sigmoid(h, beta, label_smoothing),
        chosen_rewards: chosen.detach().mul_scalar(beta),
        rejected_rewards: rejected.detach().mul_scalar(beta),
    }
}

/// KTO's per-completion losses: `desirable` is 1 for desirable completions and 0 otherwise,
/// `kl` the (detached, clamped) `[1]` estimate of the policy's KL from the reference.
pub fn kto_losses<B: Backend>(
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
    policy: Tensor<B, 1>,
    reference: Tensor<B, 1>,
    desirable: Tensor<B, 1>,
    kl: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let n = policy.dims()[0];
    let ratio = policy.sub(reference);
    let kl = kl.expand([n]);
    let good = sigmoid(ratio.clone().sub(kl.clone()).mul_scalar(beta))
        .neg()
        .add_scalar(1.0)
        .mul_scalar(desirable_weight);
    let bad = sigmoid(kl.sub(ratio).mul_scalar(beta))
        .neg()
        .add_scalar(1.0)
        .mul_scalar(undesirable_weight);
    let undesirable = desirable.clone().neg().add_scalar(1.0);
    good.mul(desirable).add(bad.mul(undesirable))
}

/// Preference data as the `tokenize` stage writes it.
pub enum PreferenceData {
    /// Chosen and rejected rows of the same prompts.
    Pairs {
        chosen: Vec<TokenizedExample>,
        rejected: Vec<TokenizedExample>,
    },
    /// KTO's unpaired completions with their labels.
    Unpaired {
        completions: Vec<TokenizedExample>,
        desirable: Vec<bool>,
    },
}

impl PreferenceData {
    pub fn len(&self) -> usize {
        match self {
            Self::Pairs { chosen, .. } => chosen.len(),
            Self::Unpaired { completions, .. } => completions.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// KTO's form: a pair's chosen row is desirable, its rejected row undesirable (TRL's
    /// `unpair_preference_dataset`).
    fn unpaired(self) -> (Vec<TokenizedExample>, Vec<bool>) {
        match self {
            Self::Pairs { chosen, rejected } => {
                let mut desirable = vec![true; chosen.len()];
                desirable.extend(vec![false; rejected.len()]);
                let mut completions = chosen;
                completions.extend(rejected);
                (completions, desirable)
            }
            Self::Unpaired {
                completions,
                desirable,
            } => (completions, desirable),
        }
    }
}

/// Checks a set of response rows: ids in the vocabulary, and each with a response to score.
fn validate_rows(set: &'static str, rows: &[TokenizedExample], vocab: usize) -> Result<(), Error> {
    validate_examples(set, rows, vocab)?;
    if let Some(index) = rows.iter().position(|r| r.num_items() == 0) {
        return Err(Error::Example {
            set,
            index,
            message: "no response tokens to score (the prompt fills max_seq_len?)".into(),
        });
    }
    Ok(())
}

/// Summed log-probs of `rows` under `model`, in order, `batch_rows` rows at a time.
fn sequence_log_probs<B: Backend, M: CausalModel<B>>(
    model: &M,
    rows: &[TokenizedExample],
    batch_rows: usize,
    pad_id: u32,
    device: &B::Device,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows.len());
    let indices: Vec<usize> = (0..rows.len()).collect();
    for chunk in indices.chunks(batch_rows.max(1)) {
        let batch = make_batch::<B>(rows, chunk, pad_id, device);
        let values = model.row_log_probs(&batch).into_data();
        out.extend(
            values
                .convert::<f64>()
                .into_vec::<f64>()
                .unwrap_or_default(),
        );
    }
    out
}

/// `values` on the device in the float type of `like` (the row log-probs: f32 from the chunked
/// LM-head loss even when the model runs in bf16).
fn host_vector<B: Backend>(values: Vec<f64>, like: &Tensor<B, 1>) -> Tensor<B, 1> {
    let n = values.len();
    // The dtype must be given: `from_data` otherwise makes the device's default float type
    // (bf16 under mixed precision), whatever the data's own type.
    Tensor::from_data(TensorData::new(values, [n]), (&like.device(), like.dtype()))
}

/// Two rows per unit — chosen and rejected, or a KTO completion and its mismatched KL row —
/// read through one batched forward, with their reference log-probs.
pub struct RowPairs {
    first: Vec<TokenizedExample>,
    second: Vec<TokenizedExample>,
    /// Summed reference log-probs of every first and second row, once computed.
    reference: Option<(Vec<f64>, Vec<f64>)>,
}

impl RowPairs {
    fn new(first: Vec<TokenizedExample>, second: Vec<TokenizedExample>) -> Self {
        Self {
            first,
            second,
            reference: None,
        }
    }

    fn len(&self) -> usize {
        self.first.len()
    }

    /// Tokens unit `i` puts through the model (both rows padded to the longer).
    fn tokens(&self, i: usize) -> usize {
        2 * self.first[i]
            .input_ids
            .len()
            .max(self.second[i].input_ids.len())
    }

    fn compute_reference<B: Backend, M: CausalModel<B>>(
        &mut self,
        model: &M,
        batch_rows: usize,
        pad_id: u32,
        device: &B::Device,
    ) {
        let first = sequence_log_probs(model, &self.first, batch_rows, pad_id, device);
        let second = sequence_log_probs(model, &self.second, batch_rows, pad_id, device);
        self.reference = Some((first, second));
    }

    /// The first rows of `units`, then their second rows, through `model` at once: the row
    /// log-probs `[2 * units]` and the batch (its per-row label counts).
    fn forward<B: Backend, M: CausalModel<B>>(
        &self,
        model: &M,
        units: &[usize],
        pad_id: u32,
        device: &B::Device,
    ) -> (Tensor<B, 1>, Batch<B>) {
        let rows: Vec<&TokenizedExample> = units
            .iter()
            .map(|&i| &self.first[i])
            .chain(units.iter().map(|&i| &self.second[i]))
            .collect();
        let batch = make_batch_rows::<B>(&rows, pad_id, device);
        (model.row_log_probs(&batch), batch)
    }

    /// The reference log-probs of `units`' first (`side` 0) or second rows; zeros before any
    /// were computed (the kinds without a reference never read them).
    fn reference<B: Backend>(
        &self,
        side: usize,
        units: &[usize],
        like: &Tensor<B, 1>,
    ) -> Tensor<B, 1> {
        let values = match &self.reference {
            Some(sides) => {
                let side = if side == 0 { &sides.0 } else { &sides.1 };
                units.iter().map(|&i| side[i]).collect()
            }
            None => vec![0.0; units.len()],
        };
        host_vector(values, like)
    }
}

/// A preference objective: its rows and their reference log-probs.
pub trait PreferenceSet: Objective {
    fn rows_mut(&mut self) -> &mut RowPairs;

    /// Sets the summed reference log-probs of every first and second row (computed elsewhere).
    fn set_reference(&mut self, first: Vec<f64>, second: Vec<f64>) {
        self.rows_mut().reference = Some((first, second));
    }
}

fn stat<B: Backend>(name: &'static str, values: Tensor<B, 1>, count: usize) -> Stat<B> {
    Stat {
        name,
        sum: values.detach().sum(),
        count: count as f64,
    }
}

/// DPO, ORPO and SimPO over chosen/rejected pairs.
pub struct PairSet {
    rows: RowPairs,
    loss: PreferenceLoss,
}

impl PairSet {
    pub fn new(
        chosen: Vec<TokenizedExample>,
        rejected: Vec<TokenizedExample>,
        loss: PreferenceLoss,
    ) -> Self {
        Self {
            rows: RowPairs::new(chosen, rejected),
            loss,
        }
    }
}

impl PreferenceSet for PairSet {
    fn rows_mut(&mut self) -> &mut RowPairs {
        &mut self.rows
    }
}

impl Objective for PairSet {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn tokens(&self, i: usize) -> usize {
        self.rows.tokens(i)
    }

    /// ORPO's NLL is the token mean over the chosen responses of the step.
    fn label_tokens(&self, i: usize) -> usize {
        self.rows.first[i].num_items()
    }

    fn validate(&self, set: &'static str, vocab: usize) -> Result<(), Error> {
        if self.rows.first.len() != self.rows.second.len() {
            return Err(Error::Example {
                set,
                index: self.rows.first.len().min(self.rows.second.len()),
                message: "chosen and rejected rows differ in number".into(),
            });
        }
        validate_rows(set, &self.rows.first, vocab)?;
        validate_rows(set, &self.rows.second, vocab)
    }

    fn micro_loss<B: Backend, M: CausalModel<B>>(
        &self,
        model: &M,
        units: &[usize],
        step: StepTotals,
        pad_id: u32,
        device: &B::Device,
    ) -> MicroLoss<B> {
        let k = units.len();
        let (logps, batch) = self.rows.forward(model, units, pad_id, device);
        let lengths: Vec<f64> = batch.row_items.iter().map(|&n| n.max(1) as f64).collect();
        let (len_c, len_r) = (
            host_vector(lengths[..k].to_vec(), &logps),
            host_vector(lengths[k..].to_vec(), &logps),
        );
        let pc = logps.clone().narrow(0, 0, k);
        let pr = logps.clone().narrow(0, k, k);
        let reference = |side: usize| self.rows.reference(side, units, &logps);
        let mut extra = Vec::new();
        let (terms, pc, pr, loss) = match self.loss {
            PreferenceLoss::Dpo {
                loss_type,
                beta,
                label_smoothing,
            } => {
                let (rc, rr) = (reference(0), reference(1));
                let terms = if loss_type == DpoLossType::Ipo {
                    // IPO's loss on length-averaged log-ratios; its rewards, as TRL logs them,
                    // on the summed ones.
                    let averaged = dpo_terms(
                        loss_type,
                        beta,
                        label_smoothing,
                        [
                            pc.clone().div(len_c.clone()),
                            pr.clone().div(len_r.clone()),
                            rc.clone().div(len_c),
                            rr.clone().div(len_r),
                        ],
                    );
                    PairTerms {
                        losses: averaged.losses,
                        chosen_rewards: pc.clone().sub(rc).detach().mul_scalar(beta),
                        rejected_rewards: pr.clone().sub(rr).detach().mul_scalar(beta),
                    }
                } else {
                    dpo_terms(
                        loss_type,
                        beta,
                        label_smoothing,
                        [pc.clone(), pr.clone(), rc, rr],
                    )
                };
                let loss = terms
                    .losses
                    .clone()
                    .sum()
                    .div_scalar(step.units.max(1) as f64);
                (terms, pc, pr, loss)
            }
            PreferenceLoss::Simpo {
                beta,
                gamma,
                label_smoothing,
            } => {
                let (ac, ar) = (pc.div(len_c), pr.div(len_r));
                let terms = simpo_terms(beta, gamma, label_smoothing, ac.clone(), ar.clone());
                let loss = terms
                    .losses
                    .clone()
                    .sum()
                    .div_scalar(step.units.max(1) as f64);
                (terms, ac, ar, loss)
            }
            PreferenceLoss::Orpo { beta } => {
                let chosen_tokens: usize = batch.row_items[..k].iter().sum();
                let nll_sum = pc.clone().neg().sum();
                let (ac, ar) = (pc.div(len_c), pr.div(len_r));
                let (terms, log_odds) = orpo_terms(beta, ac.clone(), ar.clone());
                let loss = nll_sum
                    .clone()
                    .div_scalar(step.label_tokens.max(1) as f64)
                    .sub(
                        terms
                            .losses
                            .clone()
                            .sum()
                            .div_scalar(step.units.max(1) as f64),
                    );
                extra.push(Stat {
                    name: "nll_loss",
                    sum: nll_sum.detach(),
                    count: chosen_tokens as f64,
                });
                extra.push(stat(
                    "log_odds_ratio",
                    terms.losses.clone().div_scalar(beta),
                    k,
                ));
                extra.push(stat("log_odds_chosen", log_odds, k));
                (terms, ac, ar, loss)
            }
            PreferenceLoss::Kto { .. } => unreachable!("KTO trains on a KtoSet"),
        };
        let margins = terms
            .chosen_rewards
            .clone()
            .sub(terms.rejected_rewards.clone());
        let correct = terms
            .chosen_rewards
            .clone()
            .greater(terms.rejected_rewards.clone())
            .float();
        let mut stats = vec![
            stat("rewards/chosen", terms.chosen_rewards, k),
            stat("rewards/rejected", terms.rejected_rewards, k),
            stat("rewards/accuracies", correct, k),
            stat("rewards/margins", margins, k),
            stat("logps/chosen", pc, k),
            stat("logps/rejected", pr, k),
        ];
        stats.extend(extra);
        MicroLoss {
            loss,
            tokens: batch.num_tokens,
            stats,
        }
    }
}

/// KTO over unpaired completions. Each completion also has a mismatched row (its prompt with
/// the next completion's response) whose log-prob ratio estimates the KL term, as TRL pairs
/// them; the estimate is taken over each micro-batch, detached and clamped at 0.
pub struct KtoSet {
    /// Completions and their mismatched rows.
    rows: RowPairs,
    desirable: Vec<bool>,
    loss: PreferenceLoss,
}

/// Where a row's prompt ends: the length of its leading unlabelled tokens.
fn split_prompt(row: &TokenizedExample) -> usize {
    row.labels
        .iter()
        .position(|&l| l != IGNORE_INDEX)
        .unwrap_or(row.labels.len())
}

impl KtoSet {
    pub fn new(
        completions: Vec<TokenizedExample>,
        desirable: Vec<bool>,
        loss: PreferenceLoss,
    ) -> Self {
        let n = completions.len();
        let mismatched = (0..n)
            .map(|i| {
                let (own, other) = (&completions[i], &completions[(i + 1) % n]);
                let (p, q) = (split_prompt(own), split_prompt(other));
                let cap = own.input_ids.len().max(other.input_ids.len());
                let mut row = TokenizedExample {
                    input_ids: own.input_ids[..p].to_vec(),
                    labels: own.labels[..p].to_vec(),
                };
                row.input_ids.extend_from_slice(&other.input_ids[q..]);
                row.labels.extend_from_slice(&other.labels[q..]);
                row.input_ids.truncate(cap);
                row.labels.truncate(cap);
                row
            })
            .collect();
        Self {
            rows: RowPairs::new(completions, mismatched),
            desirable,
            loss,
        }
    }
}

impl PreferenceSet for KtoSet {
    fn rows_mut(&mut self) -> &mut RowPairs {
        &mut self.rows
    }
}

impl Objective for KtoSet {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn tokens(&self, i: usize) -> usize {
        self.rows.tokens(i)
    }

    fn label_tokens(&self, i: usize) -> usize {
        self.rows.first[i].num_items()
    }

    fn validate(&self, set: &'static str, vocab: usize) -> Result<(), Error> {
        validate_rows(set, &self.rows.first, vocab)?;
        validate_examples(set, &self.rows.second, vocab)
    }

    fn micro_loss<B: Backend, M: CausalModel<B>>(
        &self,
        model: &M,
        units: &[usize],
        step: StepTotals,
        pad_id: u32,
        device: &B::Device,
    ) -> MicroLoss<B> {
        let PreferenceLoss::Kto {
            beta,
            desirable_weight,
            undesirable_weight,
        } = self.loss
        else {
            unreachable!("a KtoSet trains with the KTO loss")
        };
        let k = units.len();
        let (logps, batch) = self.rows.forward(model, units, pad_id, device);
        let policy = logps.clone().narrow(0, 0, k);
        let policy_kl = logps.clone().narrow(0, k, k).detach();
        let reference = self.rows.reference(0, units, &logps);
        let kl = policy_kl
            .sub(self.rows.reference(1, units, &logps))
            .mean()
            .clamp_min(0.0)
            .detach();
        let flags: Vec<f64> = units
            .iter()
            .map(|&i| f64::from(u8::from(self.desirable[i])))
            .collect();
        let good = flags.iter().filter(|&&f| f > 0.0).count();
        let desirable = host_vector(flags, &logps);
        let undesirable = desirable.clone().neg().add_scalar(1.0);
        let losses = kto_losses(
            beta,
            desirable_weight,
            undesirable_weight,
            policy.clone(),
            reference.clone(),
            desirable.clone(),
            kl.clone(),
        );
        let rewards = policy.clone().sub(reference).detach().mul_scalar(beta);
        let stats = vec![
            stat(
                "rewards/chosen",
                rewards.clone().mul(desirable.clone()),
                good,
            ),
            stat(
                "rewards/rejected",
                rewards.mul(undesirable.clone()),
                k - good,
            ),
            stat("logps/chosen", policy.clone().mul(desirable), good),
            stat("logps/rejected", policy.mul(undesirable), k - good),
            stat("kl", kl, 1),
        ];
        MicroLoss {
            loss: losses.sum().div_scalar(step.units.max(1) as f64),
            tokens: batch.num_tokens,
            stats,
        }
    }
}

/// The model the reference log-probs come from: the base as the method starts from it, without
/// autodiff (an NF4 base under QLoRA).
fn reference_model<B: Backend>(
    cfg: &SftConfig,
    config: &ModelConfig,
    tensors: &std::collections::BTreeMap<String, crate::model::hf::HostTensor>,
    device: &B::Device,
) -> Result<CausalLm<B>, Error> {
    Ok(if cfg.method == Method::Qlora {
        quantize_base_nf4(CausalLm::<B>::from_hf_tensors_nf4(config, tensors, device)?)?
    } else {
        CausalLm::<B>::from_hf_tensors(config, tensors, device)?
    })
}

/// Trains `base` with the preference stage `kind` on `train` (evaluated on `eval`) and writes
/// the method's outputs under `out_dir`, as [`crate::train::train_sft`] does.
#[allow(clippy::too_many_arguments)]
pub fn train_preference<B: AutodiffBackend>(
    cfg: &PreferenceConfig,
    kind: PreferenceKind,
    base: BaseModel<'_>,
    train: PreferenceData,
    eval: PreferenceData,
    out_dir: &Path,
    device: &B::Device,
    progress: Option<&MultiProgress>,
) -> Result<SftReport, Error> {
    let loss = cfg.loss(kind)?;
    cfg.train.validate()?;
    if train.is_empty() {
        return Err(Error::NoExamples);
    }
    match kind {
        PreferenceKind::Kto => {
            let (completions, desirable) = train.unpaired();
            let (eval_rows, eval_flags) = eval.unpaired();
            train_set::<B, _>(
                cfg,
                kind,
                base,
                KtoSet::new(completions, desirable, loss),
                KtoSet::new(eval_rows, eval_flags, loss),
                out_dir,
                device,
                progress,
            )
        }
        _ => train_set::<B, _>(
            cfg,
            kind,
            base,
            pair_set(train, "train", kind, loss)?,
            pair_set(eval, "eval", kind, loss)?,
            out_dir,
            device,
            progress,
        ),
    }
}

/// Checks the sets, computes their reference log-probs where the kind has a reference, and
/// trains on them.
#[allow(clippy::too_many_arguments)]
fn train_set<B: AutodiffBackend, O: PreferenceSet>(
    cfg: &PreferenceConfig,
    kind: PreferenceKind,
    base: BaseModel<'_>,
    mut train: O,
    mut eval: O,
    out_dir: &Path,
    device: &B::Device,
    progress: Option<&MultiProgress>,
) -> Result<SftReport, Error> {
    {
        // The host copy of the weights read here serves the reference pass only; the training
        // run reads its own.
        let loaded;
        let (config, tensors) = match &base {
            BaseModel::Dir(dir) => {
                loaded = (
                    ModelConfig::from_file(dir.join("config.json"))?,
                    load_hf_folder_tensors(dir)?,
                );
                (&loaded.0, &loaded.1)
            }
            BaseModel::Loaded { config, tensors } => (*config, *tensors),
        };
        train.validate("train", config.vocab_size)?;
        eval.validate("eval", config.vocab_size)?;
        if kind.needs_reference() {
            let pad_id = config.pad_token_id.unwrap_or(0);
            let rows = 2 * cfg.train.batch_size;
            let model = reference_model::<B::InnerBackend>(&cfg.train, config, tensors, device)?;
            train
                .rows_mut()
                .compute_reference(&model, rows, pad_id, device);
            eval.rows_mut()
                .compute_reference(&model, rows, pad_id, device);
        }
    }
    run_sft::<B, O>(
        &cfg.train, base, &train, &eval, out_dir, device, progress, None,
    )
}

fn pair_set(
    data: PreferenceData,
    set: &'static str,
    kind: PreferenceKind,
    loss: PreferenceLoss,
) -> Result<PairSet, Error> {
    match data {
        PreferenceData::Pairs { chosen, rejected } => Ok(PairSet::new(chosen, rejected, loss)),
        PreferenceData::Unpaired { .. } => Err(Error::Example {
            set,
            index: 0,
            message: format!(
                "`{}` trains on chosen/rejected pairs; this data has unpaired completions with \
                 labels (KTO's form): give the tokenizer records with a `rejected` column",
                kind.name()
            ),
        }),
    }
}

#[cfg(test)]
mod tests;
