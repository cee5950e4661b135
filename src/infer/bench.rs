//! `runner bench cpu-decode`: prompt processing and greedy decoding speed of the CPU engine on
//! one model, and the process's resident-memory high-water mark, as one JSON object.
//!
//! The prompt is synthetic so that other runtimes can replay it: token `i` is
//! `1 + (i * 7919) % (vocab - 1)` (scripts/bench_cpu_decode.py feeds the same ids to
//! llama.cpp). Decoding is greedy from the prompt's last logits, `new_tokens` steps. With
//! `rows` > 1 the same prompt is also decoded as that many rows at once, greedy (the engine's
//! steps alone) and sampled through [`crate::infer::generate`] (the engine plus the shared
//! sampling code, as GRPO's rollouts run), so the cost of choosing tokens shows beside the
//! cost of computing logits.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use crate::infer::{InferError, QuantModel, Session};
use crate::model::generate::{GenerateOptions, SamplingParams};

/// What one `cpu-decode` run measures.
pub struct Shape {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Rows decoded together in the batched figures (1: none).
    pub rows: usize,
}

/// The synthetic prompt of `n` tokens for a vocabulary of `vocab`.
pub fn bench_prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| 1 + ((i * 7919) % (vocab.max(2) - 1)) as u32)
        .collect()
}

/// Peak resident memory of this process in KiB (`VmHWM`), where /proc has it.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Times `model` (opened from `path` in `load_s` seconds) on the synthetic prompt.
pub fn run(
    path: &Path,
    model: &QuantModel,
    load_s: f64,
    shape: &Shape,
) -> Result<serde_json::Value, InferError> {
    let new_tokens = shape.new_tokens;
    let vocab = model.config.vocab_size;
    let prompt = bench_prompt(shape.prompt_tokens.max(1), vocab);
    let mut session = Session::new(model, 1, prompt.len() + new_tokens + 1);
    let mut logits = Vec::new();
    let t0 = Instant::now();
    session.prefill(0, &prompt, false, &mut logits);
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut next = argmax(&logits[..vocab]);
    let mut generated = vec![next];
    let t1 = Instant::now();
    for step in 0..new_tokens {
        let pos = (prompt.len() + step) as i64;
        session.step(&[next], &[pos], &mut logits);
        next = argmax(&logits[..vocab]);
        generated.push(next);
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let batched = match shape.rows {
        0 | 1 => None,
        rows => Some(batched(model, &prompt, rows, new_tokens)?),
    };
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let peak_kib = peak_rss_kib();
    Ok(json!({
        "bench": "cpu-decode",
        "model": path.display().to_string(),
        "threads": model.threads(),
        "simd": crate::infer::quant::simd_available(),
        "prompt_tokens": prompt.len(),
        "new_tokens": new_tokens,
        "load_s": load_s,
        "prompt_tokens_per_s": prompt.len() as f64 / prefill_s,
        "decode_tokens_per_s": new_tokens as f64 / decode_s,
        "peak_rss_mib": peak_kib.map(|k| k as f64 / 1024.0),
        "model_file_mib": file_bytes as f64 / (1024.0 * 1024.0),
        "peak_rss_over_file": peak_kib.filter(|_| file_bytes > 0).map(|k| k as f64 * 1024.0 / file_bytes as f64),
        "generated_ids": generated,
        "rows": shape.rows,
        "batch_greedy_tokens_per_s": batched.map(|b| b.0),
        "batch_sampled_tokens_per_s": batched.map(|b| b.1),
    }))
}

/// Tokens/s of `rows` copies of `prompt` decoded together: greedy through the engine's steps
/// alone, then sampled (temperature 0.9, no top-k/top-p: GRPO's defaults) through `generate`.
/// Only the decode steps are timed in the first; the second includes its one prefill.
fn batched(
    model: &QuantModel,
    prompt: &[u32],
    rows: usize,
    new_tokens: usize,
) -> Result<(f64, f64), InferError> {
    let vocab = model.config.vocab_size;
    let mut session = Session::new(model, rows, prompt.len() + new_tokens + 1);
    let mut logits = Vec::new();
    session.prefill(0, prompt, false, &mut logits);
    for row in 1..rows {
        session.copy_row(0, row);
    }
    let mut next = vec![argmax(&logits[..vocab]); rows];
    let mut pos = vec![0i64; rows];
    let t0 = Instant::now();
    for step in 0..new_tokens {
        pos.fill((prompt.len() + step) as i64);
        session.step(&next, &pos, &mut logits);
        for (row, id) in next.iter_mut().enumerate() {
            *id = argmax(&logits[row * vocab..(row + 1) * vocab]);
        }
    }
    let greedy = (rows * new_tokens) as f64 / t0.elapsed().as_secs_f64();

    let opts = GenerateOptions {
        max_new_tokens: new_tokens,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
            greedy: false,
            ..SamplingParams::default()
        },
        ..GenerateOptions::default()
    };
    let prompts = vec![prompt.to_vec(); rows];
    let t1 = Instant::now();
    let out = crate::infer::generate::<crate::model::device::CpuBackend>(
        model,
        &prompts,
        &opts,
        None,
        &Default::default(),
    )?;
    let tokens: usize = out.iter().map(|g| g.token_ids.len()).sum();
    Ok((greedy, tokens as f64 / t1.elapsed().as_secs_f64()))
}
