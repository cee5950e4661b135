//! Whole-model GPU benchmarks and checks for `runner bench`: a LoRA SFT step, prefill and decode,
//! and logits/greedy parity of a fixture model, at Qwen2.5 shapes with random weights. Each
//! prints JSON lines that `scripts/bench_model_torch.py` joins with transformers/peft numbers
//! for the same shapes on the same card.
//!
//! Reference: Qwen2.5-0.5B/1.5B `config.json` (hidden 896/1536, 24/28 layers, 14/12 heads,
//! 2 KV heads, intermediate 4864/8960, vocabulary 151,936, tied embeddings); Qwen2.5-7B (hidden
//! 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, vocabulary 152,064, untied);
//! ../shared/bench/peft_baseline.py (LoRA r=16 on the seven projections, batch 8 x 1024).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use serde_json::{json, Value};

use runner::model::config::ModelConfig;
use runner::model::decoder::CausalLm;
use runner::model::hf::{load_hf_folder_tensors, HostTensor};
use runner::model::init::{tiny_qwen2_config, TinyShape};

/// A named Qwen2.5 shape.
pub fn qwen_shape(name: &str) -> Option<ModelConfig> {
    let (hidden, layers, heads, kv_heads, intermediate) = match name {
        "0.5b" => (896, 24, 14, 2, 4864),
        "1.5b" => (1536, 28, 12, 2, 8960),
        "7b" => (3584, 28, 28, 4, 18944),
        "tiny" => (128, 2, 4, 2, 256),
        _ => return None,
    };
    let vocab = match name {
        "tiny" => 2048,
        "7b" => 152_064,
        _ => 151_936,
    };
    let mut config = tiny_qwen2_config(TinyShape {
        hidden,
        layers,
        heads,
        kv_heads,
        intermediate,
        vocab,
    });
    // Qwen2.5-7B has its own output projection.
    config.tie_word_embeddings = name != "7b" && config.tie_word_embeddings;
    Some(config)
}

/// Random weights for a throughput benchmark: HF names and shapes as [`runner::model::init::init_weights`]
/// gives them, values uniform with std 0.02 (norms 1) from a per-tensor xorshift, filled in
/// parallel: the 0.5B shape's 494 M values take under a second instead of half a minute.
pub fn bench_weights(config: &ModelConfig) -> BTreeMap<String, HostTensor> {
    use rayon::prelude::*;
    let shapes: Vec<(String, Vec<usize>)> = runner::model::init::init_weights(
        &ModelConfig {
            // Shapes only: the same config at one layer and a tiny vocabulary is cheap to draw.
            num_hidden_layers: 1,
            vocab_size: 1,
            ..config.clone()
        },
        0,
    )
    .into_iter()
    .map(|(name, t)| (name, t.shape))
    .collect();
    let mut named = Vec::new();
    for (name, mut shape) in shapes {
        if name.starts_with("model.embed_tokens") || name.starts_with("lm_head") {
            shape[0] = config.vocab_size;
        }
        if let Some(rest) = name.strip_prefix("model.layers.0.") {
            for layer in 0..config.num_hidden_layers {
                named.push((format!("model.layers.{layer}.{rest}"), shape.clone()));
            }
        } else {
            named.push((name, shape));
        }
    }
    named
        .into_par_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
                // Uniform on [-a, a] with a = 0.02 * sqrt(3): std 0.02.
                let a = 0.02f32 * 3f32.sqrt();
                (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
                    })
                    .collect()
            };
            (name, HostTensor::new(shape, data))
        })
        .collect()
}

/// Deterministic pseudo-random token rows (an LCG: no RNG state to carry between backends).
pub fn token_rows(rows: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..rows)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// Settings of the SFT benchmark.
#[derive(Debug, Clone)]
pub struct SftBench {
    pub shape: String,
    pub batch: usize,
    pub seq: usize,
    pub steps: u64,
    pub warmup_steps: u64,
    pub gradient_checkpointing: runner::model::decoder::GradientCheckpointing,
    /// lora, dora, qlora, adalora, prompt_tuning, p_tuning, prefix or full.
    pub method: String,
    /// `sft` (`batch` rows a step) or `dpo` (`batch` pairs a step: chosen and rejected rows with
    /// a shared prompt of a quarter of the row, DPO's sigmoid loss against reference log-probs
    /// computed before the first step).
    pub objective: String,
}

/// The trainer settings of one method in the benchmark: LoRA r=16, alpha=16 on the seven
/// projections (AdaLoRA from rank 16 to 8), 20 virtual tokens for the prompt-learning methods;
/// scripts/bench_peft_methods.py configures peft the same way.
fn bench_method(name: &str, cfg: &mut runner::train::SftConfig) -> anyhow::Result<()> {
    use runner::train::config::Method;
    cfg.method = match name {
        "lora" => Method::Lora,
        "dora" => {
            cfg.use_dora = true;
            Method::Lora
        }
        "qlora" => Method::Qlora,
        "adalora" => {
            cfg.adalora.init_r = 16;
            cfg.adalora.target_r = 8;
            Method::Adalora
        }
        "prompt_tuning" => Method::PromptTuning,
        "p_tuning" => Method::PTuning,
        "prefix" => Method::Prefix,
        "full" => Method::Full,
        other => anyhow::bail!(
            "unknown method {other:?}; expected lora, dora, qlora, adalora, prompt_tuning, p_tuning, prefix or full"
        ),
    };
    cfg.num_virtual_tokens = 20;
    cfg.pre_seq_len = 20;
    Ok(())
}

/// Preference pairs from random rows: pair i's chosen row is row i, its rejected row row i + n
/// with the first `prompt` tokens of the chosen one; labels on the responses only. Keeps the
/// first half of `rows` as chosen, so a step of `batch` pairs reads `2 * batch` rows.
fn preference_pairs(
    rows: Vec<runner::train::TokenizedExample>,
    prompt: usize,
) -> (
    Vec<runner::train::TokenizedExample>,
    Vec<runner::train::TokenizedExample>,
) {
    let n = rows.len() / 2;
    let mut chosen: Vec<_> = rows;
    let mut rejected = chosen.split_off(n);
    rejected.truncate(n);
    for (c, r) in chosen.iter_mut().zip(&mut rejected) {
        let p = prompt.min(c.input_ids.len()).min(r.input_ids.len());
        r.input_ids[..p].copy_from_slice(&c.input_ids[..p]);
        for row in [c, r] {
            row.labels = row.input_ids.iter().map(|&t| i64::from(t)).collect();
            row.labels[..p].fill(runner::train::data::IGNORE_INDEX);
        }
    }
    (chosen, rejected)
}

/// Runs `steps` SFT steps through the real trainer (r=16, alpha=16, all seven
/// projections, AdamW) on random weights and tokens; returns tokens/s over the steps after the
/// warm-up ones, read back from the trainer's own metrics.jsonl.
pub fn run_sft<AB: burn::tensor::backend::AutodiffBackend>(
    bench: &SftBench,
    device: &AB::Device,
    out_dir: &Path,
) -> anyhow::Result<Value> {
    use runner::train::config::SaveDtype;
    use runner::train::{SftConfig, TokenizedExample};
    let config = qwen_shape(&bench.shape).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown shape {:?}; expected 0.5b, 1.5b, 7b or tiny",
            bench.shape
        )
    })?;
    let t0 = Instant::now();
    let tensors = bench_weights(&config);
    let init_s = t0.elapsed().as_secs_f64();
    let total = bench.steps + bench.warmup_steps;
    let rows_per_unit = if bench.objective == "dpo" { 2 } else { 1 };
    let examples: Vec<TokenizedExample> = token_rows(
        rows_per_unit * bench.batch * total as usize,
        bench.seq,
        config.vocab_size,
        7,
    )
    .into_iter()
    .map(TokenizedExample::all_tokens)
    .collect();
    let mut cfg = SftConfig {
        learning_rate: 2e-4,
        max_steps: Some(total),
        batch_size: bench.batch,
        logging_steps: 1,
        lora_r: 16,
        lora_alpha: 16.0,
        target_modules: all_projections(),
        gradient_checkpointing: bench.gradient_checkpointing,
        dtype: SaveDtype::Bfloat16,
        write_merged: false,
        ..SftConfig::default()
    };
    bench_method(&bench.method, &mut cfg)?;
    let t1 = Instant::now();
    #[cfg(feature = "profile")]
    let profile = runner::backend::host_profile::HostProfile::from_env();
    let base = runner::train::BaseModel::Loaded {
        config: &config,
        tensors: &tensors,
    };
    let report = match bench.objective.as_str() {
        "sft" => runner::train::train_sft::<AB>(&cfg, base, &examples, &[], out_dir, device, None)?,
        "dpo" => {
            use runner::train::preference::{
                train_preference, PreferenceConfig, PreferenceData, PreferenceKind,
            };
            let (chosen, rejected) = preference_pairs(examples, bench.seq / 4);
            let none = PreferenceData::Pairs {
                chosen: Vec::new(),
                rejected: Vec::new(),
            };
            let cfg = PreferenceConfig {
                train: cfg,
                keys: Default::default(),
            };
            let pairs = PreferenceData::Pairs { chosen, rejected };
            train_preference::<AB>(
                &cfg,
                PreferenceKind::Dpo,
                base,
                pairs,
                none,
                out_dir,
                device,
                None,
            )?
        }
        other => anyhow::bail!("unknown objective {other:?}; expected sft or dpo"),
    };
    #[cfg(feature = "profile")]
    drop(profile);
    let wall_s = t1.elapsed().as_secs_f64();
    eprintln!("bench sft: weights drawn in {init_s:.1} s, training and saving took {wall_s:.1} s");
    let rows: Vec<Value> = std::fs::read_to_string(&report.metrics_path)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let timed: Vec<f64> = rows
        .iter()
        .filter(|r| r["step"].as_u64().unwrap_or(0) > bench.warmup_steps)
        .filter_map(|r| r["tokens_per_s"].as_f64())
        .collect();
    let tokens_per_s = timed.iter().sum::<f64>() / timed.len().max(1) as f64;
    // Where the time of a timed step goes (see the trainer's phase clock).
    let phase_mean = |key: &str| {
        let values: Vec<f64> = rows
            .iter()
            .filter(|r| r["step"].as_u64().unwrap_or(0) > bench.warmup_steps)
            .filter_map(|r| r[key].as_f64())
            .collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let phases_total = ["forward_s", "backward_s", "update_s", "other_s"]
        .iter()
        .map(|k| phase_mean(k))
        .sum::<f64>();
    let phases = json!({
        "forward_s": phase_mean("forward_s"),
        "backward_s": phase_mean("backward_s"),
        "update_s": phase_mean("update_s"),
        "other_s": phase_mean("other_s"),
    });
    let losses: Vec<f64> = rows.iter().filter_map(|r| r["loss"].as_f64()).collect();
    // The trainer's peak of live GPU buffers, from the start of training (weights included).
    let peak_gib = rows
        .iter()
        .filter_map(|r| r["gpu_peak_mb"].as_f64())
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        .map(|mb| mb / 1024.0);
    Ok(json!({
        "method": bench.method,
        "objective": bench.objective,
        "step_s": phases_total,
        "tokens_per_s": tokens_per_s,
        "gpu_peak_gib": peak_gib,
        "phases": phases,
        "steps_timed": timed.len(),
        "first_loss": losses.first(),
        "last_loss": losses.last(),
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "init_s": init_s,
        "train_wall_s": wall_s,
    }))
}

/// Prefill and greedy decode with the KV cache: `batch` prompts of `prompt_len` random tokens,
/// then `new_tokens` tokens each; the next tokens stay on the device (argmax), so the only host
/// waits are the two timing points.
pub fn run_decode<B: Backend>(
    shape: &str,
    batch: usize,
    prompt_len: usize,
    new_tokens: usize,
    device: &B::Device,
) -> anyhow::Result<Value> {
    let config = qwen_shape(shape).ok_or_else(|| anyhow::anyhow!("unknown shape {shape:?}"))?;
    let tensors = bench_weights(&config);
    let model = CausalLm::<B>::from_hf_tensors(&config, &tensors, device)?;
    drop(tensors);
    let rows = token_rows(batch, prompt_len, config.vocab_size, 11);
    let ids: Vec<i64> = rows.concat().into_iter().map(i64::from).collect();
    let pos: Vec<i64> = (0..batch).flat_map(|_| 0..prompt_len as i64).collect();
    let run = |model: &CausalLm<B>| -> (f64, f64) {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.clone(), [batch, prompt_len]),
            device,
        );
        let pos = Tensor::<B, 2, Int>::from_data(
            TensorData::new(pos.clone(), [batch, prompt_len]),
            device,
        );
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        let logits = model.forward_last(ids, pos, None, Some(&mut cache));
        let mut next = logits.argmax(1);
        let _ = B::sync(device);
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for i in 0..new_tokens {
            let p = Tensor::<B, 2, Int>::full([batch, 1], (prompt_len + i) as i64, device);
            let logits = model.forward_last(next, p, None, Some(&mut cache));
            next = logits.argmax(1);
        }
        let _ = next.into_data();
        (prefill, t1.elapsed().as_secs_f64())
    };
    let _ = run(&model); // warm-up: autotune and kernel compilation
    let (prefill, decode) = run(&model);
    let mut out = json!({
        "prefill_tokens_per_s": (batch * prompt_len) as f64 / prefill,
        "decode_tokens_per_s": (batch * new_tokens) as f64 / decode,
        "prefill_ms": prefill * 1e3,
        "decode_ms_per_step": decode * 1e3 / new_tokens.max(1) as f64,
    });
    #[cfg(feature = "cuda")]
    if let Value::Object(map) = &mut out {
        for (k, v) in engine_decode(&model, &rows, new_tokens)? {
            map.insert(k, v);
        }
    }
    Ok(out)
}

/// The GPU decode engine on the same prompts: prefill and decode rates (`engine_*`), its
/// memory, and how its greedy tokens compare with burn's (`greedy_*`: rows whose first 16
/// tokens agree, and the earliest step where a row differs).
#[cfg(feature = "cuda")]
fn engine_decode<B: Backend>(
    model: &CausalLm<B>,
    rows: &[Vec<u32>],
    new_tokens: usize,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    use runner::infer::gpu;
    let mut map = serde_json::Map::new();
    let Some(engine) = gpu::GpuModel::from_model(model)? else {
        let reason = gpu::unsupported(model).unwrap_or_else(|| "not enough memory".into());
        map.insert("engine".into(), format!("not used: {reason}").into());
        return Ok(map);
    };
    let _ = gpu::time_greedy(&engine, rows, new_tokens)?; // warm-up: kernels and cuBLAS
    let t = gpu::time_greedy(&engine, rows, new_tokens)?;
    let batch = rows.len();
    let prompt_tokens: usize = rows.iter().map(Vec::len).sum();
    let gib = |b: usize| b as f64 / f64::from(1u32 << 30);
    map.insert(
        "engine_prefill_tokens_per_s".into(),
        (prompt_tokens as f64 / t.prefill_s).into(),
    );
    map.insert(
        "engine_decode_tokens_per_s".into(),
        ((batch * t.steps) as f64 / t.decode_s).into(),
    );
    map.insert(
        "engine_decode_ms_per_step".into(),
        (t.decode_s * 1e3 / t.steps.max(1) as f64).into(),
    );
    map.insert("engine_weights_gib".into(), gib(t.weight_bytes).into());
    map.insert("engine_session_gib".into(), gib(t.session_bytes).into());
    // burn's greedy tokens on the same prompts.
    let check = 16.min(new_tokens + 2);
    let opts = runner::model::generate::GenerateOptions {
        max_new_tokens: check,
        ..Default::default()
    };
    let reference = runner::model::generate::generate(model, rows, &opts, None)?;
    let mut equal = 0;
    let mut first_difference = check;
    for (ours, theirs) in t.tokens.iter().zip(&reference) {
        let at = ours
            .iter()
            .zip(&theirs.token_ids)
            .take(check)
            .position(|(a, b)| a != b);
        match at {
            None => equal += 1,
            Some(i) => first_difference = first_difference.min(i),
        }
    }
    map.insert(
        "greedy_rows_equal".into(),
        format!("{equal}/{batch}").into(),
    );
    map.insert("greedy_checked_tokens".into(), check.into());
    map.insert("greedy_first_difference".into(), first_difference.into());
    Ok(map)
}

/// GRPO steps on random weights at a Qwen2.5 shape with the gsm8k-grpo recipe's sampling
/// settings, as `../shared/bench/trl_grpo_baseline.py` runs TRL: `generations` completions of
/// one prompt per step, `completion` tokens each (random weights rarely stop early), LoRA r16
/// on the seven projections (QLoRA with `method = "qlora"`), temperature 0.9, beta 0.04. The
/// first step (kernel compilation, graph capture) is left out of the mean.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn run_grpo<AB: burn::tensor::backend::AutodiffBackend>(
    shape: &str,
    steps: u64,
    completion: usize,
    generations: usize,
    method: &str,
    bf16: bool,
    device: &AB::Device,
    out_dir: &Path,
) -> anyhow::Result<Value> {
    use runner::train::grpo::{train_grpo, GrpoPrompt, GrpoTokens};
    use runner::train::grpo_config::GrpoConfig;
    use runner::train::{Method, Precision, SaveDtype};
    let config = qwen_shape(shape).ok_or_else(|| anyhow::anyhow!("unknown shape {shape:?}"))?;
    let tensors = bench_weights(&config);
    let prompts: Vec<GrpoPrompt> = token_rows(64, 128, config.vocab_size, 5)
        .into_iter()
        .map(|ids| GrpoPrompt {
            ids,
            reference: "42".into(),
        })
        .collect();
    let cfg = GrpoConfig {
        method: match method {
            "lora" | "" => Method::Lora,
            "qlora" => Method::Qlora,
            other => anyhow::bail!("bench grpo trains lora or qlora, not {other:?}"),
        },
        max_steps: Some(steps + 1),
        batch_size: generations,
        gradient_accumulation_steps: 1,
        num_generations: generations,
        max_prompt_length: 256,
        max_completion_length: completion,
        temperature: 0.9,
        beta: 0.04,
        lora_r: 16,
        lora_alpha: 64.0,
        target_modules: all_projections(),
        logging_steps: 1,
        log_completions_steps: 0,
        save_steps: 0,
        dtype: SaveDtype::Bfloat16,
        precision: if bf16 {
            Precision::Bf16
        } else {
            Precision::F32
        },
        ..GrpoConfig::default()
    };
    // Completion text for the rewards: the ids as numbers (no tokenizer for random weights).
    let decode = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    let tokens = GrpoTokens {
        eos_ids: Vec::new(),
        pad_id: 0,
    };
    let base = runner::train::BaseModel::Loaded {
        config: &config,
        tensors: &tensors,
    };
    let t0 = Instant::now();
    let report = train_grpo::<AB>(
        &cfg,
        base,
        &prompts,
        &[],
        &decode,
        &tokens,
        out_dir,
        device,
        None,
    )?;
    let wall_s = t0.elapsed().as_secs_f64();
    let rows: Vec<Value> = std::fs::read_to_string(&report.metrics_path)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &Value| r.get("step_s").is_some())
        .collect();
    let field = |k: &str| -> Vec<f64> { rows.iter().filter_map(|r| r[k].as_f64()).collect() };
    let mean = |v: &[f64]| {
        let v = if v.len() > 1 { &v[1..] } else { v };
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (step_s, sample_s) = (field("step_s"), field("sample_s"));
    let peak = field("gpu_peak_mb");
    Ok(json!({
        "what": "grpo",
        "method": method,
        "step_s": mean(&step_s),
        "sample_s": mean(&sample_s),
        "steps_s": step_s,
        "completion_length": mean(&field("completion_length")),
        "gpu_peak_gib": peak.iter().copied().fold(0.0, f64::max) / 1024.0,
        "generations": generations,
        "completion_tokens": completion,
        "engine": runner::infer::gpu::enabled(),
        "wall_s": wall_s,
    }))
}

/// Logits of a fixture model (tests/fixtures/model/*: config.json, model.safetensors and
/// expected.json from scripts/make_model_fixtures.py) and its greedy tokens, for comparison with
/// transformers on the same device and dtype (scripts/gpu_parity.py).
pub fn run_parity<B: Backend>(dir: &Path, device: &B::Device) -> anyhow::Result<Value> {
    let config = ModelConfig::from_file(dir.join("config.json"))?;
    let tensors: BTreeMap<String, HostTensor> = load_hf_folder_tensors(dir)?;
    let model = CausalLm::<B>::from_hf_tensors(&config, &tensors, device)?;
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let ints = |v: &Value| -> Vec<Vec<i64>> {
        v.as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        r.as_array()
                            .map(|x| x.iter().filter_map(Value::as_i64).collect())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (ids, mask, pos) = (
        ints(&expected["ids"]),
        ints(&expected["mask"]),
        ints(&expected["positions"]),
    );
    let (b, t) = (ids.len(), ids.first().map_or(0, Vec::len));
    let int2 = |rows: &[Vec<i64>]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(rows.concat(), [b, t]), device)
    };
    let mask_t = Tensor::<B, 2, Bool>::from_data(
        TensorData::new(
            mask.concat().iter().map(|&x| x != 0).collect::<Vec<_>>(),
            [b, t],
        ),
        device,
    );
    let logits = model.forward(int2(&ids), int2(&pos), Some(mask_t), None);
    let logits: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let prompts: Vec<Vec<u32>> = expected["greedy"]
        .as_array()
        .map(|g| {
            g.iter()
                .map(|x| {
                    x["prompt"]
                        .as_array()
                        .map(|p| {
                            p.iter()
                                .filter_map(|v| v.as_u64().map(|v| v as u32))
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    let opts = runner::model::generate::GenerateOptions {
        max_new_tokens: 16,
        ..Default::default()
    };
    let greedy = runner::infer::Generator::new(&model, None).generate(&prompts, &opts, None)?;
    let mut out = json!({
        "fixture": dir.display().to_string(),
        "logits": logits,
        "shape": [b, t, config.vocab_size],
        "greedy": greedy.iter().map(|g| g.token_ids.clone()).collect::<Vec<_>>(),
    });
    // `greedy` came from the GPU decode engine where it runs the model; burn's own tokens too.
    #[cfg(feature = "cuda")]
    {
        use runner::infer::gpu;
        let burn = runner::model::generate::generate(&model, &prompts, &opts, None)?;
        let burn: Vec<Vec<u32>> = burn.into_iter().map(|g| g.token_ids).collect();
        let engine = gpu::unsupported(&model).unwrap_or_else(|| "used".to_string());
        if let Value::Object(map) = &mut out {
            map.insert("greedy_burn".into(), json!(burn));
            map.insert("engine".into(), engine.into());
        }
    }
    Ok(out)
}

/// LoRA on the seven projections of a decoder layer, as the baselines' scripts put it.
fn all_projections() -> runner::peft::files::TargetModules {
    runner::peft::files::TargetModules::List(
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
    )
}

/// A scratch folder for the SFT benchmark's outputs.
pub fn scratch_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("runner-bench-{tag}-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_weights_have_the_names_and_shapes_of_init_weights() {
        let config = qwen_shape("tiny").unwrap();
        let fast = bench_weights(&config);
        let reference = runner::model::init::init_weights(&config, 0);
        assert_eq!(fast.len(), reference.len());
        for (name, t) in &reference {
            assert_eq!(fast[name].shape, t.shape, "{name}");
        }
        let q = &fast["model.layers.1.self_attn.q_proj.weight"].data;
        let std = (q.iter().map(|v| v * v).sum::<f32>() / q.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.002, "std {std}");
        assert!(fast["model.norm.weight"].data.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn bench_pairs_share_their_prompt_and_score_only_responses() {
        let rows: Vec<_> = token_rows(4, 12, 50, 3)
            .into_iter()
            .map(runner::train::TokenizedExample::all_tokens)
            .collect();
        let (chosen, rejected) = preference_pairs(rows.clone(), 3);
        assert_eq!((chosen.len(), rejected.len()), (2, 2));
        for (c, r) in chosen.iter().zip(&rejected) {
            assert_eq!(c.input_ids[..3], r.input_ids[..3]);
            assert_ne!(c.input_ids[3..], r.input_ids[3..]);
            assert_eq!(c.num_items(), 9);
            assert_eq!(r.num_items(), 9);
        }
        assert_eq!(chosen[0].input_ids, rows[0].input_ids);
    }

    #[test]
    fn token_rows_are_in_range_and_deterministic() {
        let a = token_rows(3, 50, 17, 5);
        assert_eq!(a, token_rows(3, 50, 17, 5));
        assert!(a.iter().flatten().all(|&t| t < 17));
        assert_ne!(a[0], a[1]);
    }
}
