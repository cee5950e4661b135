//! Parity with transformers on the tiny fixtures of `scripts/make_model_fixtures.py`
//! (transformers 5.17, f32 CPU), KV-cache and padding invariants, and generation behaviour.

mod family;

use std::collections::BTreeMap;

use burn::tensor::{Bool, Int, Tensor, TensorData};
use serde_json::Value;

use crate::model::config::ModelConfig;
use crate::model::decoder::{positions_from_mask, CausalLm, ModelError};
use crate::model::device::CpuBackend as TB;
use crate::model::generate::{
    generate, BudgetForcing, FinishReason, GenerateOptions, SamplingParams,
};
use crate::model::hf::{load_hf_folder_tensors, HostTensor};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/model");

struct Fixture {
    config: ModelConfig,
    tensors: BTreeMap<String, HostTensor>,
    expected: Value,
}

fn fixture(name: &str) -> Fixture {
    let dir = format!("{FIXTURES}/{name}");
    let text = std::fs::read_to_string(format!("{dir}/expected.json")).unwrap();
    Fixture {
        config: ModelConfig::from_file(format!("{dir}/config.json")).unwrap(),
        tensors: load_hf_folder_tensors(&dir).unwrap(),
        expected: serde_json::from_str(&text).unwrap(),
    }
}

fn model(f: &Fixture) -> CausalLm<TB> {
    CausalLm::from_hf_tensors(&f.config, &f.tensors, &Default::default()).unwrap()
}

fn ints(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

fn int_tensor(rows: &[Vec<i64>]) -> Tensor<TB, 2, Int> {
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [b, t]), &Default::default())
}

fn to_vec(t: Tensor<TB, 3>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Batch logits (row 1 left-padded) match transformers at every real position.
fn check_logits(name: &str) {
    let f = fixture(name);
    let m = model(&f);
    let ids = ints(&f.expected["ids"]);
    let mask = ints(&f.expected["mask"]);
    let positions = ints(&f.expected["positions"]);
    let mask_u8: Vec<Vec<u8>> = mask
        .iter()
        .map(|r| r.iter().map(|&x| x as u8).collect())
        .collect();
    assert_eq!(
        positions_from_mask(&mask_u8),
        positions,
        "position rule differs from HF"
    );
    let (b, t, v) = (ids.len(), ids[0].len(), f.config.vocab_size);
    let bool_mask: Vec<bool> = mask.concat().iter().map(|&x| x != 0).collect();
    let mask_t =
        Tensor::<TB, 2, Bool>::from_data(TensorData::new(bool_mask, [b, t]), &Default::default());
    let got = to_vec(m.forward(int_tensor(&ids), int_tensor(&positions), Some(mask_t), None));
    let want = floats(&f.expected["logits"]);
    let mut worst = 0.0f32;
    for (r, row_mask) in mask.iter().enumerate().take(b) {
        for (p, &m) in row_mask.iter().enumerate().take(t) {
            if m == 0 {
                continue;
            }
            let o = (r * t + p) * v;
            worst = worst.max(max_diff(&got[o..o + v], &want[o..o + v]));
        }
    }
    assert!(worst < 1e-4, "{name}: max |logit diff| {worst}");

    // Row 1 alone, unpadded, equals its padded run and transformers' unpadded run.
    let pad = mask[1].iter().filter(|&&x| x == 0).count();
    let alone_ids = vec![ids[1][pad..].to_vec()];
    let alone_pos = vec![(0..(t - pad) as i64).collect::<Vec<_>>()];
    let alone = to_vec(m.forward(int_tensor(&alone_ids), int_tensor(&alone_pos), None, None));
    let padded_row = &got[(t + pad) * v..2 * t * v];
    assert!(
        max_diff(&alone, padded_row) < 1e-5,
        "{name}: padded row differs from unpadded"
    );
    assert!(max_diff(&alone, &floats(&f.expected["unpadded_logits"])) < 1e-4);
}

#[test]
fn qwen2_logits_match_transformers() {
    check_logits("qwen2");
}

#[test]
fn llama_logits_match_transformers() {
    check_logits("llama");
}

fn greedy_opts(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        ..Default::default()
    }
}

fn prompts_and_tokens(f: &Fixture) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let greedy = f.expected["greedy"].as_array().unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    (
        greedy.iter().map(|g| ids(&g["prompt"])).collect(),
        greedy.iter().map(|g| ids(&g["tokens"])).collect(),
    )
}

/// Greedy tokens equal transformers', generated as one left-padded batch with the cache.
fn check_greedy(name: &str) {
    let f = fixture(name);
    let m = model(&f);
    let (prompts, want) = prompts_and_tokens(&f);
    let got = generate(&m, &prompts, &greedy_opts(16), None).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g.token_ids, w, "{name}");
        assert_eq!(g.finish, FinishReason::Length);
    }
}

#[test]
fn qwen2_greedy_matches_transformers() {
    check_greedy("qwen2");
}

#[test]
fn llama_greedy_matches_transformers() {
    check_greedy("llama");
}

#[test]
fn rows_sharing_a_prompt_generate_as_if_alone() {
    let f = fixture("qwen2");
    let m = model(&f);
    let (prompts, want) = prompts_and_tokens(&f);
    assert!(prompts.len() >= 2 && prompts[0] != prompts[1]);
    // Repeated prompts are prefilled once and their cache rows copied: greedy rows still give
    // transformers' tokens.
    let batch = vec![
        prompts[0].clone(),
        prompts[1].clone(),
        prompts[0].clone(),
        prompts[0].clone(),
    ];
    let got = generate(&m, &batch, &greedy_opts(16), None).unwrap();
    for (g, w) in got.iter().zip([&want[0], &want[1], &want[0], &want[0]]) {
        assert_eq!(&g.token_ids, w);
    }
    // Sampled: row i draws from seed + i, as a batch of one with that seed does.
    let sampled = |batch: &[Vec<u32>], seed: u64| {
        let mut opts = greedy_opts(12);
        opts.sampling = SamplingParams {
            seed,
            greedy: false,
            ..Default::default()
        };
        generate(&m, batch, &opts, None).unwrap()
    };
    let group = sampled(&vec![prompts[0].clone(); 3], 40);
    for (i, row) in group.iter().enumerate() {
        let alone = sampled(std::slice::from_ref(&prompts[0]), 40 + i as u64);
        assert_eq!(row.token_ids, alone[0].token_ids, "row {i}");
    }
    assert_ne!(
        group[0].token_ids, group[1].token_ids,
        "rows draw differently"
    );
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    for name in ["qwen2", "llama"] {
        let f = fixture(name);
        let m = model(&f);
        let seq: Vec<i64> = ints(&f.expected["ids"])[0].clone();
        let t = seq.len();
        assert!(
            t >= 8,
            "{name}: the fixture's sequence is too short for this test"
        );
        let full = to_vec(m.forward(
            int_tensor(std::slice::from_ref(&seq)),
            int_tensor(&[(0..t as i64).collect()]),
            None,
            None,
        ));
        let v = f.config.vocab_size;
        // No room (every step copies), room that runs out after three positions (in place,
        // then a copy), and room for everything (in place throughout).
        for room in [0, 3, 64] {
            let mut cache = m.new_cache();
            let pre = to_vec(m.forward(
                int_tensor(&[seq[..4].to_vec()]),
                int_tensor(&[(0..4).collect()]),
                None,
                Some(&mut cache),
            ));
            assert!(max_diff(&pre, &full[..4 * v]) < 1e-5, "{name} prefill");
            cache.reserve(room);
            // Then one token, two tokens, one token, ... at a time.
            let mut p = 4;
            let mut width = 1;
            while p < t {
                let end = (p + width).min(t);
                let step = to_vec(m.forward(
                    int_tensor(&[seq[p..end].to_vec()]),
                    int_tensor(&[(p as i64..end as i64).collect()]),
                    None,
                    Some(&mut cache),
                ));
                assert!(
                    max_diff(&step, &full[p * v..end * v]) < 1e-5,
                    "{name} room {room}: positions {p}..{end}"
                );
                assert_eq!(cache.len(), end);
                p = end;
                width = 3 - width;
            }
        }
    }
}

#[test]
fn missing_or_misshapen_tensor_is_named() {
    let f = fixture("qwen2");
    let mut t = f.tensors.clone();
    t.remove("model.layers.1.self_attn.k_proj.bias");
    let e = CausalLm::<TB>::from_hf_tensors(&f.config, &t, &Default::default()).unwrap_err();
    assert!(
        matches!(&e, ModelError::MissingTensor { tensor } if tensor == "model.layers.1.self_attn.k_proj.bias")
    );
    let mut t = f.tensors.clone();
    t.insert(
        "lm_head.weight".into(),
        HostTensor::new(vec![3, 2], vec![0.0; 6]),
    );
    let e = CausalLm::<TB>::from_hf_tensors(&f.config, &t, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lm_head.weight") && e.contains("[300, 64]") && e.contains("[3, 2]"),
        "{e}"
    );
}

#[test]
fn to_hf_tensors_round_trips() {
    for name in ["qwen2", "llama"] {
        let f = fixture(name);
        let back = model(&f).to_hf_tensors();
        assert_eq!(back, f.tensors, "{name}");
    }
}

fn sampling(seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingParams {
            greedy: false,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.3,
            seed,
        },
        ..Default::default()
    }
}

#[test]
fn sampling_is_seeded_and_batch_independent() {
    let f = fixture("qwen2");
    let m = model(&f);
    let (prompts, _) = prompts_and_tokens(&f);
    let batch = generate(&m, &prompts, &sampling(5), None).unwrap();
    assert_eq!(batch, generate(&m, &prompts, &sampling(5), None).unwrap());
    // Row 0 alone uses the same row seed and the same penalised logits.
    let alone = generate(&m, &prompts[..1], &sampling(5), None).unwrap();
    assert_eq!(alone[0], batch[0]);
    let other = generate(&m, &prompts, &sampling(6), None).unwrap();
    assert_ne!(other, batch);
    // top-k 1 is greedy whatever the temperature.
    let mut k1 = sampling(9);
    k1.sampling.top_k = 1;
    k1.sampling.repetition_penalty = 1.0;
    k1.max_new_tokens = 16;
    let (_, want) = prompts_and_tokens(&f);
    let got = generate(&m, &prompts, &k1, None).unwrap();
    assert_eq!(
        got.iter().map(|g| g.token_ids.clone()).collect::<Vec<_>>(),
        want
    );
}

#[test]
fn stop_tokens_and_strings_end_rows() {
    let f = fixture("llama");
    let m = model(&f);
    let (prompts, want) = prompts_and_tokens(&f);
    let mut opts = greedy_opts(16);
    opts.stop_token_ids = vec![want[0][3]];
    let got = generate(&m, &prompts[..1], &opts, None).unwrap();
    let first = want[0].iter().position(|&t| t == want[0][3]).unwrap();
    assert_eq!(got[0].token_ids, want[0][..=first].to_vec());
    assert_eq!(got[0].finish, FinishReason::StopToken(want[0][3]));
    // Decode ids as "<id>" text; stop at the text of the 12th token (first seen there).
    let decode = |ids: &[u32]| ids.iter().map(|i| format!("<{i}>")).collect::<String>();
    let mut opts = greedy_opts(16);
    let target = format!("<{}>", want[1][11]);
    opts.stop_strings = vec![target.clone()];
    let got = generate(&m, &prompts[1..2], &opts, Some(&decode)).unwrap();
    let first = want[1].iter().position(|&t| t == want[1][11]).unwrap();
    assert_eq!(got[0].token_ids, want[1][..=first].to_vec());
    assert_eq!(got[0].finish, FinishReason::StopString(target));
}

#[test]
fn budget_forcing_follows_s1() {
    let f = fixture("qwen2");
    let m = model(&f);
    let (prompts, want) = prompts_and_tokens(&f);
    let (prompt, g) = (&prompts[1], &want[1]);
    let continue_greedy = |prefix: &[u32], n: usize| -> Vec<u32> {
        let p = [prompt.as_slice(), prefix].concat();
        let rest = generate(&m, &[p], &greedy_opts(n), None)
            .unwrap()
            .remove(0)
            .token_ids;
        [prefix, rest.as_slice()].concat()
    };
    // num_ignore: the end-of-thinking token (greedy's 3rd) becomes "Wait" once.
    let (wait, answer) = (vec![7u32, 8], vec![5u32, 6]);
    let mut opts = greedy_opts(10);
    opts.budget = Some(BudgetForcing {
        max_thinking_tokens: None,
        num_ignore: 1,
        think_end: vec![g[2]],
        answer_start: answer.clone(),
        wait: wait.clone(),
    });
    let got = generate(&m, std::slice::from_ref(prompt), &opts, None)
        .unwrap()
        .remove(0)
        .token_ids;
    let prefix = [&g[..2], wait.as_slice()].concat();
    assert_eq!(got, continue_greedy(&prefix, 10 - prefix.len()));
    // max_thinking_tokens: after 3 thoughts the answer delimiter is forced.
    let unused = (0..f.config.vocab_size as u32)
        .find(|t| !g.contains(t))
        .unwrap();
    opts.budget = Some(BudgetForcing {
        max_thinking_tokens: Some(3),
        num_ignore: 0,
        think_end: vec![unused],
        answer_start: answer.clone(),
        wait,
    });
    let got = generate(&m, std::slice::from_ref(prompt), &opts, None)
        .unwrap()
        .remove(0)
        .token_ids;
    let prefix = [&g[..3], answer.as_slice()].concat();
    assert_eq!(got, continue_greedy(&prefix, 10 - prefix.len()));
}

#[test]
fn lora_trains_only_adapters_under_autodiff() {
    type AD = burn::backend::Autodiff<TB>;
    let f = fixture("qwen2");
    let base = CausalLm::<AD>::from_hf_tensors(&f.config, &f.tensors, &Default::default()).unwrap();
    let ids = Tensor::<AD, 2, Int>::from_data(
        TensorData::new(vec![5i64, 9, 17, 3], [1, 4]),
        &Default::default(),
    );
    let pos = Tensor::<AD, 2, Int>::from_data(
        TensorData::new(vec![0i64, 1, 2, 3], [1, 4]),
        &Default::default(),
    );
    let before = base
        .forward(ids.clone(), pos.clone(), None, None)
        .into_data();
    let (m, wrapped) = base.with_lora(&["q_proj", "v_proj", "down_proj"], 4, 8.0, 0.0);
    assert_eq!(wrapped, 6);
    // Fresh adapters (B = 0) leave the logits unchanged.
    m.forward(ids.clone(), pos.clone(), None, None)
        .into_data()
        .assert_approx_eq::<f32>(&before, burn::tensor::Tolerance::absolute(1e-6));
    let grads = m
        .forward(ids, pos, None, None)
        .powi_scalar(2)
        .mean()
        .backward();
    let q = &m.model.layers[0].self_attn.q_proj;
    assert!(q.lora_b.as_ref().unwrap().grad(&grads).is_some());
    assert!(q.lora_a.as_ref().unwrap().grad(&grads).is_some());
    assert!(q.weight.grad(&grads).is_none());
    assert!(q.bias.as_ref().unwrap().grad(&grads).is_none());
    assert!(m.model.embed_tokens.weight.grad(&grads).is_none());
    assert!(m.model.layers[1]
        .self_attn
        .k_proj
        .weight
        .grad(&grads)
        .is_none());
    let adapters = m.lora_tensors();
    assert_eq!(adapters.len(), 12);
    assert_eq!(
        adapters["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape,
        vec![4, 128]
    );
    assert_eq!(
        adapters["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape,
        vec![64, 4]
    );
}
