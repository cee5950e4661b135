//! The engine against the references: each kernel against dequantize-then-f32-dot, the
//! decoder's logits against `CausalLm`'s on tiny random models (f32 from HF tensors, Q8_0 and
//! Q4_K_M from GGUF files written here), greedy generation against the burn path, batched rows
//! against single rows.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::gguf::mix::ExportType;
use crate::gguf::quants;
use crate::gguf::tokenizer::GgufTokenizer;
use crate::gguf::GgmlType;
use crate::infer::quant::{self, Activations, WeightType, WeightView};
use crate::infer::{engine, QuantModel};
use crate::model::config::{Architecture, ModelConfig};
use crate::model::decoder::CausalLm;
use crate::model::device::CpuBackend;
use crate::model::generate::{generate, GenerateOptions, SamplingParams};
use crate::model::hf::HostTensor;
use crate::model::init::{init_weights, tiny_qwen2_config, TinyShape};

fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

const ALL_TYPES: [WeightType; 8] = [
    WeightType::F32,
    WeightType::F16,
    WeightType::BF16,
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q8_0,
    WeightType::Q4K,
    WeightType::Q6K,
];

/// Each kernel (scalar and, where the CPU has it, AVX2) against the f64 dot of the dequantized
/// weights with the unquantized activations. The only approximation a kernel adds is the
/// activations' 8-bit rounding: each `x_i` moves by at most half a step, `amax_block / 254`,
/// so `|err| <= sum_i |w_i| * amax_block(i) / 254` (plus f32 summation, 1e-5 relative).
#[test]
fn kernels_match_dequantized_dot_within_activation_rounding() {
    let (rows, k) = (9, 512);
    let w = rand_vec(rows * k, 1, 1.0);
    // Activations with a few outliers, as hidden states have; 1 row (the 4-row tiles) and 6
    // (the 4-column tiles and the rest).
    let mut x = rand_vec(6 * k, 2, 1.0);
    x[5] = 9.0;
    x[700] = -6.0;
    for ty in ALL_TYPES {
        let bytes = quants::quantize(ty.ggml(), &w).unwrap();
        let deq = quants::dequantize(ty.ggml(), &bytes, rows * k).unwrap();
        let view = WeightView {
            ty,
            rows,
            cols: k,
            bytes: &bytes,
        };
        let block = match ty.act_kind() {
            quant::ActKind::F32 => 0,
            quant::ActKind::Q8 => 32,
            quant::ActKind::Q8K => 256,
        };
        for t in [1, 6] {
            let mut acts = Activations::default();
            acts.encode(&x[..t * k], t, k, ty.act_kind());
            for simd in [false, true] {
                let mut out = vec![0f32; rows * t];
                quant::matmul_into(&[view], &acts, &mut out, simd);
                for r in 0..rows {
                    for j in 0..t {
                        let (wr, xj) = (&deq[r * k..(r + 1) * k], &x[j * k..(j + 1) * k]);
                        let exact: f64 =
                            wr.iter().zip(xj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let mag: f64 = wr
                            .iter()
                            .zip(xj)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
                        let mut bound = 1e-5 * mag + 1e-6;
                        if block > 0 {
                            for (bw, bx) in wr.chunks(block).zip(xj.chunks(block)) {
                                let amax = bx.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                                let sw: f64 = bw.iter().map(|v| v.abs() as f64).sum();
                                bound += sw * amax / 254.0;
                            }
                        }
                        let got = out[r * t + j] as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{ty:?} t={t} simd={simd} row {r} act {j}: {got} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }
}

/// A token's outputs are the same bits whichever tokens share its pass (a decoding batch
/// shrinks as rows finish), for every weight type and with or without SIMD.
#[test]
fn a_tokens_products_do_not_depend_on_its_batch() {
    let (rows, k) = (12, 256);
    let w = rand_vec(rows * k, 3, 1.0);
    let x = rand_vec(9 * k, 4, 1.0);
    for ty in ALL_TYPES {
        let bytes = quants::quantize(ty.ggml(), &w).unwrap();
        let view = WeightView {
            ty,
            rows,
            cols: k,
            bytes: &bytes,
        };
        for simd in [false, true] {
            let product = |from: usize, t: usize| {
                let mut acts = Activations::default();
                acts.encode(&x[from * k..(from + t) * k], t, k, ty.act_kind());
                let mut out = vec![0f32; rows * t];
                quant::matmul_into(&[view], &acts, &mut out, simd);
                out
            };
            let alone: Vec<Vec<f32>> = (0..9).map(|j| product(j, 1)).collect();
            for t in 2..=9 {
                let together = product(9 - t, t);
                for r in 0..rows {
                    for j in 0..t {
                        let (a, b) = (together[r * t + j], alone[9 - t + j][r]);
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{ty:?} simd={simd} t={t} row {r} token {j}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dequantize_row_matches_the_gguf_dequantizer() {
    let (rows, k) = (3, 512);
    let w = rand_vec(rows * k, 3, 1.0);
    for ty in ALL_TYPES {
        let bytes = quants::quantize(ty.ggml(), &w).unwrap();
        let deq = quants::dequantize(ty.ggml(), &bytes, rows * k).unwrap();
        let view = WeightView {
            ty,
            rows,
            cols: k,
            bytes: &bytes,
        };
        let mut row = vec![0f32; k];
        for r in 0..rows {
            quant::dequantize_row(&view, r, &mut row);
            for (i, (a, b)) in row.iter().zip(&deq[r * k..(r + 1) * k]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{ty:?} [{r}, {i}]: {a} vs {b}"
                );
            }
        }
    }
}

/// A tiny model of `arch` with random weights large enough to give distinct logits; norms
/// and biases perturbed so that their paths count.
fn tiny_model(arch: Architecture, hidden: usize) -> (ModelConfig, BTreeMap<String, HostTensor>) {
    let mut c = tiny_qwen2_config(TinyShape {
        hidden,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 2 * hidden,
        vocab: 260,
    });
    c.initializer_range = 0.08;
    c.rope_theta = 10000.0;
    c.max_position_embeddings = 256;
    c.architecture = arch;
    c.model_type = match arch {
        Architecture::Llama => "llama",
        Architecture::Qwen3 => "qwen3",
        _ => "qwen2",
    }
    .into();
    let mut t = init_weights(&c, 7);
    if arch == Architecture::Qwen3 {
        for l in 0..c.num_hidden_layers {
            for n in ["q_norm", "k_norm"] {
                let name = format!("model.layers.{l}.self_attn.{n}.weight");
                t.insert(
                    name,
                    HostTensor::new(vec![c.head_dim], vec![1.0; c.head_dim]),
                );
            }
        }
    }
    let mut seed = 100;
    for (name, v) in t.iter_mut() {
        if v.shape.len() == 1 {
            seed += 1;
            let base = if name.ends_with("norm.weight") {
                1.0
            } else {
                0.0
            };
            let noise = rand_vec(v.data.len(), seed, 0.3);
            for (x, r) in v.data.iter_mut().zip(noise) {
                *x = base + r;
            }
        }
    }
    (c, t)
}

fn burn_logits(c: &ModelConfig, t: &BTreeMap<String, HostTensor>, ids: &[u32]) -> Vec<f32> {
    let model = CausalLm::<CpuBackend>::from_hf_tensors(c, t, &Default::default()).unwrap();
    crate::model::generate::prompted_logits(&model, None, ids)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let scale = b.iter().fold(0f32, |m, y| m.max(y.abs()));
    (d, scale)
}

const IDS: [u32; 11] = [3, 17, 250, 42, 42, 9, 101, 7, 259, 64, 1];

#[test]
fn f32_engine_logits_match_causal_lm() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        let (c, t) = tiny_model(arch, 64);
        let want = burn_logits(&c, &t, &IDS);
        for simd in [false, true] {
            let mut m = QuantModel::from_hf_tensors(c.clone(), t.clone()).unwrap();
            m.set_simd(simd);
            let got = engine::prompt_logits(&m, &IDS);
            let (d, scale) = max_abs_diff(&got, &want);
            assert!(
                d <= 1e-4 * scale.max(1.0),
                "{arch:?} simd={simd}: {d} (scale {scale})"
            );
        }
    }
}

fn tiny_tokenizer(vocab: usize) -> GgufTokenizer {
    GgufTokenizer {
        model: "gpt2".into(),
        pre: Some("qwen2".into()),
        tokens: (0..vocab).map(|i| format!("t{i}")).collect(),
        token_types: vec![1; vocab],
        eos_id: Some(259),
        ..Default::default()
    }
}

/// Writes the tiny model as a GGUF of `et` and returns the engine over it and the burn
/// model's logits over the same (dequantized) weights.
fn gguf_pair(arch: Architecture, et: ExportType, dir: &std::path::Path) -> (QuantModel, Vec<f32>) {
    let (c, t) = tiny_model(arch, 256);
    let path = dir.join(format!("{arch:?}-{et:?}.gguf"));
    crate::gguf::model::write_gguf_model(&path, &c, &t, &tiny_tokenizer(c.vocab_size), et, "tiny")
        .unwrap();
    let (cfg, tensors, _) = crate::gguf::model::load_gguf_model(&path).unwrap();
    let want = burn_logits(&cfg, &tensors, &IDS);
    let (model, _) = crate::infer::open_gguf(&path).unwrap();
    (model, want)
}

/// GGUF weights read in place give the logits of the dequantized weights in the burn decoder,
/// up to the activations' 8-bit rounding: about 1/254 of each 32-block's largest value per
/// projection input (Q8_0), of each 256-block's for the k-quants (Q8_K, coarser), through 7
/// projections a layer, 2 layers and the head. The test allows 3% (Q8_0) and 6% (Q4_K_M) of
/// the largest logit; measured about 1% and 4%.
#[test]
fn gguf_engine_logits_match_causal_lm_on_dequantized_weights() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, et) in [
        (Architecture::Llama, ExportType::Q8_0),
        (Architecture::Qwen2, ExportType::Q8_0),
        (Architecture::Llama, ExportType::Q4_K_M),
        (Architecture::Llama, ExportType::F16),
    ] {
        let (model, want) = gguf_pair(arch, et, dir.path());
        let got = engine::prompt_logits(&model, &IDS);
        let (d, scale) = max_abs_diff(&got, &want);
        let tol = match et {
            ExportType::F16 => 1e-4,
            ExportType::Q4_K_M => 0.06,
            _ => 0.03,
        };
        assert!(d <= tol * scale, "{arch:?} {et:?}: {d} (scale {scale})");
        // The argmax agrees at most positions (rounding may flip near-ties).
        let vocab = model.config.vocab_size;
        let argmax = |l: &[f32]| {
            l.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
        };
        let agree = (0..IDS.len())
            .filter(|&i| {
                argmax(&got[i * vocab..(i + 1) * vocab])
                    == argmax(&want[i * vocab..(i + 1) * vocab])
            })
            .count();
        assert!(
            agree + 1 >= IDS.len(),
            "{arch:?} {et:?}: argmax agrees at {agree}"
        );
    }
}

fn opts(max_new_tokens: usize, sampling: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling,
        stop_token_ids: vec![],
        ..Default::default()
    }
}

#[test]
fn greedy_generation_matches_the_burn_path() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let (c, t) = tiny_model(arch, 64);
        let burn = CausalLm::<CpuBackend>::from_hf_tensors(&c, &t, &Default::default()).unwrap();
        let prompts = vec![IDS.to_vec(), vec![5, 6, 7], IDS[..4].to_vec()];
        let o = opts(12, SamplingParams::default());
        let want = generate(&burn, &prompts, &o, None).unwrap();
        let m = QuantModel::from_hf_tensors(c.clone(), t.clone()).unwrap();
        let got =
            engine::generate::<CpuBackend>(&m, &prompts, &o, None, &Default::default()).unwrap();
        assert_eq!(got, want, "{arch:?}");
        // A stop token that ends row 1 early: the engine drops it from later steps, burn
        // feeds it padding; the tokens agree.
        let stop = want[1].token_ids[2];
        let o = GenerateOptions {
            stop_token_ids: vec![stop],
            ..o
        };
        let want = generate(&burn, &prompts, &o, None).unwrap();
        assert!(want[1].token_ids.len() <= 3, "{want:?}");
        let got =
            engine::generate::<CpuBackend>(&m, &prompts, &o, None, &Default::default()).unwrap();
        assert_eq!(got, want, "{arch:?} with stop token {stop}");
    }
}

#[test]
fn generator_on_the_cpu_decodes_through_burn_with_the_same_tokens() {
    let (c, t) = tiny_model(Architecture::Qwen2, 64);
    let burn = CausalLm::<CpuBackend>::from_hf_tensors(&c, &t, &Default::default()).unwrap();
    let prompts = vec![IDS.to_vec(), vec![5, 6, 7]];
    let generator = crate::infer::Generator::new(&burn, None);
    // The GPU engine takes only models on a CUDA device.
    assert!(!generator.on_engine());
    for sampling in [
        SamplingParams::default(),
        SamplingParams {
            greedy: false,
            temperature: 0.8,
            seed: 3,
            ..Default::default()
        },
    ] {
        let o = opts(8, sampling);
        let want = generate(&burn, &prompts, &o, None).unwrap();
        assert_eq!(generator.generate(&prompts, &o, None).unwrap(), want);
    }
}

#[test]
fn batched_rows_equal_single_rows_and_sampling_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = gguf_pair(Architecture::Llama, ExportType::Q8_0, dir.path());
    let prompts = vec![IDS.to_vec(), vec![5, 6, 7], IDS.to_vec()];
    let o = opts(10, SamplingParams::default());
    let batched =
        engine::generate::<CpuBackend>(&m, &prompts, &o, None, &Default::default()).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let single = engine::generate::<CpuBackend>(
            &m,
            std::slice::from_ref(p),
            &o,
            None,
            &Default::default(),
        )
        .unwrap();
        assert_eq!(&single[0], b);
    }
    let sampled = opts(
        10,
        SamplingParams {
            greedy: false,
            temperature: 0.9,
            top_k: 20,
            top_p: 0.9,
            repetition_penalty: 1.1,
            seed: 3,
        },
    );
    let a = engine::generate::<CpuBackend>(&m, &prompts, &sampled, None, &Default::default());
    let b = engine::generate::<CpuBackend>(&m, &prompts, &sampled, None, &Default::default());
    assert_eq!(a.unwrap(), b.unwrap());
}

#[test]
fn unsupported_weight_types_and_families_are_named() {
    let (mut c, t) = tiny_model(Architecture::Llama, 64);
    c.architecture = Architecture::Gemma2;
    c.model_type = "gemma2".into();
    let err = QuantModel::from_hf_tensors(c, t).unwrap_err().to_string();
    assert!(err.contains("gemma2"), "{err}");
    assert_eq!(WeightType::from_ggml(GgmlType::Q5_K), None);
}

/// GRPO's sampling copy: the CPU engine over Q8_0 weights of the (merged) policy, made only for
/// the f32 CPU backend and a model without unmerged adapters. Its logits are those of the burn
/// decoder over the Q8_0-rounded weights, up to the activations' 8-bit rounding (the 3% bound of
/// the GGUF Q8_0 test).
#[test]
fn sampling_copy_is_q8_0_of_the_cpu_policy_and_only_of_it() {
    use burn::backend::Autodiff;
    let (c, t) = tiny_model(Architecture::Qwen2, 256);
    let rounded: BTreeMap<String, HostTensor> = t
        .iter()
        .map(|(name, v)| {
            let mut v = v.clone();
            if v.shape.len() == 2 {
                let bytes = quants::quantize(GgmlType::Q8_0, &v.data).unwrap();
                v.data = quants::dequantize(GgmlType::Q8_0, &bytes, v.data.len()).unwrap();
            }
            (name.clone(), v)
        })
        .collect();
    let want = burn_logits(&c, &rounded, &IDS);
    let device = Default::default();
    let model = CausalLm::<CpuBackend>::from_hf_tensors(&c, &t, &device).unwrap();
    let copy = crate::infer::sampling_copy(&model)
        .unwrap()
        .expect("a copy on the CPU");
    let got = engine::prompt_logits(&copy, &IDS);
    let (d, scale) = max_abs_diff(&got, &want);
    assert!(d <= 0.03 * scale.max(1.0), "Q8_0 copy: {d} (scale {scale})");
    let unrounded = burn_logits(&c, &t, &IDS);
    assert!(
        max_abs_diff(&got, &unrounded).0 > 0.0,
        "the weights were not requantized"
    );

    // An unmerged adapter, or another backend: the caller samples through burn.
    let (with_lora, _) = model.clone().with_lora(&["q_proj"], 4, 8.0, 0.0);
    assert!(crate::infer::sampling_copy(&with_lora).unwrap().is_none());
    let tracked = CausalLm::<Autodiff<CpuBackend>>::from_hf_tensors(&c, &t, &device).unwrap();
    assert!(crate::infer::sampling_copy(&tracked).unwrap().is_none());
}
