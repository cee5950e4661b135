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

/// The largest difference between `model`'s logits on the fixture's logits prompt and
/// transformers'.
fn max_logit_diff(model: &CausalLm<TB>, expected: &Value) -> f32 {
    let seq: Vec<i64> = ids(&expected["logits"]["ids"])
        .into_iter()
        .map(i64::from)
        .collect();
    let t = seq.len();
    let input = Tensor::<TB, 2, Int>::from_data(TensorData::new(seq, [1, t]), &Default::default());
    let positions = Tensor::<TB, 2, Int>::from_data(
        TensorData::new((0..t as i64).collect::<Vec<_>>(), [1, t]),
        &Default::default(),
    );
    let got = model
        .forward(input, positions, None, None)
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    let want: Vec<f32> = expected["logits"]["values"]
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
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn every_family_logits_match_transformers_in_f32() {
    for (name, _) in NAMES {
        let f = family(name);
        let diff = max_logit_diff(&f.model, &f.expected);
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

/// Exports the fixture `name` (HF folder `src`) as a GGUF of type `et` into `dir` and reads it back.
fn gguf_round_trip(
    src: &std::path::Path,
    dir: &std::path::Path,
    et: crate::gguf::mix::ExportType,
) -> (std::path::PathBuf, ModelConfig, CausalLm<TB>) {
    let out = dir.join(format!("model-{}.gguf", et.label()));
    crate::export::export_gguf(src, None, &out, et).unwrap();
    let (config, tensors, _) = crate::gguf::model::load_gguf_model(&out).unwrap();
    let model = CausalLm::from_hf_tensors(&config, &tensors, &Default::default()).unwrap();
    (out, config, model)
}

#[test]
fn every_family_round_trips_through_gguf() {
    // HF fixture -> runner's GGUF (llama.cpp's arch, keys, names; Gemma's 1 + w norms, GLM's
    // fused ffn_up) -> read back: the same config, transformers' greedy tokens, and logits
    // within what the type keeps (F32 exact up to Gemma's 1 + w - 1 rounding).
    use crate::gguf::mix::ExportType;
    each_family(|name| {
        let f = family(name);
        let src = std::path::PathBuf::from(format!("{FAMILIES}/{name}"));
        for (et, tol) in [
            (ExportType::F32, 1e-4f32),
            (ExportType::F16, 1e-2),
            // Logits of these tiny random models span about ±4.
            (ExportType::Q8_0, 0.25),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (_, config, model) = gguf_round_trip(&src, dir.path(), et);
            let c = &f.config;
            assert_eq!(
                (config.architecture, &config.model_type, config.head_dim),
                (c.architecture, &c.model_type, c.head_dim),
                "{name} {et:?}"
            );
            assert_eq!(config.variant, c.variant, "{name} {et:?}: variant");
            assert_eq!(
                (
                    config.rope_theta,
                    &config.rope_scaling,
                    config.rms_norm_eps,
                    config.tie_word_embeddings,
                    config.qkv_bias(),
                ),
                (
                    c.rope_theta,
                    &c.rope_scaling,
                    c.rms_norm_eps,
                    c.tie_word_embeddings,
                    c.qkv_bias(),
                ),
                "{name} {et:?}"
            );
            let diff = max_logit_diff(&model, &f.expected);
            eprintln!("{name} {et:?}: max logit difference {diff}");
            assert!(diff < tol, "{name} {et:?}: max logit difference {diff}");
            for p in f.expected["prompts"].as_array().unwrap() {
                let got = generate(&model, &[ids(&p["ids"])], &greedy(&f), None).unwrap();
                let want = ids(&p["tokens"]);
                if et == ExportType::Q8_0 {
                    // Quantization may flip near ties of a random model: reported, not required.
                    let same = got[0]
                        .token_ids
                        .iter()
                        .zip(&want)
                        .take_while(|(a, b)| a == b)
                        .count();
                    eprintln!(
                        "{name} {et:?}: {same}/{} greedy tokens as transformers",
                        want.len()
                    );
                } else {
                    assert_eq!(got[0].token_ids, want, "{name} {et:?}: {}", p["text"]);
                }
            }
        }
    });
}

/// Runs `check` on every fixture, each family's failure reported (its panic message printed)
/// and the test failed at the end with the list, so one family does not hide the others.
fn each_family(check: impl Fn(&'static str)) {
    let failed: Vec<&str> = NAMES
        .iter()
        .filter(|(name, _)| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(name))).is_err()
        })
        .map(|(name, _)| *name)
        .collect();
    assert!(failed.is_empty(), "failed for {failed:?}");
}

/// The GLM fixture cut to 2 query heads of 16 (heads x head_dim = hidden, which llama.cpp's
/// chatglm requires; the fixture has 4 x 16 over a hidden size of 32), as an F32 GGUF read back.
fn glm_two_heads(
    src: &std::path::Path,
    dir: &std::path::Path,
) -> (std::path::PathBuf, ModelConfig, CausalLm<TB>) {
    let mut m = crate::export::load_model(src).unwrap();
    let (hd, keep) = (m.config.head_dim, 2);
    m.config.num_attention_heads = keep;
    for (name, t) in m.tensors.iter_mut() {
        if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
            let row: usize = t.shape.iter().skip(1).product();
            t.data.truncate(keep * hd * row);
            t.shape[0] = keep * hd;
        } else if name.ends_with("self_attn.o_proj.weight") {
            let cols = t.shape[1];
            t.data = t
                .data
                .chunks(cols)
                .flat_map(|r| r[..keep * hd].to_vec())
                .collect();
            t.shape[1] = keep * hd;
        }
    }
    let out = dir.join("glm-2heads.gguf");
    crate::gguf::model::write_gguf_model(
        &out,
        &m.config,
        &m.tensors,
        &m.tokenizer,
        crate::gguf::mix::ExportType::F32,
        "glm-2heads",
    )
    .unwrap();
    let (config, tensors, _) = crate::gguf::model::load_gguf_model(&out).unwrap();
    let model = CausalLm::from_hf_tensors(&config, &tensors, &Default::default()).unwrap();
    (out, config, model)
}

fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn llama_cpp_runs_every_family_gguf_as_runner_does() {
    // llama.cpp (llama-cpp-python) on runner's F32 GGUF of each fixture, greedy from the
    // fixture's prompt ids, against runner on the same file. llama.cpp derives Gemma's attention
    // scale from the layer count (1/sqrt(head_dim) here) and ignores Mistral's window under
    // `llama`: Gemma fixtures are exported with query_pre_attn_scalar = head_dim, and runner's
    // reference for Mistral attends to the whole context, as llama.cpp does. llama.cpp's chatglm
    // needs heads x head_dim = hidden: GLM runs cut to 2 of its 4 query heads.
    if !python_has("llama_cpp") {
        crate::testing::test_skip("llama_cpp (llama-cpp-python) not installed");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/llama_cpp_greedy.py");
    each_family(|name| {
        let f = family(name);
        let dir = tempfile::tempdir().unwrap();
        let mut src = std::path::PathBuf::from(format!("{FAMILIES}/{name}"));
        if f.config.variant.query_pre_attn_scalar.is_some() {
            let copy = dir.path().join("hf");
            std::fs::create_dir_all(&copy).unwrap();
            for e in std::fs::read_dir(&src).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
            }
            let mut cfg: Value =
                serde_json::from_slice(&std::fs::read(copy.join("config.json")).unwrap()).unwrap();
            cfg["query_pre_attn_scalar"] = serde_json::json!(f.config.head_dim);
            std::fs::write(copy.join("config.json"), cfg.to_string()).unwrap();
            src = copy;
        }
        let (out, config, model) = if f.config.model_type == "glm" {
            glm_two_heads(&src, dir.path())
        } else {
            gguf_round_trip(&src, dir.path(), crate::gguf::mix::ExportType::F32)
        };
        let sliding_reference = config.model_type == "mistral";
        let reference = if sliding_reference {
            let mut full = config.clone();
            full.variant.sliding_window = None;
            full.variant.layer_types.clear();
            let (_, tensors, _) = crate::gguf::model::load_gguf_model(&out).unwrap();
            CausalLm::<TB>::from_hf_tensors(&full, &tensors, &Default::default()).unwrap()
        } else {
            model
        };
        for p in f.expected["prompts"].as_array().unwrap().iter().take(2) {
            let prompt = ids(&p["ids"]);
            let ours = generate(&reference, std::slice::from_ref(&prompt), &greedy(&f), None)
                .unwrap()
                .remove(0)
                .token_ids;
            let list: Vec<String> = prompt.iter().map(u32::to_string).collect();
            let o = std::process::Command::new("python3")
                .arg(script)
                .arg(&out)
                .arg(format!("ids:{}", list.join(",")))
                .arg(ours.len().to_string())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            if !o.status.success() && stderr.contains("unknown model architecture") {
                crate::testing::test_skip(&format!(
                    "{name}: this llama.cpp does not know the architecture: {stderr}"
                ));
                break;
            }
            assert!(o.status.success(), "{name}: llama.cpp failed: {stderr}");
            let theirs: Vec<u32> = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(theirs, ours, "{name}: llama.cpp vs runner on {}", p["text"]);
            let same_model = f.config.model_type != "glm";
            if same_model && !sliding_reference && f.config.variant.query_pre_attn_scalar.is_none()
            {
                assert_eq!(
                    theirs,
                    ids(&p["tokens"]),
                    "{name}: llama.cpp vs transformers"
                );
            }
        }
    });
}
