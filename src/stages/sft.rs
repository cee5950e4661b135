//! `sft`: supervised fine-tuning (LoRA, QLoRA, full, P-Tuning v2) of a base model on tokenized
//! data. The training loop lives in [`crate::train`]; this stage wires artifacts to it.
//!
//! Output: `adapter/` (PEFT format; LoRA, QLoRA, prefix), `merged/` (LoRA) or `model/` (full),
//! `metrics.jsonl`, loss/learning-rate charts (SVG), `checkpoint-N/` and `sft.json`.

use super::artifact::read_tokens;
use super::training::{
    stage_device, train_in_work_folder, train_with_precision, TRAINING_INPUTS,
    TRAINING_OPERATIONAL_KEYS,
};
use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::model::device::BackendTask;
use crate::train::sft::{train_sft, BaseModel};
use crate::train::{SftConfig, TokenizedExample};
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use std::path::Path;

pub struct Sft;

struct TrainTask<'a> {
    cfg: &'a SftConfig,
    model_dir: &'a Path,
    train: &'a [TokenizedExample],
    eval: &'a [TokenizedExample],
    out: &'a Path,
    progress: &'a indicatif::MultiProgress,
}

impl TrainTask<'_> {
    fn train<AB: AutodiffBackend>(
        self,
        device: &AB::Device,
    ) -> Result<crate::train::sft::SftReport, crate::train::Error> {
        let base = BaseModel::Dir(self.model_dir);
        train_sft::<AB>(
            self.cfg,
            base,
            self.train,
            self.eval,
            self.out,
            device,
            Some(self.progress),
        )
    }
}

impl BackendTask for TrainTask<'_> {
    type Output = Result<crate::train::sft::SftReport, crate::train::Error>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        // Activation checkpointing is the model's own (`CausalLm::checkpointing`), not burn's
        // checkpoint strategy, so one autodiff backend serves every setting.
        self.train::<Autodiff<B>>(&device)
    }
}

fn examples(rows: Vec<super::artifact::TokenRow>) -> Vec<TokenizedExample> {
    rows.into_iter()
        .map(|r| TokenizedExample {
            input_ids: r.input_ids,
            labels: r.labels,
        })
        .collect()
}

impl Stage for Sft {
    type Params = SftConfig;
    const KIND: &'static str = "sft";
    const VERSION: u32 = 2;
    const OUTPUT: ArtifactKind = ArtifactKind::Trained;
    const SUMMARY: &'static str = "supervised fine-tuning: LoRA, QLoRA, full or P-Tuning v2";

    fn operational_keys() -> &'static [&'static str] {
        TRAINING_OPERATIONAL_KEYS
    }

    fn input_slots() -> &'static [InputSlot] {
        TRAINING_INPUTS
    }

    fn validate(params: &SftConfig) -> Result<(), (String, String)> {
        params
            .validate()
            .map_err(|e| (String::new(), e.to_string()))
    }

    fn heavy() -> bool {
        true
    }

    fn data_parallel() -> bool {
        true
    }

    fn run(params: &SftConfig, ctx: &StageContext) -> Result<(), StageError> {
        let data = ctx.input("input")?;
        let model = ctx.input("model")?;
        // A trained stage's merged or full model continues from where it ended (SFT, then GRPO).
        let model_dir = super::artifact::model_folder(model.kind, &model.dir)?;
        let train = examples(read_tokens(
            &data.dir,
            data.output.as_deref().unwrap_or("train"),
        )?);
        let eval = if data.output.is_none() {
            examples(read_tokens(&data.dir, "test")?)
        } else {
            Vec::new()
        };
        if train.is_empty() {
            return Err(StageError::msg(
                "the tokenized input has no training examples",
            ));
        }
        let device = stage_device(ctx)?;
        train_in_work_folder(ctx, &model_dir, "sft.json", |work, interrupted| {
            let mut cfg = params.clone();
            cfg.resume = cfg.resume || interrupted;
            let task = TrainTask {
                cfg: &cfg,
                model_dir: &model_dir,
                train: &train,
                eval: &eval,
                out: work,
                progress: &ctx.progress,
            };
            let (report, bf16) = train_with_precision(device, cfg.precision, "sft", task)?;
            Ok(serde_json::json!({
                "method": cfg.method,
                "steps": report.steps,
                "resumed_from": report.resumed_from,
                "last_loss": report.last_loss,
                "eval_loss": report.eval_loss,
                "trainable_params": report.trainable_params,
                "total_params": report.total_params,
                "tokens_seen": report.tokens_seen,
                "device": ctx.device,
                "precision": if bf16 { "bf16 (f32 masters)" } else { "f32" },
            }))
        })
    }
}
