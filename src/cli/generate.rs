//! `runner generate`: text generation from an HF model folder or a GGUF file on CPU or CUDA,
//! optionally with a peft adapter (`--adapter`: LoRA, DoRA or AdaLoRA on the weights, or a
//! prompt-learning adapter; [`runner::peft::trained`]).
//!
//! The tokenizer is used through the small [`GenTokenizer`] trait, implemented with the `text`
//! module's tokenizer and chat templates ([`TextGenTokenizer`]); model files are resolved by
//! [`load_model_source`].
//! Sampling defaults follow the folder's generation_config.json as transformers does.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use serde_json::{json, Value};

use runner::infer::source::{load_model_source, ModelSource};
use runner::model::device::{run_on_device, BackendTask, DeviceChoice};
use runner::model::generate::{BudgetForcing, GenerateOptions, Generation, SamplingParams};
use runner::peft::trained::{load_trained, Adapter};

/// Arguments of `runner generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// HF model folder (config.json + safetensors + tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// peft adapter folder: LoRA, DoRA or AdaLoRA (applied unmerged on top of --model), or prompt
    /// tuning, P-Tuning or prefix tuning (run beside the frozen model).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// One prompt.
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// JSON lines: a string, or an object with `prompt` (and optional `system`).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Render prompts with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Argmax decoding (the default unless generation_config.json sets do_sample).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    pub greedy: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop once the output contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// s1 budget forcing: most thinking tokens before the answer delimiter is forced.
    #[arg(long)]
    pub max_thinking_tokens: Option<usize>,
    /// s1 budget forcing: times the end-of-thinking delimiter is replaced by --wait.
    #[arg(long, default_value_t = 0)]
    pub num_ignore: usize,
    #[arg(long, default_value = "<|im_start|>")]
    pub think_end: String,
    #[arg(long, default_value = "<|im_start|>answer\n")]
    pub answer_start: String,
    #[arg(long, default_value = "Wait")]
    pub wait: String,
    /// Prompts per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// cpu, cuda, cuda:N or auto. On the CPU a model without an adapter runs on the quantized
    /// engine (`infer`): a GGUF's blocks are read in place; an HF folder's weights stay f32.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Threads of the CPU engine (default: RAYON_NUM_THREADS, else every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// One JSON object per prompt per line: text, token_ids (generated), prompt_ids.
    #[arg(long)]
    pub json: bool,
    /// Also write each prompt's logits (one forward over the prompt ids) to this file, one JSON
    /// object per prompt per line: prompt_ids, vocab, logits (row-major `[len, vocab]`). On the
    /// CPU they are computed in float64 (written as f32), free of float32 rounding.
    #[arg(long)]
    pub logits: Option<PathBuf>,
}

/// What generation needs from a tokenizer (the `text` module provides the real one).
pub trait GenTokenizer {
    /// Ids of `text`; `add_special_tokens` as in HF (BOS for Llama-style tokenizers).
    fn encode(&self, text: &str, add_special_tokens: bool) -> anyhow::Result<Vec<u32>>;
    /// Text of `ids`, special tokens skipped.
    fn decode(&self, ids: &[u32]) -> anyhow::Result<String>;
    /// End-of-sequence ids (generation_config.json, else config.json).
    fn eos_ids(&self) -> Vec<u32>;
    /// A chat prompt (system, user) ready for generation (assistant turn opened).
    fn render_chat(&self, system: Option<&str>, user: &str) -> anyhow::Result<String>;
}

/// The `text` module's tokenizer and chat template behind [`GenTokenizer`].
pub struct TextGenTokenizer {
    inner: runner::text::TextTokenizer,
}

impl TextGenTokenizer {
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            inner: runner::text::TextTokenizer::from_dir(dir)?,
        })
    }
}

impl GenTokenizer for TextGenTokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> anyhow::Result<Vec<u32>> {
        Ok(if add_special_tokens {
            self.inner.encode(text)?
        } else {
            self.inner.encode_plain(text)?
        })
    }

    fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        Ok(self.inner.decode(ids, true)?)
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.inner.eos_ids()
    }

    fn render_chat(&self, system: Option<&str>, user: &str) -> anyhow::Result<String> {
        let template = self.inner.chat_template(None)?;
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(runner::text::ChatMessage {
                role: "system".into(),
                content: s.into(),
            });
        }
        messages.push(runner::text::ChatMessage {
            role: "user".into(),
            content: user.into(),
        });
        Ok(template.render(&messages, true)?)
    }
}

fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
    ))
}

/// Sampling settings from the flags, falling back to generation_config.json, then to
/// transformers' defaults (greedy unless do_sample; top_k 50 when sampling).
pub fn sampling_from_args(args: &GenerateArgs, gen_config: Option<&Value>) -> SamplingParams {
    let g = |k: &str| gen_config.and_then(|v| v.get(k)).and_then(Value::as_f64);
    let do_sample = gen_config
        .and_then(|v| v.get("do_sample"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let asked = args.temperature.is_some() || args.top_p.is_some() || args.top_k.is_some();
    SamplingParams {
        greedy: args.greedy || !(asked || do_sample),
        temperature: args
            .temperature
            .unwrap_or(g("temperature").unwrap_or(1.0) as f32),
        top_p: args.top_p.unwrap_or(g("top_p").unwrap_or(1.0) as f32),
        top_k: args.top_k.unwrap_or(g("top_k").unwrap_or(50.0) as usize),
        repetition_penalty: args
            .repetition_penalty
            .unwrap_or(g("repetition_penalty").unwrap_or(1.0) as f32),
        seed: args.seed,
    }
}

/// One prompt: user text and optional system message.
#[derive(Debug, Clone)]
struct PromptItem {
    user: String,
    system: Option<String>,
}

fn read_prompts(args: &GenerateArgs) -> anyhow::Result<Vec<PromptItem>> {
    if let Some(p) = &args.prompt {
        return Ok(vec![PromptItem {
            user: p.clone(),
            system: args.system.clone(),
        }]);
    }
    let Some(path) = &args.prompts else {
        bail!("--prompt or --prompts is required")
    };
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), n + 1))?;
        let item = match &v {
            Value::String(s) => PromptItem {
                user: s.clone(),
                system: args.system.clone(),
            },
            Value::Object(o) => PromptItem {
                user: o
                    .get("prompt")
                    .and_then(Value::as_str)
                    .with_context(|| {
                        format!("{}:{}: missing string `prompt`", path.display(), n + 1)
                    })?
                    .to_string(),
                system: o
                    .get("system")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or(args.system.clone()),
            },
            _ => bail!(
                "{}:{}: expected a string or an object with `prompt`",
                path.display(),
                n + 1
            ),
        };
        out.push(item);
    }
    Ok(out)
}

/// One forward over each prompt, with the adapters in effect: `[len, vocab]` rows per prompt.
struct LogitsTask<'a> {
    source: &'a ModelSource,
    adapter: Option<&'a Adapter>,
    prompts: &'a [Vec<u32>],
}

impl BackendTask for LogitsTask<'_> {
    type Output = anyhow::Result<Vec<Vec<f32>>>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let (model, adapter) = load_trained::<B>(
            &self.source.config,
            &self.source.tensors,
            self.adapter,
            &device,
        )?;
        let mut logits = Vec::with_capacity(self.prompts.len());
        for ids in self.prompts {
            let l = runner::model::generate::prompted_logits(&model, adapter.as_ref(), ids)
                .into_data()
                .convert::<f32>();
            logits.push(l.into_vec::<f32>().unwrap_or_default());
        }
        Ok(logits)
    }
}

struct GenerateTask<'a> {
    source: ModelSource,
    adapter: Option<Adapter>,
    prompts: Vec<Vec<u32>>,
    opts: GenerateOptions,
    batch_size: usize,
    decode: &'a dyn Fn(&[u32]) -> String,
}

impl BackendTask for GenerateTask<'_> {
    type Output = anyhow::Result<Vec<Generation>>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let (model, adapter) = load_trained::<B>(
            &self.source.config,
            &self.source.tensors,
            self.adapter.as_ref(),
            &device,
        )?;
        drop(self.source);
        let generator = runner::infer::Generator::new(&model, adapter.as_ref());
        let mut out = Vec::with_capacity(self.prompts.len());
        for chunk in self.prompts.chunks(self.batch_size.max(1)) {
            out.extend(generator.generate(chunk, &self.opts, Some(self.decode))?);
        }
        Ok(out)
    }
}

/// Runs `runner generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let source = load_model_source(&args.model)?;
    let tokenizer = TextGenTokenizer::from_dir(&source.tokenizer_dir)?;
    run_with_tokenizer(args, source, &tokenizer)
}

/// `run` with any tokenizer (the integration point for the `text` module's tokenizer).
pub fn run_with_tokenizer(
    args: &GenerateArgs,
    mut source: ModelSource,
    tok: &dyn GenTokenizer,
) -> anyhow::Result<()> {
    let gen_config = read_json(&source.tokenizer_dir.join("generation_config.json"))?;
    let items = read_prompts(args)?;
    let mut prompts = Vec::with_capacity(items.len());
    for item in &items {
        let ids = if args.chat {
            tok.encode(&tok.render_chat(item.system.as_deref(), &item.user)?, false)?
        } else {
            tok.encode(&item.user, true)?
        };
        prompts.push(ids);
    }
    let budget = if args.max_thinking_tokens.is_some() || args.num_ignore > 0 {
        Some(BudgetForcing {
            max_thinking_tokens: args.max_thinking_tokens,
            num_ignore: args.num_ignore,
            think_end: tok.encode(&args.think_end, false)?,
            answer_start: tok.encode(&args.answer_start, false)?,
            wait: tok.encode(&args.wait, false)?,
        })
    } else {
        None
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: sampling_from_args(args, gen_config.as_ref()),
        stop_token_ids: tok.eos_ids(),
        stop_strings: args.stop.clone(),
        budget,
        pad_token_id: source.config.pad_token_id.unwrap_or(0),
    };
    let adapter = args.adapter.as_deref().map(Adapter::read).transpose()?;
    let decode = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
    let vocab = source.config.vocab_size;
    let logits = match &args.logits {
        None => Vec::new(),
        Some(_) => {
            source.load_tensors()?;
            let task = LogitsTask {
                source: &source,
                adapter: adapter.as_ref(),
                prompts: &prompts,
            };
            // On the CPU the logits are computed in float64, so they hold no float32 rounding
            // of runner's own: any float32 implementation can be compared against them.
            if runner::model::device::resolves_to_cpu(args.device) {
                task.run::<burn::backend::NdArray<f64>>(Default::default())?
            } else {
                run_on_device(args.device, task)??
            }
        }
    };
    // Without an adapter, on the CPU, the families the quantized engine knows run on it.
    let engine_reason = if args.adapter.is_some() {
        Some("an adapter".to_string())
    } else if !runner::model::device::resolves_to_cpu(args.device) {
        Some("a GPU device".to_string())
    } else {
        runner::infer::unsupported_reason(&source.config)
    };
    let results = match engine_reason {
        None => {
            let mut model = match &source.gguf {
                Some(path) => runner::infer::open_gguf(path)?.0,
                None => runner::infer::QuantModel::from_hf_tensors(
                    source.config.clone(),
                    std::mem::take(&mut source.tensors),
                )?,
            };
            if args.threads.is_some() {
                model.set_thread_pool(runner::infer::thread_pool(args.threads)?);
            }
            tracing::info!(
                "CPU engine, {} threads (SIMD kernels: {})",
                model.threads(),
                runner::infer::quant::simd_available()
            );
            runner::infer::generate_batched(
                &model,
                &prompts,
                args.batch_size,
                &opts,
                Some(&decode),
                |_| {},
            )?
        }
        Some(reason) => {
            if runner::model::device::resolves_to_cpu(args.device) {
                tracing::info!(
                    "burn decoder on the CPU: the quantized engine does not run {reason}"
                );
            }
            source.load_tensors()?;
            let task = GenerateTask {
                source,
                adapter,
                prompts: prompts.clone(),
                opts,
                batch_size: args.batch_size,
                decode: &decode,
            };
            run_on_device(args.device, task)??
        }
    };
    if let Some(path) = &args.logits {
        let mut text = String::new();
        for (ids, l) in prompts.iter().zip(&logits) {
            let line = json!({ "prompt_ids": ids, "vocab": vocab, "logits": l });
            text.push_str(&format!("{line}\n"));
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    for (prompt_ids, g) in prompts.iter().zip(results) {
        let text = tok.decode(&g.token_ids)?;
        if args.json {
            let line = json!({
                "text": text,
                "token_ids": g.token_ids,
                "prompt_ids": prompt_ids,
                "finish_reason": format!("{:?}", g.finish),
            });
            writeln!(stdout, "{line}")?;
        } else {
            writeln!(stdout, "{text}")?;
        }
    }
    Ok(())
}
