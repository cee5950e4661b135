//! End-to-end tests of the SFT loop on a tiny random Qwen2 (ndarray CPU backend), and parity
//! of the LoRA loss and gradients with peft (fixture from `scripts/make_sft_fixtures.py`).

mod checkpointing;
mod data_parallel;
mod dora;
mod grpo;
mod learning;
mod prompt;

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::hf::{load_hf_folder_tensors, HostTensor};
use crate::model::init::{init_weights, tiny_qwen2_config, TinyShape};
use crate::peft::files::{parse_tensor_name, read_lora_adapter, TargetModules};
use crate::peft::lora::projections_mut;
use crate::train::config::{Method, SftConfig};
use crate::train::data::{make_batch, summed_cross_entropy, TokenizedExample};
use crate::train::metrics_log::read_metrics;
use crate::train::prefix::PrefixLm;
use crate::train::sft::{run_sft, train_sft, BaseModel, CausalModel};

pub(super) use crate::testing::TB;

/// burn's backend RNG (dropout, prefix init) is process-global: tests that train hold this
/// lock so parallel tests do not draw from it in between.
static RNG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(super) fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
pub(super) use crate::testing::AD;

pub(super) const SHAPE: TinyShape = TinyShape {
    hidden: 32,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    intermediate: 64,
    vocab: 64,
};

/// The tiny Qwen2 with a larger init than transformers' 0.02: with tied, frozen embeddings of
/// std 0.02 and hidden 32 the logits cannot move by more than about 0.6, so no adapter could
/// memorise anything.
pub(super) fn tiny() -> (ModelConfig, BTreeMap<String, HostTensor>) {
    let mut config = tiny_qwen2_config(SHAPE);
    config.initializer_range = 0.3;
    let tensors = init_weights(&config, 3);
    (config, tensors)
}

/// A few fixed sequences; the first two tokens of each are prompt (label -100).
pub(super) fn memorization_set() -> Vec<TokenizedExample> {
    (0..4u32)
        .map(|k| {
            let ids: Vec<u32> = (0..8 + k).map(|i| (i * 7 + k * 13 + 1) % 64).collect();
            let mut ex = TokenizedExample::all_tokens(ids);
            ex.labels[0] = -100;
            ex.labels[1] = -100;
            ex
        })
        .collect()
}

pub(super) fn lora_cfg(steps: u64) -> SftConfig {
    SftConfig {
        method: Method::Lora,
        learning_rate: 3e-2,
        lr_scheduler: crate::train::schedule::Schedule::Constant,
        max_steps: Some(steps),
        batch_size: 2,
        gradient_accumulation_steps: 2,
        lora_r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        logging_steps: 1,
        weight_decay: 0.01,
        warmup_steps: Some(2),
        ..SftConfig::default()
    }
}

pub(super) fn losses(dir: &Path) -> Vec<(u64, f64)> {
    read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| r.loss.map(|l| (r.step, l)))
        .collect()
}

/// Trains `config`/`tensors` on `train` (CPU, no progress bar), writing into `dir`.
pub(super) fn train_loaded(
    cfg: &SftConfig,
    config: &ModelConfig,
    tensors: &BTreeMap<String, HostTensor>,
    train: &[TokenizedExample],
    eval: &[TokenizedExample],
    dir: &Path,
) -> Result<crate::train::SftReport, crate::train::Error> {
    let base = BaseModel::Loaded { config, tensors };
    train_sft::<AD>(cfg, base, train, eval, dir, &Default::default(), None)
}

pub(super) fn train(cfg: &SftConfig, dir: &Path) -> crate::train::SftReport {
    train_on::<AD>(cfg, dir)
}

fn train_on<B: burn::tensor::backend::AutodiffBackend>(
    cfg: &SftConfig,
    dir: &Path,
) -> crate::train::SftReport {
    let _guard = rng_lock();
    let (config, tensors) = tiny();
    let data = memorization_set();
    let base = BaseModel::Loaded {
        config: &config,
        tensors: &tensors,
    };
    train_sft::<B>(cfg, base, &data, &data[..2], dir, &Default::default(), None).unwrap()
}

#[test]
fn lora_loss_falls_and_base_stays_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let report = train(&lora_cfg(30), dir.path());
    let l = losses(dir.path());
    assert_eq!(l.len(), 30);
    let (first, last) = (l[0].1, l[29].1);
    println!("lora loss over 30 steps: {first} -> {last}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert!(report.eval_loss.is_some());
    let rows = read_metrics(&report.metrics_path).unwrap();
    assert!(rows
        .iter()
        .all(|r| r.lr.is_some() && r.grad_norm.is_some() && r.tokens_per_s.is_some()));
    // 2 layers x r 4 x (in + out) of q, k, v, o, gate, up, down.
    let expected: usize = 2 * 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64));
    assert_eq!(report.trainable_params, expected);

    // Only adapters trained: merged = original base + scaling * B A, other tensors untouched.
    let (_, base) = tiny();
    let adapter = read_lora_adapter(report.adapter_dir.as_ref().unwrap()).unwrap();
    assert_eq!(adapter.pairs.len(), 14);
    let merged = load_hf_folder_tensors(report.model_dir.as_ref().unwrap()).unwrap();
    let scaling = adapter.config.scaling();
    for (name, t) in &base {
        let got = &merged[name];
        let pair = adapter
            .pairs
            .iter()
            .find(|p| name == &format!("model.layers.{}.{}.weight", p.layer, p.module.path()));
        match pair {
            None => assert_eq!(&got.data, &t.data, "{name} changed"),
            Some(p) => {
                let (out, inp, r) = (p.b.shape[0], p.a.shape[1], p.a.shape[0]);
                let mut max_delta = 0f32;
                for o in 0..out {
                    for i in 0..inp {
                        let delta: f32 = (0..r)
                            .map(|k| p.b.data[o * r + k] * p.a.data[k * inp + i])
                            .sum();
                        let want = t.data[o * inp + i] + scaling as f32 * delta;
                        assert!((got.data[o * inp + i] - want).abs() < 1e-5, "{name}");
                        max_delta = max_delta.max(delta.abs());
                    }
                }
                assert!(max_delta > 0.0, "{name}: adapter did not train");
            }
        }
    }
}

#[test]
fn eval_on_start_logs_the_starting_model_as_step_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = lora_cfg(2);
    cfg.eval_on_start = true;
    train(&cfg, dir.path());
    let rows = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        rows[0].step, 0,
        "the first row is the evaluation before training"
    );
    assert!(rows[0].loss.is_none());
    // LoRA starts with B = 0: the starting model is the base, whose token-mean loss on the
    // eval set (the first two examples) the row must carry.
    let (config, tensors) = tiny();
    let base = CausalLm::<TB>::from_hf_tensors(&config, &tensors, &Default::default()).unwrap();
    let data = memorization_set();
    let batch = make_batch::<TB>(&data, &[0, 1], 0, &Default::default());
    let summed: f32 =
        summed_cross_entropy(base.logits(batch.input_ids.clone()), &batch).into_scalar();
    let tokens = (data[0].num_items() + data[1].num_items()) as f64;
    let want = summed as f64 / tokens;
    let got = rows[0].eval_loss.unwrap();
    assert!(
        (got - want).abs() < 1e-5,
        "step-0 eval loss {got}, base model {want}"
    );

    let dir = tempfile::tempdir().unwrap();
    train(&lora_cfg(2), dir.path());
    let rows = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(rows[0].step, 1, "no step-0 row without eval_on_start");
}

#[test]
fn merged_logits_equal_base_plus_lora_logits() {
    let dir = tempfile::tempdir().unwrap();
    let report = train(&lora_cfg(4), dir.path());
    let (config, base) = tiny();
    let device = Default::default();
    let adapter = read_lora_adapter(report.adapter_dir.as_ref().unwrap()).unwrap();
    let mut model = CausalLm::<TB>::from_hf_tensors(&config, &base, &device).unwrap();
    for (layer, module, slot) in projections_mut(&mut model) {
        let p = adapter
            .pairs
            .iter()
            .find(|p| p.layer == layer && p.module == module)
            .unwrap();
        let t = |d: &crate::peft::files::DenseTensor| {
            Tensor::<TB, 2>::from_data(TensorData::new(d.data.clone(), d.shape.clone()), &device)
        };
        let lin = std::mem::replace(
            slot,
            crate::model::lora::LoraLinear::new(slot.weight.val(), None),
        );
        *slot = lin.with_lora_tensors(t(&p.a), t(&p.b), adapter.config.scaling());
    }
    let merged_tensors = load_hf_folder_tensors(report.model_dir.as_ref().unwrap()).unwrap();
    let merged = CausalLm::<TB>::from_hf_tensors(&config, &merged_tensors, &device).unwrap();
    let ids = Tensor::<TB, 2, Int>::from_data(
        TensorData::new(vec![1i64, 5, 9, 33, 2, 60], [1, 6]),
        &device,
    );
    let a = model
        .logits(ids.clone())
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let b = merged.logits(ids).into_data().to_vec::<f32>().unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "max logit difference {diff}");
}

#[test]
fn resume_continues_exactly() {
    let mut cfg = lora_cfg(6);
    cfg.save_steps = 3;
    cfg.lora_dropout = 0.1;
    let straight = tempfile::tempdir().unwrap();
    train(&cfg, straight.path());

    let split = tempfile::tempdir().unwrap();
    let (config, tensors) = tiny();
    let data = memorization_set();
    let base = || BaseModel::Loaded {
        config: &config,
        tensors: &tensors,
    };
    let device = Default::default();
    let _guard = rng_lock();
    run_sft::<AD, [TokenizedExample]>(
        &cfg,
        base(),
        &data,
        &data[..2],
        split.path(),
        &device,
        None,
        Some(4),
    )
    .unwrap();
    assert!(split.path().join("checkpoint-3").is_dir());
    let resumed_cfg = SftConfig {
        resume: true,
        ..cfg.clone()
    };
    let report = train_sft::<AD>(
        &resumed_cfg,
        base(),
        &data,
        &data[..2],
        split.path(),
        &device,
        None,
    )
    .unwrap();
    assert_eq!(report.resumed_from, Some(3));
    assert_eq!(losses(split.path()), losses(straight.path()));
    assert_eq!(losses(straight.path()).len(), 6);
    let a = read_lora_adapter(&straight.path().join("adapter")).unwrap();
    let b = read_lora_adapter(&split.path().join("adapter")).unwrap();
    assert_eq!(a.pairs, b.pairs);
}

#[test]
fn full_fine_tuning_and_prefix_tuning_learn() {
    for (method, lr) in [
        (Method::Full, 1e-2),
        (Method::Prefix, 1e-1),
        (Method::Qlora, 3e-2),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SftConfig {
            method,
            learning_rate: lr,
            pre_seq_len: 4,
            ..lora_cfg(20)
        };
        let report = train(&cfg, dir.path());
        let l = losses(dir.path());
        assert!(l[19].1 < 0.8 * l[0].1, "{method:?}: {:?}", l);
        match method {
            Method::Full => {
                let saved = load_hf_folder_tensors(report.model_dir.as_ref().unwrap()).unwrap();
                assert_ne!(saved["model.norm.weight"], tiny().1["model.norm.weight"]);
            }
            Method::Prefix => {
                // prompt_embeddings is [pre_seq_len, layers * 2 * kv_dim].
                let file = report
                    .adapter_dir
                    .as_ref()
                    .unwrap()
                    .join("adapter_model.safetensors");
                let saved = crate::model::hf::load_safetensors_file(&file).unwrap();
                assert_eq!(saved["prompt_embeddings"].shape, vec![4, 2 * 2 * 16]);
            }
            _ => assert!(report.adapter_dir.is_some()),
        }
    }
}

pub(super) fn fixture_tensors(
    name: &str,
) -> (BTreeMap<String, HostTensor>, BTreeMap<String, Vec<i64>>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sft");
    let bytes = std::fs::read(Path::new(dir).join(name)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (mut floats, mut ints) = (BTreeMap::new(), BTreeMap::new());
    for (name, view) in st.tensors() {
        let raw = view.data();
        match view.dtype() {
            safetensors::Dtype::F32 => {
                let data = raw
                    .chunks(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                floats.insert(name, HostTensor::new(view.shape().to_vec(), data));
            }
            safetensors::Dtype::I64 => {
                let data = raw
                    .chunks(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                ints.insert(name, data);
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    (floats, ints)
}

#[test]
fn lora_loss_and_gradients_match_peft() {
    let (floats, ints) = fixture_tensors("sft_lora_grads.safetensors");
    let base: BTreeMap<String, HostTensor> = floats
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("base.").map(|n| (n.to_string(), v.clone())))
        .collect();
    let mut config = tiny_qwen2_config(SHAPE);
    config.rope_theta = 10_000.0;
    let examples = fixture_examples(&ints);
    check_lora_against_peft(&config, &base, &floats, &examples, 28);
}

#[test]
fn gemma2_lora_loss_and_gradients_match_peft() {
    // scripts/make_family_lora_fixture.py: peft LoRA r4 on the seven projections of the Gemma 2
    // family fixture (soft-capping, GeGLU, (1 + w) norms, output norms, 12 tokens over a window
    // of 8); row 1 is right-padded after 9 tokens.
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/families/gemma2"
    );
    let config = ModelConfig::from_file(Path::new(dir).join("config.json")).unwrap();
    let base = load_hf_folder_tensors(dir).unwrap();
    let (floats, ints) = fixture_tensors("gemma2_lora_grads.safetensors");
    let (ids, labels) = (&ints["input_ids"], &ints["labels"]);
    let examples: Vec<TokenizedExample> = [(0, 12), (1, 9)]
        .iter()
        .map(|&(r, n)| TokenizedExample {
            input_ids: ids[r * 12..r * 12 + n].iter().map(|&t| t as u32).collect(),
            labels: labels[r * 12..r * 12 + n].to_vec(),
        })
        .collect();
    check_lora_against_peft(&config, &base, &floats, &examples, 4 * 14);
}

/// Puts the fixture's `init.*` LoRA factors (scaling 2: alpha 8, r 4) on every projection of
/// `base`, and checks one batch's mean loss (1e-4 relative) and every factor's gradient (1e-4 of
/// its largest entry) against the fixture's `loss` and `grad.*`.
fn check_lora_against_peft(
    config: &ModelConfig,
    base: &BTreeMap<String, HostTensor>,
    floats: &BTreeMap<String, HostTensor>,
    examples: &[TokenizedExample],
    factors: usize,
) {
    let device = Default::default();
    let mut model = CausalLm::<AD>::from_hf_tensors(config, base, &device)
        .unwrap()
        .no_grad();
    let dev2 = |t: &HostTensor| {
        Tensor::<AD, 2>::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &device)
    };
    let find = |prefix: &str, layer: usize, module, factor| {
        floats
            .iter()
            .find(|(k, _)| {
                k.strip_prefix(prefix).and_then(parse_tensor_name) == Some((layer, module, factor))
            })
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    for (layer, module, slot) in projections_mut(&mut model) {
        let lin = std::mem::replace(
            slot,
            crate::model::lora::LoraLinear::new(slot.weight.val(), None),
        );
        *slot = lin.with_lora_tensors(
            dev2(&find("init.", layer, module, 'A')),
            dev2(&find("init.", layer, module, 'B')),
            2.0,
        );
    }
    let rows: Vec<usize> = (0..examples.len()).collect();
    let batch = make_batch::<AD>(examples, &rows, 0, &device);
    let loss = summed_cross_entropy(model.logits(batch.input_ids.clone()), &batch)
        .div_scalar(batch.num_items as f64);
    let got: f32 = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let want = floats["loss"].data[0];
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "loss {got} vs peft {want}"
    );
    // The loss training computes (through the chunked LM head where it applies) is the same.
    let trained: f32 = model
        .summed_loss(&batch)
        .div_scalar(batch.num_items as f64)
        .into_data()
        .to_vec::<f32>()
        .unwrap()[0];
    assert!(
        ((trained - want) / want).abs() < 1e-4,
        "training loss {trained} vs peft {want}"
    );
    let grads = loss.backward();
    let mut checked = 0;
    for (layer, module, slot) in projections_mut(&mut model) {
        for (factor, param) in [
            ('A', slot.lora_a.as_ref().unwrap()),
            ('B', slot.lora_b.as_ref().unwrap()),
        ] {
            let g = param
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let want = find("grad.", layer, module, factor).data;
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = g
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                scale > 0.0 && diff <= 1e-4 * scale,
                "layer {layer} {module:?} {factor}: {diff} vs scale {scale}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, factors);
}

/// The fixture batch: row 1 is right-padded after 5 tokens (attention_mask 0, labels -100).
pub(super) fn fixture_examples(ints: &BTreeMap<String, Vec<i64>>) -> Vec<TokenizedExample> {
    let (ids, labels) = (&ints["input_ids"], &ints["labels"]);
    [(0, 7), (1, 5)]
        .iter()
        .map(|&(r, n)| TokenizedExample {
            input_ids: ids[r * 7..r * 7 + n].iter().map(|&t| t as u32).collect(),
            labels: labels[r * 7..r * 7 + n].to_vec(),
        })
        .collect()
}

#[test]
fn prefix_loss_and_gradient_match_peft_prefix_tuning() {
    let (floats, ints) = fixture_tensors("sft_prefix_grads.safetensors");
    let base: BTreeMap<String, HostTensor> = floats
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("base.").map(|n| (n.to_string(), v.clone())))
        .collect();
    let mut config = tiny_qwen2_config(SHAPE);
    config.rope_theta = 10_000.0;
    let device = Default::default();
    let e = &floats["prompt_embeddings"];
    // peft's layout: [virtual tokens, layers * 2 * kv_heads * head_dim].
    assert_eq!(e.shape, vec![3, 2 * 2 * 2 * 8]);
    let model = PrefixLm {
        base: CausalLm::<AD>::from_hf_tensors(&config, &base, &device)
            .unwrap()
            .no_grad(),
        embedding: Param::from_tensor(Tensor::from_data(
            TensorData::new(e.data.clone(), e.shape.clone()),
            &device,
        )),
        trans: None,
    };
    let batch = make_batch::<AD>(&fixture_examples(&ints), &[0, 1], 0, &device);
    let loss = summed_cross_entropy(model.logits(batch.input_ids.clone()), &batch)
        .div_scalar(batch.num_items as f64);
    let got: f32 = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let want = floats["loss"].data[0];
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "loss {got} vs peft {want}"
    );
    let grads = loss.backward();
    let g = model
        .embedding
        .val()
        .grad(&grads)
        .unwrap()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let want = &floats["grad"].data;
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = g
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        scale > 0.0 && diff <= 1e-4 * scale,
        "prefix gradient: {diff} vs scale {scale}"
    );
}

#[test]
fn a_diverging_run_fails_at_the_step_that_shows_it_and_checkpoints_nothing_after() {
    let _guard = rng_lock();
    let (config, tensors) = tiny();
    let data = memorization_set();
    let dir = tempfile::tempdir().unwrap();
    let cfg = SftConfig {
        method: Method::Full,
        learning_rate: 1e30,
        max_grad_norm: None,
        logging_steps: 5,
        save_steps: 1,
        ..lora_cfg(10)
    };
    let err = train_loaded(&cfg, &config, &tensors, &data, &[], dir.path()).unwrap_err();
    let crate::train::Error::NonFinite {
        step,
        first_step,
        lr,
        ..
    } = err
    else {
        panic!("expected a non-finite loss, got {err}");
    };
    assert!(err.to_string().starts_with("non-finite "), "{err}");
    assert!(err.to_string().contains("learning rate 1e30"), "{err}");
    // The warm-up's first step still had a finite loss and was checkpointed; the first step
    // whose loss is not a number is not.
    assert!(step >= 2 && lr > 0.0, "{err}");
    // Checkpoints every step: each step is read back, so the error names exactly one.
    assert_eq!(first_step, step, "{err}");
    assert!(
        err.to_string().contains(&format!("at step {step} ")),
        "{err}"
    );
    assert!(dir.path().join(format!("checkpoint-{}", step - 1)).is_dir());
    assert!(!dir.path().join(format!("checkpoint-{step}")).exists());

    // Read back only every 5 steps: the error names the window the bad step lies in.
    let dir = tempfile::tempdir().unwrap();
    let cfg = SftConfig {
        save_steps: 0,
        ..cfg
    };
    let err = train_loaded(&cfg, &config, &tensors, &data, &[], dir.path()).unwrap_err();
    let crate::train::Error::NonFinite {
        step, first_step, ..
    } = err
    else {
        panic!("expected a non-finite loss, got {err}");
    };
    assert_eq!((first_step, step), (1, 5), "{err}");
    assert!(err.to_string().contains("in steps 1–5"), "{err}");
}
