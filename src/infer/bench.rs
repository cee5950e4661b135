//! `runner bench cpu-decode`: prompt processing and greedy decoding speed of the CPU engine on
//! one model, and the process's resident-memory high-water mark, as one JSON object.
//!
//! The prompt is synthetic so that other runtimes can replay it: token `i` is
//! `1 + (i * 7919) % (vocab - 1)` (scripts/bench_cpu_decode.py feeds the same ids to
//! llama.cpp). Decoding is greedy from the prompt's last logits, `new_tokens` steps.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use crate::infer::{InferError, QuantModel, Session};

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
    prompt_tokens: usize,
    new_tokens: usize,
) -> Result<serde_json::Value, InferError> {
    let vocab = model.config.vocab_size;
    let prompt = bench_prompt(prompt_tokens.max(1), vocab);
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
    }))
}
