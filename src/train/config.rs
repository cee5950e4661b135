//! The `sft` recipe keys ([`SftConfig`]) and their validation.
//!
//! Defaults follow transformers' `TrainingArguments` (lr 5e-5, linear schedule, AdamW betas
//! 0.9/0.999, eps 1e-8, no weight decay, clip 1.0, 3 epochs) and peft's `LoraConfig`
//! (r 8, alpha 8, dropout 0) unless said otherwise.

use serde::{Deserialize, Serialize};

use crate::model::decoder::GradientCheckpointing;
use crate::peft::adalora_files::AdaLoraParams;
use crate::peft::files::TargetModules;
use crate::train::schedule::{Schedule, ScheduleConfig};
use crate::train::Error;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Low-rank adapters on a frozen base (peft LoRA).
    #[default]
    Lora,
    /// LoRA on a base quantised to NF4 (bitsandbytes) and dequantised for each matmul.
    Qlora,
    /// Every parameter.
    Full,
    /// P-Tuning v2: trained keys and values prepended in every layer.
    Prefix,
    /// AdaLoRA: SVD-form adapters whose ranks are pruned to a budget (peft ADALORA).
    Adalora,
    /// peft PROMPT_TUNING: trained virtual-token embeddings before the input embeddings.
    #[serde(rename = "prompt_tuning")]
    PromptTuning,
    /// peft P_TUNING: virtual tokens produced by an MLP or LSTM prompt encoder.
    #[serde(rename = "p_tuning")]
    PTuning,
}

/// How prompt tuning's virtual tokens start (peft `prompt_tuning_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PromptInit {
    /// N(0, 1), as torch's `nn.Embedding`.
    #[default]
    #[serde(alias = "RANDOM")]
    Random,
    /// The embeddings of `prompt_tuning_init_text`'s tokens, repeated or cut to length.
    #[serde(alias = "TEXT")]
    Text,
}

/// P-Tuning's prompt encoder (peft `encoder_reparameterization_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Reparameterization {
    #[default]
    #[serde(alias = "MLP")]
    Mlp,
    #[serde(alias = "LSTM")]
    Lstm,
}

/// Precision of the trained weights written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    #[default]
    Float32,
    Bfloat16,
    Float16,
}

/// Float type of the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Weights and activations in bf16, the optimizer's moments and master copies of the trained
    /// weights in f32 (CUDA only; on the CPU the stage trains in f32 and says so).
    Bf16,
}

impl Precision {
    fn is_f32(&self) -> bool {
        *self == Self::F32
    }
}

/// The `sft` stage parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    pub method: Method,
    pub learning_rate: f64,
    /// `constant`, `linear` or `cosine`; `scheduler` is accepted as an alias.
    #[serde(alias = "scheduler")]
    pub lr_scheduler: Schedule,
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: Option<f64>,
    /// Optimizer steps; overrides `epochs` when set.
    pub max_steps: Option<u64>,
    pub epochs: u64,
    /// Examples per micro-batch (at most).
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Padded tokens per micro-batch (rows x longest row), at most; a longer single example
    /// still forms its own micro-batch.
    pub max_tokens_per_batch: Option<usize>,
    /// Clip the global gradient norm to this (0 or absent: no clipping).
    pub max_grad_norm: Option<f64>,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub seed: u64,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    /// DoRA (peft `use_dora`): a trained magnitude per output row on top of LoRA.
    pub use_dora: bool,
    pub pre_seq_len: usize,
    pub prefix_projection: bool,
    /// Hidden size of the prefix projection MLP (ChatGLM's `prefix_hidden_size`).
    pub prefix_hidden_size: Option<usize>,
    /// Virtual tokens of prompt tuning and P-Tuning (the prefix uses `pre_seq_len`).
    pub num_virtual_tokens: usize,
    pub prompt_tuning_init: PromptInit,
    pub prompt_tuning_init_text: Option<String>,
    pub encoder_reparameterization_type: Reparameterization,
    /// P-Tuning encoder width (default: the model's hidden size, as peft).
    pub encoder_hidden_size: Option<usize>,
    /// P-Tuning LSTM layers (the MLP always has 3 linears, as peft).
    pub encoder_num_layers: usize,
    /// Evaluate every N optimizer steps (0: only at the end when an eval set is given).
    pub eval_steps: u64,
    /// Also evaluate before the first step (transformers' `eval_on_start`): the starting
    /// model's figures as the step-0 row of `metrics.jsonl`. Left out of the fingerprint when
    /// false, so stages cached before the key existed stay cached.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub eval_on_start: bool,
    /// Checkpoint every N optimizer steps (0: never; default 500).
    pub save_steps: u64,
    pub logging_steps: u64,
    /// Continue from the last `checkpoint-N` in the output folder.
    pub resume: bool,
    /// `false`, `true` (keep each decoder layer's input, recompute the layer in the backward
    /// pass) or `"offload"` (the same, with the kept inputs in host memory).
    pub gradient_checkpointing: GradientCheckpointing,
    /// dtype of the saved weights.
    pub dtype: SaveDtype,
    /// `f32` or `bf16` (mixed precision with f32 masters). Left out of the fingerprint when f32,
    /// so stages cached before the key existed stay cached.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// AdaLoRA's keys (`method = "adalora"`): `init_r`, `target_r`, `tinit`, `tfinal`, `deltaT`...
    pub adalora: AdaLoraParams,
    /// Whether LoRA/QLoRA write `merged/` after training. Not a recipe key (stages downstream
    /// read the merged model): `runner bench sft` turns it off, so a 7B benchmark does not spend
    /// a minute writing 15 GB.
    #[serde(skip, default = "write_merged_default")]
    pub write_merged: bool,
}

fn write_merged_default() -> bool {
    true
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            method: Method::Lora,
            learning_rate: 5e-5,
            lr_scheduler: Schedule::Linear,
            warmup_steps: None,
            warmup_ratio: None,
            max_steps: None,
            epochs: 3,
            batch_size: 8,
            gradient_accumulation_steps: 1,
            max_tokens_per_batch: None,
            max_grad_norm: Some(1.0),
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            seed: 42,
            lora_r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
            use_dora: false,
            pre_seq_len: 16,
            prefix_projection: false,
            prefix_hidden_size: None,
            num_virtual_tokens: 20,
            prompt_tuning_init: PromptInit::Random,
            prompt_tuning_init_text: None,
            encoder_reparameterization_type: Reparameterization::Mlp,
            encoder_hidden_size: None,
            encoder_num_layers: 2,
            eval_steps: 0,
            eval_on_start: false,
            // As transformers' Trainer: a killed run loses at most 500 steps.
            save_steps: 500,
            logging_steps: 10,
            resume: false,
            gradient_checkpointing: GradientCheckpointing::Off,
            dtype: SaveDtype::Float32,
            precision: Precision::F32,
            adalora: AdaLoraParams::default(),
            write_merged: true,
        }
    }
}

/// The optimizer and schedule keys every training stage (sft, the preference kinds, grpo) shares,
/// checked in one place.
pub(crate) struct OptimizerKeys {
    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub weight_decay: f64,
    pub schedule: ScheduleConfig,
}

impl OptimizerKeys {
    /// The first key out of range, with what is wrong with it.
    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            let lr = self.learning_rate;
            return Err(("learning_rate", format!("must be >= 0, got {lr}")));
        }
        for (key, beta) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return Err((key, format!("must be in [0, 1), got {beta}")));
            }
        }
        if self.adam_epsilon.is_nan() || self.adam_epsilon <= 0.0 {
            let eps = self.adam_epsilon;
            return Err(("adam_epsilon", format!("must be > 0, got {eps}")));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            let wd = self.weight_decay;
            return Err(("weight_decay", format!("must be >= 0, got {wd}")));
        }
        if let Err(e) = self.schedule.warmup_steps_for(1) {
            return Err(("warmup_steps", e.to_string()));
        }
        Ok(())
    }

    /// AdamW's hyper-parameters.
    pub(crate) fn adamw(&self) -> crate::train::optim::AdamWParams {
        crate::train::optim::AdamWParams {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }
}

/// LoRA's rank and dropout, checked the same way for every stage that trains adapters.
pub(crate) fn check_lora(r: usize, dropout: f64) -> Result<(), (&'static str, String)> {
    if r == 0 {
        return Err(("lora_r", "must be >= 1".into()));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Err(("lora_dropout", format!("must be in [0, 1), got {dropout}")));
    }
    Ok(())
}

/// The accessors every training stage's config has for the keys it names alike (`learning_rate`,
/// `adam_*`, `weight_decay`, the schedule's, `seed`, `max_grad_norm`, logging, saving,
/// evaluation, `resume`): what the optimizer and the training loop read.
macro_rules! training_keys {
    ($config:ty) => {
        impl $config {
            /// The keys the training loop reads.
            pub(crate) fn loop_settings(&self) -> $crate::train::train_loop::LoopSettings {
                $crate::train::train_loop::LoopSettings {
                    method: self.method,
                    seed: self.seed,
                    optimizer: self.optimizer_keys(),
                    max_grad_norm: self.max_grad_norm,
                    logging_steps: self.logging_steps,
                    save_steps: self.save_steps,
                    eval_steps: self.eval_steps,
                    resume: self.resume,
                }
            }

            /// The optimizer and schedule keys.
            pub(crate) fn optimizer_keys(&self) -> $crate::train::config::OptimizerKeys {
                $crate::train::config::OptimizerKeys {
                    learning_rate: self.learning_rate,
                    adam_beta1: self.adam_beta1,
                    adam_beta2: self.adam_beta2,
                    adam_epsilon: self.adam_epsilon,
                    weight_decay: self.weight_decay,
                    schedule: self.schedule_config(),
                }
            }

            /// The schedule keys as `train::schedule` takes them.
            pub fn schedule_config(&self) -> $crate::train::schedule::ScheduleConfig {
                $crate::train::schedule::ScheduleConfig {
                    scheduler: self.lr_scheduler,
                    warmup_steps: self.warmup_steps,
                    warmup_ratio: self.warmup_ratio,
                }
            }
        }
    };
}
pub(crate) use training_keys;

training_keys!(SftConfig);

impl SftConfig {
    /// Checks ranges and combinations before any work starts.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &'static str, message: String| Err(Error::Config { key, message });
        if let Err((key, message)) = self.optimizer_keys().check() {
            return bad(key, message);
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be >= 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be >= 1".into());
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            return bad("epochs", "must be >= 1 when max_steps is not set".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be >= 1".into());
        }
        if self.logging_steps == 0 {
            return bad("logging_steps", "must be >= 1".into());
        }
        if self.method == Method::Adalora {
            let planned = self.adalora.total_step.or(self.max_steps);
            if let Err((key, message)) = self.adalora.check(planned.unwrap_or(u64::MAX)) {
                return bad(key, message);
            }
        }
        if matches!(self.method, Method::Lora | Method::Qlora | Method::Adalora) {
            if let Err((key, message)) = check_lora(self.lora_r, self.lora_dropout) {
                return bad(key, message);
            }
        }
        if self.use_dora && !matches!(self.method, Method::Lora | Method::Qlora) {
            return bad(
                "use_dora",
                format!("needs method lora or qlora, got {:?}", self.method),
            );
        }
        if self.method == Method::Prefix && self.pre_seq_len == 0 {
            return bad("pre_seq_len", "must be >= 1".into());
        }
        if matches!(self.method, Method::PromptTuning | Method::PTuning) {
            if self.num_virtual_tokens == 0 {
                return bad("num_virtual_tokens", "must be >= 1".into());
            }
            if self.encoder_hidden_size == Some(0) {
                return bad("encoder_hidden_size", "must be >= 1".into());
            }
            if self.encoder_num_layers == 0 {
                return bad("encoder_num_layers", "must be >= 1".into());
            }
        }
        if self.method == Method::PromptTuning
            && self.prompt_tuning_init == PromptInit::Text
            && self
                .prompt_tuning_init_text
                .as_deref()
                .unwrap_or("")
                .is_empty()
        {
            return bad(
                "prompt_tuning_init_text",
                "needed (non-empty) when prompt_tuning_init = \"text\"".into(),
            );
        }
        Ok(())
    }

    /// peft's factor on `B A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn lora_scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.lora_r as f64).sqrt()
        } else {
            self.lora_alpha / self.lora_r as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_keys_parse_and_unknown_keys_are_refused() {
        let cfg: SftConfig = toml::from_str(
            "method = \"lora\"\nlearning_rate = 2e-4\nscheduler = \"cosine\"\nwarmup_ratio = 0.1\n\
             lora_r = 4\nlora_alpha = 16\ntarget_modules = \"all-linear\"\nuse_rslora = true\n",
        )
        .unwrap();
        assert_eq!(cfg.lr_scheduler, Schedule::Cosine);
        assert_eq!(
            cfg.target_modules,
            TargetModules::Pattern("all-linear".into())
        );
        assert_eq!(cfg.lora_scaling(), 8.0);
        cfg.validate().unwrap();
        let err = toml::from_str::<SftConfig>("learnin_rate = 1.0").unwrap_err();
        assert!(err.to_string().contains("learnin_rate"), "{err}");
        let both = SftConfig {
            warmup_steps: Some(3),
            warmup_ratio: Some(0.1),
            ..SftConfig::default()
        };
        assert!(both.validate().unwrap_err().to_string().contains("warmup"));
    }

    #[test]
    fn precision_parses_and_f32_stays_out_of_the_fingerprint() {
        let cfg: SftConfig = toml::from_str("precision = \"bf16\"").unwrap();
        assert_eq!(cfg.precision, Precision::Bf16);
        assert!(toml::to_string(&cfg).unwrap().contains("precision"));
        let default = toml::to_string(&SftConfig::default()).unwrap();
        assert!(!default.contains("precision"), "{default}");
        let err = toml::from_str::<SftConfig>("precision = \"fp8\"").unwrap_err();
        assert!(err.to_string().contains("fp8"), "{err}");
    }
}
