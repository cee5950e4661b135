//! Tests of the export module: LoRA merge arithmetic, GGUF / safetensors / PEFT exports of a
//! tiny synthetic model, Modelfile translation, tokenizer.json parity with llama.cpp's
//! tokenization of SmolLM2 (fixture from scripts/make_tokenizer_fixture.py), GGUF → HF.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::export::{
    export_gguf, export_peft, export_safetensors, load_model, modelfile::modelfile,
};
use crate::gguf::mix::ExportType;
use crate::gguf::reader::GgufFile;
use crate::gguf::tokenizer::{GgufTokenizer, TOKEN_CONTROL, TOKEN_NORMAL};
use crate::gguf::{quants, GgmlType};
use crate::model::hf::{
    load_hf_folder_tensors, load_safetensors_file, save_safetensors, DType, HostTensor,
};
use crate::peft::merge::merge_lora;

/// GPT-2 `bytes_to_unicode`: the byte-level alphabet BPE vocabularies are written in.
fn byte_token(b: u8) -> String {
    let printable =
        |c: u32| (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
    if printable(b as u32) {
        return char::from_u32(b as u32).unwrap().to_string();
    }
    let n = (0..b as u32).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + n).unwrap().to_string()
}

fn tiny_tokenizer() -> GgufTokenizer {
    let mut tokens: Vec<String> = (0..=255u8).map(byte_token).collect();
    let mut types = vec![TOKEN_NORMAL; 256];
    tokens.push("Ġt".into());
    types.push(TOKEN_NORMAL);
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.into());
        types.push(TOKEN_CONTROL);
    }
    GgufTokenizer {
        model: "gpt2".into(),
        pre: Some("qwen2".into()),
        tokens,
        token_types: types,
        merges: vec!["Ġ t".into()],
        bos_id: None,
        eos_id: Some(259),
        pad_id: Some(257),
        add_bos: Some(false),
        chat_template: Some("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}".into()),
        context_length: Some(128),
        ..Default::default()
    }
}

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect()
}

/// A 2-layer llama-shaped HF folder: hidden 256, 4 heads (2 kv) of 64, ffn 512, vocab 288.
fn tiny_hf_model(dir: &Path, arch: &str) -> BTreeMap<String, HostTensor> {
    let (h, ffn, vocab, kv) = (256usize, 512usize, 288usize, 128usize);
    let mut t = BTreeMap::new();
    let mut seed = 0;
    let mut add = |name: String, shape: Vec<usize>| {
        seed += 1;
        let n = shape.iter().product();
        t.insert(name, HostTensor::new(shape, rand_vec(n, seed)));
    };
    add("model.embed_tokens.weight".into(), vec![vocab, h]);
    add("model.norm.weight".into(), vec![h]);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        add(format!("{p}.self_attn.q_proj.weight"), vec![h, h]);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, h]);
        if arch == "qwen2" {
            add(format!("{p}.self_attn.q_proj.bias"), vec![h]);
            add(format!("{p}.self_attn.k_proj.bias"), vec![kv]);
            add(format!("{p}.self_attn.v_proj.bias"), vec![kv]);
        }
        add(format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]);
        add(format!("{p}.mlp.up_proj.weight"), vec![ffn, h]);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, ffn]);
    }
    let archname = if arch == "qwen2" {
        "Qwen2ForCausalLM"
    } else {
        "LlamaForCausalLM"
    };
    let config = json!({
        "architectures": [archname], "model_type": arch, "vocab_size": vocab, "hidden_size": h,
        "intermediate_size": ffn, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": true,
        "eos_token_id": 259, "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    save_safetensors(dir.join("model.safetensors"), &t, DType::F32).unwrap();
    let tok = tiny_tokenizer();
    tok.write_hf(dir, dir).unwrap();
    t
}

fn tiny_adapter(dir: &Path, use_rslora: bool) -> (HostTensor, HostTensor) {
    let r = 4;
    let a = HostTensor::new(vec![r, 256], rand_vec(r * 256, 100));
    let b = HostTensor::new(vec![128, r], rand_vec(128 * r, 101));
    let mut m = BTreeMap::new();
    m.insert(
        "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight".to_string(),
        a.clone(),
    );
    m.insert(
        "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight".to_string(),
        b.clone(),
    );
    std::fs::create_dir_all(dir).unwrap();
    save_safetensors(dir.join("adapter_model.safetensors"), &m, DType::F32).unwrap();
    let cfg = json!({"peft_type": "LORA", "r": r, "lora_alpha": 16, "use_rslora": use_rslora, "target_modules": ["k_proj"]});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    (a, b)
}

#[test]
fn lora_merge_adds_scaled_b_times_a() {
    for (rslora, scale) in [(false, 16.0f32 / 4.0), (true, 16.0f32 / 2.0)] {
        let dir = tempfile::tempdir().unwrap();
        let base = tiny_hf_model(dir.path(), "llama");
        let (a, b) = tiny_adapter(&dir.path().join("adapter"), rslora);
        let mut merged = base.clone();
        let names = merge_lora(&mut merged, &dir.path().join("adapter")).unwrap();
        assert_eq!(names, vec!["model.layers.1.self_attn.k_proj".to_string()]);
        let name = "model.layers.1.self_attn.k_proj.weight";
        for (o, i) in [(0usize, 0usize), (5, 17), (127, 255)] {
            let delta: f32 = (0..4)
                .map(|k| b.data[o * 4 + k] * a.data[k * 256 + i])
                .sum();
            let want = base[name].data[o * 256 + i] + scale * delta;
            assert!(
                (merged[name].data[o * 256 + i] - want).abs() < 1e-6,
                "rslora={rslora} ({o},{i})"
            );
        }
        let untouched = "model.layers.0.self_attn.k_proj.weight";
        assert_eq!(merged[untouched], base[untouched]);
    }
}

#[test]
fn lora_merge_reports_shape_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    tiny_hf_model(dir.path(), "llama");
    let adir = dir.path().join("adapter");
    tiny_adapter(&adir, false);
    let mut m = load_safetensors_file(&adir.join("adapter_model.safetensors")).unwrap();
    let a = m
        .remove("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight")
        .unwrap();
    m.insert(
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight".into(),
        a,
    );
    m.insert(
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight".into(),
        HostTensor::new(vec![128, 4], vec![0.0; 512]),
    );
    save_safetensors(adir.join("adapter_model.safetensors"), &m, DType::F32).unwrap();
    let mut base = load_hf_folder_tensors(dir.path()).unwrap();
    let e = merge_lora(&mut base, &adir).unwrap_err().to_string();
    assert!(e.contains("k_proj") || e.contains("q_proj.weight"), "{e}");
}

/// Merging reads adapter_config.json as the adapter reader does: `alpha_pattern` keys match a
/// whole dotted suffix of the module path, a missing `peft_type` means LoRA, another type fails
/// naming the file.
#[test]
fn lora_merge_applies_alpha_pattern_and_checks_peft_type() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_hf_model(dir.path(), "llama");
    let adir = dir.path().join("adapter");
    let (a, b) = tiny_adapter(&adir, false);
    let name = "model.layers.1.self_attn.k_proj.weight";
    let merged_value = |cfg: serde_json::Value| {
        std::fs::write(adir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let mut merged = base.clone();
        merge_lora(&mut merged, &adir).map(|_| merged[name].data[5 * 256 + 17])
    };
    let delta: f32 = (0..4)
        .map(|k| b.data[5 * 4 + k] * a.data[k * 256 + 17])
        .sum();
    let want = |scale: f32| base[name].data[5 * 256 + 17] + scale * delta;
    // "layers.1.self_attn.k_proj" matches as a dotted suffix; "proj" would not.
    for (pattern, scale) in [
        ("layers.1.self_attn.k_proj", 8.0 / 4.0),
        ("proj", 16.0 / 4.0),
    ] {
        let got = merged_value(json!({"peft_type": "LORA", "r": 4, "lora_alpha": 16,
            "alpha_pattern": {pattern: 8}, "target_modules": ["k_proj"]}))
        .unwrap();
        assert!((got - want(scale)).abs() < 1e-6, "{pattern}: {got}");
    }
    let got =
        merged_value(json!({"r": 4, "lora_alpha": 16, "target_modules": ["k_proj"]})).unwrap();
    assert!((got - want(4.0)).abs() < 1e-6);
    let e = merged_value(json!({"peft_type": "IA3", "r": 4, "target_modules": ["k_proj"]}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("IA3"),
        "{e}"
    );
}

#[test]
fn export_gguf_q8_0_of_merged_model_reads_back() {
    for arch in ["llama", "qwen2"] {
        let dir = tempfile::tempdir().unwrap();
        tiny_hf_model(dir.path(), arch);
        let adir = dir.path().join("adapter");
        tiny_adapter(&adir, false);
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let r = export_gguf(dir.path(), Some(&adir), &out, ExportType::Q8_0).unwrap();
        let f = GgufFile::open(&r.gguf).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), Some(arch));
        assert_eq!(f.get_u64(&format!("{arch}.block_count")).unwrap(), Some(2));
        assert_eq!(f.get_u64("general.file_type").unwrap(), Some(7));
        assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), Some("qwen2"));
        // the first tensors follow llama.cpp's order: globals, then blk.0.*
        assert_eq!(f.tensors[0].name, "output_norm.weight");
        assert_eq!(f.tensors[1].name, "token_embd.weight");
        let (cfg, back, tok) = crate::gguf::model::load_gguf_model(&r.gguf).unwrap();
        assert_eq!(cfg.vocab_size, 288);
        assert_eq!(tok.tokens.len(), 288, "tokens padded to vocab_size");
        assert_eq!(tok.tokens[270], "[PAD270]");
        let mut merged = load_hf_folder_tensors(dir.path()).unwrap();
        merge_lora(&mut merged, &adir).unwrap();
        for (name, t) in &merged {
            let want = if t.shape.len() == 2 {
                quants::dequantize(
                    GgmlType::Q8_0,
                    &quants::quantize(GgmlType::Q8_0, &t.data).unwrap(),
                    t.data.len(),
                )
                .unwrap()
            } else {
                t.data.clone()
            };
            // Q8_0 blocks run along rows, so quantizing the permuted rows equals permuting the quantized rows.
            assert_eq!(back[name].data, want, "{arch} {name}");
        }
        let mf = std::fs::read_to_string(&r.modelfile).unwrap();
        assert!(
            mf.starts_with(&format!(
                "FROM ./{}\n",
                r.gguf.file_name().unwrap().to_string_lossy()
            )),
            "{mf}"
        );
        assert!(
            mf.contains("<|im_start|>{{ .Role }}") && mf.contains("PARAMETER stop \"<|im_end|>\""),
            "{mf}"
        );
    }
}

#[test]
fn export_safetensors_and_peft_folders() {
    let dir = tempfile::tempdir().unwrap();
    tiny_hf_model(dir.path(), "qwen2");
    let adir = dir.path().join("adapter");
    tiny_adapter(&adir, true);
    let out = dir.path().join("hf");
    export_safetensors(dir.path(), Some(&adir), &out, DType::BF16).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let m = load_model(&out).unwrap();
    assert_eq!(m.config.num_hidden_layers, 2);
    let mut merged = load_hf_folder_tensors(dir.path()).unwrap();
    merge_lora(&mut merged, &adir).unwrap();
    let name = "model.layers.1.self_attn.k_proj.weight";
    let want: Vec<f32> = merged[name]
        .data
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(m.tensors[name].data, want);
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gen["eos_token_id"], json!(259));

    let pdir = dir.path().join("peft");
    export_peft(&adir, Some(dir.path()), &pdir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pdir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], json!("CAUSAL_LM"));
    assert_eq!(
        load_safetensors_file(&pdir.join("adapter_model.safetensors")).unwrap(),
        load_safetensors_file(&adir.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn modelfile_keeps_smollm_system_prompt_and_notes_unknown_templates() {
    let mut tok = tiny_tokenizer();
    tok.chat_template = Some("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}<|im_end|>".into());
    let mf = modelfile("m.gguf", &tok);
    assert!(mf.contains("SYSTEM \"\"\"You are a helpful AI assistant named SmolLM, trained by Hugging Face\"\"\""), "{mf}");
    tok.chat_template = Some("[INST] {{ messages[0]['content'] }} [/INST]".into());
    let mf = modelfile("m.gguf", &tok);
    assert!(
        !mf.contains("TEMPLATE") && mf.contains("#   [INST]"),
        "{mf}"
    );
}

#[test]
fn smollm2_tokenizer_json_matches_llama_cpp_tokenization() {
    let Some(path) = crate::gguf::tests::smollm2_gguf() else {
        return;
    };
    if !python_has("tokenizers") {
        crate::testing::test_skip("python tokenizers not installed (pip install tokenizers)");
        return;
    }
    let f = GgufFile::open(&path).unwrap();
    let tok = GgufTokenizer::from_gguf(&f).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tok.write_hf(dir.path(), &path).unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gguf/smollm2_tokenize.json"
    );
    let o = std::process::Command::new("python3")
        .arg(script("check_tokenizer_json.py"))
        .arg(dir.path().join("tokenizer.json"))
        .arg(fixture)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["n"].as_u64().unwrap() >= 20);
    assert_eq!(
        report["mismatches"],
        json!([]),
        "tokenization differs from llama.cpp"
    );
    assert_eq!(
        report["decode_mismatches"],
        json!([]),
        "decode does not round-trip"
    );
}

#[test]
fn smollm2_gguf_converts_to_hf_folder() {
    let Some(path) = crate::gguf::tests::smollm2_gguf() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    crate::export::convert_gguf_to_hf(&path, dir.path(), DType::BF16).unwrap();
    let back = load_model(dir.path()).unwrap();
    let (cfg, _, tok) = crate::gguf::model::load_gguf_model(&path).unwrap();
    let mut want = cfg.clone();
    want.dtype = Some("bfloat16".into());
    assert_eq!(back.config, want);
    assert_eq!(back.tokenizer.tokens, tok.tokens);
    assert_eq!(back.tokenizer.merges, tok.merges);
    assert_eq!(
        back.tokenizer.pre.as_deref(),
        Some("starcoder"),
        "folder name lacks 'smollm': same regexes as smollm"
    );
    assert_eq!(back.tokenizer.add_bos, Some(false));
    assert_eq!(back.tokenizer.chat_template, tok.chat_template);
    assert!(!back.tensors.contains_key("lm_head.weight"));
}

fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn script(name: &str) -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/").to_string() + name
}

#[test]
fn gguf_py_reads_our_files_and_agrees_on_values() {
    if !python_has("gguf") {
        crate::testing::test_skip("python gguf not installed (pip install gguf)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    tiny_hf_model(dir.path(), "llama");
    for et in [
        ExportType::F16,
        ExportType::BF16,
        ExportType::Q8_0,
        ExportType::Q4_0,
        ExportType::Q4_K_M,
    ] {
        let out = dir.path().join(format!("m-{}.gguf", et.label()));
        let r = export_gguf(dir.path(), None, &out, et).unwrap();
        let raw = dir.path().join("deq.f32");
        let o = std::process::Command::new("python3")
            .arg(script("gguf_py_dequant.py"))
            .arg(&out)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "gguf-py failed on {et:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let f = GgufFile::open(&out).unwrap();
        let names: Vec<&str> = summary["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            f.tensors
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
        );
        for (t, (name, ty)) in summary["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&r.tensor_types)
        {
            assert_eq!(t["type"].as_str().unwrap(), ty.name(), "{name}");
        }
        let theirs: Vec<f32> = std::fs::read(&raw)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ours: Vec<f32> = f
            .tensors
            .iter()
            .flat_map(|t| f.tensor_f32(t).unwrap().data)
            .collect();
        assert_eq!(ours.len(), theirs.len());
        assert!(
            ours.iter()
                .zip(&theirs)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{et:?}: dequantized values differ"
        );
    }
}

#[test]
fn llama_cpp_runs_reexported_smollm2_like_the_original() {
    let Some(path) = crate::gguf::tests::smollm2_gguf() else {
        return;
    };
    if !python_has("llama_cpp") {
        crate::testing::test_skip("llama_cpp (llama-cpp-python) not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smol-f32.gguf");
    export_gguf(&path, None, &out, ExportType::F32).unwrap();
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let greedy = |model: &Path| -> Vec<u32> {
        let o = std::process::Command::new("python3")
            .arg(script("llama_cpp_greedy.py"))
            .arg(model)
            .arg(prompt)
            .arg("16")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "llama.cpp failed on {}: {}",
            model.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let reference = greedy(&path);
    let ours = greedy(&out);
    assert_eq!(
        ours, reference,
        "greedy tokens of the F32 re-export differ from the original Q4_1 file"
    );
}

/// Benchmark (ignored by default): export of a random model with Qwen2.5-0.5B shapes.
/// `cargo test --release bench_export_qwen2_0_5b -- --ignored --nocapture`;
/// compare with `python3 scripts/bench_gguf_py.py`.
#[test]
#[ignore]
fn bench_export_qwen2_0_5b() {
    use crate::model::config::{Architecture, ModelConfig};
    let (h, ffn, vocab, layers, kv) = (896usize, 4864usize, 151936usize, 24usize, 128usize);
    let mut t = BTreeMap::new();
    let mut seed = 0;
    let mut add = |name: String, shape: Vec<usize>| {
        seed += 1;
        let n = shape.iter().product();
        t.insert(name, HostTensor::new(shape, rand_vec(n, seed)));
    };
    add("model.embed_tokens.weight".into(), vec![vocab, h]);
    add("model.norm.weight".into(), vec![h]);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        add(format!("{p}.self_attn.q_proj.weight"), vec![h, h]);
        add(format!("{p}.self_attn.q_proj.bias"), vec![h]);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
        add(format!("{p}.self_attn.k_proj.bias"), vec![kv]);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
        add(format!("{p}.self_attn.v_proj.bias"), vec![kv]);
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, h]);
        add(format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]);
        add(format!("{p}.mlp.up_proj.weight"), vec![ffn, h]);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, ffn]);
    }
    let cfg = ModelConfig {
        architecture: Architecture::Qwen2,
        model_type: "qwen2".into(),
        vocab_size: vocab,
        hidden_size: h,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        rope_scaling: None,
        max_position_embeddings: 32768,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        initializer_range: 0.02,
        bos_token_id: None,
        eos_token_ids: vec![259],
        pad_token_id: None,
        dtype: None,
        variant: Default::default(),
    };
    let tok = tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    for et in [ExportType::Q8_0, ExportType::Q4_K_M] {
        let out = dir.path().join(format!("bench-{}.gguf", et.label()));
        let start = std::time::Instant::now();
        crate::gguf::model::write_gguf_model(&out, &cfg, &t, &tok, et, "bench").unwrap();
        let secs = start.elapsed().as_secs_f64();
        let size = std::fs::metadata(&out).unwrap().len();
        println!(
            "BENCH {}: {secs:.2} s, {:.1} MiB, {} threads",
            et.label(),
            size as f64 / 1048576.0,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        );
        assert_eq!(GgufFile::open(&out).unwrap().tensors.len(), 2 + layers * 12);
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn quantized_exports_equal_llama_quantize_output() {
    let Some(path) = crate::gguf::tests::smollm2_gguf() else {
        return;
    };
    if !python_has("llama_cpp") {
        crate::testing::test_skip("llama_cpp (llama-cpp-python) not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("smol-f32.gguf");
    export_gguf(&path, None, &f32_path, ExportType::F32).unwrap();
    for (et, ftype) in [
        (ExportType::Q8_0, "q8_0"),
        (ExportType::Q4_0, "q4_0"),
        (ExportType::Q4_K_M, "q4_k_m"),
    ] {
        let theirs_path = dir.path().join(format!("llama-{ftype}.gguf"));
        let o = std::process::Command::new("python3")
            .arg(script("llama_quantize.py"))
            .arg(&f32_path)
            .arg(&theirs_path)
            .arg(ftype)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "llama-quantize failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ours_path = dir.path().join(format!("ours-{ftype}.gguf"));
        export_gguf(&path, None, &ours_path, et).unwrap();
        let (ours, theirs) = (
            GgufFile::open(&ours_path).unwrap(),
            GgufFile::open(&theirs_path).unwrap(),
        );
        let names = |f: &GgufFile| f.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&ours), names(&theirs), "{ftype}: tensor order");
        for (a, b) in ours.tensors.iter().zip(&theirs.tensors) {
            assert_eq!(a.ty, b.ty, "{ftype}: type of {}", a.name);
            assert!(
                ours.tensor_bytes(a).unwrap() == theirs.tensor_bytes(b).unwrap(),
                "{ftype}: bytes of {}",
                a.name
            );
        }
        assert_eq!(
            ours.get("general.file_type"),
            theirs.get("general.file_type")
        );
    }
}

#[test]
fn qwen3_exports_to_gguf_reads_back_and_llama_cpp_agrees() {
    // The Qwen3 family fixture (per-head q/k norms, head_dim 16 != hidden / heads): F32 GGUF
    // under llama.cpp's `qwen3` names, read back bit for bit, greedy tokens as transformers'.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/qwen3");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("expected.json")).unwrap()).unwrap();
    let prompt = &expected["prompts"][0];
    let ids: Vec<u32> = serde_json::from_value(prompt["ids"].clone()).unwrap();
    let want: Vec<u32> = serde_json::from_value(prompt["tokens"].clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qwen3-f32.gguf");
    export_gguf(&src, None, &out, ExportType::F32).unwrap();
    let (config, tensors, _) = crate::gguf::model::load_gguf_model(&out).unwrap();
    assert_eq!(config.model_type, "qwen3");
    assert_eq!(config.head_dim, 16);
    let original = crate::model::hf::load_hf_folder_tensors(&src).unwrap();
    for (name, t) in &original {
        assert_eq!(tensors[name].data, t.data, "{name}");
    }
    let model = crate::model::decoder::CausalLm::<burn::backend::NdArray<f32>>::from_hf_tensors(
        &config,
        &tensors,
        &Default::default(),
    )
    .unwrap();
    let opts = crate::model::generate::GenerateOptions {
        max_new_tokens: 16,
        stop_token_ids: vec![2],
        ..Default::default()
    };
    let got =
        crate::model::generate::generate(&model, std::slice::from_ref(&ids), &opts, None).unwrap();
    assert_eq!(got[0].token_ids, want, "runner on its own GGUF");
    if !python_has("llama_cpp") {
        crate::testing::test_skip("llama_cpp (llama-cpp-python) not installed");
        return;
    }
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    let o = std::process::Command::new("python3")
        .arg(script("llama_cpp_greedy.py"))
        .arg(&out)
        .arg(format!("ids:{}", list.join(",")))
        .arg(want.len().to_string())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "llama.cpp failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let theirs: Vec<u32> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(theirs, want, "llama.cpp on the exported qwen3 GGUF");
}
