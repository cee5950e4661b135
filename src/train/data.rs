//! Tokenized examples, the seeded step plan (epoch shuffles, token-budget micro-batches,
//! gradient accumulation), batch tensors, and the causal-LM loss.
//!
//! The loss follows transformers' `ForCausalLMLoss`: logits at position t predict label t+1,
//! labels of -100 are ignored. For one optimizer step every micro-batch loss is the SUM of
//! token cross-entropies divided by the number of non-ignored tokens of the whole accumulated
//! batch (`num_items_in_batch`, as `Trainer` passes it since transformers 4.46), so the summed
//! gradient is that of the token mean over the accumulated batch, however it is split.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::train::Error;

/// Label value that contributes no loss (transformers' `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized training example; `labels` has one entry per input token (unshifted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl TokenizedExample {
    /// Labels that train on every token.
    pub fn all_tokens(input_ids: Vec<u32>) -> Self {
        let labels = input_ids.iter().map(|&t| i64::from(t)).collect();
        Self { input_ids, labels }
    }

    /// Label tokens that contribute to the loss (after the shift).
    pub fn num_items(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Checks lengths and ids; `set` names the data set in errors.
pub fn validate_examples(
    set: &'static str,
    examples: &[TokenizedExample],
    vocab: usize,
) -> Result<(), Error> {
    for (index, ex) in examples.iter().enumerate() {
        let bad = |message: String| {
            Err(Error::Example {
                set,
                index,
                message,
            })
        };
        if ex.input_ids.is_empty() {
            return bad("no tokens".into());
        }
        if ex.input_ids.len() != ex.labels.len() {
            return bad(format!(
                "{} input_ids but {} labels",
                ex.input_ids.len(),
                ex.labels.len()
            ));
        }
        if let Some(&t) = ex.input_ids.iter().find(|&&t| t as usize >= vocab) {
            return bad(format!("token id {t} is outside the vocabulary of {vocab}"));
        }
        if let Some(&l) = ex
            .labels
            .iter()
            .find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= vocab))
        {
            return bad(format!(
                "label {l} is neither -100 nor a token id below {vocab}"
            ));
        }
    }
    Ok(())
}

/// One optimizer step: its epoch and its micro-batches (example indices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    pub epoch: u64,
    pub micro_batches: Vec<Vec<usize>>,
}

/// Splits `order` into micro-batches of at most `batch_size` rows and, when set, at most
/// `max_tokens` padded tokens (rows x longest row).
pub fn micro_batches(
    order: &[usize],
    lengths: &[usize],
    batch_size: usize,
    max_tokens: Option<usize>,
) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for &i in order {
        let len = lengths[i];
        let fits_tokens = max_tokens.is_none_or(|m| longest.max(len) * (current.len() + 1) <= m);
        if !current.is_empty() && (current.len() >= batch_size || !fits_tokens) {
            out.push(std::mem::take(&mut current));
            longest = 0;
        }
        longest = longest.max(len);
        current.push(i);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The shuffled order of epoch `epoch`: a ChaCha20 permutation seeded by `seed + epoch`
/// (as transformers reseeds its sampler each epoch), so any position can be recomputed.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(seed.wrapping_add(epoch));
    order.shuffle(&mut rng);
    order
}

/// Every optimizer step of the run: epochs of micro-batches grouped by
/// `accumulation` (the last group of an epoch may be shorter), until `max_steps` or `epochs`.
pub fn plan_steps(
    lengths: &[usize],
    seed: u64,
    batch_size: usize,
    max_tokens: Option<usize>,
    accumulation: usize,
    epochs: u64,
    max_steps: Option<u64>,
) -> Vec<PlannedStep> {
    let mut steps = Vec::new();
    if lengths.is_empty() {
        return steps;
    }
    let mut epoch = 0;
    loop {
        if max_steps.is_none() && epoch >= epochs {
            break;
        }
        let order = epoch_order(lengths.len(), seed, epoch);
        let micro = micro_batches(&order, lengths, batch_size, max_tokens);
        for group in micro.chunks(accumulation) {
            if max_steps.is_some_and(|m| steps.len() as u64 >= m) {
                return steps;
            }
            steps.push(PlannedStep {
                epoch,
                micro_batches: group.to_vec(),
            });
        }
        epoch += 1;
        if max_steps.is_some_and(|m| steps.len() as u64 >= m) {
            break;
        }
    }
    steps
}

/// A padded micro-batch on the device.
pub struct Batch<B: Backend> {
    /// `[rows, len]`, right-padded with `pad_id`.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[rows * len, 1]`: the label each position predicts (ignored ones set to 0).
    pub targets: Tensor<B, 2, Int>,
    /// `[rows * len]`: 1 where the target counts, else 0.
    pub weights: Tensor<B, 1>,
    pub rows: usize,
    pub len: usize,
    /// Non-ignored targets.
    pub num_items: usize,
    /// Real (unpadded) tokens.
    pub num_tokens: usize,
    /// Non-ignored targets of each row.
    pub row_items: Vec<usize>,
}

/// Right-pads the rows and shifts labels left by one. Right padding needs no attention mask:
/// under the causal mask a real token only sees earlier positions, all real.
pub fn make_batch<B: Backend>(
    examples: &[TokenizedExample],
    indices: &[usize],
    pad_id: u32,
    device: &B::Device,
) -> Batch<B> {
    let rows: Vec<&TokenizedExample> = indices.iter().map(|&i| &examples[i]).collect();
    make_batch_rows(&rows, pad_id, device)
}

/// [`make_batch`] of the given rows, in order.
pub fn make_batch_rows<B: Backend>(
    examples: &[&TokenizedExample],
    pad_id: u32,
    device: &B::Device,
) -> Batch<B> {
    let rows = examples.len();
    let len = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(1);
    let mut ids = Vec::with_capacity(rows * len);
    let mut targets = Vec::with_capacity(rows * len);
    let mut weights = Vec::with_capacity(rows * len);
    let (mut num_items, mut num_tokens) = (0, 0);
    let mut row_items = Vec::with_capacity(rows);
    for ex in examples {
        num_tokens += ex.input_ids.len();
        let before = num_items;
        for t in 0..len {
            ids.push(i64::from(ex.input_ids.get(t).copied().unwrap_or(pad_id)));
            let label = ex.labels.get(t + 1).copied().unwrap_or(IGNORE_INDEX);
            if label == IGNORE_INDEX {
                targets.push(0i64);
                weights.push(0f32);
            } else {
                targets.push(label);
                weights.push(1f32);
                num_items += 1;
            }
        }
        row_items.push(num_items - before);
    }
    Batch {
        input_ids: Tensor::from_data(TensorData::new(ids, [rows, len]), device),
        targets: Tensor::from_data(TensorData::new(targets, [rows * len, 1]), device),
        weights: Tensor::from_data(TensorData::new(weights, [rows * len]), device),
        rows,
        len,
        num_items,
        num_tokens,
        row_items,
    }
}

/// Positions `offset..offset + len` for every row.
pub fn positions<B: Backend>(
    rows: usize,
    len: usize,
    offset: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = (0..rows)
        .flat_map(|_| (0..len).map(move |t| (t + offset) as i64))
        .collect();
    Tensor::from_data(TensorData::new(data, [rows, len]), device)
}

/// Sum of the token cross-entropies of the counted targets, as a `[1]` tensor.
///
/// # Shapes
/// - logits: `[rows, len, vocab]`
pub fn summed_cross_entropy<B: Backend>(logits: Tensor<B, 3>, batch: &Batch<B>) -> Tensor<B, 1> {
    let [rows, len, vocab] = logits.dims();
    let logp = log_softmax(logits.reshape([rows * len, vocab]), 1);
    let picked = logp.gather(1, batch.targets.clone()).reshape([rows * len]);
    picked.mul(batch.weights.clone()).sum().neg()
}

/// Summed log-probability of each row's counted targets, `[rows]` (the sequence log-likelihood
/// of the labelled part: a response's log-prob under the model).
///
/// # Shapes
/// - logits: `[rows, len, vocab]`
pub fn row_log_probs<B: Backend>(logits: Tensor<B, 3>, batch: &Batch<B>) -> Tensor<B, 1> {
    let [rows, len, vocab] = logits.dims();
    let logp = log_softmax(logits.reshape([rows * len, vocab]), 1);
    let picked = logp.gather(1, batch.targets.clone()).reshape([rows * len]);
    picked
        .mul(batch.weights.clone())
        .reshape([rows, len])
        .sum_dim(1)
        .reshape([rows])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_budget_and_batch_size_bound_micro_batches() {
        let lengths = [4, 9, 2, 3, 8, 1];
        // [4, 5]: 2 rows x 8 = 16 tokens fit; [2, 3, 4] would be 3 x 8.
        let order = [0, 1, 2, 3, 4, 5];
        assert_eq!(
            micro_batches(&order, &lengths, 8, Some(16)),
            vec![vec![0], vec![1], vec![2, 3], vec![4, 5]]
        );
        assert_eq!(
            micro_batches(&order, &lengths, 2, None),
            vec![vec![0, 1], vec![2, 3], vec![4, 5]]
        );
        // A single example over the budget still forms a batch.
        assert_eq!(micro_batches(&[1], &lengths, 4, Some(5)), vec![vec![1]]);
    }

    #[test]
    fn plan_is_seeded_and_counts_steps() {
        let lengths = vec![3; 10];
        let a = plan_steps(&lengths, 7, 2, None, 2, 2, None);
        // 5 micro-batches per epoch -> 3 steps per epoch (last one short).
        assert_eq!(a.len(), 6);
        assert_eq!(a[2].micro_batches.len(), 1);
        assert_eq!(a, plan_steps(&lengths, 7, 2, None, 2, 2, None));
        assert_ne!(epoch_order(10, 7, 0), epoch_order(10, 7, 1));
        let capped = plan_steps(&lengths, 7, 2, None, 2, 1, Some(7));
        assert_eq!(capped.len(), 7);
        assert_eq!(capped[6].epoch, 2);
    }
}
