//! Parity with transformers 5 on tiny random models of every family the decoder reads (Qwen3,
//! Mistral with a sliding window of 8, Llama with llama3 rope scaling, Gemma 2, Gemma 3, GLM-4,
//! GLM), made by `scripts/make_family_fixtures.py` with a byte-level BPE tokenizer: prompt ids,
//! greedy tokens alone and as one left-padded batch, f32 logits, and the config and tensors
//! written back.

use burn::tensor::{Int, Tensor, TensorData};
use serde_json::Value;

use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::device::CpuBackend as TB;
use crate::model::generate::{generate, GenerateOptions};
use crate::model::hf::load_hf_folder_tensors;
use crate::text::TextTokenizer;

const FAMILIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/families");

/// Every fixture folder, with the `model_type` its config declares.
const NAMES: [(&str, &str); 7] = [
    ("qwen3", "qwen3"),
    ("mistral_sliding", "mistral"),
    ("llama3_rope", "llama"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3_text"),
    ("glm4", "glm4"),
    ("glm", "glm"),
];

struct Family {
    name: &'static str,
    config: ModelConfig,
    model: CausalLm<TB>,
    tokenizer: TextTokenizer,
    expected: Value,
}

fn family(name: &'static str) -> Family {
    let dir = std::path::PathBuf::from(format!("{FAMILIES}/{name}"));
    let config = ModelConfig::from_file(dir.join("config.json")).unwrap();
    let tensors = load_hf_folder_tensors(&dir).unwrap();
    let model = CausalLm::from_hf_tensors(&config, &tensors, &Default::default()).unwrap();
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    Family {
        name,
        config,
        model,
        tokenizer: TextTokenizer::from_dir(&dir).unwrap(),
        expected: serde_json::from_str(&text).unwrap(),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The fixture's prompts as token ids.
fn prompt_ids(f: &Family) -> Vec<Vec<u32>> {
    f.expected["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["ids"]))
        .collect()
}

fn greedy(f: &Family) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 16,
        stop_token_ids: f.tokenizer.eos_ids(),
        pad_token_id: f.config.pad_token_id.unwrap_or(0),
        ..Default::default()
    }
}

#[test]
fn every_family_reads_its_config() {
    for (name, model_type) in NAMES {
        let f = family(name);
        assert_eq!(f.config.model_type, model_type, "{name}");
    }
    let gemma3 = family("gemma3").config;
    assert_eq!(gemma3.variant.sliding_window, Some(8));
    assert_eq!(
        gemma3.layer_window(5),
        None,
        "every sixth Gemma 3 layer is global"
    );
    assert_eq!(gemma3.variant.rope_local_theta, Some(10000.0));
    let glm = family("glm").config;
    assert_eq!((glm.head_dim, glm.rotary_dim()), (16, 8));
}

#[test]
fn every_family_tokenizes_and_decodes_greedily_as_transformers() {
    for (name, _) in NAMES {
        let f = family(name);
        for p in f.expected["prompts"].as_array().unwrap() {
            let text = p["text"].as_str().unwrap();
            let prompt = f.tokenizer.encode(text).unwrap();
            assert_eq!(prompt, ids(&p["ids"]), "{name}: prompt ids of {text:?}");
            let got = generate(&f.model, &[prompt], &greedy(&f), None).unwrap();
            assert_eq!(got[0].token_ids, ids(&p["tokens"]), "{name}: {text:?}");
        }
    }
}

#[test]
fn every_family_generates_a_left_padded_batch_as_transformers() {
    // Sliding windows count padding positions as transformers does (cache positions).
    for (name, _) in NAMES {
        let f = family(name);
        let prompts = prompt_ids(&f);
        let got = generate(&f.model, &prompts, &greedy(&f), None).unwrap();
        let want = f.expected["batch"]["tokens"].as_array().unwrap();
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.token_ids, ids(w), "{}: row {i}", f.name);
        }
    }
}

#[test]
fn every_family_logits_match_transformers_in_f32() {
    for (name, _) in NAMES {
        let f = family(name);
        let seq: Vec<i64> = ids(&f.expected["logits"]["ids"])
            .into_iter()
            .map(i64::from)
            .collect();
        let t = seq.len();
        let input =
            Tensor::<TB, 2, Int>::from_data(TensorData::new(seq, [1, t]), &Default::default());
        let positions = Tensor::<TB, 2, Int>::from_data(
            TensorData::new((0..t as i64).collect::<Vec<_>>(), [1, t]),
            &Default::default(),
        );
        let got = f
            .model
            .forward(input, positions, None, None)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        let want: Vec<f32> = f.expected["logits"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{name}: max logit difference {diff}");
    }
}

#[test]
fn every_family_writes_back_what_it_read() {
    for (name, _) in NAMES {
        let f = family(name);
        let again = ModelConfig::from_json_str(
            &f.config.to_hf_json().to_string(),
            std::path::Path::new("written/config.json"),
        )
        .unwrap();
        assert_eq!(again, f.config, "{name}: config.json round trip");
        let tensors = load_hf_folder_tensors(format!("{FAMILIES}/{name}")).unwrap();
        let mut back = f.model.to_hf_tensors();
        if f.config.tie_word_embeddings {
            back.remove("lm_head.weight");
        }
        let names =
            |m: &std::collections::BTreeMap<String, _>| m.keys().cloned().collect::<Vec<String>>();
        assert_eq!(names(&back), names(&tensors), "{name}: tensor names");
        for (k, t) in &tensors {
            assert_eq!(back[k].data, t.data, "{name}: {k}");
        }
    }
}

#[test]
fn a_pad_id_outside_the_vocabulary_still_pads() {
    // GLM's configs name pad id 151329; a smaller vocabulary must not make padding fail.
    let f = family("glm");
    let prompts = prompt_ids(&f);
    let opts = GenerateOptions {
        pad_token_id: 151_329,
        ..greedy(&f)
    };
    let got = generate(&f.model, &prompts, &opts, None).unwrap();
    let want = f.expected["batch"]["tokens"].as_array().unwrap();
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.token_ids, ids(w));
    }
}
