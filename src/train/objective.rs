//! What the training loop minimises: an [`Objective`] turns a micro-batch of a data set's units
//! (SFT examples, preference pairs, KTO completions) into a loss and the statistics logged with
//! it. The loop ([`crate::train::sft::train_loop`]) owns everything else — the step plan,
//! accumulation, clipping, the optimizer, logging, checkpoints and resume — so a new training
//! method is an objective, not a copy of the loop.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

use crate::train::data::{make_batch, micro_batches, validate_examples, TokenizedExample};
use crate::train::sft::CausalModel;
use crate::train::Error;

/// Totals over the units of one optimizer step (all its micro-batches), by which each
/// micro-batch's share of the loss is normalised, so the step's gradient does not depend on how
/// it is split into micro-batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTotals {
    pub units: usize,
    /// Counted label tokens ([`Objective::label_tokens`]).
    pub label_tokens: usize,
}

/// A logged quantity: its sum over the micro-batch's units and how many units it averages over.
pub struct Stat<B: Backend> {
    pub name: &'static str,
    pub sum: Tensor<B, 1>,
    pub count: f64,
}

/// One micro-batch's share of the step's loss.
pub struct MicroLoss<B: Backend> {
    /// Already divided by the step's normaliser: the step's loss is the sum over micro-batches.
    pub loss: Tensor<B, 1>,
    /// Real (unpadded) tokens that went through the model, for tokens/s.
    pub tokens: usize,
    pub stats: Vec<Stat<B>>,
}

/// A training data set and the loss on it.
pub trait Objective: Sync {
    /// Units (examples, pairs) in the set; the step plan shuffles and batches these.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens the model reads for unit `i` (micro-batch token budgets).
    fn tokens(&self, i: usize) -> usize;

    /// Label tokens of unit `i` that a token-mean loss counts.
    fn label_tokens(&self, i: usize) -> usize;

    /// The loss of the micro-batch `units`, normalised by `step`.
    fn micro_loss<B: Backend, M: CausalModel<B>>(
        &self,
        model: &M,
        units: &[usize],
        step: StepTotals,
        pad_id: u32,
        device: &B::Device,
    ) -> MicroLoss<B>;

    /// Checks the units against the model's vocabulary; `set` names the data set in errors.
    fn validate(&self, set: &'static str, vocab: usize) -> Result<(), Error>;
}

/// Supervised fine-tuning: the token-mean cross-entropy over the step's label tokens
/// (transformers' `num_items_in_batch`).
impl Objective for [TokenizedExample] {
    fn len(&self) -> usize {
        <[TokenizedExample]>::len(self)
    }

    fn tokens(&self, i: usize) -> usize {
        self[i].input_ids.len()
    }

    fn validate(&self, set: &'static str, vocab: usize) -> Result<(), Error> {
        validate_examples(set, self, vocab)
    }

    fn label_tokens(&self, i: usize) -> usize {
        self[i].num_items()
    }

    fn micro_loss<B: Backend, M: CausalModel<B>>(
        &self,
        model: &M,
        units: &[usize],
        step: StepTotals,
        pad_id: u32,
        device: &B::Device,
    ) -> MicroLoss<B> {
        let batch = make_batch::<B>(self, units, pad_id, device);
        MicroLoss {
            loss: model
                .summed_loss(&batch)
                .div_scalar(step.label_tokens.max(1) as f64),
            tokens: batch.num_tokens,
            stats: Vec::new(),
        }
    }
}

/// The totals of `units` of `set`.
pub fn totals<O: Objective + ?Sized>(
    set: &O,
    units: impl IntoIterator<Item = usize>,
) -> StepTotals {
    units
        .into_iter()
        .fold(StepTotals::default(), |t, i| StepTotals {
            units: t.units + 1,
            label_tokens: t.label_tokens + set.label_tokens(i),
        })
}

/// Running sums of the statistics of the steps since the last log line, read back only when
/// logged (one host read per statistic).
pub struct StatWindow<B: Backend> {
    sums: Vec<(&'static str, Tensor<B, 1>, f64)>,
}

impl<B: Backend> Default for StatWindow<B> {
    fn default() -> Self {
        Self { sums: Vec::new() }
    }
}

impl<B: Backend> StatWindow<B> {
    pub fn add(&mut self, stats: Vec<Stat<B>>) {
        for stat in stats {
            match self.sums.iter_mut().find(|(n, _, _)| *n == stat.name) {
                Some((_, sum, count)) => {
                    *sum = sum.clone().add(stat.sum);
                    *count += stat.count;
                }
                None => self.sums.push((stat.name, stat.sum, stat.count)),
            }
        }
    }

    /// The mean of each statistic over its units (statistics with no units are left out), and
    /// a fresh window.
    pub fn take(&mut self) -> Vec<(&'static str, f64)> {
        self.take_sums()
            .into_iter()
            .filter(|(_, _, count)| *count > 0.0)
            .map(|(name, total, count)| (name, total / count))
            .collect()
    }

    /// Each statistic's sum and unit count, in the order first seen, and a fresh window.
    pub fn take_sums(&mut self) -> Vec<(&'static str, f64, f64)> {
        std::mem::take(&mut self.sums)
            .into_iter()
            .map(|(name, sum, count)| (name, sum.into_scalar().elem(), count))
            .collect()
    }
}

/// The objective over a whole evaluation set: its loss (normalised over the set, e.g. the
/// token mean for SFT) and the means of its statistics. `None` for an empty set.
pub fn evaluate_objective<B: Backend, M: CausalModel<B>, O: Objective + ?Sized>(
    model: &M,
    set: &O,
    batch_size: usize,
    max_tokens: Option<usize>,
    pad_id: u32,
    device: &B::Device,
) -> Option<(f64, Vec<(&'static str, f64)>)> {
    if set.is_empty() {
        return None;
    }
    let order: Vec<usize> = (0..set.len()).collect();
    let lengths: Vec<usize> = order.iter().map(|&i| set.tokens(i)).collect();
    let whole = totals(set, order.iter().copied());
    let mut loss: Option<Tensor<B, 1>> = None;
    let mut stats = StatWindow::<B>::default();
    for mb in micro_batches(&order, &lengths, batch_size, max_tokens) {
        let micro = set.micro_loss(model, &mb, whole, pad_id, device);
        loss = Some(match loss {
            Some(acc) => acc.add(micro.loss),
            None => micro.loss,
        });
        stats.add(micro.stats);
    }
    let total: f64 = loss?.into_scalar().elem();
    Some((total, stats.take()))
}
