//! Tests of PEFT adapter reading and writing.

use super::*;

fn dense(shape: [usize; 2], seed: f32) -> DenseTensor {
    let data = (0..shape[0] * shape[1])
        .map(|i| ((i as f32 + seed) * 0.37).sin() * 0.01)
        .collect();
    DenseTensor {
        shape: shape.to_vec(),
        data,
    }
}

/// A 2-layer toy decoder: hidden 8, 2 heads of 4, 1 KV head, intermediate 12, rank 2.
fn toy_pairs(r: usize) -> Vec<LoraPair> {
    let (hidden, kv, inter) = (8, 4, 12);
    let mut pairs = Vec::new();
    for layer in 0..2 {
        for (k, module) in LoraModule::ALL.into_iter().enumerate() {
            let (out, inp) = match module {
                LoraModule::QProj | LoraModule::OProj => (hidden, hidden),
                LoraModule::KProj | LoraModule::VProj => (kv, hidden),
                LoraModule::GateProj | LoraModule::UpProj => (inter, hidden),
                LoraModule::DownProj => (hidden, inter),
                LoraModule::GateUpProj => (2 * inter, hidden),
            };
            let seed = (layer * 7 + k) as f32;
            pairs.push(LoraPair {
                layer,
                module,
                a: dense([r, inp], seed),
                b: dense([out, r], -seed),
            });
        }
    }
    pairs
}

fn golden_config() -> LoraAdapterConfig {
    let names = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let mut config = LoraAdapterConfig::new(
        2,
        16.0,
        TargetModules::List(names.map(String::from).to_vec()),
    );
    config.lora_dropout = 0.05;
    config.base_model_name_or_path = Some("toy/llama-2l".into());
    config
}

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/train/peft_adapter"
);

#[test]
fn writes_the_committed_golden_adapter() {
    let dir = tempfile::tempdir().unwrap();
    write_lora_adapter(dir.path(), &golden_config(), &toy_pairs(2)).unwrap();
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let got = std::fs::read(dir.path().join(file)).unwrap();
        if std::env::var_os("RUNNER_BLESS").is_some() {
            // Blessing writes the golden copy and fails, so a blessed run never counts as a
            // pass: rerun without RUNNER_BLESS (and re-check with scripts/check_peft_adapter.py).
            std::fs::create_dir_all(GOLDEN).unwrap();
            std::fs::write(Path::new(GOLDEN).join(file), &got).unwrap();
            panic!("RUNNER_BLESS: wrote {file}; rerun without it to compare");
        }
        let want = std::fs::read(Path::new(GOLDEN).join(file)).unwrap();
        assert!(
            got == want,
            "{file} differs from the golden copy checked by scripts/check_peft_adapter.py"
        );
    }
}

#[test]
fn config_has_peft_keys() {
    let json = golden_config().to_json();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "peft writes sorted keys");
    assert_eq!(
        keys.len(),
        41,
        "PeftConfigMixin + PeftConfig + LoraConfig fields less runtime_config"
    );
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["lora_alpha"], json!(16));
    assert_eq!(json["inference_mode"], true);
    assert_eq!(json["rank_pattern"], json!({}));
    assert_eq!(json["modules_to_save"], Value::Null);
    assert!(!keys.contains(&"runtime_config"));
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = golden_config();
    config.use_rslora = true;
    config.layers_to_transform = Some(vec![0, 1]);
    config
        .extra
        .insert("layers_pattern".into(), json!("layers"));
    let pairs = toy_pairs(2);
    write_lora_adapter(dir.path(), &config, &pairs).unwrap();
    let adapter = read_lora_adapter(dir.path()).unwrap();
    assert_eq!(adapter.config, config);
    assert_eq!(adapter.pairs, pairs);
    assert!((adapter.config.scaling() - 16.0 / 2f64.sqrt()).abs() < 1e-12);
    config.use_rslora = false;
    assert_eq!(config.scaling(), 8.0);
}

#[test]
fn reads_peft_name_variants_and_regex_targets() {
    let dir = tempfile::tempdir().unwrap();
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 2,
        "target_modules": r".*\.layers\.\d+\.self_attn\.(q|v)_proj", "layers_to_transform": 3,
        "use_rslora": false, "some_future_key": [1, 2]
    });
    std::fs::write(dir.path().join(CONFIG_FILE), config.to_string()).unwrap();
    let halves: Vec<u8> = [0.5f32, -1.0, 2.0]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let names = [
        "model.layers.3.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_B.default.weight",
        "base_model.model.model.layers.3.self_attn.v_proj.lora_A",
        "layers.3.self_attn.v_proj.lora_B.default",
    ];
    let shapes = [vec![1, 3], vec![3, 1], vec![1, 3], vec![3, 1]];
    let views: Vec<_> = names
        .iter()
        .zip(&shapes)
        .map(|(n, s)| {
            (
                n.to_string(),
                TensorView::new(Dtype::F16, s.clone(), &halves).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join(WEIGHTS_FILE)).unwrap();
    let adapter = read_lora_adapter(dir.path()).unwrap();
    assert_eq!(adapter.pairs.len(), 2);
    assert_eq!(adapter.pairs[0].module, LoraModule::QProj);
    assert_eq!(adapter.pairs[1].b.data, [0.5, -1.0, 2.0]);
    assert_eq!(adapter.config.extra["some_future_key"], json!([1, 2]));
    let c = &adapter.config;
    assert!(c.targets("model.layers.3.self_attn.q_proj").unwrap());
    assert!(!c.targets("model.layers.3.self_attn.k_proj").unwrap());
    assert!(
        !c.targets("model.layers.2.self_attn.q_proj").unwrap(),
        "layers_to_transform = 3"
    );
    let all = LoraAdapterConfig::new(4, 8.0, TargetModules::Pattern("all-linear".into()));
    assert!(all.targets("model.layers.0.mlp.down_proj").unwrap());
    assert!(!all.targets("lm_head").unwrap());
}

#[test]
fn parse_tensor_name_rejects_other_tensors() {
    assert_eq!(
        parse_tensor_name("model.layers.0.mlp.up_proj.lora_B.weight"),
        Some((0, LoraModule::UpProj, 'B'))
    );
    assert_eq!(
        parse_tensor_name("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
        None
    );
    assert_eq!(parse_tensor_name("base_model.model.lm_head.weight"), None);
    assert_eq!(
        parse_tensor_name("model.layers.x.self_attn.q_proj.lora_A.weight"),
        None
    );
}

#[test]
fn errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let mut pairs = toy_pairs(2);
    pairs[0].b.shape = vec![8, 3];
    let err = write_lora_adapter(dir.path(), &golden_config(), &pairs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 0 self_attn.q_proj"), "{err}");
    let err = write_lora_adapter(dir.path(), &golden_config(), &toy_pairs(3))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 3 differs from config r = 2"), "{err}");

    write_lora_adapter(dir.path(), &golden_config(), &toy_pairs(2)[..1]).unwrap();
    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let only_a: Vec<_> = st.iter().filter(|(n, _)| n.contains("lora_A")).collect();
    safetensors::serialize_to_file(only_a, None, &dir.path().join(WEIGHTS_FILE)).unwrap();
    let err = read_lora_adapter(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("layers.0.self_attn.q_proj.lora_B.weight") && err.contains("missing"),
        "{err}"
    );

    std::fs::write(
        dir.path().join(CONFIG_FILE),
        r#"{"peft_type": "PREFIX_TUNING"}"#,
    )
    .unwrap();
    let err = read_lora_adapter(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("peft_type"),
        "{err}"
    );
}

/// `scaling * B @ A` of a pair, row-major [out, in].
fn delta(pair: &LoraPair, scaling: f64) -> Vec<f32> {
    let (r, out, inp) = (pair.a.shape[0], pair.b.shape[0], pair.a.shape[1]);
    let mut d = vec![0f32; out * inp];
    for o in 0..out {
        for k in 0..r {
            let bk = pair.b.data[o * r + k] * scaling as f32;
            for i in 0..inp {
                d[o * inp + i] += bk * pair.a.data[k * inp + i];
            }
        }
    }
    d
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// A GLM adapter is written with peft's fused `gate_up_proj` (rank 2r, the same scaling, DoRA
/// magnitudes stacked) and reads back as the split pairs with the same products.
#[test]
fn gate_up_pairs_are_written_fused_as_peft_names_them_and_read_back_split() {
    for use_rslora in [false, true] {
        let pairs = toy_pairs(2);
        let mut config = golden_config();
        config.use_rslora = use_rslora;
        config.use_dora = true;
        let magnitudes: BTreeMap<_, _> = pairs
            .iter()
            .map(|p| {
                let rows = p.b.shape[0];
                let data = (0..rows).map(|i| 1.0 + i as f32 * 0.01).collect();
                let m = DenseTensor {
                    shape: vec![rows],
                    data,
                };
                ((p.layer, p.module), m)
            })
            .collect();
        let scaling = config.scaling();
        let mut written = config.clone();
        let (fused, fused_mags) = fuse_gate_up(&mut written, pairs.clone(), magnitudes.clone());
        assert_eq!(fused.len(), pairs.len() - 2, "one pair less a layer");
        let gate_up: Vec<_> = fused
            .iter()
            .filter(|p| p.module == LoraModule::GateUpProj)
            .collect();
        assert_eq!(gate_up.len(), 2);
        assert_eq!(gate_up[0].a.shape, vec![4, 8]);
        assert_eq!(gate_up[0].b.shape, vec![24, 4]);
        assert_eq!(fused_mags[&(0, LoraModule::GateUpProj)].shape, vec![24]);
        assert_eq!(written.rank_pattern["gate_up_proj"], 4);
        // The fused module's scaling under its own rank and alpha is the halves' scaling.
        let path = "model.layers.1.mlp.gate_up_proj";
        assert!((written.scaling_for(path) - scaling).abs() < 1e-12);
        let TargetModules::List(names) = &written.target_modules else {
            panic!("a list stays a list");
        };
        assert!(names.contains(&"gate_up_proj".to_string()));
        assert!(!names.iter().any(|n| n == "gate_proj" || n == "up_proj"));

        let dir = tempfile::tempdir().unwrap();
        write_adapter_with_magnitudes(dir.path(), &written, &fused, &fused_mags).unwrap();
        let saved = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let saved = SafeTensors::deserialize(&saved).unwrap();
        assert!(saved
            .names()
            .contains(&"base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight"));
        let back = read_lora_adapter(dir.path()).unwrap();
        assert_eq!(back.pairs.len(), pairs.len());
        for (p, q) in pairs.iter().zip(&back.pairs) {
            assert_eq!((p.layer, p.module), (q.layer, q.module));
            let d = max_diff(&delta(p, scaling), &delta(q, back.config.scaling()));
            assert!(d < 1e-7, "{:?} layer {}: {d}", p.module, p.layer);
        }
        assert_eq!(back.magnitudes, magnitudes);
    }
}

/// An adapter peft trained on a fused `gate_up_proj` (any rank, its own alpha) splits into two
/// pairs whose products are the fused product's halves under the fused module's scaling.
#[test]
fn a_peft_gate_up_pair_splits_into_exact_halves() {
    let mut config =
        LoraAdapterConfig::new(2, 16.0, TargetModules::List(vec!["gate_up_proj".into()]));
    config.rank_pattern.insert("gate_up_proj".into(), 3);
    config.alpha_pattern.insert("gate_up_proj".into(), 5.0);
    let fused = LoraPair {
        layer: 0,
        module: LoraModule::GateUpProj,
        a: dense([3, 8], 1.0),
        b: dense([24, 3], 2.0),
    };
    let dir = tempfile::tempdir().unwrap();
    write_lora_adapter(dir.path(), &config, std::slice::from_ref(&fused)).unwrap();
    let back = read_lora_adapter(dir.path()).unwrap();
    let modules: Vec<_> = back.pairs.iter().map(|p| p.module).collect();
    assert_eq!(modules, vec![LoraModule::GateProj, LoraModule::UpProj]);
    let whole = delta(&fused, 5.0 / 3.0);
    let halves = [
        delta(&back.pairs[0], back.config.scaling()),
        delta(&back.pairs[1], back.config.scaling()),
    ]
    .concat();
    assert!(max_diff(&whole, &halves) < 1e-7);

    // An odd number of rows cannot be gate rows then up rows.
    let odd = LoraPair {
        b: dense([23, 3], 2.0),
        ..fused
    };
    write_lora_adapter(dir.path(), &config, &[odd]).unwrap();
    let e = read_lora_adapter(dir.path()).unwrap_err().to_string();
    assert!(e.contains("gate_up_proj") && e.contains("23 rows"), "{e}");
}
