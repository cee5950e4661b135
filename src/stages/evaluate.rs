//! `evaluate`: generate for a split of prompt records and score the predictions (BLEU-4/ROUGE as
//! ChatGLM-6B's script, sacreBLEU, GSM8K accuracy, exact match).
//!
//! A trained artifact with only a prompt-learning `adapter/` (prompt tuning, P-Tuning, prefix)
//! runs on its base model (the optional `base` input, else the adapter's base folder).
//!
//! Output: `predictions.jsonl` (prompt, prediction, reference), `metrics.json` and `metrics.md`.

use super::artifact::{encode_generation_prompt, model_folder, read_records, DatasetManifest};
use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::metrics::{self, PredictionRow};
use crate::model::config::ModelConfig;
use crate::model::device::{run_on_device, BackendTask, DeviceChoice};
use crate::model::generate::{BudgetForcing, GenerateOptions, SamplingParams};
use crate::model::hf::load_hf_folder_tensors;
use crate::model::prompt::{prompt_adapter_kind, read_prompt_adapter};
use crate::peft::trained::{load_trained, Adapter};
use crate::text::TextTokenizer;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub struct Evaluate;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Evaluate at most this many records (the first ones of the split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Greedy unless `temperature` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    /// Metrics: chatglm, sacrebleu, gsm8k, exact.
    #[serde(default = "default_metrics")]
    pub metrics: Vec<String>,
    /// s1 budget forcing: end thinking after this many tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_thinking_tokens: Option<usize>,
    /// s1 budget forcing: suppress the end-of-thinking delimiter this many times, appending "Wait".
    #[serde(default)]
    pub num_ignore: usize,
    #[serde(default = "default_think_end")]
    pub think_end: String,
    #[serde(default = "default_answer_start")]
    pub answer_start: String,
    /// Render prompts with the model's chat template (`auto`: when the records are chat records).
    #[serde(default = "default_auto")]
    pub chat: String,
    /// Text every answer starts with: appended to the prompt and put before each prediction (as
    /// the `grpo` key, so a model trained with it is evaluated the same way).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub response_prefix: String,
}

fn default_max_new_tokens() -> usize {
    64
}
fn default_batch_size() -> usize {
    8
}
fn one() -> f32 {
    1.0
}
fn default_metrics() -> Vec<String> {
    vec!["chatglm".into()]
}
fn default_think_end() -> String {
    "</think>".into()
}
fn default_answer_start() -> String {
    "\nFinal Answer:".into()
}
fn default_auto() -> String {
    "auto".into()
}

/// The base model and prompt-learning adapter (prompt tuning, P-Tuning, prefix) of a trained
/// artifact that holds only `adapter/`: the base is the `base` input, else the adapter's
/// `base_model_name_or_path` when that is a model folder (the sft stage writes its input's).
pub fn prompt_adapter_model(
    dir: &Path,
    base: Option<&Path>,
) -> Result<Option<(PathBuf, PathBuf)>, StageError> {
    let adapter = dir.join("adapter");
    if prompt_adapter_kind(&adapter).is_none() {
        return Ok(None);
    }
    if let Some(b) = base {
        return Ok(Some((b.to_path_buf(), adapter)));
    }
    let file = read_prompt_adapter(&adapter).map_err(StageError::wrap)?;
    match file.config["base_model_name_or_path"]
        .as_str()
        .map(PathBuf::from)
    {
        Some(b) if b.join("config.json").is_file() => Ok(Some((b, adapter))),
        _ => Err(StageError::msg(format!(
            "{}: a prompt-learning adapter needs its base model: add `base = \"<model stage>\"`",
            adapter.display()
        ))),
    }
}

struct GenerateTask<'a> {
    config: ModelConfig,
    model_dir: &'a Path,
    adapter: Option<&'a Adapter>,
    prompts: &'a [Vec<u32>],
    opts: GenerateOptions,
    batch_size: usize,
    bar: indicatif::ProgressBar,
}

impl BackendTask for GenerateTask<'_> {
    type Output = Result<Vec<Vec<u32>>, StageError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let tensors = load_hf_folder_tensors(self.model_dir).map_err(StageError::wrap)?;
        let (model, prompt_adapter) =
            load_trained::<B>(&self.config, &tensors, self.adapter, &device)
                .map_err(StageError::wrap)?;
        drop(tensors);
        let generator = crate::infer::Generator::new(&model, prompt_adapter.as_ref());
        let mut out = Vec::with_capacity(self.prompts.len());
        for chunk in self.prompts.chunks(self.batch_size.max(1)) {
            let gens = generator
                .generate(chunk, &self.opts, None)
                .map_err(StageError::wrap)?;
            out.extend(gens.into_iter().map(|g| g.token_ids));
            self.bar.inc(chunk.len() as u64);
        }
        Ok(out)
    }
}

/// The generated ids of `prompts` through the CPU engine (f32 weights of the HF folder).
fn generate_on_cpu_engine(
    config: ModelConfig,
    model_dir: &Path,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    batch_size: usize,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<Vec<u32>>, StageError> {
    let tensors = load_hf_folder_tensors(model_dir).map_err(StageError::wrap)?;
    let model =
        crate::infer::QuantModel::from_hf_tensors(config, tensors).map_err(StageError::wrap)?;
    let gens = crate::infer::generate_batched(&model, prompts, batch_size, opts, None, |n| {
        bar.inc(n as u64)
    })
    .map_err(|e| StageError::Other(Box::new(e)))?;
    Ok(gens.into_iter().map(|g| g.token_ids).collect())
}

impl Stage for Evaluate {
    type Params = Params;
    const KIND: &'static str = "evaluate";
    // 2: chat records without a chat template keep their system message; `response_prefix`.
    const VERSION: u32 = 2;
    const OUTPUT: ArtifactKind = ArtifactKind::Evaluation;
    const SUMMARY: &'static str = "generate on a split and score BLEU-4/ROUGE, GSM8K accuracy";

    fn input_slots() -> &'static [InputSlot] {
        const SLOTS: &[InputSlot] = &[
            InputSlot::one("input", &[ArtifactKind::Prompts]),
            InputSlot::one("model", &[ArtifactKind::Model, ArtifactKind::Trained]),
            InputSlot::optional("base", &[ArtifactKind::Model]),
        ];
        SLOTS
    }

    fn validate(params: &Params) -> Result<(), (String, String)> {
        for m in &params.metrics {
            if !["chatglm", "sacrebleu", "gsm8k", "exact"].contains(&m.as_str()) {
                return Err((
                    "metrics".into(),
                    format!("unknown metric `{m}` (chatglm, sacrebleu, gsm8k, exact)"),
                ));
            }
        }
        if !["auto", "true", "false"].contains(&params.chat.as_str()) {
            return Err(("chat".into(), "one of \"auto\", \"true\", \"false\"".into()));
        }
        Ok(())
    }

    fn heavy() -> bool {
        true
    }

    fn run(params: &Params, ctx: &StageContext) -> Result<(), StageError> {
        let input = ctx.input("input")?;
        let model = ctx.input("model")?;
        let base = ctx.optional_input("base").map(|b| b.dir.as_path());
        let (model_dir, adapter) = match model.kind {
            ArtifactKind::Trained => match prompt_adapter_model(&model.dir, base)? {
                Some((b, a)) => (b, Some(Adapter::read(&a).map_err(StageError::wrap)?)),
                None => (model_folder(model.kind, &model.dir)?, None),
            },
            _ => (model_folder(model.kind, &model.dir)?, None),
        };
        let config =
            ModelConfig::from_file(model_dir.join("config.json")).map_err(StageError::wrap)?;
        let tokenizer = TextTokenizer::from_dir(&model_dir).map_err(StageError::wrap)?;
        let manifest = DatasetManifest::read(&input.dir)?;
        let split = input.output.clone().unwrap_or_else(|| "test".into());
        let mut records = read_records(&input.dir, &split)?;
        if let Some(limit) = params.limit {
            records.truncate(limit);
        }
        let chat = match params.chat.as_str() {
            "true" => true,
            "false" => false,
            _ => manifest.is_chat(),
        };
        let template = if chat {
            Some(tokenizer.chat_template(None).map_err(StageError::wrap)?)
        } else {
            None
        };
        let prompts = records
            .iter()
            .map(|r| {
                encode_generation_prompt(&tokenizer, template.as_ref(), r, &params.response_prefix)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let encode = |s: &str| tokenizer.encode_plain(s).map_err(StageError::wrap);
        let budget = if params.max_thinking_tokens.is_some() || params.num_ignore > 0 {
            Some(BudgetForcing {
                max_thinking_tokens: params.max_thinking_tokens,
                num_ignore: params.num_ignore,
                think_end: encode(&params.think_end)?,
                answer_start: encode(&params.answer_start)?,
                wait: encode("Wait")?,
            })
        } else {
            None
        };
        let opts = GenerateOptions {
            max_new_tokens: params.max_new_tokens,
            sampling: SamplingParams {
                temperature: params.temperature.unwrap_or(1.0),
                top_k: params.top_k,
                top_p: params.top_p,
                repetition_penalty: params.repetition_penalty,
                seed: ctx.seed,
                greedy: params.temperature.is_none(),
            },
            stop_token_ids: tokenizer.eos_ids(),
            stop_strings: Vec::new(),
            budget,
            pad_token_id: tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0),
        };
        let device: DeviceChoice = ctx.device.parse().map_err(StageError::wrap)?;
        let bar = ctx.progress_bar(prompts.len() as u64, "predictions");
        // On the CPU, models without a prompt-learning adapter whose family the CPU engine
        // runs decode there (the same sampling loop, SIMD kernels, an in-place cache).
        let engine = crate::model::device::resolves_to_cpu(device)
            && adapter.is_none()
            && crate::infer::unsupported_reason(&config).is_none();
        let outputs = if engine {
            generate_on_cpu_engine(config, &model_dir, &prompts, &opts, params.batch_size, &bar)?
        } else {
            let task = GenerateTask {
                config,
                model_dir: &model_dir,
                adapter: adapter.as_ref(),
                prompts: &prompts,
                opts,
                batch_size: params.batch_size,
                bar: bar.clone(),
            };
            run_on_device(device, task).map_err(StageError::wrap)??
        };
        bar.finish_and_clear();

        let mut rows = Vec::with_capacity(records.len());
        for (r, ids) in records.iter().zip(&outputs) {
            let text = tokenizer.decode(ids, true).map_err(StageError::wrap)?;
            rows.push(PredictionRow {
                prompt: r.prompt.clone(),
                prediction: format!("{}{text}", params.response_prefix)
                    .trim()
                    .to_string(),
                reference: r.response.clone(),
            });
        }
        metrics::write_predictions(&ctx.out("predictions.jsonl"), &rows)
            .map_err(StageError::wrap)?;
        let predictions: Vec<String> = rows.iter().map(|r| r.prediction.clone()).collect();
        let references: Vec<String> = rows.iter().map(|r| r.reference.clone()).collect();
        let mut scores = serde_json::Map::new();
        for m in &params.metrics {
            match m.as_str() {
                "chatglm" => {
                    let pairs: Vec<(String, String)> = predictions
                        .iter()
                        .cloned()
                        .zip(references.iter().cloned())
                        .collect();
                    let s = metrics::chatglm_scores(&pairs).map_err(StageError::wrap)?;
                    if let serde_json::Value::Object(o) =
                        serde_json::to_value(s).map_err(StageError::wrap)?
                    {
                        scores.extend(o);
                    }
                }
                "sacrebleu" => {
                    let s =
                        metrics::sacrebleu(&predictions, &references, metrics::SacreTokenizer::Zh)
                            .map_err(StageError::wrap)?;
                    scores.insert("sacrebleu".into(), s.into());
                }
                "gsm8k" => {
                    let s = metrics::gsm8k_accuracy(&predictions, &references)
                        .map_err(StageError::wrap)?;
                    scores.insert("gsm8k-accuracy".into(), s.into());
                }
                "exact" => {
                    let s = metrics::exact_match(&predictions, &references)
                        .map_err(StageError::wrap)?;
                    scores.insert("exact-match".into(), s.into());
                }
                _ => {}
            }
        }
        scores.insert("count".into(), rows.len().into());
        crate::stages::artifact::write_json(&ctx.out("metrics.json"), &scores)?;
        let mut table = String::from("| metric | value |\n| --- | --- |\n");
        for (k, v) in &scores {
            table.push_str(&format!("| {k} | {v} |\n"));
        }
        std::fs::write(ctx.out("metrics.md"), table)
            .map_err(|e| StageError::io(&ctx.out("metrics.md"), e))?;
        Ok(())
    }
}
