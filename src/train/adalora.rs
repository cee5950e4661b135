//! AdaLoRA on the decoder: SVD-form adapters `B (A * E)` in the projection slots
//! (`LoraLinear::lora_e`), the orthogonality regularizer, the rank allocator that prunes the
//! least important singular values to a shrinking budget, and the peft-format outputs.
//!
//! Reference: Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
//! Fine-Tuning"; peft 0.21 `tuners/adalora/layer.py` (`SVDLinear`: A, B ~ N(0, 0.02), E = 0,
//! output `x (A * E)^T B^T * alpha / (ranknum + 1e-5)`; `RankAllocator`), `model.py`
//! (`AdaLoraModel.forward`: `orth_reg_weight * mean ||P P^T - I||_F` over every A and B;
//! `update_and_allocate`, called after `optimizer.step()` and before `zero_grad()` with the
//! 0-based step). Importance uses the gradients the optimizer stepped with (clipped, as torch's
//! in-place `clip_grad_norm_` leaves them) and the parameters after the step, as peft does.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::hf::{load_safetensors_file, save_safetensors, DType, HostTensor};
use crate::peft::adalora::{add_adalora, factors, orth_penalty, projections, triplets};
use crate::peft::adalora_files::{
    keep_mask, pattern_key, write_adalora_adapter, AdaLoraAdapterConfig, BudgetSchedule,
};
use crate::peft::files::{LoraAdapterConfig, LoraModule};
use crate::peft::lora::{projections_mut, save_merged};
use crate::train::objective::Objective;
use crate::train::sft::{train_objective, CausalModel, LoopCtx, SftReport};
use crate::train::train_loop::StepHook;
use crate::train::Error;

/// The allocator's state file in a checkpoint folder.
const STATE_FILE: &str = "adalora_state.safetensors";

type Key = (usize, LoraModule);

/// The decoder with AdaLoRA adapters and the weight of their orthogonality penalty.
#[derive(Module, Debug)]
pub struct AdaLoraLm<B: Backend> {
    pub lm: CausalLm<B>,
    pub orth_reg_weight: f64,
}

impl<B: Backend> CausalModel<B> for AdaLoraLm<B> {
    fn logits(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.lm.logits(input_ids)
    }

    fn regularizer(&self) -> Option<Tensor<B, 1>> {
        if self.orth_reg_weight == 0.0 {
            return None;
        }
        orth_penalty(&self.lm).map(|r| r.mul_scalar(self.orth_reg_weight))
    }
}

/// Sensitivity and uncertainty EMAs of one factor.
#[derive(Debug, Clone)]
struct Ema<B: Backend> {
    ipt: Tensor<B, 2>,
    unc: Tensor<B, 2>,
}

/// peft's `RankAllocator` plus the step logic of `AdaLoraModel.update_and_allocate`, on the
/// inner backend, keyed by (layer, module).
#[derive(Debug)]
pub struct RankAllocator<B: Backend> {
    pub schedule: BudgetSchedule,
    /// The adapter settings; `rank_pattern` is the last allocation.
    pub config: AdaLoraAdapterConfig,
    keys: Vec<Key>,
    ema: BTreeMap<Key, [Ema<B>; 3]>,
    grads: BTreeMap<Key, [Tensor<B, 2>; 3]>,
}

impl<B: Backend> RankAllocator<B> {
    /// For the adapters of `model`; `config.params.total_step` must be set.
    pub fn new<M: Backend>(model: &CausalLm<M>, config: AdaLoraAdapterConfig) -> Self {
        let keys: Vec<Key> = projections(model)
            .into_iter()
            .filter(|(_, _, lin)| factors(lin).is_some())
            .map(|(l, m, _)| (l, m))
            .collect();
        let total = config.params.total_step.unwrap_or(0);
        Self {
            schedule: BudgetSchedule::new(&config.params, keys.len(), total),
            config,
            keys,
            ema: BTreeMap::new(),
            grads: BTreeMap::new(),
        }
    }

    /// The current rank pattern by (layer, module).
    fn pattern(&self) -> Option<BTreeMap<Key, Vec<bool>>> {
        let p = self.config.rank_pattern.as_ref()?;
        Some(
            self.keys
                .iter()
                .filter_map(|&(l, m)| Some(((l, m), p.get(&pattern_key(l, m))?.clone())))
                .collect(),
        )
    }

    fn update_ipt<AB: AutodiffBackend<InnerBackend = B>>(&mut self, model: &CausalLm<AB>) {
        let (b1, b2) = (self.config.params.beta1, self.config.params.beta2);
        for (layer, module, lin) in projections(model) {
            let (Some(params), Some(grads)) = (factors(lin), self.grads.get(&(layer, module)))
            else {
                continue;
            };
            let old = self.ema.remove(&(layer, module));
            let new: [Ema<B>; 3] = std::array::from_fn(|i| {
                let ipt = params[i].val().inner().mul(grads[i].clone()).abs();
                let (ei, eu) = match &old {
                    Some(o) => (o[i].ipt.clone(), o[i].unc.clone()),
                    None => (ipt.zeros_like(), ipt.zeros_like()),
                };
                let ei = ei.mul_scalar(b1).add(ipt.clone().mul_scalar(1.0 - b1));
                let eu = eu
                    .mul_scalar(b2)
                    .add(ipt.sub(ei.clone()).abs().mul_scalar(1.0 - b2));
                Ema { ipt: ei, unc: eu }
            });
            self.ema.insert((layer, module), new);
        }
    }

    /// peft's `mask_to_budget`: a triplet's score is `s(E) + mean_in s(A row) + mean_out s(B col)`
    /// with `s = ipt EMA * uncertainty EMA`; all but the `budget` best are dropped.
    fn mask_to_budget(&self, budget: usize) -> BTreeMap<Key, Vec<bool>> {
        let mut parts = Vec::new();
        let mut ranks = Vec::new();
        for key in &self.keys {
            let Some(e) = self.ema.get(key) else {
                continue;
            };
            let s = |i: usize| e[i].ipt.clone().mul(e[i].unc.clone());
            let r = e[1].ipt.dims()[0];
            let a = s(0).mean_dim(1);
            let b = s(2).mean_dim(0).reshape([r, 1]);
            parts.push(s(1).add(a.add(b)).reshape([r]));
            ranks.push((*key, r));
        }
        if parts.is_empty() {
            return BTreeMap::new();
        }
        let scores = Tensor::cat(parts, 0)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default();
        let keep = keep_mask(&scores, budget);
        let mut at = 0;
        ranks
            .into_iter()
            .map(|(key, r)| {
                at += r;
                (key, keep[at - r..at].to_vec())
            })
            .collect()
    }

    /// Zeroes the E entries `pattern` drops (peft's `masked_fill_` under `no_grad`).
    pub fn apply_pattern<AB: AutodiffBackend<InnerBackend = B>>(
        mut model: AdaLoraLm<AB>,
        pattern: &BTreeMap<Key, Vec<bool>>,
    ) -> AdaLoraLm<AB> {
        for (layer, module, slot) in projections_mut(&mut model.lm) {
            let Some(keep) = pattern.get(&(layer, module)) else {
                continue;
            };
            let Some(e) = slot.lora_e.take() else {
                continue;
            };
            let mask: Vec<f32> = keep.iter().map(|&k| f32::from(u8::from(k))).collect();
            slot.lora_e = Some(e.map(|t| {
                let inner = t.inner();
                let mask = Tensor::<B, 2>::from_data(
                    TensorData::new(mask, [keep.len(), 1]),
                    &inner.device(),
                );
                Tensor::from_inner(inner.mul(mask)).require_grad()
            }));
        }
        model
    }

    fn set_pattern(&mut self, pattern: &BTreeMap<Key, Vec<bool>>) {
        self.config.rank_pattern = Some(
            pattern
                .iter()
                .map(|(&(l, m), keep)| (pattern_key(l, m), keep.clone()))
                .collect(),
        );
    }

    /// The model with the current rank pattern applied (what the saved adapter holds).
    pub fn masked<AB: AutodiffBackend<InnerBackend = B>>(
        &self,
        model: AdaLoraLm<AB>,
    ) -> AdaLoraLm<AB> {
        match self.pattern() {
            Some(p) => Self::apply_pattern(model, &p),
            None => model,
        }
    }

    /// The adapter in peft's format, tensors cut to the rank pattern.
    pub fn write_adapter<M: Backend>(&self, model: &CausalLm<M>, dir: &Path) -> Result<(), Error> {
        Ok(write_adalora_adapter(dir, &self.config, &triplets(model))?)
    }
}

impl<AB: AutodiffBackend> StepHook<AB, AdaLoraLm<AB>> for RankAllocator<AB::InnerBackend> {
    fn before_step(
        &mut self,
        model: &AdaLoraLm<AB>,
        grads: &GradientsParams,
        grad_scale: Option<&Tensor<AB::InnerBackend, 1>>,
    ) {
        self.grads.clear();
        for (layer, module, lin) in projections(&model.lm) {
            let Some(params) = factors(lin) else {
                continue;
            };
            let g: [Tensor<AB::InnerBackend, 2>; 3] = std::array::from_fn(|i| {
                let g = grads
                    .get::<AB::InnerBackend, 2>(params[i].id)
                    .unwrap_or_else(|| params[i].val().inner().zeros_like());
                match grad_scale {
                    Some(s) => g.mul(s.clone().unsqueeze::<2>()),
                    None => g,
                }
            });
            self.grads.insert((layer, module), g);
        }
    }

    fn after_step(&mut self, mut model: AdaLoraLm<AB>, index: u64) -> AdaLoraLm<AB> {
        let final_start = self.schedule.final_start();
        if index < final_start {
            self.update_ipt(&model.lm);
            let (budget, mask) = self.schedule.at(index);
            if mask {
                let pattern = self.mask_to_budget(budget);
                model = Self::apply_pattern(model, &pattern);
                self.set_pattern(&pattern);
            }
        } else if index == final_start {
            let (budget, _) = self.schedule.at(index);
            let pattern = self.mask_to_budget(budget);
            model = Self::apply_pattern(model, &pattern);
            self.set_pattern(&pattern);
            self.ema.clear();
        } else {
            model = self.masked(model);
        }
        self.grads.clear();
        model
    }

    fn save(&self, model: &AdaLoraLm<AB>, dir: &Path) -> Result<(), Error> {
        self.write_adapter(&model.lm, &dir.join("adapter"))?;
        let host = |t: &Tensor<AB::InnerBackend, 2>| {
            let d = t.clone().into_data();
            HostTensor::new(
                d.shape.to_vec(),
                d.convert::<f32>().into_vec::<f32>().unwrap_or_default(),
            )
        };
        let mut out = BTreeMap::new();
        for ((layer, module), emas) in &self.ema {
            for (factor, e) in ['A', 'E', 'B'].into_iter().zip(emas) {
                let name = format!("{layer}.{}.{factor}", module.path());
                out.insert(format!("ipt.{name}"), host(&e.ipt));
                out.insert(format!("unc.{name}"), host(&e.unc));
            }
        }
        Ok(save_safetensors(dir.join(STATE_FILE), &out, DType::F32)?)
    }

    fn load(&mut self, dir: &Path) -> Result<(), Error> {
        let saved = crate::peft::adalora_files::read_adalora_adapter(&dir.join("adapter"))?;
        self.config.rank_pattern = saved.config.rank_pattern;
        let tensors = load_safetensors_file(&dir.join(STATE_FILE))?;
        self.ema.clear();
        let device = Default::default();
        for &(layer, module) in &self.keys {
            let get = |kind: &str, factor: char| {
                let t = tensors.get(&format!("{kind}.{layer}.{}.{factor}", module.path()))?;
                Some(Tensor::<AB::InnerBackend, 2>::from_data(
                    TensorData::new(t.data.clone(), t.shape.clone()),
                    &device,
                ))
            };
            let emas: Option<Vec<Ema<AB::InnerBackend>>> = ['A', 'E', 'B']
                .into_iter()
                .map(|f| {
                    Some(Ema {
                        ipt: get("ipt", f)?,
                        unc: get("unc", f)?,
                    })
                })
                .collect();
            if let Some(Ok(emas)) = emas.map(<[Ema<_>; 3]>::try_from) {
                self.ema.insert((layer, module), emas);
            }
        }
        Ok(())
    }
}

/// The adapter settings of a run: the stage's LoRA keys, its `adalora` table, and
/// `total_step` defaulting to the planned steps.
pub(crate) fn adapter_config<O: Objective + ?Sized>(
    ctx: &LoopCtx<'_, O>,
    base_name: Option<String>,
) -> Result<AdaLoraAdapterConfig, Error> {
    let cfg = ctx.cfg;
    let planned = ctx.step_plan().len() as u64;
    let mut params = cfg.adalora.clone();
    params
        .check(planned)
        .map_err(|(key, message)| Error::Config { key, message })?;
    params.total_step = Some(params.total_step.unwrap_or(planned));
    let mut lora =
        LoraAdapterConfig::new(params.init_r, cfg.lora_alpha, cfg.target_modules.clone());
    lora.lora_dropout = cfg.lora_dropout;
    lora.base_model_name_or_path = base_name;
    Ok(AdaLoraAdapterConfig {
        lora,
        params,
        rank_pattern: None,
    })
}

/// The `method = "adalora"` branch of the SFT stage.
pub(crate) fn run<B: AutodiffBackend, O: Objective + ?Sized>(
    ctx: &LoopCtx<'_, O>,
    config: &ModelConfig,
    tensors: BTreeMap<String, HostTensor>,
    base_name: Option<String>,
    dtype: DType,
    device: &B::Device,
) -> Result<SftReport, Error> {
    let adapter = adapter_config(ctx, base_name)?;
    let model = crate::train::sft::training_base::<B>(ctx.cfg, config, &tensors, device)?;
    drop(tensors);
    let (lm, wrapped) = add_adalora(model, &adapter, ctx.cfg.seed, device)?;
    if wrapped == 0 {
        return Err(Error::NoTargets);
    }
    let model = AdaLoraLm {
        lm,
        orth_reg_weight: adapter.params.orth_reg_weight,
    };
    train_and_save(ctx, model, adapter, config, dtype, device)
}

/// Trains an AdaLoRA model and writes `adapter/` (peft format, cut to the rank pattern) and
/// `merged/` (base + the same masked adapter).
pub(crate) fn train_and_save<B: AutodiffBackend, O: Objective + ?Sized>(
    ctx: &LoopCtx<'_, O>,
    model: AdaLoraLm<B>,
    adapter: AdaLoraAdapterConfig,
    config: &ModelConfig,
    dtype: DType,
    device: &B::Device,
) -> Result<SftReport, Error> {
    let mut alloc = RankAllocator::<B::InnerBackend>::new(&model.lm, adapter);
    let (model, mut report) =
        train_objective::<B, _, O>(ctx, model, device, &|_, _| Ok(()), &mut alloc)?;
    let model = alloc.masked(model).valid();
    let adapter_dir = ctx.out_dir.join("adapter");
    alloc.write_adapter(&model.lm, &adapter_dir)?;
    let model_dir = save_merged(ctx.out_dir, config, model.lm, dtype)?;
    report.adapter_dir = Some(adapter_dir);
    report.model_dir = Some(model_dir);
    Ok(report)
}

#[cfg(test)]
mod tests;
