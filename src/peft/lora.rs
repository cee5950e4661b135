//! Preparing the decoder for each method: LoRA adapters placed and initialised as peft does
//! (`tuners/lora/layer.py` `reset_lora_parameters`: A kaiming-uniform with a = sqrt(5), i.e.
//! U(-1/sqrt(in), 1/sqrt(in)), B zeros; scaling alpha/r or alpha/sqrt(r) with rsLoRA; DoRA's
//! magnitude `||W + scaling B A||` per output row, `tuners/lora/dora.py`), QLoRA's frozen base held
//! in NF4 on the device (bitsandbytes `Linear4bit` quantizes every linear layer but `lm_head` and
//! dequantizes for each matmul), loading a peft adapter onto the model, and the export of
//! adapters and merged weights.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::nn::DropoutConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::model::decoder::CausalLm;
use crate::model::lora::LoraLinear;
use crate::peft::files::{
    fuse_gate_up, write_adapter_with_magnitudes, DenseTensor, LoraAdapter, LoraAdapterConfig,
    LoraModule, LoraPair,
};
use crate::peft::AdapterError as Error;

/// Every decoder projection with its layer and peft module kind.
pub fn projections_mut<B: Backend>(
    model: &mut CausalLm<B>,
) -> Vec<(usize, LoraModule, &mut LoraLinear<B>)> {
    let mut out = Vec::new();
    for (i, l) in model.model.layers.iter_mut().enumerate() {
        let a = &mut l.self_attn;
        out.push((i, LoraModule::QProj, &mut a.q_proj));
        out.push((i, LoraModule::KProj, &mut a.k_proj));
        out.push((i, LoraModule::VProj, &mut a.v_proj));
        out.push((i, LoraModule::OProj, &mut a.o_proj));
        let m = &mut l.mlp;
        out.push((i, LoraModule::GateProj, &mut m.gate_proj));
        out.push((i, LoraModule::UpProj, &mut m.up_proj));
        out.push((i, LoraModule::DownProj, &mut m.down_proj));
    }
    out
}

fn take_linear<B: Backend>(slot: &mut LoraLinear<B>) -> LoraLinear<B> {
    // A 1x1 stand-in: cheaper than copying (or dequantizing) the real weight.
    let placeholder = LoraLinear::new(Tensor::zeros([1, 1], &slot.weight.device()), None);
    std::mem::replace(slot, placeholder)
}

/// Freezes the whole model and adds adapters to the projections `adapter` targets. A is drawn
/// from a ChaCha20 stream seeded with `seed` (in layer, module order), so the initial adapter
/// does not depend on the backend. Returns the model and the number of wrapped projections.
pub fn add_lora<B: Backend>(
    model: CausalLm<B>,
    adapter: &LoraAdapterConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(CausalLm<B>, usize), Error> {
    let mut model = model.no_grad();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (r, scaling) = (adapter.r, adapter.scaling());
    let fused_gate_up = model.config.fused_gate_up();
    let mut wrapped = 0;
    for (layer, module, slot) in projections_mut(&mut model) {
        let path = format!("model.layers.{layer}.{}", module.path());
        // GLM's gate and up are one `gate_up_proj` in transformers: peft's name targets both.
        let fused_path = format!("model.layers.{layer}.{}", LoraModule::GateUpProj.path());
        let halves_of_fused =
            fused_gate_up && matches!(module, LoraModule::GateProj | LoraModule::UpProj);
        if !(adapter.targets(&path)? || (halves_of_fused && adapter.targets(&fused_path)?)) {
            continue;
        }
        let (out, inp) = (slot.out_features(), slot.in_features());
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..r * inp)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Tensor::<B, 2>::from_data(TensorData::new(a, [r, inp]), device);
        let b = Tensor::<B, 2>::zeros([out, r], device);
        let mut lin = take_linear(slot).with_lora_tensors(a, b, scaling);
        lin.dropout = DropoutConfig::new(adapter.lora_dropout).init();
        if adapter.use_dora {
            lin = lin.with_dora();
        }
        *slot = lin;
        wrapped += 1;
    }
    Ok((model, wrapped))
}

/// The adapters of `model` as peft pairs (host copies).
pub fn lora_pairs<B: Backend>(model: &CausalLm<B>) -> Vec<LoraPair> {
    let dense = |t: Tensor<B, 2>| {
        let d = t.into_data();
        DenseTensor {
            shape: d.shape.to_vec(),
            data: d.convert::<f32>().into_vec::<f32>().unwrap_or_default(),
        }
    };
    let mut me = model.clone();
    let mut pairs = Vec::new();
    for (layer, module, lin) in projections_mut(&mut me) {
        if let (Some(a), Some(b)) = (&lin.lora_a, &lin.lora_b) {
            pairs.push(LoraPair {
                layer,
                module,
                a: dense(a.val()),
                b: dense(b.val()),
            });
        }
    }
    pairs
}

/// Writes the adapters of `model` (and DoRA's magnitudes) as a peft folder in `dir`; for a
/// model with a fused `gate_up_proj` (GLM) with peft's names for it ([`fuse_gate_up`]).
pub fn write_model_adapter<B: Backend>(
    dir: &std::path::Path,
    config: &LoraAdapterConfig,
    model: &CausalLm<B>,
) -> Result<(), crate::peft::files::Error> {
    let (pairs, magnitudes) = (lora_pairs(model), lora_magnitudes(model));
    if !model.config.fused_gate_up() {
        return write_adapter_with_magnitudes(dir, config, &pairs, &magnitudes);
    }
    let mut config = config.clone();
    let (pairs, magnitudes) = fuse_gate_up(&mut config, pairs, magnitudes);
    write_adapter_with_magnitudes(dir, &config, &pairs, &magnitudes)
}

/// The model with every adapter folded into its base weight (`W + scaling B A`).
pub fn merged<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    for (_, _, slot) in projections_mut(&mut model) {
        *slot = take_linear(slot).merged();
    }
    model
}

/// Folds the adapters into the base weights and writes the result as an HF folder
/// `out_dir/merged` (the `merged/` output of the LoRA, QLoRA and AdaLoRA trainers); returns it.
pub fn save_merged<B: Backend>(
    out_dir: &std::path::Path,
    config: &crate::model::config::ModelConfig,
    model: CausalLm<B>,
    dtype: crate::model::hf::DType,
) -> Result<std::path::PathBuf, Error> {
    let dir = out_dir.join("merged");
    crate::model::hf::save_hf_folder(&dir, config, &merged(model).to_hf_tensors(), dtype)?;
    Ok(dir)
}

/// The policy to sample from: the adapters folded into a copy of the base weights, so decoding
/// runs one GEMM a projection instead of three (`None` without adapters, or over an NF4 base,
/// whose merge would hold a full-precision copy of every projection).
pub fn merged_for_sampling<B: Backend>(model: &CausalLm<B>) -> Option<CausalLm<B>> {
    let mut probe = model.clone();
    let projections = projections_mut(&mut probe);
    let has_adapter = projections.iter().any(|(_, _, l)| l.lora_b.is_some());
    let quantized = projections
        .iter()
        .any(|(_, _, l)| matches!(l.weight, crate::model::nf4_linear::BaseWeight::Nf4(_)));
    (has_adapter && !quantized).then(|| merged(model.clone()))
}

/// DoRA magnitude vectors of `model` by (layer, module) (host copies); empty without DoRA.
pub fn lora_magnitudes<B: Backend>(
    model: &CausalLm<B>,
) -> BTreeMap<(usize, LoraModule), DenseTensor> {
    let mut me = model.clone();
    let mut out = BTreeMap::new();
    for (layer, module, lin) in projections_mut(&mut me) {
        if let Some(m) = &lin.magnitude {
            let d = m.val().into_data();
            let data = d.convert::<f32>().into_vec::<f32>().unwrap_or_default();
            out.insert(
                (layer, module),
                DenseTensor {
                    shape: vec![data.len()],
                    data,
                },
            );
        }
    }
    out
}

/// Holds the base weight of every decoder projection in NF4 on the device (QLoRA). `lm_head` and
/// embeddings stay in full precision, as bitsandbytes leaves them.
pub fn quantize_base_nf4<B: Backend>(mut model: CausalLm<B>) -> Result<CausalLm<B>, Error> {
    for (_, _, slot) in projections_mut(&mut model) {
        *slot = take_linear(slot).quantize_base_nf4()?;
    }
    Ok(model)
}

/// Puts a peft adapter (LoRA or DoRA) onto the matching projections of a frozen `model`,
/// unmerged. Errors name the projection whose shapes disagree.
pub fn apply_adapter<B: Backend>(
    model: CausalLm<B>,
    adapter: &LoraAdapter,
    device: &B::Device,
) -> Result<CausalLm<B>, Error> {
    let mut model = model.no_grad();
    let scaling = adapter.config.scaling();
    let t2 = |d: &DenseTensor| {
        Tensor::<B, 2>::from_data(TensorData::new(d.data.clone(), d.shape.clone()), device)
    };
    for (layer, module, slot) in projections_mut(&mut model) {
        let Some(pair) = adapter
            .pairs
            .iter()
            .find(|p| p.layer == layer && p.module == module)
        else {
            continue;
        };
        let (out, inp) = (slot.out_features(), slot.in_features());
        if pair.a.shape[1] != inp || pair.b.shape[0] != out {
            return Err(Error::Mismatch(format!(
                "layer {layer} {}: lora_A {:?} / lora_B {:?} do not fit a [{out}, {inp}] weight",
                module.path(),
                pair.a.shape,
                pair.b.shape
            )));
        }
        let mut lin = take_linear(slot).with_lora_tensors(t2(&pair.a), t2(&pair.b), scaling);
        if let Some(m) = adapter.magnitudes.get(&(layer, module)) {
            let m = Tensor::<B, 1>::from_data(TensorData::new(m.data.clone(), [out]), device);
            lin = lin.with_magnitude(m);
        }
        *slot = lin;
    }
    Ok(model)
}
