//! Activation checkpointing changes memory, never results: gradients with `gradient_checkpointing
//! = true` or `"offload"` equal those of a pass that keeps every activation, bit for bit on the
//! CPU, for LoRA, DoRA, QLoRA, full fine-tuning and prompt tuning.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};

use crate::model::decoder::{CausalLm, GradientCheckpointing};
use crate::peft::files::LoraAdapterConfig;
use crate::peft::lora::{add_lora, projections_mut, quantize_base_nf4};
use crate::train::config::{Method, SftConfig};
use crate::train::data::make_batch;
use crate::train::sft::{training_base, CausalModel};
use crate::train::tests::{lora_cfg, losses, memorization_set, rng_lock, tiny, train, AD};

const MODES: [GradientCheckpointing; 3] = [
    GradientCheckpointing::Off,
    GradientCheckpointing::Layers,
    GradientCheckpointing::Offload,
];

/// Every gradient the backward pass gave, in the order of the module's parameters.
struct CollectGrads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    out: Vec<Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = param.val().grad(self.grads) {
            self.out
                .push(g.into_data().convert::<f32>().to_vec().unwrap());
        }
    }
}

/// The loss of two padded rows and the gradients of every trainable parameter of `model`.
fn loss_and_grads<M: CausalModel<AD> + Module<AD>>(model: &M) -> (f32, Vec<Vec<f32>>) {
    let data = memorization_set();
    let batch = make_batch::<AD>(&data, &[0, 3], 0, &Default::default());
    let loss = model.summed_loss(&batch);
    let value = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let grads = loss.backward();
    let mut collect = CollectGrads::<AD> {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut collect);
    (value, collect.out)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    Lora,
    Dora,
    Qlora,
    Full,
}

/// The tiny model set up for `case` with `mode`; LoRA's B factors get random values so that
/// the A factors have gradients too.
fn model_for(case: Case, mode: GradientCheckpointing) -> CausalLm<AD> {
    let (config, tensors) = tiny();
    let cfg = SftConfig {
        gradient_checkpointing: mode,
        ..lora_cfg(1)
    };
    let device = Default::default();
    let model = training_base::<AD>(&cfg, &config, &tensors, &device).unwrap();
    let model = match case {
        Case::Full => return model,
        Case::Qlora => quantize_base_nf4(model).unwrap(),
        Case::Lora | Case::Dora => model,
    };
    let mut adapter = LoraAdapterConfig::new(4, 8.0, cfg.target_modules.clone());
    adapter.use_dora = case == Case::Dora;
    let (mut model, wrapped) = add_lora(model, &adapter, 7, &device).unwrap();
    assert!(wrapped > 0);
    for (i, (_, _, slot)) in projections_mut(&mut model).into_iter().enumerate() {
        let b = slot.lora_b.take().expect("a LoRA B factor");
        let random = Tensor::<AD, 2>::random(
            b.val().dims(),
            Distribution::Normal(0.0, 0.1 + i as f64 * 1e-3),
            &device,
        );
        slot.lora_b = Some(Param::from_tensor(random.require_grad()));
    }
    model
}

fn assert_modes_agree(case: Case) {
    let _guard = rng_lock();
    <AD as burn::tensor::backend::Backend>::seed(&Default::default(), 5);
    let reference = loss_and_grads(&model_for(case, GradientCheckpointing::Off));
    assert!(!reference.1.is_empty(), "{case:?}: no gradients");
    assert!(
        reference.1.iter().flatten().any(|g| *g != 0.0),
        "{case:?}: all gradients are zero"
    );
    let recomputes = || crate::backend::checkpoint::RECOMPUTES.with(|n| n.get());
    assert_eq!(
        recomputes(),
        0,
        "a pass without checkpointing recomputed layers"
    );
    for mode in &MODES[1..] {
        <AD as burn::tensor::backend::Backend>::seed(&Default::default(), 5);
        let before = recomputes();
        let got = loss_and_grads(&model_for(case, *mode));
        // The tiny model has two layers: each ran again in the backward pass.
        assert_eq!(
            recomputes() - before,
            2,
            "{case:?} {mode}: layers recomputed"
        );
        assert_eq!(got.0, reference.0, "{case:?} {mode}: loss");
        assert_eq!(got.1.len(), reference.1.len(), "{case:?} {mode}: count");
        for (i, (g, r)) in got.1.iter().zip(&reference.1).enumerate() {
            assert_eq!(g, r, "{case:?} {mode}: gradient of parameter {i}");
        }
    }
}

#[test]
fn checkpointed_lora_gradients_equal_plain_ones() {
    assert_modes_agree(Case::Lora);
}

#[test]
fn checkpointed_dora_gradients_equal_plain_ones() {
    assert_modes_agree(Case::Dora);
}

#[test]
fn checkpointed_qlora_gradients_equal_plain_ones() {
    assert_modes_agree(Case::Qlora);
}

#[test]
fn checkpointed_full_gradients_equal_plain_ones() {
    assert_modes_agree(Case::Full);
}

fn trained_bytes(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap()
}

/// Whole training runs (accumulation, clipping, AdamW) give the same losses and weights.
#[test]
fn checkpointed_training_runs_match_plain_ones() {
    for (method, file) in [
        (Method::Lora, "adapter/adapter_model.safetensors"),
        (Method::PromptTuning, "adapter/adapter_model.safetensors"),
        (Method::Full, "model/model.safetensors"),
    ] {
        let dirs: Vec<_> = MODES.iter().map(|_| tempfile::tempdir().unwrap()).collect();
        for (mode, dir) in MODES.iter().zip(&dirs) {
            let cfg = SftConfig {
                method,
                gradient_checkpointing: *mode,
                num_virtual_tokens: 4,
                ..lora_cfg(3)
            };
            train(&cfg, dir.path());
        }
        let reference = (losses(dirs[0].path()), trained_bytes(dirs[0].path(), file));
        assert_eq!(reference.0.len(), 3);
        for (mode, dir) in MODES.iter().zip(&dirs).skip(1) {
            assert_eq!(losses(dir.path()), reference.0, "{method:?} {mode}: losses");
            assert!(
                trained_bytes(dir.path(), file) == reference.1,
                "{method:?} {mode}: trained weights differ"
            );
        }
    }
}

/// With dropout the recompute must draw the masks the forward pass drew: the checkpointed
/// gradient then matches central differences of the (equally seeded) loss along a random
/// direction of the LoRA B factors.
#[test]
fn checkpointed_gradients_with_dropout_match_finite_differences() {
    let _guard = rng_lock();
    let device = Default::default();
    let seeded_loss = |model: &CausalLm<AD>| {
        <AD as burn::tensor::backend::Backend>::seed(&device, 9);
        loss_and_grads(model)
    };
    let mut model = model_for(Case::Lora, GradientCheckpointing::Layers);
    for (_, _, slot) in projections_mut(&mut model) {
        slot.dropout = burn::nn::DropoutConfig::new(0.3).init();
    }
    let before = crate::backend::checkpoint::RECOMPUTES.with(|n| n.get());
    let (_, grads) = seeded_loss(&model);
    assert!(crate::backend::checkpoint::RECOMPUTES.with(|n| n.get()) > before);
    // Parameter order of the visitor: per projection A then B; the B gradients are every
    // second one.
    let b_grads: Vec<&Vec<f32>> = grads.iter().skip(1).step_by(2).collect();
    let direction: Vec<Vec<f32>> = b_grads
        .iter()
        .enumerate()
        .map(|(i, g)| {
            (0..g.len())
                .map(|j| (((i * 131 + j * 71) % 17) as f32 - 8.0) / 8.0)
                .collect()
        })
        .collect();
    let analytic: f64 = b_grads
        .iter()
        .zip(&direction)
        .flat_map(|(g, d)| g.iter().zip(d).map(|(a, b)| f64::from(a * b)))
        .sum();
    let shifted = |eps: f32| {
        let mut m = model.clone();
        for ((_, _, slot), d) in projections_mut(&mut m).into_iter().zip(&direction) {
            let b = slot.lora_b.take().unwrap().val();
            let shape = b.dims();
            let step = Tensor::<AD, 2>::from_data(
                burn::tensor::TensorData::new(d.iter().map(|x| x * eps).collect(), shape),
                &device,
            );
            slot.lora_b = Some(Param::from_tensor((b + step).detach().require_grad()));
        }
        f64::from(seeded_loss(&m).0)
    };
    let eps = 1e-2;
    let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * f64::from(eps));
    assert!(
        (numeric - analytic).abs() <= 2e-2 * analytic.abs().max(1.0),
        "directional derivative: analytic {analytic}, central difference {numeric}"
    );
}

/// QLoRA's loader quantizes each projection from the host values: the same NF4 model, and the
/// same logits, as quantizing a loaded dense model.
#[test]
fn nf4_loading_equals_quantizing_the_dense_model() {
    let (config, tensors) = tiny();
    let device = Default::default();
    let dense =
        CausalLm::<crate::train::tests::TB>::from_hf_tensors(&config, &tensors, &device).unwrap();
    let quantized = quantize_base_nf4(dense).unwrap();
    let loaded =
        CausalLm::<crate::train::tests::TB>::from_hf_tensors_nf4(&config, &tensors, &device)
            .unwrap();
    let ids = Tensor::<crate::train::tests::TB, 2, burn::tensor::Int>::from_data(
        [[1, 5, 9, 13, 2]],
        &device,
    );
    let pos = Tensor::<crate::train::tests::TB, 2, burn::tensor::Int>::from_data(
        [[0, 1, 2, 3, 4]],
        &device,
    );
    let logits = |m: &CausalLm<crate::train::tests::TB>| {
        m.forward(ids.clone(), pos.clone(), None, None)
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(logits(&loaded), logits(&quantized));
    for (a, b) in loaded.model.layers.iter().zip(&quantized.model.layers) {
        assert_eq!(
            a.mlp.up_proj.weight.device_bytes(),
            b.mlp.up_proj.weight.device_bytes()
        );
        assert!(matches!(
            a.mlp.up_proj.weight,
            crate::model::nf4_linear::BaseWeight::Nf4(_)
        ));
    }
}
