//! The GPU decode engine (issue 31): generation on CUDA without burn's per-operation overhead.
//!
//! burn launches each small operation of a decode step through cubecl's server thread, about
//! a dozen per layer, so a step of a 0.5B model took ~12 ms whatever the batch: launch-bound,
//! far from the ~0.3 ms the weights' bytes need. Here a step is four cuBLAS products and six
//! kernels per layer (`decode.cu`: fused norm + residual, bias + q/k norm + rotary + cache
//! write, attention over the cache, SwiGLU), queued on the engine's own stream straight from
//! this thread and, for decode steps, captured once per batch size into a CUDA graph that is
//! replayed for every later step. The cache is one preallocated slab written in place; a
//! group's shared prompt is prefilled once and its cache copied to the group's rows. Tokens
//! are picked on the device (argmax, or a seeded Gumbel-max draw for plain temperature
//! sampling), so only the picked ids cross to the host; other logit processing (top-k, top-p,
//! repetition penalty) takes the logits to the host and the shared code in
//! `model/generate.rs`, whose decoding loop (stop tokens and strings, budget forcing) drives
//! both engines.
//!
//! The weights are copied from the burn model's own device tensors (`copy_to_device_memory`),
//! in the model's dtype (bf16 or f32). Families: those of the CPU engine
//! ([`crate::infer::unsupported_reason`]) without unmerged adapters; others decode through burn.

mod device;
mod session;
mod weights;

use std::cell::RefCell;

use burn::tensor::{Tensor, TensorData};

pub use session::GpuSession;
pub use weights::{unsupported, GpuModel};

use crate::infer::model::TokenIn;
use crate::model::decoder::CausalLm;
use crate::model::generate::{
    decode_loop, distinct_prompts, validate, DecodeFn, FinishedRows, GenerateError,
    GenerateOptions, Generation, Row, SamplingParams, StepLogits,
};
use session::PassLogits;

fn device_error(e: crate::backend::Error) -> GenerateError {
    GenerateError::Device(e.to_string())
}

/// Whether generation on CUDA may use the engine: `RUNNER_GPU_ENGINE=0` in the environment
/// keeps it on burn's decoder (for comparing).
pub fn enabled() -> bool {
    !std::env::var("RUNNER_GPU_ENGINE").is_ok_and(|v| v.trim() == "0")
}

/// The engine's copy of `model` when it runs it (see [`unsupported`]); a failure to build it is
/// logged and the caller decodes through burn.
pub fn engine_for<B: burn::tensor::backend::Backend>(model: &CausalLm<B>) -> Option<GpuModel> {
    if !enabled() {
        return None;
    }
    match GpuModel::from_model(model) {
        Ok(engine) => engine,
        Err(e) => {
            tracing::warn!("the GPU decode engine is unavailable, decoding through burn: {e}");
            None
        }
    }
}

/// A step's logits in the session's memory.
struct GpuLogits<'a, 'm> {
    session: &'a RefCell<GpuSession<'m>>,
    pass: PassLogits,
}

impl StepLogits for GpuLogits<'_, '_> {
    fn vocab(&self) -> usize {
        self.session.borrow().model.dims.vocab
    }

    fn choose(self, rows: &mut [Row], s: &SamplingParams) -> Result<Vec<u32>, GenerateError> {
        let mut session = self.session.borrow_mut();
        let greedy = s.greedy || s.temperature == 0.0;
        let plain = s.repetition_penalty == 1.0 && (s.top_k == 0 && s.top_p >= 1.0 || greedy);
        if plain {
            let keys: Option<Vec<u64>> =
                (!greedy).then(|| rows.iter().map(Row::draw_key).collect());
            return session
                .pick(self.pass, keys.as_deref(), s.temperature)
                .map_err(device_error);
        }
        // Top-k, top-p or a repetition penalty: the shared host code, on the logits.
        let vocab = session.model.dims.vocab;
        let host = session.download_logits(self.pass).map_err(device_error)?;
        drop(session);
        let logits = Tensor::<crate::model::device::CpuBackend, 2>::from_data(
            TensorData::new(host, [self.pass.rows, vocab]),
            &Default::default(),
        );
        logits.choose(rows, s)
    }
}

/// Prefills every distinct prompt once (into the first row that has it, in passes of whole
/// prompts' tokens) and copies its cache to the other rows with that prompt; returns the logits
/// after each row's prompt, `[rows, vocab]`.
fn prefill(
    session: &mut GpuSession<'_>,
    prompts: &[Vec<u32>],
) -> Result<device::DevBuf, GenerateError> {
    let model = session.model;
    let vocab = model.dims.vocab;
    let b = prompts.len();
    let (distinct, row_source) = distinct_prompts(prompts);
    let first =
        device::DevBuf::new(model.ordinal, b * vocab * model.elem.size()).map_err(device_error)?;
    // Each distinct prompt fills the first row that has it, in passes of whole prompts' tokens.
    let mut first_row = vec![usize::MAX; distinct.len()];
    for (row, &src) in row_source.iter().enumerate() {
        if first_row[src] == usize::MAX {
            first_row[src] = row;
        }
    }
    let max_pass = session.max_pass_tokens();
    let mut tokens: Vec<TokenIn> = Vec::with_capacity(max_pass);
    let mut want = Vec::new();
    let mut want_rows = Vec::new();
    let flush = |session: &mut GpuSession<'_>,
                 tokens: &mut Vec<TokenIn>,
                 want: &mut Vec<usize>,
                 want_rows: &mut Vec<usize>|
     -> Result<(), GenerateError> {
        if tokens.is_empty() {
            return Ok(());
        }
        let pass = session.forward(tokens, Some(want)).map_err(device_error)?;
        for (j, &row) in want_rows.iter().enumerate() {
            session
                .copy_logits_row(first.ptr, row, pass.ptr, j)
                .map_err(device_error)?;
        }
        tokens.clear();
        want.clear();
        want_rows.clear();
        Ok(())
    };
    for (src, prompt) in distinct.iter().enumerate() {
        let row = first_row[src];
        for (i, &id) in prompt.iter().enumerate() {
            tokens.push(TokenIn {
                id,
                row,
                slot: i,
                pos: i as i64,
            });
            if i + 1 == prompt.len() {
                want.push(tokens.len() - 1);
                want_rows.push(row);
            }
            if tokens.len() == max_pass {
                flush(session, &mut tokens, &mut want, &mut want_rows)?;
            }
        }
    }
    flush(session, &mut tokens, &mut want, &mut want_rows)?;
    for (row, &src) in row_source.iter().enumerate() {
        let from = first_row[src];
        if row != from {
            session.copy_row(from, row).map_err(device_error)?;
            session
                .copy_logits_row(first.ptr, row, first.ptr, from)
                .map_err(device_error)?;
        }
    }
    Ok(first)
}

/// [`crate::model::generate::generate`] on the engine: the same options, stop rules and
/// budget forcing; greedy tokens follow the burn decoder's up to rounding.
pub fn generate(
    model: &GpuModel,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    decode: Option<DecodeFn<'_>>,
) -> Result<Vec<Generation>, GenerateError> {
    let vocab = model.dims.vocab;
    validate(vocab, prompts, opts, decode.is_some())?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut session =
        GpuSession::new(model, b, longest + opts.max_new_tokens + 1).map_err(device_error)?;
    let first = prefill(&mut session, prompts)?;
    let session = RefCell::new(session);
    let first_logits = GpuLogits {
        session: &session,
        pass: PassLogits {
            ptr: first.ptr,
            rows: b,
        },
    };
    let out = decode_loop(
        prompts,
        opts,
        decode,
        0,
        FinishedRows::Padded,
        first_logits,
        |_, next, pos| {
            let pass = session.borrow_mut().step(next, pos).map_err(device_error)?;
            Ok(GpuLogits {
                session: &session,
                pass,
            })
        },
    );
    drop(session);
    drop(first);
    out
}

/// The engine's greedy decoding timed for `runner bench decode`.
#[derive(Debug, Clone)]
pub struct DecodeTiming {
    /// Prefill of every prompt and the first token picked.
    pub prefill_s: f64,
    /// `steps` decode steps (forward and pick), after one untimed step that captures the graph.
    pub decode_s: f64,
    pub steps: usize,
    /// Each row's greedy tokens (`steps + 2` of them).
    pub tokens: Vec<Vec<u32>>,
    /// Device memory of the weights and of the session (cache and scratch).
    pub weight_bytes: usize,
    pub session_bytes: usize,
}

/// Prefills `prompts` and decodes `steps` greedy tokens per row, timing the two phases.
pub fn time_greedy(
    model: &GpuModel,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Result<DecodeTiming, GenerateError> {
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut session = GpuSession::new(model, b, longest + steps + 2).map_err(device_error)?;
    let t0 = std::time::Instant::now();
    let first = prefill(&mut session, prompts)?;
    let first = PassLogits {
        ptr: first.ptr,
        rows: b,
    };
    let mut next = session.pick(first, None, 0.0).map_err(device_error)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut tokens: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    // Prompts start at position 0, so each row's next position is its length.
    let step = |session: &mut GpuSession<'_>, next: &[u32]| {
        let pos: Vec<i64> = (0..next.len()).map(|r| session.len(r) as i64).collect();
        let pass = session.step(next, &pos)?;
        session.pick(pass, None, 0.0)
    };
    next = step(&mut session, &next).map_err(device_error)?;
    tokens.iter_mut().zip(&next).for_each(|(t, &n)| t.push(n));
    let t1 = std::time::Instant::now();
    for _ in 0..steps {
        next = step(&mut session, &next).map_err(device_error)?;
        tokens.iter_mut().zip(&next).for_each(|(t, &n)| t.push(n));
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(DecodeTiming {
        prefill_s,
        decode_s,
        steps,
        tokens,
        weight_bytes: model.weight_bytes(),
        session_bytes: session.bytes(),
    })
}
