//! Generation on the quantized CPU decoder: prefill every distinct prompt in chunks of whole
//! matrix products, copy the cache to rows that share a prompt (GRPO's groups), then decode all
//! rows one token a step through one preallocated cache. Choosing tokens is
//! `model/generate.rs`'s [`decode_loop`] (penalty, temperature, top-k/top-p, seeded per-row
//! RNG, stop tokens and strings, budget forcing), so both decoders share it to the letter.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::infer::model::{KvCache, QuantModel, Scratch, TokenIn};
use crate::model::generate::{
    decode_loop, distinct_prompts, validate, DecodeFn, FinishedRows, GenerateError,
    GenerateOptions, Generation,
};

/// Tokens per prefill pass: bounds the activation buffers of long prompts.
const PREFILL_CHUNK: usize = 256;

/// The model with the buffers of one batch of sequences.
pub struct Session<'m> {
    model: &'m QuantModel,
    cache: KvCache,
    scratch: Scratch,
    /// Filled slots per row.
    lens: Vec<usize>,
    tokens: Vec<TokenIn>,
    want: Vec<usize>,
}

impl<'m> Session<'m> {
    /// A cache for `rows` sequences of at most `capacity` tokens each.
    pub fn new(model: &'m QuantModel, rows: usize, capacity: usize) -> Self {
        Self {
            model,
            cache: KvCache::new(model, rows, capacity),
            scratch: Scratch::default(),
            lens: vec![0; rows],
            tokens: Vec::new(),
            want: Vec::new(),
        }
    }

    /// Appends `ids` to row `row` (positions continue from its length) and returns the logits
    /// of every appended position (`all`) or of the last one, row-major `[n, vocab]`.
    pub fn prefill(&mut self, row: usize, ids: &[u32], all: bool, logits: &mut Vec<f32>) {
        let vocab = self.model.config.vocab_size;
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = ids.chunks(PREFILL_CHUNK).collect();
        for (ci, chunk) in chunks.iter().enumerate() {
            let start = self.lens[row];
            self.tokens.clear();
            self.tokens
                .extend(chunk.iter().enumerate().map(|(i, &id)| TokenIn {
                    id,
                    row,
                    slot: start + i,
                    pos: (start + i) as i64,
                }));
            self.want.clear();
            if all {
                self.want.extend(0..chunk.len());
            } else if ci + 1 == chunks.len() {
                self.want.push(chunk.len() - 1);
            }
            self.model.forward(
                &self.tokens,
                &mut self.cache,
                &mut self.scratch,
                &self.want,
                logits,
            );
            self.lens[row] += chunk.len();
            if all {
                out.extend_from_slice(&logits[..chunk.len() * vocab]);
            }
        }
        if all {
            *logits = out;
        }
    }

    /// One token for each row at `pos[row]`; logits `[rows, vocab]`.
    pub fn step(&mut self, ids: &[u32], pos: &[i64], logits: &mut Vec<f32>) {
        let rows: Vec<usize> = (0..ids.len()).collect();
        self.step_rows(&rows, ids, pos, logits);
    }

    /// Token `ids[i]` at position `pos[i]` for row `rows[i]` (rows that have finished are left
    /// out); logits `[rows.len(), vocab]` in that order.
    pub fn step_rows(&mut self, rows: &[usize], ids: &[u32], pos: &[i64], logits: &mut Vec<f32>) {
        self.tokens.clear();
        for (&row, (&id, &p)) in rows.iter().zip(ids.iter().zip(pos)) {
            self.tokens.push(TokenIn {
                id,
                row,
                slot: self.lens[row],
                pos: p,
            });
            self.lens[row] += 1;
        }
        self.want.clear();
        self.want.extend(0..ids.len());
        self.model.forward(
            &self.tokens,
            &mut self.cache,
            &mut self.scratch,
            &self.want,
            logits,
        );
    }

    /// Gives row `to` a copy of row `from`'s cache.
    pub fn copy_row(&mut self, from: usize, to: usize) {
        let len = self.lens[from];
        self.cache.copy_row(from, to, len, self.model.num_layers());
        self.lens[to] = len;
    }
}

/// The logits of every position of one prompt, `[len, vocab]` row-major.
pub fn prompt_logits(model: &QuantModel, ids: &[u32]) -> Vec<f32> {
    let mut s = Session::new(model, 1, ids.len().max(1));
    let mut logits = Vec::new();
    s.prefill(0, ids, true, &mut logits);
    logits
}

/// [`generate`] over `prompts` in batches of `batch_size` rows on the CPU backend, calling
/// `done(n)` after each batch of `n` (a progress bar).
pub fn generate_batched(
    model: &QuantModel,
    prompts: &[Vec<u32>],
    batch_size: usize,
    opts: &GenerateOptions,
    decode: Option<DecodeFn<'_>>,
    mut done: impl FnMut(usize),
) -> Result<Vec<Generation>, GenerateError> {
    let device = Default::default();
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch_size.max(1)) {
        out.extend(generate::<crate::model::device::CpuBackend>(
            model, chunk, opts, decode, &device,
        )?);
        done(chunk.len());
    }
    Ok(out)
}

/// [`crate::model::generate::generate`] on the quantized decoder; the logits reach the shared
/// sampling code as `B` tensors (ndarray's on the CPU).
pub fn generate<B: Backend>(
    model: &QuantModel,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    decode: Option<DecodeFn<'_>>,
    device: &B::Device,
) -> Result<Vec<Generation>, GenerateError> {
    let vocab = model.config.vocab_size;
    validate(vocab, prompts, opts, decode.is_some())?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let b = prompts.len();
    let (distinct, row_source) = distinct_prompts(prompts);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut session = Session::new(model, b, longest + opts.max_new_tokens + 1);
    // Prefill the first row of each distinct prompt, then copy its cache to the others.
    let mut first = vec![0f32; b * vocab];
    let mut firsts: Vec<Option<usize>> = vec![None; distinct.len()];
    let mut logits = Vec::new();
    for (row, &src) in row_source.iter().enumerate() {
        match firsts[src] {
            None => {
                session.prefill(row, distinct[src], false, &mut logits);
                firsts[src] = Some(row);
            }
            Some(from) => {
                session.copy_row(from, row);
                let (a, b2) = (from * vocab, row * vocab);
                first.copy_within(a..a + vocab, b2);
                continue;
            }
        }
        first[row * vocab..(row + 1) * vocab].copy_from_slice(&logits[..vocab]);
    }
    let to_tensor = |data: Vec<f32>| {
        let n = data.len() / vocab;
        Tensor::<B, 2>::from_data(TensorData::new(data, [n, vocab]), device)
    };
    // Rows that finish leave the batch: each step computes only the rows still decoding.
    decode_loop(
        prompts,
        opts,
        decode,
        0,
        FinishedRows::Dropped,
        to_tensor(first),
        |rows, next, pos| {
            session.step_rows(rows, next, pos, &mut logits);
            Ok(to_tensor(logits.clone()))
        },
    )
}
