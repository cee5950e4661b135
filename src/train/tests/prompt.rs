//! Prompt tuning and P-Tuning against peft (fixture from `scripts/make_sft_prompt_fixture.py`):
//! one step's loss and gradients, peft-written adapters (prompt tuning, P-Tuning, prefix) loaded
//! for inference with peft's logits and greedy tokens, runner's adapter_config.json equal to
//! peft's, and training end to end.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::{fixture_examples, fixture_tensors, lora_cfg, losses, rng_lock, train, AD, SHAPE, TB};
use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::generate::{generate_prompted, GenerateOptions};
use crate::model::hf::HostTensor;
use crate::model::init::tiny_qwen2_config;
use crate::model::lora::LoraLinear;
use crate::model::prompt::{read_prompt_adapter, PromptAdapter};
use crate::train::config::{Method, Reparameterization, SftConfig};
use crate::train::data::{make_batch, summed_cross_entropy};
use crate::train::prefix::{write_prefix_adapter, PrefixLm};
use crate::train::prompt::{
    text_init_ids, write_virtual_adapter, LstmCell, LstmLayer, PromptEncoder, PromptLm,
};
use crate::train::sft::CausalModel;

fn config() -> ModelConfig {
    let mut c = tiny_qwen2_config(SHAPE);
    c.rope_theta = 10_000.0;
    c
}

fn base_tensors(floats: &BTreeMap<String, HostTensor>) -> BTreeMap<String, HostTensor> {
    floats
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("base.").map(|n| (n.to_string(), v.clone())))
        .collect()
}

fn param<B: Backend, const D: usize>(t: &HostTensor) -> Param<Tensor<B, D>> {
    let shape: Vec<usize> = if D == 1 {
        vec![t.numel()]
    } else {
        t.shape.clone()
    };
    Param::from_tensor(Tensor::from_data(
        TensorData::new(t.data.clone(), shape),
        &Default::default(),
    ))
}

/// peft's `PromptEncoder` heads from the fixture's `{case}.param.*` tensors.
fn encoder(floats: &BTreeMap<String, HostTensor>, case: &str) -> Option<PromptEncoder<AD>> {
    let get = |n: &str| &floats[&format!("{case}.param.{n}")];
    let linears = |count: usize| -> Vec<LoraLinear<AD>> {
        (0..count)
            .map(|k| {
                LoraLinear::new(
                    param::<AD, 2>(get(&format!("mlp_head.{}.weight", 2 * k))).val(),
                    Some(param::<AD, 1>(get(&format!("mlp_head.{}.bias", 2 * k))).val()),
                )
            })
            .collect()
    };
    let cell = |k: usize, s: &str| LstmCell {
        weight_ih: param(get(&format!("lstm_head.weight_ih_l{k}{s}"))),
        weight_hh: param(get(&format!("lstm_head.weight_hh_l{k}{s}"))),
        bias_ih: param(get(&format!("lstm_head.bias_ih_l{k}{s}"))),
        bias_hh: param(get(&format!("lstm_head.bias_hh_l{k}{s}"))),
    };
    match case {
        "mlp" => Some(PromptEncoder {
            lstm: Vec::new(),
            mlp: linears(3),
        }),
        "lstm" => Some(PromptEncoder {
            lstm: (0..2)
                .map(|k| LstmLayer {
                    fwd: cell(k, ""),
                    rev: cell(k, "_reverse"),
                })
                .collect(),
            mlp: linears(2),
        }),
        _ => None,
    }
}

/// Max |a - b| over max |b|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(scale > 0.0);
    diff / scale
}

fn vec_of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

#[test]
fn prompt_tuning_and_p_tuning_match_peft_loss_and_gradients() {
    let (floats, ints) = fixture_tensors("sft_prompt_grads.safetensors");
    let device = Default::default();
    let examples = fixture_examples(&ints);
    for case in ["pt", "mlp", "lstm"] {
        let model = PromptLm {
            base: CausalLm::<AD>::from_hf_tensors(&config(), &base_tensors(&floats), &device)
                .unwrap()
                .no_grad(),
            embedding: param(&floats[&format!("{case}.param.embedding.weight")]),
            encoder: encoder(&floats, case),
        };
        let e = rel_err(
            &vec_of(model.virtual_tokens()),
            &floats[&format!("{case}.prompt_embeddings")].data,
        );
        assert!(e < 1e-5, "{case}: virtual tokens differ by {e}");
        let batch = make_batch::<AD>(&examples, &[0, 1], 0, &device);
        let loss = summed_cross_entropy(model.logits(batch.input_ids.clone()), &batch)
            .div_scalar(batch.num_items as f64);
        let got = vec_of(loss.clone())[0];
        let want = floats[&format!("{case}.loss")].data[0];
        let loss_err = ((got - want) / want).abs();
        assert!(loss_err < 1e-4, "{case}: loss {got} vs peft {want}");
        let grads = loss.backward();
        let mut checked: Vec<(String, Vec<f32>)> = vec![(
            "embedding.weight".into(),
            vec_of(model.embedding.val().grad(&grads).unwrap()),
        )];
        if let Some(enc) = &model.encoder {
            for (k, layer) in enc.lstm.iter().enumerate() {
                for (s, c) in [("", &layer.fwd), ("_reverse", &layer.rev)] {
                    let n = |p: &str| format!("lstm_head.{p}_l{k}{s}");
                    checked.push((
                        n("weight_ih"),
                        vec_of(c.weight_ih.val().grad(&grads).unwrap()),
                    ));
                    checked.push((
                        n("weight_hh"),
                        vec_of(c.weight_hh.val().grad(&grads).unwrap()),
                    ));
                    checked.push((n("bias_ih"), vec_of(c.bias_ih.val().grad(&grads).unwrap())));
                    checked.push((n("bias_hh"), vec_of(c.bias_hh.val().grad(&grads).unwrap())));
                }
            }
            for (k, lin) in enc.mlp.iter().enumerate() {
                let w = lin.weight.val().grad(&grads).unwrap();
                let b = lin.bias.as_ref().unwrap().val().grad(&grads).unwrap();
                checked.push((format!("mlp_head.{}.weight", 2 * k), vec_of(w)));
                checked.push((format!("mlp_head.{}.bias", 2 * k), vec_of(b)));
            }
        }
        let expected = floats
            .keys()
            .filter(|k| k.starts_with(&format!("{case}.grad.")))
            .count();
        assert_eq!(checked.len(), expected, "{case}: every peft parameter");
        let mut worst = 0f32;
        for (name, g) in &checked {
            let e = rel_err(g, &floats[&format!("{case}.grad.{name}")].data);
            assert!(e <= 1e-4, "{case} {name}: gradient relative error {e}");
            worst = worst.max(e);
        }
        println!("{case}: loss rel err {loss_err:.2e}, max grad rel err {worst:.2e}");
    }
}

fn sft_cfg(method: Method) -> SftConfig {
    SftConfig {
        method,
        num_virtual_tokens: 3,
        pre_seq_len: 3,
        encoder_reparameterization_type: Reparameterization::Lstm,
        encoder_hidden_size: Some(8),
        ..SftConfig::default()
    }
}

#[test]
fn peft_written_adapters_give_peft_logits_and_greedy_tokens() {
    let (floats, ints) = fixture_tensors("sft_prompt_grads.safetensors");
    let meta = fixture_metadata("sft_prompt_grads.safetensors");
    let configs: serde_json::Value = serde_json::from_str(&meta["adapter_configs"]).unwrap();
    let device = Default::default();
    let ids: Vec<u32> = ints["infer_ids"].iter().map(|&t| t as u32).collect();
    let prompts = vec![ids[..5].to_vec(), ids[5..].to_vec()];
    for case in ["pt", "lstm", "prefix"] {
        // The folder exactly as peft saved it.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("adapter_config.json"),
            configs[case].to_string(),
        )
        .unwrap();
        let e = floats[&format!("saved.{case}.prompt_embeddings")].clone();
        let tensors = [("prompt_embeddings".to_string(), e)].into_iter().collect();
        crate::model::hf::save_safetensors(
            dir.path().join("adapter_model.safetensors"),
            &tensors,
            crate::model::hf::DType::F32,
        )
        .unwrap();

        let file = read_prompt_adapter(dir.path()).unwrap();
        let base =
            CausalLm::<TB>::from_hf_tensors(&config(), &base_tensors(&floats), &device).unwrap();
        let adapter =
            PromptAdapter::<TB>::from_file(&file, &config(), dir.path(), &device).unwrap();
        // Logits of the prompt tokens (through the training forward).
        let t = |h: &HostTensor| {
            Tensor::<TB, 2>::from_data(TensorData::new(h.data.clone(), h.shape.clone()), &device)
        };
        let input = Tensor::<TB, 2, burn::tensor::Int>::from_data(
            TensorData::new(ints["infer_ids"].clone(), [2, 5]),
            &device,
        );
        let logits = match case {
            "prefix" => PrefixLm {
                base: base.clone(),
                embedding: Param::from_tensor(t(&file.prompt_embeddings)),
                trans: None,
            }
            .logits(input),
            _ => PromptLm {
                base: base.clone(),
                embedding: Param::from_tensor(t(&file.prompt_embeddings)),
                encoder: None,
            }
            .logits(input),
        };
        let e = rel_err(
            &vec_of(logits),
            &floats[&format!("saved.{case}.logits")].data,
        );
        assert!(e < 1e-4, "{case}: logits relative error {e}");
        // Greedy tokens through the KV-cached generation.
        let opts = GenerateOptions {
            max_new_tokens: 4,
            ..GenerateOptions::default()
        };
        let gens = generate_prompted(&base, Some(&adapter), &prompts, &opts, None).unwrap();
        let got: Vec<i64> = gens
            .iter()
            .flat_map(|g| g.token_ids.iter().map(|&t| i64::from(t)))
            .collect();
        assert_eq!(got, ints[&format!("saved.{case}.generated")], "{case}");
        let plain = crate::model::generate::generate(&base, &prompts, &opts, None).unwrap();
        assert_ne!(plain, gens, "{case}: the adapter changes nothing");

        // runner writes the same adapter_config.json as peft.
        let out = tempfile::tempdir().unwrap();
        let method = match case {
            "pt" => Method::PromptTuning,
            "lstm" => Method::PTuning,
            _ => Method::Prefix,
        };
        let cfg = sft_cfg(method);
        let _guard = rng_lock();
        match method {
            Method::Prefix => {
                let m = PrefixLm::new(base.clone(), &cfg, &device);
                write_prefix_adapter(&m, &cfg, None, out.path()).unwrap();
            }
            _ => {
                let m = PromptLm::new(base.clone(), &cfg, None, &device);
                write_virtual_adapter(&m, &cfg, None, out.path()).unwrap();
            }
        }
        let written: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(written, configs[case], "{case}: adapter_config.json");
        let back = read_prompt_adapter(out.path()).unwrap();
        assert_eq!(back.prompt_embeddings.shape, file.prompt_embeddings.shape);
    }
}

fn fixture_metadata(name: &str) -> BTreeMap<String, String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sft");
    let bytes = std::fs::read(std::path::Path::new(dir).join(name)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect()
}

#[test]
fn prompt_tuning_and_p_tuning_learn_and_write_adapters() {
    for (method, reparam, lr) in [
        (Method::PromptTuning, Reparameterization::Mlp, 1e-1),
        (Method::PTuning, Reparameterization::Mlp, 1e-2),
        (Method::PTuning, Reparameterization::Lstm, 1e-2),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SftConfig {
            method,
            learning_rate: lr,
            num_virtual_tokens: 4,
            encoder_reparameterization_type: reparam,
            encoder_hidden_size: Some(16),
            ..lora_cfg(20)
        };
        let report = train(&cfg, dir.path());
        let l = losses(dir.path());
        assert!(l[19].1 < 0.8 * l[0].1, "{method:?} {reparam:?}: {l:?}");
        let file = read_prompt_adapter(report.adapter_dir.as_ref().unwrap()).unwrap();
        assert_eq!(file.prompt_embeddings.shape, vec![4, 32]);
    }
}

#[test]
fn text_init_repeats_or_cuts_the_ids() {
    assert_eq!(text_init_ids(&[5, 6, 7], 7), vec![5, 6, 7, 5, 6, 7, 5]);
    assert_eq!(text_init_ids(&[5, 6, 7], 2), vec![5, 6]);
    let bad = SftConfig {
        method: Method::PromptTuning,
        prompt_tuning_init: crate::train::config::PromptInit::Text,
        ..SftConfig::default()
    };
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("prompt_tuning_init_text"), "{err}");
}
