//! Batched autoregressive generation on token ids with a KV cache.
//!
//! Prompts are left-padded; positions follow HF generate (`cumsum(mask) - 1`). Logit
//! processing follows transformers' order and semantics: repetition penalty (over prompt and
//! generated ids), then temperature, top-k (ties at the k-th value kept) and top-p (the
//! smallest top set with mass >= p), then sampling with a per-row seeded ChaCha20 RNG, so a
//! prompt yields the same tokens alone or in a batch. Greedy decoding takes the argmax on
//! the device; top-k sampling brings only k values per row to the host.
//! s1 budget forcing (Muennighoff et al. 2025, "s1: Simple test-time scaling"): cap the
//! thinking tokens by forcing the answer delimiter, and suppress the end-of-thinking
//! delimiter `num_ignore` times by appending "Wait".
//! With a prompt-learning adapter ([`generate_prompted`]) the prefix keys/values fill the cache
//! first, or the virtual-token embeddings go before the (left-padded) prompt, as peft's
//! `prepare_inputs_for_generation`; prompt positions then start after the virtual tokens.
//! Reference: transformers `generation/utils.py`, `generation/logits_process.py`.

use std::collections::{BTreeSet, HashMap, VecDeque};

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::model::decoder::{positions_from_mask, CausalLm, KvCache};
use crate::model::prompt::{prefix_cache, with_virtual_tokens, PromptAdapter};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or `greedy`) picks the argmax.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 1.0 disables; HF semantics (divide positive logits, multiply negative ones).
    pub repetition_penalty: f32,
    pub seed: u64,
    pub greedy: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            greedy: true,
        }
    }
}

/// s1 budget forcing. Delimiters are token sequences (tokenize them with the model's
/// tokenizer). The end of thinking is recognised when the generated ids end with
/// `think_end`; with a multi-token `think_end` the tokens before its last one are already
/// emitted when it is suppressed, so prefer a single token (s1 uses `<|im_start|>`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BudgetForcing {
    /// Force `answer_start` once this many tokens were generated while thinking.
    pub max_thinking_tokens: Option<usize>,
    /// Suppress `think_end` this many times, appending `wait` instead.
    pub num_ignore: usize,
    pub think_end: Vec<u32>,
    /// Appended when the thinking budget runs out (e.g. `<|im_start|>answer\n`).
    pub answer_start: Vec<u32>,
    /// Appended instead of a suppressed `think_end` (e.g. the tokens of "Wait").
    pub wait: Vec<u32>,
}

/// Everything [`generate`] needs besides the model and prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends after one of these (it is kept in the output, as HF does).
    pub stop_token_ids: Vec<u32>,
    /// Generation ends once the decoded output contains one of these (needs `decode`).
    pub stop_strings: Vec<String>,
    pub budget: Option<BudgetForcing>,
    /// Fed to left-pad prompts and for finished rows (masked, so any valid id works).
    pub pad_token_id: u32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            budget: None,
            pad_token_id: 0,
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    StopToken(u32),
    StopString(String),
    Length,
}

/// One prompt's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids only (forced budget-forcing tokens included).
    pub token_ids: Vec<u32>,
    pub finish: FinishReason,
}

/// Errors from [`generate`].
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("prompt {index} is empty")]
    EmptyPrompt { index: usize },
    #[error("prompt {index}: token id {id} is outside the vocabulary ({vocab})")]
    TokenOutOfRange { index: usize, id: u32, vocab: usize },
    #[error("stop strings need a decode function")]
    NoDecoder,
    #[error("invalid sampling parameter `{key}`: {message}")]
    InvalidParam { key: &'static str, message: String },
    #[error("generation on the device failed: {0}")]
    Device(String),
}

/// One row's decoding state.
#[derive(Debug)]
pub(crate) struct Row {
    seen: BTreeSet<u32>,
    out: Vec<u32>,
    forced: VecDeque<u32>,
    thinking: bool,
    thinking_tokens: usize,
    ignores_left: usize,
    finish: Option<FinishReason>,
    rng: ChaCha20Rng,
    /// The row's sampling seed (`seed + row index`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    seed: u64,
    next_pos: i64,
}

impl Row {
    /// The key of this row's next draw for samplers that draw from a counter-based generator
    /// instead of the row's ChaCha20 stream (the GPU engine): a function of the row's seed and of
    /// how many tokens it has, so a prompt draws the same tokens alone or in a batch.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn draw_key(&self) -> u64 {
        let mut x = self
            .seed
            .wrapping_add((self.out.len() as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
}

/// The logits of one decoding step, `[rows, vocab]`, as [`decode_loop`] consumes them: a burn
/// tensor, or logits that stay in a decode engine's memory and are picked from there.
pub(crate) trait StepLogits {
    fn vocab(&self) -> usize;
    /// One token per row of `rows` (in order) per `s`; rows that have finished get a token too
    /// (it is ignored).
    fn choose(self, rows: &mut [Row], s: &SamplingParams) -> Result<Vec<u32>, GenerateError>;
}

impl<B: Backend> StepLogits for Tensor<B, 2> {
    fn vocab(&self) -> usize {
        self.dims()[1]
    }

    fn choose(self, rows: &mut [Row], s: &SamplingParams) -> Result<Vec<u32>, GenerateError> {
        Ok(choose(self, rows, s))
    }
}

/// Generates for each prompt (ids) in one batch; `decode` turns ids into text for stop strings.
/// Turns generated ids into text (for stop strings).
pub type DecodeFn<'a> = &'a dyn Fn(&[u32]) -> String;

/// Generates for each prompt (ids) in one batch.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    decode: Option<DecodeFn<'_>>,
) -> Result<Vec<Generation>, GenerateError> {
    generate_prompted(model, None, prompts, opts, decode)
}

/// [`generate`] with a prompt-learning adapter (prefix tuning, prompt tuning, P-Tuning).
///
/// Prompt positions start at the number of virtual tokens in both cases. peft's prompt
/// tuning numbers a left-padded row's padding too; here padding takes no position, so the
/// tokens sit where training (right-padded) put them; unpadded rows get peft's positions.
pub fn generate_prompted<B: Backend>(
    model: &CausalLm<B>,
    adapter: Option<&PromptAdapter<B>>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    decode: Option<DecodeFn<'_>>,
) -> Result<Vec<Generation>, GenerateError> {
    validate(model.config.vocab_size, prompts, opts, decode.is_some())?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let device = model.model.embed_tokens.weight.device();
    let b = prompts.len();
    let pad_id = pad_id(model.config.vocab_size, opts);
    // Rows with the same prompt (GRPO's group of completions) share one prefill.
    let (distinct, row_source) = distinct_prompts(prompts);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(distinct.len() * longest);
    let mut mask = Vec::with_capacity(distinct.len());
    for p in &distinct {
        let pad = longest - p.len();
        ids.extend(std::iter::repeat_n(pad_id as i64, pad));
        ids.extend(p.iter().map(|&t| t as i64));
        mask.push([vec![0u8; pad], vec![1u8; p.len()]].concat());
    }
    let virtual_len = adapter.map_or(0, PromptAdapter::len);
    let int2 = |data: Vec<i64>, t: usize| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(data, [b, t]), &device)
    };
    let (mut cache, hidden) = prefill(model, adapter, ids, &mask);
    let mut logits = last_logits(model, hidden);
    if distinct.len() < b {
        cache.select_rows(distinct.len(), &row_source);
        let index: Vec<i64> = row_source.iter().map(|&r| r as i64).collect();
        logits = logits.select(
            0,
            Tensor::<B, 1, Int>::from_data(TensorData::new(index, [b]), &device),
        );
    }
    // Room for every token to come, so that each step writes its keys and values in place.
    cache.reserve(opts.max_new_tokens);
    decode_loop(
        prompts,
        opts,
        decode,
        virtual_len as i64,
        FinishedRows::Padded,
        logits,
        |_, next, pos| {
            let ids: Vec<i64> = next.iter().map(|&t| t as i64).collect();
            Ok(model.forward_last(int2(ids, 1), int2(pos.to_vec(), 1), None, Some(&mut cache)))
        },
    )
}

/// The id fed for left padding and for finished rows: `opts.pad_token_id` when it is in the
/// vocabulary (padding is masked, so any id serves; configs may name one outside it, as GLM's
/// 151329 in a model with a smaller vocabulary), else 0.
pub(crate) fn pad_id(vocab: usize, opts: &GenerateOptions) -> u32 {
    if (opts.pad_token_id as usize) < vocab {
        opts.pad_token_id
    } else {
        0
    }
}

/// What a decoding step does with rows that have finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinishedRows {
    /// They stay in the batch, fed the pad id (a cache of fixed rows, as burn's).
    Padded,
    /// They leave it: each step runs only the rows still decoding (engines whose passes name
    /// each token's row).
    Dropped,
}

/// The decoding steps every model shares: from the logits after the prompts (`[batch, vocab]`,
/// one row per prompt), pick a token per row (repetition penalty, temperature, top-k/top-p,
/// per-row seeded RNG), apply budget forcing, stop rows on stop tokens or strings, and ask
/// `step(rows, next, pos)` for the next logits given each row's next token and its position:
/// every row, finished ones fed the pad id ([`FinishedRows::Padded`]), or only the rows still
/// decoding, which `rows` names (prompt indices) and the logits then follow
/// ([`FinishedRows::Dropped`]). Prompt positions start at `offset` (virtual tokens before them).
pub(crate) fn decode_loop<L: StepLogits>(
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    decode: Option<DecodeFn<'_>>,
    offset: i64,
    finished: FinishedRows,
    first_logits: L,
    mut step: impl FnMut(&[usize], &[u32], &[i64]) -> Result<L, GenerateError>,
) -> Result<Vec<Generation>, GenerateError> {
    let vocab = first_logits.vocab();
    let pad_id = pad_id(vocab, opts);
    let b = prompts.len();
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Row {
            seen: p.iter().copied().collect(),
            out: Vec::new(),
            forced: VecDeque::new(),
            thinking: opts.budget.is_some(),
            thinking_tokens: 0,
            ignores_left: opts.budget.as_ref().map_or(0, |bf| bf.num_ignore),
            finish: None,
            rng: ChaCha20Rng::seed_from_u64(opts.sampling.seed.wrapping_add(i as u64)),
            seed: opts.sampling.seed.wrapping_add(i as u64),
            next_pos: p.len() as i64 + offset,
        })
        .collect();
    // `rows[..live]` are in the batch, `origin[i]` the prompt of `rows[i]`.
    let mut origin: Vec<usize> = (0..b).collect();
    let mut live = b;
    let mut logits = first_logits;
    let mut next = Vec::with_capacity(b);
    let mut pos = Vec::with_capacity(b);
    for step_index in 0..opts.max_new_tokens {
        let choice = logits.choose(&mut rows[..live], &opts.sampling)?;
        next.clear();
        for (row, sampled) in rows[..live].iter_mut().zip(choice) {
            if row.finish.is_some() {
                next.push(pad_id);
                continue;
            }
            let token = advance(row, sampled, opts.budget.as_ref());
            row.out.push(token);
            row.seen.insert(token);
            next.push(token);
            if opts.stop_token_ids.contains(&token) && row.forced.is_empty() {
                row.finish = Some(FinishReason::StopToken(token));
            } else if let (Some(dec), false) = (decode, opts.stop_strings.is_empty()) {
                if let Some(s) = hit_stop_string(&row.out, &opts.stop_strings, dec) {
                    row.finish = Some(FinishReason::StopString(s));
                }
            }
        }
        // No logits after the last token: nothing would read them.
        if rows.iter().all(|r| r.finish.is_some()) || step_index + 1 == opts.max_new_tokens {
            break;
        }
        if finished == FinishedRows::Dropped && rows[..live].iter().any(|r| r.finish.is_some()) {
            // Finished rows move behind the live ones (both keep their order), with their
            // tokens.
            let mut order: Vec<usize> = (0..live).filter(|&i| rows[i].finish.is_none()).collect();
            let kept = order.len();
            order.extend((0..live).filter(|&i| rows[i].finish.is_some()));
            order.extend(live..b);
            let mut slots: Vec<Option<Row>> = rows.drain(..).map(Some).collect();
            rows = order
                .iter()
                .map(|&i| slots[i].take().expect("a permutation"))
                .collect();
            origin = order.iter().map(|&i| origin[i]).collect();
            next = order[..kept].iter().map(|&i| next[i]).collect();
            live = kept;
        }
        pos.clear();
        pos.extend(rows[..live].iter_mut().map(|r| {
            r.next_pos += 1;
            r.next_pos - 1
        }));
        logits = step(&origin[..live], &next, &pos)?;
    }
    let mut done: Vec<(usize, Row)> = origin.into_iter().zip(rows).collect();
    done.sort_by_key(|(i, _)| *i);
    Ok(done
        .into_iter()
        .map(|(_, r)| Generation {
            token_ids: r.out,
            finish: r.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}

/// Runs the prompts through the model with a prompt-learning adapter in effect, as peft does:
/// the virtual-token embeddings go before the (left-padded) input and are always attended, the
/// prompt's positions continuing after them; a prefix fills the cache first. `ids` is
/// `[b, longest]` row-major, `mask` one row per prompt, 0 on left padding. Returns the cache
/// and the hidden states of the `longest` input positions (virtual positions dropped).
pub(crate) fn prefill<B: Backend>(
    model: &CausalLm<B>,
    adapter: Option<&PromptAdapter<B>>,
    ids: Vec<i64>,
    mask: &[Vec<u8>],
) -> (KvCache<B>, Tensor<B, 3>) {
    let device = model.model.embed_tokens.weight.device();
    let b = mask.len();
    let longest = mask.first().map_or(0, Vec::len);
    let padded = mask.iter().flatten().any(|&m| m == 0);
    let virtual_len = adapter.map_or(0, PromptAdapter::len);
    let int2 = |data: Vec<i64>, t: usize| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(data, [b, t]), &device)
    };
    let bool2 = |mask: &[Vec<u8>], t: usize| {
        let flat: Vec<bool> = mask.iter().flatten().map(|&m| m != 0).collect();
        Tensor::<B, 2, Bool>::from_data(TensorData::new(flat, [b, t]), &device)
    };
    match adapter {
        Some(PromptAdapter::Virtual(tokens)) => {
            // [virtual | padding | prompt]; the virtual tokens are always attended.
            let mask: Vec<Vec<u8>> = mask
                .iter()
                .map(|m| [vec![1u8; virtual_len], m.clone()].concat())
                .collect();
            // Padding takes no position: the prompt continues right after the virtual tokens.
            let positions = positions_from_mask(&mask);
            let t = virtual_len + longest;
            let mut cache = model.new_cache();
            let embeds = with_virtual_tokens(model, tokens.clone(), int2(ids, longest));
            let h = model.hidden_states_from_embeds(
                embeds,
                int2(positions.into_iter().flatten().collect(), t),
                padded.then(|| bool2(&mask, t)),
                Some(&mut cache),
            );
            let width = h.dims()[2];
            (cache, h.slice([0..b, virtual_len..t, 0..width]))
        }
        _ => {
            let mut cache = match adapter {
                Some(PromptAdapter::Prefix(prefix)) => {
                    prefix_cache(prefix.clone(), &model.config, b)
                }
                _ => model.new_cache(),
            };
            let positions: Vec<i64> = positions_from_mask(mask)
                .into_iter()
                .flatten()
                .map(|p| p + virtual_len as i64)
                .collect();
            let h = model.hidden_states(
                int2(ids, longest),
                int2(positions, longest),
                padded.then(|| bool2(mask, longest)),
                Some(&mut cache),
            );
            (cache, h)
        }
    }
}

/// The logits of one prompt's own tokens with the adapter in effect, as peft's
/// `PeftModelForCausalLM.forward` computes them: `[len, vocab]`.
pub fn prompted_logits<B: Backend>(
    model: &CausalLm<B>,
    adapter: Option<&PromptAdapter<B>>,
    ids: &[u32],
) -> Tensor<B, 2> {
    let ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
    let len = ids.len();
    let (_, hidden) = prefill(model, adapter, ids, &[vec![1u8; len]]);
    let logits = model.lm_head(hidden);
    let vocab = logits.dims()[2];
    logits.reshape([len, vocab])
}

/// The distinct prompts in order of first appearance, and for each row the index of its prompt
/// among them.
pub(crate) fn distinct_prompts(prompts: &[Vec<u32>]) -> (Vec<&[u32]>, Vec<usize>) {
    let mut seen: HashMap<&[u32], usize> = HashMap::new();
    let mut distinct = Vec::new();
    let source = prompts
        .iter()
        .map(|p| {
            *seen.entry(p.as_slice()).or_insert_with(|| {
                distinct.push(p.as_slice());
                distinct.len() - 1
            })
        })
        .collect();
    (distinct, source)
}

/// Logits of the last position: `[batch, seq, hidden]` -> `[batch, vocab]`.
fn last_logits<B: Backend>(model: &CausalLm<B>, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, t, h] = hidden.dims();
    let logits = model.lm_head(hidden.slice([0..b, t - 1..t, 0..h]));
    let v = logits.dims()[2];
    logits.reshape([b, v])
}

/// Checks prompts (non-empty, ids inside the vocabulary) and sampling parameters; stop strings
/// need a decode function.
pub(crate) fn validate(
    vocab: usize,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    has_decoder: bool,
) -> Result<(), GenerateError> {
    for (index, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(GenerateError::EmptyPrompt { index });
        }
        if let Some(&id) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(GenerateError::TokenOutOfRange { index, id, vocab });
        }
    }
    let s = &opts.sampling;
    let invalid = |key, message: String| Err(GenerateError::InvalidParam { key, message });
    if !(s.greedy || s.temperature >= 0.0 && s.temperature.is_finite()) {
        return invalid("temperature", format!("{} must be >= 0", s.temperature));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return invalid("top_p", format!("{} must be in (0, 1]", s.top_p));
    }
    if !(s.repetition_penalty > 0.0 && s.repetition_penalty.is_finite()) {
        return invalid(
            "repetition_penalty",
            format!("{} must be > 0", s.repetition_penalty),
        );
    }
    if !opts.stop_strings.is_empty() && !has_decoder {
        return Err(GenerateError::NoDecoder);
    }
    Ok(())
}

/// Applies budget forcing to a sampled token and returns the token to emit.
fn advance(row: &mut Row, sampled: u32, budget: Option<&BudgetForcing>) -> u32 {
    if let Some(t) = row.forced.pop_front() {
        count_thinking(row);
        return t;
    }
    let Some(bf) = budget else { return sampled };
    if !row.thinking {
        return sampled;
    }
    if let Some(max) = bf.max_thinking_tokens {
        if row.thinking_tokens >= max {
            // Budget spent: the answer delimiter replaces the sampled token.
            row.thinking = false;
            row.forced.extend(bf.answer_start.iter().copied());
            return row.forced.pop_front().unwrap_or(sampled);
        }
    }
    let ends_thinking = !bf.think_end.is_empty() && {
        let n = bf.think_end.len();
        bf.think_end[n - 1] == sampled && row.out.ends_with(&bf.think_end[..n - 1])
    };
    if ends_thinking {
        if row.ignores_left > 0 && !bf.wait.is_empty() {
            row.ignores_left -= 1;
            row.forced.extend(bf.wait.iter().copied());
            let first = row.forced.pop_front().unwrap_or(sampled);
            count_thinking(row);
            return first;
        }
        row.thinking = false;
        return sampled;
    }
    count_thinking(row);
    sampled
}

fn count_thinking(row: &mut Row) {
    if row.thinking {
        row.thinking_tokens += 1;
    }
}

fn hit_stop_string(
    out: &[u32],
    stops: &[String],
    decode: &dyn Fn(&[u32]) -> String,
) -> Option<String> {
    // A stop string spans at most its byte length in tokens (+ slack for tokens that
    // decode to nothing), so only the tail needs decoding.
    let window = stops.iter().map(String::len).max().unwrap_or(0) + 8;
    let text = decode(&out[out.len().saturating_sub(window)..]);
    stops.iter().find(|s| text.contains(s.as_str())).cloned()
}

/// Picks one token per row from last-position logits `[batch, vocab]`.
fn choose<B: Backend>(logits: Tensor<B, 2>, rows: &mut [Row], s: &SamplingParams) -> Vec<u32> {
    let [b, vocab] = logits.dims();
    let device = logits.device();
    let mut logits = logits;
    if s.repetition_penalty != 1.0 {
        logits = penalize(logits, rows, s.repetition_penalty, &device);
    }
    if s.greedy || s.temperature == 0.0 {
        return to_u32(logits.argmax(1).into_data());
    }
    let logits = logits.div_scalar(s.temperature);
    // Candidates per row: (token, logit); top-k's best first.
    let in_token_order = !(s.top_k > 0 && s.top_k < vocab);
    let candidates: Vec<Vec<(u32, f32)>> = if !in_token_order {
        let (vals, idx) = logits.topk_with_indices(s.top_k, 1);
        let vals = to_f32(vals.into_data());
        let idx = to_u32(idx.into_data());
        (0..b)
            .map(|r| {
                let k = s.top_k;
                idx[r * k..(r + 1) * k]
                    .iter()
                    .copied()
                    .zip(vals[r * k..(r + 1) * k].iter().copied())
                    .collect()
            })
            .collect()
    } else {
        let all = to_f32(logits.into_data());
        (0..b)
            .map(|r| {
                // In token order: `sample_row` sorts only what the draw reaches.
                all[r * vocab..(r + 1) * vocab]
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i as u32, v))
                    .collect()
            })
            .collect()
    };
    rows.iter_mut()
        .zip(candidates)
        .map(|(row, c)| sample_row(c, in_token_order, s.top_p, &mut row.rng))
        .collect()
}

/// HF `RepetitionPenaltyLogitsProcessor` on the device: each seen token once per row.
fn penalize<B: Backend>(
    logits: Tensor<B, 2>,
    rows: &[Row],
    penalty: f32,
    device: &B::Device,
) -> Tensor<B, 2> {
    let b = rows.len();
    let width = rows.iter().map(|r| r.seen.len()).max().unwrap_or(0);
    if width == 0 {
        return logits;
    }
    // Rows with fewer seen tokens repeat their first one; its delta is zeroed below.
    let mut idx = Vec::with_capacity(b * width);
    let mut keep = Vec::with_capacity(b * width);
    for r in rows {
        let seen: Vec<i64> = r.seen.iter().map(|&t| t as i64).collect();
        let first = seen.first().copied().unwrap_or(0);
        for j in 0..width {
            idx.push(seen.get(j).copied().unwrap_or(first));
            keep.push(if j < seen.len() { 1.0f32 } else { 0.0 });
        }
    }
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [b, width]), device);
    let keep = Tensor::<B, 2>::from_data(TensorData::new(keep, [b, width]), device);
    let old = logits.clone().gather(1, idx.clone());
    let negative = old.clone().lower_elem(0.0);
    let new = old
        .clone()
        .div_scalar(penalty)
        .mask_where(negative, old.clone().mul_scalar(penalty));
    let delta = new.sub(old).mul(keep);
    logits.scatter(1, idx, delta, burn::tensor::IndexingUpdateOp::Add)
}

/// Tokens a draw sorts first: the draw and the top-p cut almost always fall among a row's best
/// few (a full sort of a 49k-token vocabulary per row and token was a sixth of CPU sampling).
const SORTED_FIRST: usize = 1024;

/// Top-p filter (HF: drop tokens whose ascending cumulative probability is <= 1 - p, always
/// keeping the best) and a draw from the rest, walking the candidates best first (ties in their
/// given order). `c` need not be sorted; a long `c` listed in token order (`in_token_order`) has
/// only its best [`SORTED_FIRST`] sorted unless the cut or the draw reaches past them.
fn sample_row(
    mut c: Vec<(u32, f32)>,
    in_token_order: bool,
    top_p: f32,
    rng: &mut ChaCha20Rng,
) -> u32 {
    let u = rng.random::<f64>();
    let weights_sum = |c: &[(u32, f32)], max: f64| -> f64 {
        c.iter().map(|&(_, v)| (f64::from(v) - max).exp()).sum()
    };
    if in_token_order && c.len() > SORTED_FIRST {
        // In token order, "ties in given order" is "ties by token id": a total order, so the
        // selected best are exactly the first of the stable sort.
        let order = |x: &(u32, f32), y: &(u32, f32)| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0));
        c.select_nth_unstable_by(SORTED_FIRST - 1, order);
        c[..SORTED_FIRST].sort_unstable_by(order);
        let max = f64::from(c[0].1);
        let total = weights_sum(&c, max);
        if let Some(token) = draw(&c[..SORTED_FIRST], max, total, top_p, u, false) {
            return token;
        }
        c.sort_unstable_by(order);
        return draw(&c, max, total, top_p, u, true).unwrap_or(c[0].0);
    }
    c.sort_by(|x, y| y.1.total_cmp(&x.1));
    let max = c.first().map_or(0.0, |x| f64::from(x.1));
    let total = weights_sum(&c, max);
    draw(&c, max, total, top_p, u, true).unwrap_or(0)
}

/// The top-p cut and the draw `u` (in [0, 1)) over `sorted` (best first): the first tokens of a
/// row whose weights `exp(v - max)` sum to `total`, or all of them (`complete`). `None` when a
/// prefix is too short to decide.
fn draw(
    sorted: &[(u32, f32)],
    max: f64,
    total: f64,
    top_p: f32,
    u: f64,
    complete: bool,
) -> Option<u32> {
    let weight = |i: usize| (f64::from(sorted[i].1) - max).exp();
    // Tokens kept by the cut (`None`: the whole row).
    let mut keep = None;
    if top_p < 1.0 {
        // Ascending cumsum <= 1-p removed  <=>  keep while the mass above stays < p.
        let mut above = 0.0;
        for i in 0..sorted.len() {
            let tail_from_here = 1.0 - above / total;
            if i > 0 && tail_from_here <= 1.0 - f64::from(top_p) {
                keep = Some(i);
                break;
            }
            above += weight(i);
        }
        if keep.is_none() && !complete {
            return None;
        }
    }
    let kept_total = match keep {
        Some(k) => (0..k).map(weight).sum(),
        None => total,
    };
    let n = keep.unwrap_or(sorted.len());
    let mut u = u * kept_total;
    for (i, &(token, _)) in sorted[..n].iter().enumerate() {
        let w = weight(i);
        if u < w {
            return Some(token);
        }
        u -= w;
    }
    // Rounding left `u` past the last kept token.
    (complete || keep.is_some()).then(|| sorted[n - 1].0)
}

/// The probability of every token a draw can pick from one row of logits under `s`, best first:
/// the rule [`choose`] samples by (penalty over `seen`, temperature, top-k, then top-p; ties in
/// token order), as exact probabilities, to check other samplers (the GPU engine's) against.
pub fn next_token_distribution(
    logits: &[f32],
    seen: &BTreeSet<u32>,
    s: &SamplingParams,
) -> Vec<(u32, f64)> {
    let greedy = s.greedy || s.temperature == 0.0;
    let penalised = |i: usize, v: f32| {
        if s.repetition_penalty != 1.0 && seen.contains(&(i as u32)) {
            if v < 0.0 {
                v * s.repetition_penalty
            } else {
                v / s.repetition_penalty
            }
        } else {
            v
        }
    };
    let temperature = if greedy { 1.0 } else { s.temperature };
    let mut c: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, penalised(i, v) / temperature))
        .collect();
    // Stable: ties stay in token order.
    c.sort_by(|x, y| y.1.total_cmp(&x.1));
    if greedy {
        c.truncate(1);
    } else if s.top_k > 0 {
        c.truncate(s.top_k);
    }
    let Some(&(_, best)) = c.first() else {
        return Vec::new();
    };
    let weights: Vec<f64> = c
        .iter()
        .map(|&(_, v)| (f64::from(v) - f64::from(best)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut keep = c.len();
    if s.top_p < 1.0 && !greedy {
        let mut above = 0.0;
        for (i, w) in weights.iter().enumerate() {
            if i > 0 && 1.0 - above / total <= 1.0 - f64::from(s.top_p) {
                keep = i;
                break;
            }
            above += w;
        }
    }
    let kept: f64 = weights[..keep].iter().sum();
    c[..keep]
        .iter()
        .zip(&weights)
        .map(|(&(token, _), w)| (token, w / kept))
        .collect()
}

fn to_u32(d: TensorData) -> Vec<u32> {
    d.convert::<i64>()
        .into_vec::<i64>()
        .unwrap_or_default()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn to_f32(d: TensorData) -> Vec<f32> {
    d.convert::<f32>().into_vec::<f32>().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::device::CpuBackend as TB;

    fn row(seen: &[u32]) -> Row {
        Row {
            seen: seen.iter().copied().collect(),
            out: Vec::new(),
            forced: VecDeque::new(),
            thinking: false,
            thinking_tokens: 0,
            ignores_left: 0,
            finish: None,
            rng: ChaCha20Rng::seed_from_u64(0),
            seed: 0,
            next_pos: 0,
        }
    }

    #[test]
    fn decode_loop_asks_for_no_logits_after_the_last_token() {
        let prompts = vec![vec![1u32, 2], vec![3u32]];
        let logits = |best: usize| {
            let mut v = vec![0.0f32; 2 * 5];
            v[best] = 1.0;
            v[5 + best] = 1.0;
            Tensor::<TB, 2>::from_data(TensorData::new(v, [2, 5]), &Default::default())
        };
        let mut calls = Vec::new();
        let opts = GenerateOptions {
            max_new_tokens: 3,
            ..Default::default()
        };
        let out = decode_loop(
            &prompts,
            &opts,
            None,
            0,
            FinishedRows::Padded,
            logits(4),
            |_, next, pos| {
                calls.push((next.to_vec(), pos.to_vec()));
                Ok(logits(calls.len()))
            },
        )
        .unwrap();
        // Three tokens need the first logits and two steps; positions follow each prompt.
        assert_eq!(
            calls,
            vec![(vec![4, 4], vec![2, 1]), (vec![1, 1], vec![3, 2])]
        );
        assert_eq!(out[0].token_ids, vec![4, 1, 2]);
        assert_eq!(out[1].finish, FinishReason::Length);
    }

    #[test]
    fn dropped_rows_leave_the_steps_and_outputs_keep_the_prompt_order() {
        let prompts = vec![vec![1u32, 2], vec![3u32], vec![4u32, 4, 4]];
        // One row of 6 logits per best token.
        let logits = |best: &[usize]| {
            let mut v = vec![0.0f32; best.len() * 6];
            for (r, &t) in best.iter().enumerate() {
                v[r * 6 + t] = 1.0;
            }
            Tensor::<TB, 2>::from_data(TensorData::new(v, [best.len(), 6]), &Default::default())
        };
        let opts = GenerateOptions {
            max_new_tokens: 4,
            stop_token_ids: vec![5],
            ..Default::default()
        };
        let mut calls = Vec::new();
        // Row 1 stops at once, row 0 one step later; row 2 runs to the length limit.
        let replies = [vec![5, 4], vec![1], vec![1]];
        let out = decode_loop(
            &prompts,
            &opts,
            None,
            0,
            FinishedRows::Dropped,
            logits(&[2, 5, 3]),
            |rows, next, pos| {
                calls.push((rows.to_vec(), next.to_vec(), pos.to_vec()));
                Ok(logits(&replies[calls.len() - 1]))
            },
        )
        .unwrap();
        assert_eq!(
            calls,
            vec![
                (vec![0, 2], vec![2, 3], vec![2, 3]),
                (vec![2], vec![4], vec![4]),
                (vec![2], vec![1], vec![5]),
            ]
        );
        assert_eq!(out[0].token_ids, vec![2, 5]);
        assert_eq!(out[0].finish, FinishReason::StopToken(5));
        assert_eq!(out[1].token_ids, vec![5]);
        assert_eq!(out[2].token_ids, vec![3, 4, 1, 1]);
        assert_eq!(out[2].finish, FinishReason::Length);
    }

    #[test]
    fn draw_keys_depend_on_the_row_seed_and_its_length_only() {
        let mut a = row(&[]);
        let mut b = row(&[5, 6]);
        assert_eq!(a.draw_key(), b.draw_key());
        a.out.push(1);
        assert_ne!(a.draw_key(), b.draw_key());
        b.out.push(9);
        assert_eq!(a.draw_key(), b.draw_key());
        b.seed = 1;
        assert_ne!(a.draw_key(), b.draw_key());
    }

    #[test]
    fn repetition_penalty_matches_hf_rule() {
        let logits = vec![2.0f32, -1.0, 0.5, -3.0, 4.0, 1.0];
        let t = Tensor::<TB, 2>::from_data(
            TensorData::new(logits.clone(), [2, 3]),
            &Default::default(),
        );
        // Row 0 saw tokens 0 and 1, row 1 saw token 2 only.
        let rows = [row(&[0, 1]), row(&[2])];
        let got = to_f32(penalize(t, &rows, 2.0, &Default::default()).into_data());
        assert_eq!(got, vec![1.0, -2.0, 0.5, -3.0, 4.0, 0.5]);
    }

    #[test]
    fn the_next_token_distribution_is_what_choose_draws_from() {
        // 40 tokens, each value twice (ties split by top-k 9), three of them seen.
        let logits: Vec<f32> = (0..40u32)
            .map(|i| ((i * 7) % 20) as f32 * 0.25 - 5.0)
            .collect();
        let seen: BTreeSet<u32> = [3, 17, 20].into_iter().collect();
        let n = 6000;
        for s in [
            SamplingParams {
                temperature: 0.8,
                top_k: 9,
                top_p: 0.8,
                repetition_penalty: 1.3,
                greedy: false,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.5,
                top_p: 0.5,
                greedy: false,
                ..Default::default()
            },
            // The 9th best ties with the 10th: top-k keeps the lower token.
            SamplingParams {
                temperature: 0.8,
                top_k: 9,
                repetition_penalty: 1.3,
                greedy: false,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 2.0,
                ..Default::default()
            },
        ] {
            let dist = next_token_distribution(&logits, &seen, &s);
            if s.top_k == 9 && s.top_p == 1.0 {
                assert!(dist.iter().any(|d| d.0 == 5) && !dist.iter().any(|d| d.0 == 25));
            }
            let sum: f64 = dist.iter().map(|d| d.1).sum();
            assert!((sum - 1.0).abs() < 1e-9, "{sum}");
            let t = Tensor::<TB, 2>::from_data(
                TensorData::new(logits.repeat(n), [n, 40]),
                &Default::default(),
            );
            let seen_list: Vec<u32> = seen.iter().copied().collect();
            let mut rows: Vec<Row> = (0..n)
                .map(|i| {
                    let mut r = row(&seen_list);
                    r.rng = ChaCha20Rng::seed_from_u64(i as u64);
                    r
                })
                .collect();
            let mut counts = std::collections::BTreeMap::<u32, usize>::new();
            for token in choose(t, &mut rows, &s) {
                *counts.entry(token).or_default() += 1;
            }
            let p: std::collections::BTreeMap<u32, f64> = dist.iter().copied().collect();
            for token in counts.keys() {
                assert!(
                    p.contains_key(token),
                    "{s:?}: drew {token}, outside {dist:?}"
                );
            }
            let tv: f64 = p
                .iter()
                .map(|(t, &q)| (counts.get(t).copied().unwrap_or(0) as f64 / n as f64 - q).abs())
                .sum::<f64>()
                / 2.0;
            assert!(tv < 0.03, "{s:?}: total variation {tv} against {dist:?}");
        }
        // Greedy: the penalised argmax alone.
        let greedy = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        assert_eq!(
            next_token_distribution(&[1.0, 3.0, 2.0], &[1].into(), &greedy),
            vec![(2, 1.0)]
        );
    }

    /// The draw over a fully sorted row: what `sample_row` did before it sorted only the best.
    fn draw_over_full_sort(c: &[(u32, f32)], top_p: f32, rng: &mut ChaCha20Rng) -> u32 {
        let mut c = c.to_vec();
        c.sort_by(|x, y| y.1.total_cmp(&x.1));
        let max = c[0].1 as f64;
        let weights: Vec<f64> = c.iter().map(|&(_, v)| ((v as f64) - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = c.len();
        if top_p < 1.0 {
            let mut above = 0.0;
            for (i, w) in weights.iter().enumerate() {
                if i > 0 && 1.0 - above / total <= 1.0 - top_p as f64 {
                    keep = i;
                    break;
                }
                above += w;
            }
        }
        let mut u = rng.random::<f64>() * weights[..keep].iter().sum::<f64>();
        for (i, w) in weights[..keep].iter().enumerate() {
            if u < *w {
                return c[i].0;
            }
            u -= w;
        }
        c[keep - 1].0
    }

    #[test]
    fn draws_over_the_best_tokens_equal_draws_over_the_whole_sorted_row() {
        let vocab = 5000;
        let mut gen = ChaCha20Rng::seed_from_u64(7);
        for (case, (spread, top_p)) in [
            (1.0f32, 1.0f32),
            (4.0, 1.0),
            (0.2, 1.0),
            (1.0, 0.9),
            (0.05, 0.95),
            (3.0, 0.5),
        ]
        .into_iter()
        .enumerate()
        {
            // Rounded logits: many exact ties. A flat row (spread 0.05) puts most draws past the
            // best 1,024 tokens, a peaked one (4.0) within the first few.
            let row: Vec<(u32, f32)> = (0..vocab)
                .map(|i| {
                    let v: f32 = gen.random::<f32>() * spread * 8.0;
                    (i as u32, (v * 4.0).round() / 4.0)
                })
                .collect();
            for seed in 0..200u64 {
                let mut a = ChaCha20Rng::seed_from_u64(seed);
                let mut b = ChaCha20Rng::seed_from_u64(seed);
                assert_eq!(
                    sample_row(row.clone(), true, top_p, &mut a),
                    draw_over_full_sort(&row, top_p, &mut b),
                    "case {case}, seed {seed}"
                );
            }
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.2 (logits are their logs).
        let c: Vec<(u32, f32)> = [(10u32, 0.5f32), (11, 0.3), (12, 0.2)]
            .iter()
            .map(|&(t, p)| (t, p.ln()))
            .collect();
        let draw = |top_p: f32| -> BTreeSet<u32> {
            let mut rng = ChaCha20Rng::seed_from_u64(1);
            (0..400)
                .map(|_| sample_row(c.clone(), false, top_p, &mut rng))
                .collect()
        };
        // HF: ascending cumsum [0.2, 0.5, 1.0]; remove entries <= 1 - p.
        assert_eq!(draw(0.5), BTreeSet::from([10]));
        assert_eq!(draw(0.6), BTreeSet::from([10, 11]));
        assert_eq!(draw(1.0), BTreeSet::from([10, 11, 12]));
    }
}
