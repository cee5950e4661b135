//! AdaLoRA adapters on the decoder: SVD-form triplets `B (A * E)` in the projection slots
//! (`LoraLinear::lora_e`), placed and initialised as peft does, read back from files, and
//! their orthogonality penalty. Training them (the rank allocator) is
//! [`crate::train::adalora`]'s; their keys, budget schedule and files are `adalora_files.rs`'s.
//!
//! Reference: peft 0.21 `tuners/adalora/layer.py` (`SVDLinear`: A, B ~ N(0, 0.02), E = 0),
//! `model.py` (`AdaLoraModel.forward`: `orth_reg_weight * mean ||P P^T - I||_F` over every A and
//! B).

use burn::module::{Module, Param};
use burn::nn::DropoutConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::model::decoder::CausalLm;
use crate::model::lora::LoraLinear;
use crate::peft::adalora_files::{AdaLoraAdapter, AdaLoraAdapterConfig, AdaLoraTriplet};
use crate::peft::files::{self, DenseTensor, LoraModule};
use crate::peft::lora::projections_mut;
use crate::peft::AdapterError as Error;

/// Every decoder projection with its layer and module kind (read-only).
pub(crate) fn projections<B: Backend>(
    model: &CausalLm<B>,
) -> Vec<(usize, LoraModule, &LoraLinear<B>)> {
    let mut out = Vec::new();
    for (i, l) in model.model.layers.iter().enumerate() {
        let (a, m) = (&l.self_attn, &l.mlp);
        out.push((i, LoraModule::QProj, &a.q_proj));
        out.push((i, LoraModule::KProj, &a.k_proj));
        out.push((i, LoraModule::VProj, &a.v_proj));
        out.push((i, LoraModule::OProj, &a.o_proj));
        out.push((i, LoraModule::GateProj, &m.gate_proj));
        out.push((i, LoraModule::UpProj, &m.up_proj));
        out.push((i, LoraModule::DownProj, &m.down_proj));
    }
    out
}

/// `[A, E, B]` of an AdaLoRA projection.
pub(crate) fn factors<B: Backend>(lin: &LoraLinear<B>) -> Option<[&Param<Tensor<B, 2>>; 3]> {
    Some([
        lin.lora_a.as_ref()?,
        lin.lora_e.as_ref()?,
        lin.lora_b.as_ref()?,
    ])
}

/// peft's orthogonality penalty without its weight: the mean over every A and B of
/// `||A A^T - I||_F` and `||B^T B - I||_F` (Frobenius norm, not squared).
pub fn orth_penalty<B: Backend>(model: &CausalLm<B>) -> Option<Tensor<B, 1>> {
    let mut sum: Option<Tensor<B, 1>> = None;
    let mut count = 0usize;
    for (_, _, lin) in projections(model) {
        let Some([a, _, b]) = factors(lin) else {
            continue;
        };
        let (a, b) = (a.val(), b.val());
        let r = a.dims()[0];
        if r == 0 {
            continue;
        }
        let eye: Vec<f32> = (0..r * r)
            .map(|i| if i % (r + 1) == 0 { 1.0 } else { 0.0 })
            .collect();
        let eye = Tensor::<B, 2>::from_data(TensorData::new(eye, [r, r]), &a.device());
        for cov in [
            a.clone().matmul(a.transpose()),
            b.clone().transpose().matmul(b),
        ] {
            let norm = cov.sub(eye.clone()).powi_scalar(2).sum().sqrt();
            sum = Some(match sum {
                Some(s) => s.add(norm),
                None => norm,
            });
            count += 1;
        }
    }
    sum.map(|s| s.div_scalar(count as f64))
}

/// Puts an AdaLoRA triplet into a projection slot (its base weight and bias stay).
pub(crate) fn install<B: Backend>(
    slot: &mut LoraLinear<B>,
    [a, e, b]: [Tensor<B, 2>; 3],
    scaling: f64,
    dropout: f64,
) {
    let placeholder = LoraLinear::new(slot.weight.val(), None);
    let mut lin = std::mem::replace(slot, placeholder).with_lora_tensors(a, b, scaling);
    lin.lora_e = Some(Param::from_tensor(e));
    lin.dropout = DropoutConfig::new(dropout).init();
    *slot = lin;
}

/// Freezes the model and adds rank-`init_r` adapters to the targeted projections as peft
/// initialises them (A, B ~ N(0, 0.02), E = 0), drawn from a ChaCha20 stream seeded with `seed`
/// in (layer, module) order. Returns the model and the number of adapted projections.
pub fn add_adalora<B: Backend>(
    model: CausalLm<B>,
    adapter: &AdaLoraAdapterConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(CausalLm<B>, usize), Error> {
    let mut model = model.no_grad();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut normal = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box-Muller; 1 - u keeps the logarithm finite.
                let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
                (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    };
    let r = adapter.params.init_r;
    let mut wrapped = 0;
    for (layer, module, slot) in projections_mut(&mut model) {
        let path = format!("model.layers.{layer}.{}", module.path());
        if !adapter.lora.targets(&path)? {
            continue;
        }
        let (out, inp) = (slot.out_features(), slot.in_features());
        let a = Tensor::from_data(TensorData::new(normal(r * inp), [r, inp]), device);
        let b = Tensor::from_data(TensorData::new(normal(out * r), [out, r]), device);
        let e = Tensor::zeros([r, 1], device);
        install(
            slot,
            [a, e, b],
            adapter.scaling(),
            adapter.lora.lora_dropout,
        );
        wrapped += 1;
    }
    Ok((model, wrapped))
}

/// Adds an adapter read from disk (peft's or runner's) to a model, as peft's
/// `PeftModel.from_pretrained` does: ranks as stored, `ranknum = init_r`; rank-0 projections
/// stay plain.
pub fn apply_adalora_adapter<B: Backend>(
    mut model: CausalLm<B>,
    adapter: &AdaLoraAdapter,
    device: &B::Device,
) -> Result<CausalLm<B>, Error> {
    let dev = |t: &DenseTensor| {
        Tensor::<B, 2>::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
    };
    for (layer, module, slot) in projections_mut(&mut model) {
        let Some(t) = adapter
            .triplets
            .iter()
            .find(|t| t.layer == layer && t.module == module)
        else {
            continue;
        };
        if t.a.shape[1] != slot.in_features() || t.b.shape[0] != slot.out_features() {
            return Err(files::Error::BadPair {
                layer,
                module: module.path(),
                message: format!(
                    "A {:?} / B {:?} do not fit a [{}, {}] projection",
                    t.a.shape,
                    t.b.shape,
                    slot.out_features(),
                    slot.in_features()
                ),
            }
            .into());
        }
        if t.rank() > 0 {
            let factors = [dev(&t.a), dev(&t.e), dev(&t.b)];
            install(slot, factors, adapter.config.scaling(), 0.0);
        }
    }
    Ok(model)
}

/// Host copies of every AdaLoRA triplet of `model`, full rank.
pub fn triplets<B: Backend>(model: &CausalLm<B>) -> Vec<AdaLoraTriplet> {
    let dense = |t: Tensor<B, 2>| {
        let d = t.into_data();
        DenseTensor {
            shape: d.shape.to_vec(),
            data: d.convert::<f32>().into_vec::<f32>().unwrap_or_default(),
        }
    };
    projections(model)
        .into_iter()
        .filter_map(|(layer, module, lin)| {
            let [a, e, b] = factors(lin)?;
            Some(AdaLoraTriplet {
                layer,
                module,
                a: dense(a.val()),
                e: dense(e.val()),
                b: dense(b.val()),
            })
        })
        .collect()
}
