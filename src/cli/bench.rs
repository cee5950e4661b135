//! `runner bench`: GPU benchmarks of the fast kernels and of whole-model work (LoRA SFT steps,
//! prefill/decode), as JSON lines that scripts/bench_torch.py and scripts/bench_model_torch.py
//! join with PyTorch's numbers for the same shapes; `check` (on-device correctness of the
//! kernels, with dumps for scripts/check_torch.py) and `parity` (a fixture model's logits and
//! greedy tokens, for scripts/gpu_parity.py).

use std::path::PathBuf;

/// Benchmark or check the GPU paths.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// matmul, attention, ce, all (the three kernels), check, sft, decode, grpo or parity (GPU); or
    /// cpu-decode (the CPU engine on `--model`: prompt and decode tokens/s, peak memory).
    #[arg(value_parser = ["matmul", "attention", "ce", "all", "check", "sft", "decode", "grpo", "parity", "cpu-decode"])]
    pub what: String,
    /// cpu-decode: a GGUF file or an HF model folder.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cpu-decode: threads (default: RAYON_NUM_THREADS, else every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// cpu-decode: prompt length (synthetic ids, see `infer::bench`).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// cpu-decode: greedy tokens decoded after the prompt.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// cpu-decode: also decode this many rows of the prompt together (a GRPO group, an
    /// evaluation batch), greedy and sampled; 1 skips.
    #[arg(long, default_value_t = 1)]
    pub rows: usize,
    /// Also time burn's own matmul on each shape.
    #[arg(long)]
    pub with_burn: bool,
    /// Where `check` writes its tensor dumps.
    #[arg(long, default_value = "check_dump")]
    pub dump_dir: PathBuf,
    /// Model shape for sft/decode: 0.5b, 1.5b, 7b or tiny (Qwen2.5, random weights).
    #[arg(long, default_value = "0.5b")]
    pub shape: String,
    /// sft: rows per step; decode: prompts decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// sft: tokens per row; decode: prompt tokens.
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// sft: timed optimizer steps (after the warm-up steps); decode: new tokens.
    #[arg(long, default_value_t = 8)]
    pub steps: u64,
    /// sft: untimed steps before the timed ones (kernels compile and tune in the first).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// sft: the fine-tuning methods, comma-separated (lora, dora, qlora, adalora, prompt_tuning,
    /// p_tuning, prefix, full); one JSON line each. Only the first method's memory figure is its
    /// own: cubecl keeps its pool, so later lines show the process's high-water mark.
    #[arg(long, default_value = "lora")]
    pub method: String,
    /// sft: `sft` (`--batch` rows a step) or `dpo` (`--batch` preference pairs a step, both rows
    /// through one forward, against precomputed reference log-probs).
    #[arg(long, default_value = "sft", value_parser = ["sft", "dpo"])]
    pub objective: String,
    /// sft: activation checkpointing of the decoder layers: `false`, `true` (recompute each
    /// layer in the backward pass) or `offload` (the same, layer inputs in host memory).
    /// `--gradient-checkpointing` alone means `true`.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true",
          value_parser = ["false", "true", "offload"])]
    pub gradient_checkpointing: String,
    /// sft: the longest sequence that trains at batch 1: from `--seq`, double until a step runs
    /// out of memory, then bisect to `--context-step` tokens. Each try runs in a child process,
    /// so one that runs out of memory cannot disturb the next.
    #[arg(long)]
    pub max_context: bool,
    /// sft `--max-context`: the resolution of the bisection, in tokens.
    #[arg(long, default_value_t = 1024)]
    pub context_step: usize,
    /// Float type of the whole model: f32 or bf16 (bf16: weights, activations, adapters and
    /// optimizer state all in bf16; no f32 master copy).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// grpo: completions sampled per prompt (one prompt a step).
    #[arg(long, default_value_t = 6)]
    pub generations: usize,
    /// grpo: tokens per completion.
    #[arg(long, default_value_t = 200)]
    pub completion: usize,
    /// parity: the fixture folder (config.json, model.safetensors, expected.json).
    #[arg(long)]
    pub fixture: Option<PathBuf>,
    /// parity: where to write the JSON result.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[cfg(feature = "cuda")]
mod run_cuda {
    use super::BenchArgs;
    use crate::cli::bench_model::{
        run_decode, run_grpo, run_parity, run_sft, scratch_dir, SftBench,
    };
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::backend::Backend;
    use runner::backend::cuda::device_memory_used;
    use runner::model::decoder::GradientCheckpointing;
    use serde_json::Value;

    fn checkpointing(args: &BenchArgs) -> anyhow::Result<GradientCheckpointing> {
        Ok(match args.gradient_checkpointing.as_str() {
            "false" => GradientCheckpointing::Off,
            "true" => GradientCheckpointing::Layers,
            "offload" => GradientCheckpointing::Offload,
            other => {
                anyhow::bail!("--gradient-checkpointing {other:?}: expected false, true or offload")
            }
        })
    }

    /// One `bench sft` at batch 1 and `seq` tokens in a child process: its JSON line, or
    /// `None` when it failed (out of memory, most likely).
    fn probe_context(args: &BenchArgs, seq: usize) -> anyhow::Result<Option<Value>> {
        let exe = std::env::current_exe()?;
        let output = std::process::Command::new(exe)
            .args([
                "bench", "sft", "--batch", "1", "--steps", "1", "--warmup", "1",
            ])
            .args(["--shape", &args.shape, "--method", &args.method])
            .args(["--dtype", &args.dtype, "--seq", &seq.to_string()])
            .args(["--gradient-checkpointing", &args.gradient_checkpointing])
            .stderr(std::process::Stdio::null())
            .output()?;
        let line = String::from_utf8_lossy(&output.stdout)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok());
        let ok = output.status.success()
            && line
                .as_ref()
                .is_some_and(|v| v.get("error").is_none() && v["tokens_per_s"].is_number());
        let mut record = line.unwrap_or(Value::Null);
        if let Value::Object(map) = &mut record {
            map.insert("probe_seq".into(), seq.into());
        }
        eprintln!(
            "max-context: {seq} tokens {}",
            if ok { "trains" } else { "does not fit" }
        );
        Ok(ok.then_some(record))
    }

    /// `bench sft --max-context`: doubles the sequence from `--seq` until a step fails, then
    /// bisects down to `--context-step` tokens; prints the longest that trained.
    fn max_context(args: &BenchArgs) -> anyhow::Result<()> {
        let step = args.context_step.max(1);
        let mut good: Option<(usize, Value)> = None;
        let mut seq = args.seq.max(step);
        let bad = loop {
            match probe_context(args, seq)? {
                Some(v) => {
                    println!("{v}");
                    good = Some((seq, v));
                    seq *= 2;
                }
                None => break seq,
            }
        };
        let (mut lo, mut hi) = (good.as_ref().map_or(0, |g| g.0), bad);
        while hi - lo > step {
            let mid = (lo + (hi - lo) / 2) / step * step;
            if mid <= lo {
                break;
            }
            match probe_context(args, mid)? {
                Some(v) => {
                    println!("{v}");
                    good = Some((mid, v));
                    lo = mid;
                }
                None => hi = mid,
            }
        }
        let summary = match good {
            Some((seq, v)) => serde_json::json!({
                "max_context": seq,
                "shape": args.shape,
                "method": args.method,
                "gradient_checkpointing": args.gradient_checkpointing,
                "tokens_per_s": v["tokens_per_s"],
                "gpu_peak_gib": v["gpu_peak_gib"],
                "first_failure": hi,
            }),
            None => serde_json::json!({"max_context": 0, "first_failure": hi}),
        };
        println!("{summary}");
        Ok(())
    }

    fn gib(bytes: usize) -> f64 {
        bytes as f64 / (1u64 << 30) as f64
    }

    /// Runs one model benchmark and adds the settings and the memory it reserved on the GPU
    /// (`first_in_process` false: the figure includes what earlier methods left in the pool).
    fn model_task<B: Backend>(
        args: &BenchArgs,
        method: &str,
        first_in_process: bool,
    ) -> anyhow::Result<Value>
    where
        B::Device: Default,
    {
        let device = B::Device::default();
        // Asks cubecl to give back what an earlier method reserved; measured on an H200 it kept
        // its pool, hence `first_in_process` in the output.
        B::memory_cleanup(&device);
        let _ = B::sync(&device);
        let base = device_memory_used(0)?;
        let mut out = match args.what.as_str() {
            "sft" => {
                let bench = SftBench {
                    shape: args.shape.clone(),
                    batch: args.batch,
                    seq: args.seq,
                    steps: args.steps,
                    warmup_steps: args.warmup,
                    gradient_checkpointing: checkpointing(args)?,
                    method: method.to_string(),
                    objective: args.objective.clone(),
                };
                let dir = scratch_dir("sft");
                let v = run_sft::<Autodiff<B>>(&bench, &device, &dir);
                let _ = std::fs::remove_dir_all(&dir);
                v?
            }
            "grpo" => {
                let dir = scratch_dir("grpo");
                let v = run_grpo::<Autodiff<B>>(
                    &args.shape,
                    args.steps,
                    args.completion,
                    args.generations,
                    method,
                    args.dtype == "bf16",
                    &device,
                    &dir,
                );
                let _ = std::fs::remove_dir_all(&dir);
                v?
            }
            "decode" => run_decode::<B>(
                &args.shape,
                args.batch,
                args.seq,
                args.steps as usize,
                &device,
            )?,
            _ => {
                let dir = args
                    .fixture
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("`bench parity` needs --fixture DIR"))?;
                run_parity::<B>(dir, &device)?
            }
        };
        let used = device_memory_used(0)?;
        if let Value::Object(map) = &mut out {
            map.insert("what".into(), args.what.clone().into());
            map.insert("shape".into(), args.shape.clone().into());
            map.insert("batch".into(), args.batch.into());
            map.insert("seq".into(), args.seq.into());
            map.insert("dtype".into(), args.dtype.clone().into());
            map.insert(
                "gradient_checkpointing".into(),
                args.gradient_checkpointing.clone().into(),
            );
            // cubecl's pools keep what they reserved, so growth of used memory is the peak
            // reservation (comparable to torch.cuda.max_memory_reserved).
            map.insert(
                "gpu_reserved_gib".into(),
                gib(used.saturating_sub(base)).into(),
            );
            map.insert("first_in_process".into(), first_in_process.into());
        }
        Ok(out)
    }

    pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
        use runner::backend::{bench, check};
        match args.what.as_str() {
            "check" => {
                let (lines, ok) = check::run_checks(&args.dump_dir)?;
                for line in lines {
                    println!("{line}");
                }
                anyhow::ensure!(ok, "some on-device checks failed");
            }
            "sft" if args.max_context => max_context(args)?,
            "sft" | "decode" | "grpo" | "parity" => {
                // Several sft methods share one process, so kernels compiled and tuned for the
                // first are reused by the next; each line is printed as soon as it is known.
                let methods: Vec<&str> = if matches!(args.what.as_str(), "sft" | "grpo") {
                    args.method.split(',').map(str::trim).collect()
                } else {
                    vec![""]
                };
                let mut lines = Vec::new();
                for (i, method) in methods.into_iter().enumerate() {
                    let out = runner::backend::memory::catch_out_of_memory("cuda:0", || {
                        if args.dtype == "bf16" {
                            model_task::<Cuda<half::bf16, i32>>(args, method, i == 0)
                        } else {
                            model_task::<Cuda<f32, i32>>(args, method, i == 0)
                        }
                    })
                    .map_err(anyhow::Error::from)
                    .and_then(|out| out);
                    let line = match out {
                        Ok(v) => serde_json::to_string(&v)?,
                        Err(e) => serde_json::json!({"method": method, "error": format!("{e:#}")})
                            .to_string(),
                    };
                    println!("{line}");
                    lines.push(line);
                }
                if let Some(path) = &args.out {
                    std::fs::write(path, lines.join("\n") + "\n")?;
                }
            }
            what => {
                let mut records = Vec::new();
                if matches!(what, "matmul" | "all") {
                    records.extend(bench::bench_matmul(args.with_burn)?);
                }
                if matches!(what, "ce" | "all") {
                    records.extend(bench::bench_cross_entropy()?);
                }
                if matches!(what, "attention" | "all") {
                    records.extend(bench::bench_attention()?);
                }
                for r in records {
                    println!("{}", r.json());
                }
            }
        }
        Ok(())
    }
}

/// Runs the selected benchmark or check: `cpu-decode` on the CPU, the rest on CUDA device 0.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.what == "cpu-decode" {
        return cpu_decode(args);
    }
    run_gpu(args)
}

/// `runner bench cpu-decode`: one JSON line.
fn cpu_decode(args: &BenchArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let path = args
        .model
        .as_ref()
        .context("`bench cpu-decode` needs --model (a GGUF file or an HF folder)")?;
    let t0 = std::time::Instant::now();
    let mut model = runner::infer::open_model(path)?;
    if args.threads.is_some() {
        model.set_thread_pool(runner::infer::thread_pool(args.threads)?);
    }
    let load_s = t0.elapsed().as_secs_f64();
    let shape = runner::infer::bench::Shape {
        prompt_tokens: args.prompt_tokens,
        new_tokens: args.new_tokens,
        rows: args.rows,
    };
    let v = runner::infer::bench::run(path, &model, load_s, &shape)?;
    println!("{v}");
    Ok(())
}

#[cfg(feature = "cuda")]
fn run_gpu(args: &BenchArgs) -> anyhow::Result<()> {
    run_cuda::run(args)
}

/// Without the `cuda` feature there is nothing to benchmark on a GPU.
#[cfg(not(feature = "cuda"))]
fn run_gpu(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("`runner bench` needs a build with the `cuda` feature (except `cpu-decode`)")
}
