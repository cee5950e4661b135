//! `grpo`: Group Relative Policy Optimization (LoRA, QLoRA or full) of a base model on prompt
//! records, rewarded by configured reward functions. The loop lives in
//! [`crate::train::grpo`]; this stage turns records into prompts and wires artifacts to it.
//!
//! Prompts: each record's system prompt and user text rendered with the model's chat template
//! (generation prompt added), or the plain text when the tokenizer has no template, then
//! `response_prefix` (text every completion starts with, scored as part of it); the
//! record's response is the reference the rewards compare with (GSM8K: the `#### n` solution).
//! `eval_input` (optional): prompt records, encoded alike, that the policy is scored on before,
//! during (`eval_steps`) and after training.
//! Output: `adapter/` (peft) + `merged/` (LoRA, QLoRA) or `model/` (full), as `sft` writes them
//! (so `evaluate` takes a grpo stage as its model), `metrics.jsonl`, `completions.jsonl`,
//! charts (rewards.svg, kl.svg, ...), `checkpoint-N/` and `grpo.json` (with each reward's mean
//! over the first and last steps, also logged).

use super::artifact::{encode_generation_prompt, read_records};
use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::model::device::BackendTask;
use crate::text::TextTokenizer;
use crate::train::grpo::{train_grpo, GrpoError, GrpoPrompt, GrpoReport, GrpoTokens};
use crate::train::grpo_config::GrpoConfig;
use crate::train::sft::BaseModel;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use std::collections::BTreeMap;
use std::path::Path;

pub struct Grpo;

struct TrainTask<'a> {
    cfg: &'a GrpoConfig,
    model_dir: &'a Path,
    prompts: &'a [GrpoPrompt],
    eval_prompts: &'a [GrpoPrompt],
    tokenizer: &'a TextTokenizer,
    tokens: &'a GrpoTokens,
    out: &'a Path,
    progress: &'a indicatif::MultiProgress,
}

impl BackendTask for TrainTask<'_> {
    type Output = Result<GrpoReport, GrpoError>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        train_grpo::<Autodiff<B>>(
            self.cfg,
            BaseModel::Dir(self.model_dir),
            self.prompts,
            self.eval_prompts,
            &decode,
            self.tokens,
            self.out,
            &device,
            Some(self.progress),
        )
    }
}

/// Token ids of each record's prompt (see [`encode_generation_prompt`]) and its reference.
fn encode_prompts(
    tokenizer: &TextTokenizer,
    records: &[crate::text::Record],
    response_prefix: &str,
) -> Result<Vec<GrpoPrompt>, StageError> {
    let template = tokenizer.chat_template(None).ok();
    records
        .iter()
        .map(|r| {
            Ok(GrpoPrompt {
                ids: encode_generation_prompt(tokenizer, template.as_ref(), r, response_prefix)?,
                reference: r.response.clone(),
            })
        })
        .collect()
}

impl Stage for Grpo {
    type Params = GrpoConfig;
    const KIND: &'static str = "grpo";
    // 2: metrics.jsonl rows from the shared training loop (eval values in the step's row, per-token
    // clip_ratio and kl over the logged window, phase times). 3: a group's shared prompt runs
    // once in the log-prob passes (the same numbers up to rounding, so not bit-identical).
    const VERSION: u32 = 3;
    const OUTPUT: ArtifactKind = ArtifactKind::Trained;
    const SUMMARY: &'static str =
        "GRPO reinforcement learning with reward functions (LoRA or full)";

    fn operational_keys() -> &'static [&'static str] {
        &[
            "resume",
            "save_steps",
            "logging_steps",
            "log_completions_steps",
        ]
    }

    fn input_slots() -> &'static [InputSlot] {
        const SLOTS: &[InputSlot] = &[
            InputSlot::one("input", &[ArtifactKind::Prompts]),
            InputSlot::one("model", &[ArtifactKind::Model, ArtifactKind::Trained]),
            InputSlot::optional("eval_input", &[ArtifactKind::Prompts]),
        ];
        SLOTS
    }

    fn validate(params: &GrpoConfig) -> Result<(), (String, String)> {
        params.validate().map_err(|(k, m)| (k.to_string(), m))?;
        crate::train::rewards::RewardSet::new(&params.rewards)
            .map(|_| ())
            .map_err(|e| ("rewards".to_string(), e.to_string()))
    }

    fn heavy() -> bool {
        true
    }

    fn data_parallel() -> bool {
        true
    }

    fn run(params: &GrpoConfig, ctx: &StageContext) -> Result<(), StageError> {
        let data = ctx.input("input")?;
        let model = ctx.input("model")?;
        // A trained stage's merged or full model continues from where it ended (SFT, then GRPO).
        let model_dir = super::artifact::model_folder(model.kind, &model.dir)?;
        let records = read_records(&data.dir, data.output.as_deref().unwrap_or("train"))?;
        if records.is_empty() {
            return Err(StageError::msg("the prompt input has no training records"));
        }
        let tokenizer = TextTokenizer::from_dir(&model_dir).map_err(StageError::wrap)?;
        let prompts = encode_prompts(&tokenizer, &records, &params.response_prefix)?;
        let eval_prompts = match ctx.optional_input("eval_input") {
            Some(eval) => {
                let split = eval.output.as_deref().unwrap_or("test");
                let records = read_records(&eval.dir, split)?;
                if records.is_empty() {
                    return Err(StageError::msg(format!(
                        "eval_input `{}` has no records in its `{split}` split",
                        eval.stage
                    )));
                }
                encode_prompts(&tokenizer, &records, &params.response_prefix)?
            }
            None => Vec::new(),
        };
        let mut eos_ids = tokenizer.eos_ids();
        if eos_ids.is_empty() {
            eos_ids = crate::model::config::ModelConfig::from_file(model_dir.join("config.json"))
                .map_err(StageError::wrap)?
                .eos_token_ids;
        }
        let tokens = GrpoTokens {
            pad_id: tokenizer.pad_id().or(eos_ids.first().copied()).unwrap_or(0),
            eos_ids,
        };
        let device = super::training::stage_device(ctx)?;
        super::training::train_in_work_folder(ctx, &model_dir, "grpo.json", |work, interrupted| {
            let mut cfg = params.clone();
            cfg.resume = cfg.resume || interrupted;
            let task = TrainTask {
                cfg: &cfg,
                model_dir: &model_dir,
                prompts: &prompts,
                eval_prompts: &eval_prompts,
                tokenizer: &tokenizer,
                tokens: &tokens,
                out: work,
                progress: &ctx.progress,
            };
            let (report, bf16) =
                super::training::train_with_precision(device, cfg.precision, "grpo", task)?;
            for (key, before) in &report.eval_before {
                if let Some(after) = report.eval_after.get(key) {
                    tracing::info!(
                        "grpo eval {key}: {before:.4} before training, {after:.4} after"
                    );
                }
            }
            let trend = reward_trend(&work.join("metrics.jsonl"))?;
            if let Some(t) = &trend {
                for (key, first) in &t.first {
                    if let Some(last) = t.last.get(key) {
                        tracing::info!(
                            "grpo {key}: {first:.4} over the first {n} steps, {last:.4} over the last {n}",
                            n = t.steps
                        );
                    }
                }
            }
            Ok(serde_json::json!({
                "method": cfg.method,
                "steps": report.steps,
                "resumed_from": report.resumed_from,
                "first_reward": report.first_reward,
                "last_reward": report.last_reward,
                "eval_before": report.eval_before,
                "eval_after": report.eval_after,
                "reward_trend": trend,
                "trainable_params": report.trainable_params,
                "total_params": report.total_params,
                "prompts": prompts.len(),
                "device": ctx.device,
                "precision": if bf16 { "bf16 (f32 masters)" } else { "f32" },
            }))
        })
    }
}

/// Each reward's mean over the first and over the last `steps` training steps of a run's
/// `metrics.jsonl` (a third of the steps, at most ten). One step's few completions swing by more
/// than a short run moves them, so the log and `grpo.json` compare windows, not single steps.
#[derive(Debug, PartialEq, serde::Serialize)]
struct RewardTrend {
    steps: usize,
    first: BTreeMap<String, f64>,
    last: BTreeMap<String, f64>,
}

/// [`RewardTrend`] of the training rows (those with `reward`; evaluation rows have
/// `eval_reward`), or `None` before two steps are logged.
fn reward_trend(metrics: &Path) -> Result<Option<RewardTrend>, StageError> {
    let text = match std::fs::read_to_string(metrics) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StageError::io(metrics, e)),
    };
    let mut rows: Vec<BTreeMap<String, f64>> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).map_err(|e| {
                StageError::Failed(format!(
                    "{}:{}: not a JSON object: {e}",
                    metrics.display(),
                    i + 1
                ))
            })?;
        if !row.contains_key("reward") {
            continue;
        }
        rows.push(
            row.iter()
                .filter(|(k, _)| *k == "reward" || k.starts_with("rewards/"))
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect(),
        );
    }
    if rows.len() < 2 {
        return Ok(None);
    }
    let steps = (rows.len() / 3).clamp(1, 10);
    let mean = |window: &[BTreeMap<String, f64>]| {
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for row in window {
            for (k, v) in row {
                let e = sums.entry(k.clone()).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
        sums.into_iter()
            .map(|(k, (sum, n))| (k, sum / n as f64))
            .collect()
    };
    Ok(Some(RewardTrend {
        steps,
        first: mean(&rows[..steps]),
        last: mean(&rows[rows.len() - steps..]),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_trend_compares_the_first_and_last_third_of_the_training_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut lines = vec![r#"{"step":0,"eval_reward":9.0}"#.to_string()];
        for step in 1..=7 {
            lines.push(format!(
                r#"{{"step":{step},"loss":0.1,"reward":{r},"rewards/xml_count":{x},"kl":0.5}}"#,
                r = step as f64,
                x = -(step as f64)
            ));
        }
        lines.push(r#"{"step":7,"eval_reward":9.0}"#.into());
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let t = reward_trend(&path).unwrap().unwrap();
        // Seven training rows: windows of two (steps 1-2 and 6-7); eval rows and kl left out.
        assert_eq!(t.steps, 2);
        assert_eq!(t.first["reward"], 1.5);
        assert_eq!(t.last["reward"], 6.5);
        assert_eq!(t.last["rewards/xml_count"], -6.5);
        assert_eq!(t.first.len(), 2);

        std::fs::write(&path, r#"{"step":1,"reward":1.0}"#).unwrap();
        assert_eq!(reward_trend(&path).unwrap(), None, "one step has no trend");
        assert_eq!(reward_trend(&dir.path().join("absent")).unwrap(), None);

        std::fs::write(&path, "{\"step\":1,\"reward\":1.0}\nnot json\n").unwrap();
        let e = reward_trend(&path).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2"), "{e}");
    }
}
