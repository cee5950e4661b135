//! Parity of AdaLoRA with peft 0.21 (fixtures from `scripts/make_adalora_fixtures.py`, on the
//! tiny Qwen2 and batch of `sft_lora_grads.safetensors`): one step's loss and gradients, ten
//! steps of rank allocation, and adapters crossing between peft and runner.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};

use super::*;
use crate::model::init::tiny_qwen2_config;
use crate::peft::adalora::{apply_adalora_adapter, install};
use crate::peft::adalora_files::{read_adalora_adapter, AdaLoraParams};
use crate::peft::files::TargetModules;
use crate::train::config::{Method, SftConfig};
use crate::train::data::{make_batch, summed_cross_entropy};
use crate::train::metrics_log::read_metrics;
use crate::train::schedule::Schedule;
use crate::train::tests::{
    fixture_examples, fixture_tensors, memorization_set, rng_lock, tiny, SHAPE,
};
use crate::train::{train_sft, BaseModel};

use crate::testing::AD;
use crate::testing::TB;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sft");

/// The fixture model's config and base tensors (from the LoRA fixture).
fn fixture_base() -> (ModelConfig, BTreeMap<String, HostTensor>) {
    let (floats, _) = fixture_tensors("sft_lora_grads.safetensors");
    let base = floats
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("base.").map(|n| (n.to_string(), v.clone())))
        .collect();
    let mut config = tiny_qwen2_config(SHAPE);
    config.rope_theta = 10_000.0;
    (config, base)
}

/// peft's name of a factor in the fixtures: `{prefix}base_model.model.model.layers.{i}.{path}.lora_{f}`.
fn fixture_name(prefix: &str, layer: usize, module: LoraModule, factor: char) -> String {
    format!(
        "{prefix}{}",
        crate::peft::adalora_files::tensor_name(layer, module, factor)
    )
}

/// The base with rank-4 adapters on every projection, factors from `floats` under `prefix`.
fn model_from<B: Backend>(
    floats: &BTreeMap<String, HostTensor>,
    prefix: &str,
    device: &B::Device,
) -> AdaLoraLm<B> {
    let (config, base) = fixture_base();
    let mut lm = CausalLm::<B>::from_hf_tensors(&config, &base, device)
        .unwrap()
        .no_grad();
    for (layer, module, slot) in projections_mut(&mut lm) {
        let t = |f: char| {
            let h = &floats[&fixture_name(prefix, layer, module, f)];
            Tensor::<B, 2>::from_data(TensorData::new(h.data.clone(), h.shape.clone()), device)
        };
        install(slot, [t('A'), t('E'), t('B')], 8.0 / (4.0 + 1e-5), 0.0);
    }
    AdaLoraLm {
        lm,
        orth_reg_weight: 0.5,
    }
}

fn max_rel_diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    (diff, scale)
}

#[test]
fn adalora_loss_and_gradients_match_peft() {
    let (floats, _) = fixture_tensors("adalora_grads.safetensors");
    let (_, lora_ints) = fixture_tensors("sft_lora_grads.safetensors");
    let device = Default::default();
    let model = model_from::<AD>(&floats, "init.", &device);
    let batch = make_batch::<AD>(&fixture_examples(&lora_ints), &[0, 1], 0, &device);
    let ce = summed_cross_entropy(model.logits(batch.input_ids.clone()), &batch)
        .div_scalar(batch.num_items as f64);
    let loss = ce.clone().add(model.regularizer().unwrap());
    let scalar = |t: &Tensor<AD, 1>| t.clone().into_data().to_vec::<f32>().unwrap()[0];
    let (got_ce, got) = (scalar(&ce), scalar(&loss));
    let (want_ce, want) = (floats["loss_ce"].data[0], floats["loss"].data[0]);
    println!("adalora one step: loss {got} vs peft {want} (cross-entropy {got_ce} vs {want_ce})");
    assert!(((got_ce - want_ce) / want_ce).abs() < 1e-4);
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "loss {got} vs peft {want}"
    );
    let grads = loss.backward();
    let mut worst = 0f32;
    for (layer, module, lin) in projections(&model.lm) {
        let params = factors(lin).unwrap();
        for (param, f) in params.into_iter().zip(['A', 'E', 'B']) {
            let g = param
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let want = &floats[&fixture_name("grad.", layer, module, f)].data;
            let (diff, scale) = max_rel_diff(&g, want);
            assert!(
                scale > 0.0 && diff <= 1e-4 * scale,
                "layer {layer} {module:?} {f}: {diff} vs {scale}"
            );
            worst = worst.max(diff / scale);
        }
    }
    println!("adalora gradients of A, E, B: worst max|diff|/max|peft| = {worst:e}");
}

fn budget_cfg() -> SftConfig {
    SftConfig {
        method: Method::Adalora,
        learning_rate: 1e-2,
        lr_scheduler: Schedule::Constant,
        max_steps: Some(10),
        batch_size: 2,
        weight_decay: 0.01,
        logging_steps: 1,
        lora_alpha: 8.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        adalora: AdaLoraParams {
            init_r: 4,
            target_r: 2,
            tinit: 2,
            tfinal: 3,
            delta_t: 2,
            total_step: Some(10),
            ..AdaLoraParams::default()
        },
        ..SftConfig::default()
    }
}

fn logits_of<B: Backend>(model: &CausalLm<B>, ids: &[i64], device: &B::Device) -> Vec<f32> {
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [2, 7]), device);
    model.logits(ids).into_data().to_vec::<f32>().unwrap()
}

/// The fixture batch padded as peft saw it (row 1 has 5 real tokens, then padding that the
/// causal mask keeps from influencing them): only its first 5 positions are compared.
fn real_positions(logits: &[f32]) -> Vec<f32> {
    let v = 64;
    logits
        .chunks(7 * v)
        .enumerate()
        .flat_map(|(row, l)| l[..if row == 0 { 7 } else { 5 } * v].to_vec())
        .collect()
}

#[test]
fn rank_budget_and_adapter_match_peft_after_ten_steps() {
    let (floats, _) = fixture_tensors("adalora_budget.safetensors");
    let (_, lora_ints) = fixture_tensors("sft_lora_grads.safetensors");
    let examples = fixture_examples(&lora_ints);
    let device = Default::default();
    let cfg = budget_cfg();
    let dir = tempfile::tempdir().unwrap();
    let ctx = LoopCtx {
        cfg: &cfg,
        train: examples.as_slice(),
        eval: &[],
        out_dir: dir.path(),
        pad_id: 0,
        stop_after: None,
        progress: None,
    };
    let (config, base) = fixture_base();
    let adapter = adapter_config(&ctx, None).unwrap();
    let report = {
        let _guard = rng_lock();
        let model = model_from::<AD>(&floats, "init.", &device);
        train_and_save(&ctx, model, adapter, &config, DType::F32, &device).unwrap()
    };
    // Per-step loss (cross-entropy + orthogonality penalty), as peft's loop computed it.
    let losses: Vec<f64> = read_metrics(&report.metrics_path)
        .unwrap()
        .iter()
        .filter_map(|r| r.loss)
        .collect();
    let want = &floats["losses"].data;
    assert_eq!(losses.len(), want.len());
    for (step, (g, w)) in losses.iter().zip(want).enumerate() {
        println!("step {step}: loss {g:.6} vs peft {w:.6}");
        assert!(((g - *w as f64) / *w as f64).abs() < 1e-4, "step {step}");
    }
    // The final rank pattern equals peft's, entry by entry.
    let ours = read_adalora_adapter(&dir.path().join("adapter")).unwrap();
    let peft = read_adalora_adapter(&Path::new(FIXTURES).join("adalora_adapter")).unwrap();
    let (ours_p, peft_p) = (
        ours.config.rank_pattern.clone().unwrap(),
        peft.config.rank_pattern.clone().unwrap(),
    );
    let kept = |p: &BTreeMap<String, Vec<bool>>| -> usize {
        p.values().map(|v| v.iter().filter(|&&k| k).count()).sum()
    };
    println!(
        "kept triplets: runner {} vs peft {} (of 56)",
        kept(&ours_p),
        kept(&peft_p)
    );
    assert_eq!(ours_p, peft_p);
    let (_, budget_ints) = fixture_tensors("adalora_budget.safetensors");
    let patterns = &budget_ints["patterns"];
    assert_eq!(
        patterns[9 * 56..].iter().filter(|&&k| k == 1).count(),
        kept(&ours_p)
    );
    // The saved (cut) tensors equal peft's, and the config carries peft's keys.
    assert_eq!(ours.triplets.len(), 14);
    for (a, b) in ours.triplets.iter().zip(&peft.triplets) {
        assert_eq!((a.layer, a.module), (b.layer, b.module));
        for (x, y, f) in [(&a.a, &b.a, 'A'), (&a.e, &b.e, 'E'), (&a.b, &b.b, 'B')] {
            assert_eq!(x.shape, y.shape, "{:?} {f}", a.module);
            let (diff, scale) = max_rel_diff(&x.data, &y.data);
            assert!(
                diff <= 1e-3 * scale.max(1e-3),
                "layer {} {:?} {f}: {diff} vs {scale}",
                a.layer,
                a.module
            );
        }
    }
    assert_eq!(ours.config.params, peft.config.params);
    assert_eq!(ours.config.scaling(), peft.config.scaling());
    // The runner adapter reloads onto the base with the merged model's logits, and with peft's
    // reloaded model's logits on the real positions.
    let ids: Vec<i64> = lora_ints["input_ids"].clone();
    let base_lm = CausalLm::<TB>::from_hf_tensors(&config, &base, &device).unwrap();
    let reloaded = apply_adalora_adapter(base_lm, &ours, &device).unwrap();
    let merged_t =
        crate::model::hf::load_hf_folder_tensors(report.model_dir.as_ref().unwrap()).unwrap();
    let merged_lm = CausalLm::<TB>::from_hf_tensors(&config, &merged_t, &device).unwrap();
    let (a, b) = (
        logits_of(&reloaded, &ids, &device),
        logits_of(&merged_lm, &ids, &device),
    );
    let (diff, scale) = max_rel_diff(&a, &b);
    assert!(diff <= 1e-4 * scale, "merged vs adapter logits: {diff}");
    let (peft_logits, _) = fixture_tensors("adalora_peft_logits.safetensors");
    let (diff, scale) = max_rel_diff(
        &real_positions(&a),
        &real_positions(&peft_logits["logits"].data),
    );
    println!("runner-trained adapter vs peft-trained adapter logits: max|diff| {diff:e} (max |logit| {scale})");
    assert!(diff <= 1e-3 * scale);
}

#[test]
fn peft_written_adapter_gives_peft_logits() {
    let adapter = read_adalora_adapter(&Path::new(FIXTURES).join("adalora_adapter")).unwrap();
    assert_eq!(adapter.config.params.init_r, 4);
    // layer 1 down_proj was pruned to rank 0: peft saves [0, in] / [out, 0] tensors.
    let zero = adapter
        .triplets
        .iter()
        .find(|t| t.layer == 1 && t.module == LoraModule::DownProj)
        .unwrap();
    assert_eq!(
        (zero.a.shape.clone(), zero.b.shape.clone()),
        (vec![0, 64], vec![32, 0])
    );
    let (config, base) = fixture_base();
    let device = Default::default();
    let lm = CausalLm::<TB>::from_hf_tensors(&config, &base, &device).unwrap();
    let lm = apply_adalora_adapter(lm, &adapter, &device).unwrap();
    let (_, ints) = fixture_tensors("sft_lora_grads.safetensors");
    let got = real_positions(&logits_of(&lm, &ints["input_ids"], &device));
    let (peft, _) = fixture_tensors("adalora_peft_logits.safetensors");
    let want = real_positions(&peft["logits"].data);
    let (diff, scale) = max_rel_diff(&got, &want);
    println!("peft adapter in runner: max|logit diff| {diff:e} (max |logit| {scale})");
    assert!(diff <= 1e-4 * scale.max(1.0), "{diff}");
    // runner -> disk -> runner keeps the adapter exactly.
    let dir = tempfile::tempdir().unwrap();
    write_adalora_adapter(dir.path(), &adapter.config, &adapter.triplets).unwrap();
    assert_eq!(read_adalora_adapter(dir.path()).unwrap(), adapter);
}

#[test]
fn adalora_stage_trains_prunes_and_exports() {
    let cfg = SftConfig {
        learning_rate: 3e-2,
        max_steps: Some(12),
        lora_alpha: 16.0,
        adalora: AdaLoraParams {
            init_r: 4,
            target_r: 2,
            tinit: 2,
            tfinal: 4,
            delta_t: 2,
            ..AdaLoraParams::default()
        },
        save_steps: 6,
        ..budget_cfg()
    };
    let dir = tempfile::tempdir().unwrap();
    let (config, tensors) = tiny();
    let data = memorization_set();
    let report = {
        let _guard = rng_lock();
        let base = BaseModel::Loaded {
            config: &config,
            tensors: &tensors,
        };
        train_sft::<AD>(
            &cfg,
            base,
            &data,
            &data[..2],
            dir.path(),
            &Default::default(),
            None,
        )
        .unwrap()
    };
    let rows = read_metrics(&report.metrics_path).unwrap();
    let (first, last) = (rows[0].loss.unwrap(), rows[11].loss.unwrap());
    println!("adalora loss over 12 steps: {first} -> {last}");
    assert!(last < first);
    let adapter = read_adalora_adapter(report.adapter_dir.as_ref().unwrap()).unwrap();
    assert_eq!(adapter.config.params.total_step, Some(12));
    let kept: usize = adapter.triplets.iter().map(|t| t.rank()).sum();
    assert_eq!(kept, 2 * 14, "final budget is target_r per adapter");
    assert!(dir
        .path()
        .join("checkpoint-6/adapter/adapter_config.json")
        .is_file());
    assert!(dir.path().join("checkpoint-6").join(STATE_FILE).is_file());
    // merged = base + B (A * E) alpha / (init_r + 1e-5) on the adapted weights.
    let merged =
        crate::model::hf::load_hf_folder_tensors(report.model_dir.as_ref().unwrap()).unwrap();
    let t = &adapter.triplets[0];
    let name = format!("model.layers.{}.{}.weight", t.layer, t.module.path());
    let (out, inp, r) = (t.b.shape[0], t.a.shape[1], t.rank());
    let s = adapter.config.scaling() as f32;
    for o in 0..out {
        for i in 0..inp {
            let d: f32 = (0..r)
                .map(|k| t.b.data[o * r + k] * t.a.data[k * inp + i] * t.e.data[k])
                .sum();
            let want = tensors[&name].data[o * inp + i] + s * d;
            assert!((merged[&name].data[o * inp + i] - want).abs() < 1e-5);
        }
    }
}
