//! Tests of the GRPO objective against TRL's formula (fixture from
//! `scripts/grpo_loss_fixture.py`), of the reference policy (adapters off), and of the whole
//! loop on a tiny random Qwen2: a toy task rewarded for a fixed token pattern, and resume.

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::module::Param;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::hf::HostTensor;
use crate::model::init::{init_weights, tiny_qwen2_config, TinyShape};
use crate::peft::files::{read_lora_adapter, TargetModules};
use crate::peft::lora::{add_lora, projections_mut};
use crate::train::config::Method;
use crate::train::grpo::{run_grpo, train_grpo, without_adapters, GrpoPrompt, GrpoTokens};
use crate::train::grpo_config::{GrpoConfig, LossType};
use crate::train::grpo_loss::{grpo_loss, row_batch, token_logps, LossParams};
use crate::train::metrics_log::read_metrics;
use crate::train::rewards::{RewardKind, RewardSpec};
use crate::train::sft::BaseModel;
use crate::train::tests::rng_lock;

use crate::testing::AD;
use crate::testing::TB;

fn fixture() -> serde_json::Value {
    let path = format!(
        "{}/tests/fixtures/grpo/loss.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn loss_and_gradient_match_trl_formula() {
    let fx = fixture();
    let dim = |k: &str| fx[k].as_u64().unwrap() as usize;
    let (rows, len, vocab) = (dim("rows"), dim("length"), dim("vocab"));
    let dev = Default::default();
    let t2 =
        |k: &str| Tensor::<AD, 2>::from_data(TensorData::new(floats(&fx[k]), [rows, len]), &dev);
    let targets: Vec<i64> = fx["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let temperature = fx["temperature"].as_f64().unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let logits = Tensor::<AD, 3>::from_data(
            TensorData::new(floats(&fx["logits"]), [rows, len, vocab]),
            &dev,
        )
        .require_grad();
        let tgt =
            Tensor::<AD, 2, Int>::from_data(TensorData::new(targets.clone(), [rows, len]), &dev);
        let logps = token_logps(logits.clone(), tgt, temperature);
        let mask = t2("mask");
        let tokens: f32 = floats(&fx["mask"]).iter().sum();
        let loss_type = match case["loss_type"].as_str().unwrap() {
            "grpo" => LossType::Grpo,
            _ => LossType::Bnpo,
        };
        let params = LossParams {
            epsilon_low: case["epsilon_low"].as_f64().unwrap(),
            epsilon_high: case["epsilon_high"].as_f64().unwrap(),
            beta: case["beta"].as_f64().unwrap(),
            loss_type,
            denominator: match loss_type {
                LossType::Grpo => rows as f64,
                _ => tokens as f64,
            },
        };
        let adv =
            Tensor::<AD, 1>::from_data(TensorData::new(floats(&fx["advantages"]), [rows]), &dev);
        let out = grpo_loss(
            logps,
            Some(t2("old_logps")),
            Some(t2("ref_logps")),
            adv,
            mask,
            &params,
        );
        let loss: f32 = out.loss.clone().into_scalar();
        let want = case["loss"].as_f64().unwrap() as f32;
        assert!(
            (loss - want).abs() < 1e-5,
            "{case:?}: loss {loss}, want {want}"
        );
        let clip: f32 = out.clipped.into_scalar() / tokens;
        assert!((clip - case["clip_ratio"].as_f64().unwrap() as f32).abs() < 1e-6);
        let kl: f32 = out.kl_sum.into_scalar() / tokens;
        assert!(
            (kl - case["kl"].as_f64().unwrap() as f32).abs() < 1e-5,
            "kl {kl}"
        );
        let grads = out.loss.backward();
        let got = logits
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let want = floats(&case["grad"]);
        let scale = want.iter().fold(0f32, |m, g| m.max(g.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() < 1e-5 * scale.max(1.0),
                "grad {i}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn without_old_logps_the_ratio_is_one_and_the_gradient_is_the_advantage() {
    // loss = -(1/T_i) sum_t A_i * exp(logp - stopgrad(logp)) / rows: d loss / d logp = -A_i / (T_i rows).
    let dev = Default::default();
    let logps = Tensor::<AD, 2>::from_data(
        TensorData::new(vec![-1.0f32, -2.0, -0.5, -3.0], [2, 2]),
        &dev,
    )
    .require_grad();
    let mask =
        Tensor::<AD, 2>::from_data(TensorData::new(vec![1.0f32, 1.0, 1.0, 0.0], [2, 2]), &dev);
    let adv = Tensor::<AD, 1>::from_data(TensorData::new(vec![0.5f32, -2.0], [2]), &dev);
    let p = LossParams {
        epsilon_low: 0.2,
        epsilon_high: 0.2,
        beta: 0.0,
        loss_type: LossType::Grpo,
        denominator: 2.0,
    };
    let out = grpo_loss(logps.clone(), None, None, adv, mask, &p);
    let loss: f32 = out.loss.clone().into_scalar();
    assert!((loss - (-(0.5) + 2.0) / 2.0).abs() < 1e-6, "{loss}");
    let g = logps
        .grad(&out.loss.backward())
        .unwrap()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(g, vec![-0.125, -0.125, 1.0, 0.0]);
}

const SHAPE: TinyShape = TinyShape {
    hidden: 32,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    intermediate: 64,
    vocab: 16,
};
const EOS: u32 = 15;

fn tiny() -> (ModelConfig, BTreeMap<String, HostTensor>) {
    let mut config = tiny_qwen2_config(SHAPE);
    config.initializer_range = 0.3;
    let tensors = init_weights(&config, 5);
    (config, tensors)
}

/// Token t is the letter `a + t`; EOS is skipped as a special token would be.
fn decode(ids: &[u32]) -> String {
    ids.iter()
        .filter(|&&t| t != EOS)
        .map(|&t| char::from(b'a' + t as u8))
        .collect()
}

/// `base` with LoRA on every linear projection (GRPO's other defaults), each zero-initialised
/// `lora_B` replaced by `set_b` of it so that the adapters move the outputs; and how many
/// projections were wrapped.
fn all_linear_lora<B: burn::tensor::backend::Backend>(
    base: CausalLm<B>,
    seed: u64,
    set_b: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>,
) -> (CausalLm<B>, usize) {
    let adapter = GrpoConfig {
        target_modules: TargetModules::Pattern("all-linear".into()),
        ..GrpoConfig::default()
    }
    .adapter_config();
    let device = base.model.embed_tokens.weight.device();
    let (mut lora, wrapped) = add_lora(base, &adapter, seed, &device).unwrap();
    for (_, _, lin) in projections_mut(&mut lora) {
        let b = lin.lora_b.take().unwrap().val();
        lin.lora_b = Some(Param::from_tensor(set_b(b)));
    }
    (lora, wrapped)
}

#[test]
fn reference_policy_is_the_base_with_adapters_off() {
    let (config, tensors) = tiny();
    let dev = Default::default();
    let base = CausalLm::<TB>::from_hf_tensors(&config, &tensors, &dev).unwrap();
    let (lora, wrapped) = all_linear_lora(base.clone(), 1, |b| b.ones_like());
    assert_eq!(wrapped, 14);
    let p: Vec<&[u32]> = vec![&[1u32, 2, 3][..], &[4][..]];
    let c: Vec<&[u32]> = vec![&[5u32, 6][..], &[7, 8, 9][..]];
    let batch = row_batch::<TB>(&p, &c, 0, &dev);
    let logps = |m: &CausalLm<TB>| {
        crate::train::grpo_loss::completion_logps(m, &batch, 1.0)
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    let (want, adapted, off) = (
        logps(&base),
        logps(&lora),
        logps(&without_adapters(lora.clone())),
    );
    assert_eq!(off, want);
    assert!(adapted.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3));
    // The adapters are still in the policy.
    assert!(lora.model.layers[0].self_attn.q_proj.lora_a.is_some());
}

#[test]
fn sampling_uses_the_merged_policy_and_draws_what_the_adapted_one_does() {
    use crate::model::generate::{generate, GenerateOptions, SamplingParams};
    use crate::peft::lora::merged_for_sampling;
    let (config, tensors) = tiny();
    let dev = Default::default();
    let base = CausalLm::<TB>::from_hf_tensors(&config, &tensors, &dev).unwrap();
    assert!(merged_for_sampling(&base).is_none(), "nothing to merge");
    let (lora, _) = all_linear_lora(base.clone(), 1, |b| b.ones_like().mul_scalar(0.05));
    let mut merged = merged_for_sampling(&lora).expect("adapters to merge");
    assert!(projections_mut(&mut merged)
        .iter()
        .all(|(_, _, l)| l.lora_a.is_none() && l.lora_b.is_none()));
    let prompts = vec![vec![1u32, 2, 3], vec![4]];
    let run = |m: &CausalLm<TB>, greedy: bool| {
        let opts = GenerateOptions {
            max_new_tokens: 6,
            sampling: SamplingParams {
                greedy,
                seed: 9,
                temperature: 0.9,
                ..SamplingParams::default()
            },
            ..GenerateOptions::default()
        };
        generate(m, &prompts, &opts, None)
            .unwrap()
            .into_iter()
            .map(|g| g.token_ids)
            .collect::<Vec<_>>()
    };
    for greedy in [true, false] {
        assert_eq!(
            run(&merged, greedy),
            run(&lora, greedy),
            "greedy = {greedy}"
        );
    }
    // The adapters changed what is drawn, so the equality above is not the base's.
    assert_ne!(run(&merged, true), run(&base, true));
    // An NF4 base is not merged (that would hold a full-precision copy of it).
    let qlora = crate::peft::lora::quantize_base_nf4(lora).unwrap();
    assert!(merged_for_sampling(&qlora).is_none());
}

fn toy_config(steps: u64) -> GrpoConfig {
    GrpoConfig {
        method: Method::Lora,
        learning_rate: 3e-2,
        lr_scheduler: crate::train::schedule::Schedule::Constant,
        max_steps: Some(steps),
        batch_size: 8,
        gradient_accumulation_steps: 2,
        num_generations: 4,
        max_prompt_length: 3,
        max_completion_length: 4,
        num_iterations: 2,
        beta: 0.04,
        rewards: vec![
            RewardSpec {
                kind: RewardKind::Regex {
                    pattern: "[a-d]".into(),
                },
                weight: 1.0,
            },
            RewardSpec {
                kind: RewardKind::Regex {
                    pattern: "[a-d]{2}".into(),
                },
                weight: 1.0,
            },
        ],
        lora_r: 8,
        lora_alpha: 16.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        log_completions_steps: 10,
        ..GrpoConfig::default()
    }
}

fn toy_prompts() -> Vec<GrpoPrompt> {
    // Four prompts; the first is longer than max_prompt_length and is cut on the left.
    [vec![9, 10, 11, 12], vec![5, 6], vec![13], vec![7, 8, 14]]
        .into_iter()
        .map(|ids| GrpoPrompt {
            ids,
            reference: String::new(),
        })
        .collect()
}

/// GRPO of the tiny model on the toy prompts with `cfg`, written into `out`.
fn train_toy(cfg: &GrpoConfig, out: &std::path::Path) -> crate::train::grpo::GrpoReport {
    train_toy_scored_on(cfg, out, &[])
}

/// [`train_toy`] with eval prompts (the last three toy prompts).
fn train_toy_with_eval(cfg: &GrpoConfig, out: &std::path::Path) -> crate::train::grpo::GrpoReport {
    train_toy_scored_on(cfg, out, &toy_prompts()[1..])
}

fn train_toy_scored_on(
    cfg: &GrpoConfig,
    out: &std::path::Path,
    eval_prompts: &[GrpoPrompt],
) -> crate::train::grpo::GrpoReport {
    let (config, tensors) = tiny();
    let tokens = GrpoTokens {
        eos_ids: vec![EOS],
        pad_id: 0,
    };
    train_grpo::<AD>(
        cfg,
        BaseModel::Loaded {
            config: &config,
            tensors: &tensors,
        },
        &toy_prompts(),
        eval_prompts,
        &decode,
        &tokens,
        out,
        &Default::default(),
        None,
    )
    .unwrap()
}

/// The `eval_reward` values of a run's metrics rows, by step.
fn eval_rows(path: &std::path::Path) -> Vec<(u64, f64)> {
    read_metrics(path)
        .unwrap()
        .iter()
        .filter_map(|r| Some((r.step, r.extra.get("eval_reward")?.as_f64()?)))
        .collect()
}

#[test]
fn eval_prompts_are_scored_with_the_same_draws_at_every_evaluation() {
    let _guard = rng_lock();
    // Learning rate 0: the policy never changes, so common random numbers make every
    // evaluation identical, while the training rollouts (fresh draws each step) differ.
    let frozen = GrpoConfig {
        learning_rate: 0.0,
        eval_steps: 1,
        eval_prompts: 2,
        eval_generations: 3,
        ..toy_config(3)
    };
    let dir = tempfile::tempdir().unwrap();
    let report = train_toy_with_eval(&frozen, dir.path());
    let evals = eval_rows(&report.metrics_path);
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(evals.iter().all(|e| e.1 == evals[0].1), "{evals:?}");
    assert_eq!(report.eval_before, report.eval_after);
    for key in [
        "eval_reward",
        "eval_rewards/regex",
        "eval_rewards/regex_2",
        "eval_completion_length",
    ] {
        assert!(report.eval_before.contains_key(key), "no {key}");
    }
    let length = report.eval_before["eval_completion_length"];
    assert!(length > 0.0 && length <= 4.0, "{length}");
    // Training rows are still one per step, beside the eval rows.
    let rows = read_metrics(&report.metrics_path).unwrap();
    assert_eq!(rows.iter().filter(|r| r.loss.is_some()).count(), 3);
}

#[test]
fn eval_reward_rises_as_the_toy_policy_learns() {
    let _guard = rng_lock();
    let cfg = GrpoConfig {
        eval_steps: 15,
        ..toy_config(30)
    };
    let dir = tempfile::tempdir().unwrap();
    let report = train_toy_with_eval(&cfg, dir.path());
    let evals = eval_rows(&report.metrics_path);
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 15, 30]);
    // Three eval prompts x num_generations (4) completions, the same draws each time.
    let (before, after) = (evals[0].1, evals[2].1);
    assert!(
        after > before + 0.3,
        "eval reward {before:.3} -> {after:.3}"
    );
    assert_eq!(report.eval_after["eval_reward"], after);
}

#[test]
fn toy_pattern_reward_rises_over_50_steps() {
    let _guard = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let report = train_toy(&toy_config(50), dir.path());
    assert_eq!(report.steps, 50);
    let rows = read_metrics(&report.metrics_path).unwrap();
    assert_eq!(rows.len(), 50);
    let reward = |r: &crate::train::metrics_log::MetricsRow| r.extra["reward"].as_f64().unwrap();
    let first: f64 = rows[..10].iter().map(reward).sum::<f64>() / 10.0;
    let last: f64 = rows[40..].iter().map(reward).sum::<f64>() / 10.0;
    assert!(last > first + 0.5, "mean reward {first:.3} -> {last:.3}");
    for key in [
        "rewards/regex",
        "rewards/regex_2",
        "reward_std",
        "kl",
        "clip_ratio",
        "completion_length",
    ] {
        assert!(rows[0].extra.contains_key(key), "no {key} in {:?}", rows[0]);
    }
    assert!(rows[0].lr.is_some() && rows[0].grad_norm.is_some() && rows[0].loss.is_some());
    // The policy moved away from the reference: KL grows from 0.
    assert!(rows[0].extra["kl"].as_f64().unwrap() < 1e-6);
    assert!(rows[49].extra["kl"].as_f64().unwrap() > 1e-4);
    let samples = std::fs::read_to_string(dir.path().join("completions.jsonl")).unwrap();
    // 16 completions at steps 1, 10, 20, 30, 40 and 50.
    let steps: std::collections::BTreeSet<u64> = samples
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps.into_iter().collect::<Vec<_>>(),
        [1, 10, 20, 30, 40, 50]
    );
    assert_eq!(samples.lines().count(), 6 * 16);
    let adapter = read_lora_adapter(&report.adapter_dir.unwrap()).unwrap();
    assert_eq!((adapter.config.r, adapter.pairs.len()), (8, 14));
    assert!(report.model_dir.unwrap().join("config.json").is_file());
}

#[test]
fn response_prefix_starts_every_scored_completion() {
    let _guard = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    // Token ids decode to letters only, so the pattern matches only through the prefix.
    let cfg = GrpoConfig {
        response_prefix: "<r>\n".into(),
        rewards: vec![RewardSpec {
            kind: RewardKind::Regex {
                pattern: "^<r>\n[a-z]*$".into(),
            },
            weight: 0.5,
        }],
        log_completions_steps: 1,
        ..toy_config(1)
    };
    let report = train_toy(&cfg, dir.path());
    let rows = read_metrics(&report.metrics_path).unwrap();
    // Each reward's mean is unweighted (as TRL logs it); the total is weighted.
    assert_eq!(rows[0].extra["rewards/regex"].as_f64(), Some(1.0));
    assert_eq!(rows[0].extra["reward"].as_f64(), Some(0.5));
    let samples = std::fs::read_to_string(dir.path().join("completions.jsonl")).unwrap();
    for line in samples.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let completion = row["completion"].as_str().unwrap();
        assert!(completion.starts_with("<r>\n"), "{completion:?}");
    }
    // An empty prefix stays out of the stage's fingerprint.
    let params = serde_json::to_value(GrpoConfig::default()).unwrap();
    assert!(params.get("response_prefix").is_none());
}

/// GRPO of the tiny model on the toy prompts with `cfg`, written into `dir`, stopping after
/// `stop` steps if given.
fn run_toy(
    cfg: &GrpoConfig,
    dir: &std::path::Path,
    stop: Option<u64>,
) -> crate::train::grpo::GrpoReport {
    let (config, tensors) = tiny();
    let tokens = GrpoTokens {
        eos_ids: vec![EOS],
        pad_id: 0,
    };
    let base = BaseModel::Loaded {
        config: &config,
        tensors: &tensors,
    };
    let device = Default::default();
    run_grpo::<AD>(
        cfg,
        base,
        &toy_prompts(),
        &[],
        &decode,
        &tokens,
        dir,
        &device,
        None,
        stop,
    )
    .unwrap()
}

/// A run's metrics rows without wall times and memory, which differ between any two runs.
fn comparable_rows(path: &std::path::Path) -> Vec<crate::train::metrics_log::MetricsRow> {
    let mut rows = read_metrics(path).unwrap();
    for row in &mut rows {
        assert!(row.extra.contains_key("step_s"), "no step time in {row:?}");
        row.memory_mb = None;
        row.tokens_per_s = None;
        for key in crate::train::train_loop::TIMING_KEYS {
            row.extra.remove(*key);
        }
    }
    rows
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let _guard = rng_lock();
    let cfg = GrpoConfig {
        save_steps: 2,
        ..toy_config(4)
    };
    let run = |dir: &std::path::Path, cfg: &GrpoConfig, stop: Option<u64>| run_toy(cfg, dir, stop);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = run(a.path(), &cfg, None);
    run(b.path(), &cfg, Some(2));
    let resumed = run(
        b.path(),
        &GrpoConfig {
            resume: true,
            ..cfg.clone()
        },
        None,
    );
    assert_eq!(resumed.resumed_from, Some(2));
    let weights = |r: &crate::train::grpo::GrpoReport| {
        let adapter = read_lora_adapter(r.adapter_dir.as_ref().unwrap()).unwrap();
        adapter
            .pairs
            .into_iter()
            .flat_map(|p| p.b.data)
            .collect::<Vec<f32>>()
    };
    assert_eq!(weights(&full), weights(&resumed));
    let metrics = |r: &crate::train::grpo::GrpoReport| comparable_rows(&r.metrics_path);
    let (full_rows, resumed_rows) = (metrics(&full), metrics(&resumed));
    assert!(full_rows
        .iter()
        .all(|r| r.loss.is_some() && r.extra.contains_key("reward")));
    assert_eq!(full_rows, resumed_rows);
}

#[test]
fn bad_prompts_and_keys_are_reported() {
    let (config, tensors) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let tokens = GrpoTokens {
        eos_ids: vec![EOS],
        pad_id: 0,
    };
    let fails = |cfg: &GrpoConfig, train: &[GrpoPrompt], eval: &[GrpoPrompt]| {
        let base = BaseModel::Loaded {
            config: &config,
            tensors: &tensors,
        };
        train_grpo::<AD>(
            cfg,
            base,
            train,
            eval,
            &decode,
            &tokens,
            dir.path(),
            &Default::default(),
            None,
        )
        .unwrap_err()
        .to_string()
    };
    let bad = [GrpoPrompt {
        ids: vec![3, 99],
        reference: String::new(),
    }];
    let err = fails(&toy_config(1), &bad, &[]);
    assert!(
        err.contains("training prompt 0") && err.contains("99"),
        "{err}"
    );
    let err = fails(&toy_config(1), &toy_prompts(), &bad);
    assert!(err.contains("eval prompt 0") && err.contains("99"), "{err}");
    let cfg = GrpoConfig {
        num_generations: 3,
        ..toy_config(1)
    };
    let err = fails(&cfg, &toy_prompts(), &[]);
    assert!(err.contains("grpo: key `num_generations`"), "{err}");
}

/// The shipped recipe's GRPO stage on SmolLM2-135M-Instruct on CPU (the CLI's
/// `runner run recipes/gsm8k-grpo.toml --set stages.grpo.max_steps=N --only ...`), for measuring:
/// `GRPO_SMOKE_STEPS` steps (default 30), printing the time and the reward curve. Ignored
/// (minutes on CPU); skips without models/SmolLM2-135M-Instruct.Q4_1.gguf.
#[test]
#[ignore]
fn smollm2_gsm8k_recipe_smoke() {
    use crate::pipeline::{execute, Plan, RunOptions, Store};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        .is_file()
    {
        crate::testing::test_skip(
            "models/SmolLM2-135M-Instruct.Q4_1.gguf is absent (scripts/fetch-smollm2.sh)",
        );
        return;
    }
    std::env::set_current_dir(root).unwrap();
    let steps = std::env::var("GRPO_SMOKE_STEPS").unwrap_or_else(|_| "30".into());
    let mut sets = vec![format!("stages.grpo.max_steps={steps}")];
    if let Ok(extra) = std::env::var("GRPO_SMOKE_SET") {
        sets.extend(extra.split(';').map(str::to_string));
    }
    let raw = crate::recipe::RawRecipe::load(&root.join("recipes/gsm8k-grpo.toml"), &sets).unwrap();
    let plan = Plan::build(raw, crate::stages::registry()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let only = ["train_raw", "train_prompts", "base", "grpo"];
    let opts = RunOptions {
        runs_dir: dir.path().join("runs"),
        force: Vec::new(),
        only: only.iter().map(|s| s.to_string()).collect(),
        jobs: 1,
        device: "cpu".into(),
        run_id: None,
    };
    let t0 = std::time::Instant::now();
    let record = execute(&plan, &store, &opts).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    for s in &record.stages {
        assert!(s.error.is_none(), "stage {} failed: {:?}", s.name, s.error);
    }
    let grpo = store.artifact(&plan.stage("grpo").unwrap().fingerprint);
    let rows = read_metrics(&grpo.join("metrics.jsonl")).unwrap();
    eprintln!(
        "{} steps in {secs:.0} s (whole run incl. GGUF conversion)",
        rows.len()
    );
    for r in &rows {
        let get = |k: &str| r.extra.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        eprintln!(
            "step {:>3} reward {:.3} xml {:.3} soft {:.3} strict {:.3} int {:.3} correct {:.3} kl {:.5} len {:.0} loss {:.4}",
            r.step,
            get("reward"),
            get("rewards/xml_count"),
            get("rewards/soft_format"),
            get("rewards/strict_format"),
            get("rewards/int"),
            get("rewards/correctness"),
            get("kl"),
            get("completion_length"),
            r.loss.unwrap_or(f64::NAN)
        );
    }
    // Kept in the system's temp folder for a person to look at after the run.
    let keep = &std::env::temp_dir().join("grpo-smoke");
    let _ = std::fs::remove_dir_all(keep);
    let _ = std::fs::create_dir_all(keep);
    eprintln!(
        "metrics, completions and charts copied to {}",
        keep.display()
    );
    for name in [
        "metrics.jsonl",
        "completions.jsonl",
        "rewards.svg",
        "grpo.json",
    ] {
        let _ = std::fs::copy(grpo.join(name), keep.join(name));
    }
}

/// The policy's log-prob pass with activation checkpointing trains as without it: the same
/// adapter weights and losses after four steps. Offloaded and kept checkpoints agree bit for
/// bit; the plain pass runs each group's shared prompt once (checkpointing runs rows whole), so
/// it agrees up to rounding.
#[test]
fn checkpointed_policy_pass_trains_as_the_plain_one() {
    let _guard = rng_lock();
    let weights = |mode: crate::model::decoder::GradientCheckpointing| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = GrpoConfig {
            gradient_checkpointing: mode,
            ..toy_config(4)
        };
        let report = train_toy(&cfg, dir.path());
        let adapter = read_lora_adapter(report.adapter_dir.as_ref().unwrap()).unwrap();
        let losses: Vec<f64> = read_metrics(&report.metrics_path)
            .unwrap()
            .iter()
            .filter_map(|r| r.loss)
            .collect();
        let b: Vec<f32> = adapter.pairs.into_iter().flat_map(|p| p.b.data).collect();
        (losses, b)
    };
    use crate::model::decoder::GradientCheckpointing as G;
    let recomputes = || crate::backend::checkpoint::RECOMPUTES.with(|n| n.get());
    let plain = weights(G::Off);
    assert!(
        plain.1.iter().any(|v| *v != 0.0),
        "the adapter did not move"
    );
    let before = recomputes();
    let layers = weights(G::Layers);
    assert!(recomputes() > before, "no layer was recomputed");
    assert_eq!(weights(G::Offload), layers);
    let close = |a: &[f32], b: &[f32], what: &str| {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            a.len() == b.len() && diff <= 1e-4 * scale,
            "{what}: {diff} vs {scale}"
        );
    };
    let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    close(&as_f32(&layers.0), &as_f32(&plain.0), "losses");
    close(&layers.1, &plain.1, "adapter B");
}

/// Rows that share prompts run each prompt once (a cached prefix copied to its rows); the
/// log-probs and the LoRA gradients equal those of running every row whole: prompts of two
/// lengths (so one is left-padded), interleaved rows, completions of 1 to 4 tokens, and a batch
/// of one-token completions (no completion pass at all).
#[test]
fn shared_prompt_rows_give_the_log_probs_and_gradients_of_whole_rows() {
    // The adapters' random values come from burn's process-global RNG: fixed here, so the
    // comparison does not depend on what other tests drew before.
    let _guard = rng_lock();
    let (config, tensors) = tiny();
    let dev = Default::default();
    <AD as burn::tensor::backend::Backend>::seed(&dev, 11);
    let base = CausalLm::<AD>::from_hf_tensors(&config, &tensors, &dev).unwrap();
    let (lora, _) = all_linear_lora(base, 3, |b| {
        Tensor::random(b.dims(), burn::tensor::Distribution::Normal(0.0, 0.1), &dev)
    });
    let (p1, p2) = (&[1u32, 2, 3, 4, 5][..], &[6u32, 7][..]);
    type Rows<'a> = Vec<&'a [u32]>;
    let cases: [(Rows, Rows); 2] = [
        (
            vec![p1, p2, p1, p1, p2],
            vec![
                &[8, 9, 10],
                &[11],
                &[12, 13, 14, 15],
                &[9, 8],
                &[10, 12, 14],
            ],
        ),
        (vec![p2, p2, p2], vec![&[3], &[4], &[5]]),
    ];
    for (prompts, completions) in cases {
        let shared = row_batch::<AD>(&prompts, &completions, 0, &dev);
        assert!(shared.shared.is_some());
        let mut whole = row_batch::<AD>(&prompts, &completions, 0, &dev);
        whole.shared = None;
        let run = |batch: &crate::train::grpo_loss::RowBatch<AD>| {
            let logps = crate::train::grpo_loss::completion_logps(&lora, batch, 0.9);
            let values = logps.clone().into_data().to_vec::<f32>().unwrap();
            let grads = (logps * batch.mask.clone()).sum().backward();
            let lin = &lora.model.layers[0].self_attn.q_proj;
            let grad = |p: &Option<Param<Tensor<AD, 2>>>| {
                p.as_ref()
                    .unwrap()
                    .val()
                    .grad(&grads)
                    .unwrap()
                    .to_data()
                    .to_vec::<f32>()
                    .unwrap()
            };
            let mlp = &lora.model.layers[1].mlp.down_proj;
            (
                values,
                [
                    grad(&lin.lora_a),
                    grad(&lin.lora_b),
                    grad(&mlp.lora_a),
                    grad(&mlp.lora_b),
                ],
            )
        };
        let (want, want_grads) = run(&whole);
        let (got, got_grads) = run(&shared);
        let mask = whole.mask.clone().into_data().to_vec::<f32>().unwrap();
        for (i, ((g, w), m)) in got.iter().zip(&want).zip(&mask).enumerate() {
            assert!(
                *m == 0.0 || (g - w).abs() < 1e-5,
                "log-prob {i}: {g} vs {w}"
            );
        }
        for (k, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                scale > 0.0 && diff <= 1e-4 * scale,
                "gradient {k}: {diff} vs {scale}"
            );
        }
    }
    // Distinct prompts only: nothing to share.
    assert!(row_batch::<AD>(&[p1, p2], &[&[1], &[2]], 0, &dev)
        .shared
        .is_none());
}

#[test]
fn two_ranks_train_grpo_exactly_as_one() {
    use crate::dist::{with_group, Collective, LocalGroup};
    let _guard = rng_lock();
    // Two micro-batches a step, one per rank; each rank samples half the step's completions.
    let cfg = toy_config(3);
    let run = |dir: &std::path::Path| run_toy(&cfg, dir, None);
    let one = tempfile::tempdir().unwrap();
    let single = run(one.path());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let members = LocalGroup::new(2);
    let mut reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = members
            .into_iter()
            .zip(&dirs)
            .map(|(member, dir)| {
                let run = &run;
                s.spawn(move || {
                    let member: Arc<dyn Collective> = member;
                    with_group(member, || run(dir.path()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let lead = reports.swap_remove(0);
    let rows = comparable_rows;
    let want = rows(&single.metrics_path);
    assert!(want.iter().all(|r| r.extra.contains_key("kl")), "{want:?}");
    assert_eq!(rows(&lead.metrics_path), want);
    let adapter = |r: &crate::train::grpo::GrpoReport| {
        read_lora_adapter(r.adapter_dir.as_ref().unwrap())
            .unwrap()
            .pairs
    };
    assert_eq!(adapter(&lead), adapter(&single));
    assert!(!dirs[1].path().join("completions.jsonl").exists());
}
