//! Tests of the gguf module: bit parity with gguf-py / ggml reference fixtures
//! (scripts/make_gguf_fixtures.py), reader/writer round trips, error messages, and the real
//! SmolLM2-135M-Instruct Q4_1 GGUF when present.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::gguf::mix::{tensor_type, ExportType, MixContext};
use crate::gguf::names::{gguf_to_hf, hf_to_gguf, permute_rows};
use crate::gguf::reader::GgufFile;
use crate::gguf::writer::GgufWriter;
use crate::gguf::{quants, Error, GgmlType, MetaValue};

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf")).join(name)
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The SmolLM2 GGUF from `scripts/fetch-smollm2.sh` (models/ of this checkout) or
/// $RUNNER_SMOLLM2_GGUF.
pub(crate) fn smollm2_gguf() -> Option<PathBuf> {
    let candidates = [
        std::env::var("RUNNER_SMOLLM2_GGUF").ok().map(PathBuf::from),
        // Where scripts/fetch-smollm2.sh puts it.
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.exists());
    if found.is_none() {
        crate::testing::test_skip("SmolLM2 GGUF not found (set RUNNER_SMOLLM2_GGUF)");
    }
    found
}

#[test]
fn quantizers_match_reference_bit_for_bit() {
    let x = read_f32(&fixture("input_8x512.f32"));
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let expected =
            std::fs::read(fixture(&format!("quant_{}.bin", ty.name().to_lowercase()))).unwrap();
        let got = quants::quantize(ty, &x).unwrap();
        assert_eq!(got.len(), expected.len(), "{ty} size");
        let (bs, ts) = ty.block().unwrap();
        for (i, (g, e)) in got.chunks(ts).zip(expected.chunks(ts)).enumerate() {
            assert_eq!(
                g,
                e,
                "{ty} block {i} (elements {}..{}) differs from the reference",
                i * bs,
                (i + 1) * bs
            );
        }
    }
}

#[test]
fn dequantizers_match_reference_bit_for_bit() {
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let stem = ty.name().to_lowercase();
        let bytes = std::fs::read(fixture(&format!("quant_{stem}.bin"))).unwrap();
        let expected = read_f32(&fixture(&format!("dequant_{stem}.f32")));
        let got = quants::dequantize(ty, &bytes, expected.len()).unwrap();
        let same = got
            .iter()
            .zip(&expected)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{ty}: dequantized values differ from gguf-py");
    }
}

#[test]
fn quantize_rejects_partial_blocks_and_unsupported_types() {
    let err = quants::quantize(GgmlType::Q4_K, &[0.0; 300])
        .unwrap_err()
        .to_string();
    assert!(err.contains("Q4_K") && err.contains("300"), "{err}");
    let err = quants::quantize(GgmlType::Q3_K, &[0.0; 256])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Q3_K") && err.contains("not implemented"),
        "{err}"
    );
}

#[test]
fn reads_gguf_py_file_with_all_metadata_types() {
    let f = GgufFile::open(fixture("tiny_gguf_py.gguf")).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get("test.u8"), Some(&MetaValue::U8(200)));
    assert_eq!(f.get("test.i8"), Some(&MetaValue::I8(-100)));
    assert_eq!(f.get("test.u16"), Some(&MetaValue::U16(60000)));
    assert_eq!(f.get("test.i16"), Some(&MetaValue::I16(-30000)));
    assert_eq!(f.get("test.u32"), Some(&MetaValue::U32(4_000_000_000)));
    assert_eq!(f.get("test.i32"), Some(&MetaValue::I32(-2_000_000_000)));
    assert_eq!(f.get("test.f32"), Some(&MetaValue::F32(1.5)));
    assert_eq!(f.get("test.bool"), Some(&MetaValue::Bool(true)));
    assert_eq!(f.get_str("test.str").unwrap(), Some("héllo ✓"));
    assert_eq!(f.get("test.u64"), Some(&MetaValue::U64((1u64 << 63) + 5)));
    assert_eq!(f.get("test.i64"), Some(&MetaValue::I64(-(1i64 << 62))));
    assert_eq!(f.get("test.f64"), Some(&MetaValue::F64(2.25)));
    let arr: Vec<i64> = f
        .get_array("test.arr_i32")
        .unwrap()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(arr, vec![1, -2, 3]);
    let strs: Vec<&str> = f
        .get_array("test.arr_str")
        .unwrap()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(strs, vec!["a", "bc", ""]);
    let nested = f.get_array("test.arr_nested").unwrap().unwrap();
    assert_eq!(nested.len(), 2);
    assert_eq!(nested[1].as_array().unwrap().len(), 1);
    let x = read_f32(&fixture("input_8x512.f32"));
    let t = f.tensor_f32(f.tensor_info("t_f32").unwrap()).unwrap();
    assert_eq!(t.shape, vec![2, 64]);
    assert_eq!(t.data[..64], x[..64]);
    assert_eq!(t.data[64..], x[512..576]);
    let q8 = f.tensor_info("t_q8_0").unwrap();
    assert_eq!((q8.ty, q8.hf_shape()), (GgmlType::Q8_0, vec![2, 512]));
    let expected = read_f32(&fixture("dequant_q8_0.f32"));
    assert_eq!(f.tensor_f32(q8).unwrap().data, expected[..1024]);
    assert_eq!(
        f.tensor_f32(f.tensor_info("t_1d").unwrap()).unwrap().shape,
        vec![10]
    );
    let f16 = f.tensor_f32(f.tensor_info("t_f16").unwrap()).unwrap();
    assert!(f16
        .data
        .iter()
        .zip(&t.data)
        .all(|(a, b)| (a - b).abs() <= b.abs() * 1e-3 + 1e-6));
}

#[test]
fn write_then_read_round_trip_keeps_values_and_blocks() {
    let x = read_f32(&fixture("input_8x512.f32"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", MetaValue::String("llama".into()));
    w.set(
        "test.arr",
        MetaValue::Array(5, vec![MetaValue::I32(-1), MetaValue::I32(7)]),
    );
    w.set("test.empty", MetaValue::Array(8, vec![]));
    w.set("test.f64", MetaValue::F64(0.1));
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q5_0,
    ];
    for ty in types {
        w.add_tensor_f32(&format!("t.{ty}"), &[8, 512], ty, &x)
            .unwrap();
    }
    w.add_tensor_f32("odd", &[3], GgmlType::F32, &[1.0, 2.0, 3.0])
        .unwrap();
    w.write(&path).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary file left behind");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(
        f.get("test.arr"),
        Some(&MetaValue::Array(
            5,
            vec![MetaValue::I32(-1), MetaValue::I32(7)]
        ))
    );
    assert_eq!(f.get("test.empty"), Some(&MetaValue::Array(8, vec![])));
    assert_eq!(f.get("test.f64"), Some(&MetaValue::F64(0.1)));
    for ty in types {
        let info = f.tensor_info(&format!("t.{ty}")).unwrap();
        assert_eq!(info.offset % 32, 0);
        assert_eq!(info.hf_shape(), vec![8, 512]);
        assert_eq!(
            f.tensor_bytes(info).unwrap(),
            quants::quantize(ty, &x).unwrap().as_slice(),
            "{ty} blocks"
        );
    }
    assert_eq!(
        f.tensor_f32(f.tensor_info("t.F32").unwrap()).unwrap().data,
        x
    );
    assert_eq!(
        f.tensor_f32(f.tensor_info("odd").unwrap()).unwrap().data,
        vec![1.0, 2.0, 3.0]
    );
}

#[test]
fn reader_errors_name_file_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGML\x03\0\0\0").unwrap();
    let e = GgufFile::open(&bad).unwrap_err();
    assert!(
        matches!(e, Error::BadMagic { .. }) && e.to_string().contains("bad.gguf"),
        "{e}"
    );

    let x = vec![0.5f32; 256];
    let mut w = GgufWriter::new();
    w.add_tensor_bytes("blk.0.weird", &[256], GgmlType::Other(16), vec![0u8; 66])
        .unwrap_err();
    w.add_tensor_f32("blk.0.attn_q.weight", &[1, 256], GgmlType::Q4_K, &x)
        .unwrap();
    let path = dir.path().join("ok.gguf");
    w.write(&path).unwrap();
    // Rewrite the tensor's type id to IQ2_XXS (16): reading must name file, tensor and type.
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.0.attn_q.weight";
    let at = bytes
        .windows(name.len())
        .position(|win| win == name)
        .unwrap()
        + name.len()
        + 4
        + 2 * 8;
    bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    let iq = dir.path().join("iq.gguf");
    std::fs::write(&iq, &bytes).unwrap();
    let e = GgufFile::open(&iq).unwrap_err().to_string();
    assert!(
        e.contains("iq.gguf") && e.contains("blk.0.attn_q.weight") && e.contains("16"),
        "{e}"
    );

    let trunc = dir.path().join("trunc.gguf");
    std::fs::write(&trunc, &std::fs::read(&path).unwrap()[..100]).unwrap();
    let e = GgufFile::open(&trunc).unwrap_err().to_string();
    assert!(e.contains("trunc.gguf"), "{e}");
}

#[test]
fn tensor_names_map_both_ways() {
    for (hf, g) in [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        (
            "model.layers.12.self_attn.q_proj.bias",
            "blk.12.attn_q.bias",
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            "blk.0.attn_output.weight",
        ),
        (
            "model.layers.3.mlp.down_proj.weight",
            "blk.3.ffn_down.weight",
        ),
        (
            "model.layers.3.post_attention_layernorm.weight",
            "blk.3.ffn_norm.weight",
        ),
        (
            "model.layers.3.input_layernorm.weight",
            "blk.3.attn_norm.weight",
        ),
    ] {
        assert_eq!(hf_to_gguf(hf).as_deref(), Some(g));
        assert_eq!(gguf_to_hf(g).as_deref(), Some(hf));
    }
    assert_eq!(
        hf_to_gguf("model.layers.0.self_attn.rotary_emb.inv_freq"),
        None
    );
}

#[test]
fn permutation_matches_convert_hf_to_gguf_and_inverts() {
    // 2 heads of head_dim 4, rows labelled by index: permute(w, 2) in numpy gives
    // reshape(2, 2, 2).swapaxes(1, 2) -> rows [0, 2, 1, 3, 4, 6, 5, 7].
    let w: Vec<f32> = (0..8).map(|r| r as f32).collect();
    let p = permute_rows(&w, 8, 1, 2, false).unwrap();
    assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    let w2: Vec<f32> = (0..48).map(|v| v as f32).collect();
    let fwd = permute_rows(&w2, 12, 4, 3, false).unwrap();
    assert_eq!(permute_rows(&fwd, 12, 4, 3, true).unwrap(), w2);
    assert!(permute_rows(&w2, 12, 4, 5, false).is_none());
}

#[test]
fn q4_k_m_mix_follows_llama_quantize_for_qwen2_0_5b_shapes() {
    let ctx = MixContext {
        n_layers: 24,
        tied_embeddings: true,
    };
    let t = |name: &str, shape: &[usize]| tensor_type(name, shape, ExportType::Q4_K_M, &ctx);
    // hidden 896 is not a multiple of 256: Q4_K -> Q5_0, Q6_K -> Q8_0 fallbacks.
    assert_eq!(t("token_embd.weight", &[151936, 896]), GgmlType::Q8_0);
    assert_eq!(t("blk.0.attn_q.weight", &[896, 896]), GgmlType::Q5_0);
    assert_eq!(t("blk.0.attn_v.weight", &[128, 896]), GgmlType::Q8_0);
    assert_eq!(t("blk.4.attn_v.weight", &[128, 896]), GgmlType::Q5_0);
    assert_eq!(t("blk.0.ffn_down.weight", &[896, 4864]), GgmlType::Q6_K);
    // use_more_bits(i, 24): i < 3, i >= 21, or (i - 3) % 3 == 2
    assert_eq!(t("blk.4.ffn_down.weight", &[896, 4864]), GgmlType::Q4_K);
    assert_eq!(t("blk.5.ffn_down.weight", &[896, 4864]), GgmlType::Q6_K);
    assert_eq!(t("blk.5.attn_v.weight", &[128, 896]), GgmlType::Q8_0);
    assert_eq!(t("blk.23.ffn_down.weight", &[896, 4864]), GgmlType::Q6_K);
    assert_eq!(t("blk.0.attn_norm.weight", &[896]), GgmlType::F32);
    assert_eq!(t("blk.0.attn_q.bias", &[896]), GgmlType::F32);
    let ctx = MixContext {
        n_layers: 32,
        tied_embeddings: false,
    };
    let t = |name: &str, shape: &[usize]| tensor_type(name, shape, ExportType::Q4_K_M, &ctx);
    assert_eq!(t("output.weight", &[32000, 4096]), GgmlType::Q6_K);
    assert_eq!(t("token_embd.weight", &[32000, 4096]), GgmlType::Q4_K);
    assert_eq!(t("blk.12.attn_v.weight", &[1024, 4096]), GgmlType::Q6_K);
    assert_eq!(t("blk.11.attn_v.weight", &[1024, 4096]), GgmlType::Q4_K);
    let q8 = |name: &str, shape: &[usize]| tensor_type(name, shape, ExportType::Q8_0, &ctx);
    assert_eq!(q8("output.weight", &[32000, 4096]), GgmlType::Q8_0);
    assert_eq!(q8("blk.0.ffn_up.weight", &[11008, 4096]), GgmlType::Q8_0);
    assert_eq!(q8("blk.0.ffn_up.weight", &[11008, 4100]), GgmlType::F16);
    assert_eq!(
        tensor_type("output.weight", &[32000, 4096], ExportType::Q4_0, &ctx),
        GgmlType::Q6_K
    );
}

#[test]
fn smollm2_gguf_loads_as_hf_model() {
    let Some(path) = smollm2_gguf() else { return };
    let (cfg, tensors, tok) = crate::gguf::model::load_gguf_model(&path).unwrap();
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size
        ),
        (30, 576, 1536)
    );
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (9, 3, 64)
    );
    assert_eq!((cfg.vocab_size, cfg.max_position_embeddings), (49152, 8192));
    assert_eq!((cfg.rms_norm_eps, cfg.rope_theta), (1e-5, 100000.0));
    assert!(cfg.tie_word_embeddings);
    assert_eq!(tensors.len(), 2 + 30 * 9);
    assert_eq!(tensors["model.embed_tokens.weight"].shape, vec![49152, 576]);
    assert_eq!(
        tensors["model.layers.0.self_attn.k_proj.weight"].shape,
        vec![192, 576]
    );
    assert_eq!(tok.pre.as_deref(), Some("smollm"));
    assert_eq!(
        (tok.bos_id, tok.eos_id, tok.add_bos),
        (Some(1), Some(2), Some(false))
    );
    assert_eq!(tok.tokens.len(), 49152);
    // The k permutation must be undone: re-permuting gives back the GGUF rows.
    let f = GgufFile::open(&path).unwrap();
    let raw = f
        .tensor_f32(f.tensor_info("blk.0.attn_k.weight").unwrap())
        .unwrap();
    let hf = &tensors["model.layers.0.self_attn.k_proj.weight"];
    assert_eq!(
        permute_rows(&hf.data, 192, 576, 3, false).unwrap(),
        raw.data
    );
    assert_ne!(hf.data, raw.data);
}

#[test]
fn smollm2_gguf_reexports_identically_at_f32() {
    let Some(path) = smollm2_gguf() else { return };
    let (cfg, tensors, tok) = crate::gguf::model::load_gguf_model(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smol-f32.gguf");
    let small: BTreeMap<_, _> = tensors
        .into_iter()
        .filter(|(k, _)| !k.contains("layers.") || k.contains("layers.0."))
        .collect();
    let mut cfg1 = cfg.clone();
    cfg1.num_hidden_layers = 1;
    crate::gguf::model::write_gguf_model(&out, &cfg1, &small, &tok, ExportType::F32, "smol")
        .unwrap();
    let (cfg2, back, tok2) = crate::gguf::model::load_gguf_model(&out).unwrap();
    assert_eq!(cfg2, cfg1);
    assert_eq!(tok2, tok);
    assert_eq!(back, small);
}

/// A GGUF's metadata, and its tensors as (name, PyTorch shape, type, bytes).
type Meta = Vec<(String, MetaValue)>;
type RawTensors = Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>;

/// Rewrites `src` as `dst` with `edit` applied to its metadata and tensor list.
fn rewrite_gguf(src: &Path, dst: &Path, edit: impl FnOnce(&mut Meta, &mut RawTensors)) {
    let f = GgufFile::open(src).unwrap();
    let mut meta = f.metadata.clone();
    let mut tensors: Vec<_> = f
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.hf_shape(),
                t.ty,
                f.tensor_bytes(t).unwrap().to_vec(),
            )
        })
        .collect();
    edit(&mut meta, &mut tensors);
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.set(&k, v);
    }
    for (name, shape, ty, bytes) in tensors {
        w.add_tensor_bytes(&name, &shape, ty, bytes).unwrap();
    }
    w.write(dst).unwrap();
}

#[test]
fn bad_gguf_models_are_errors_naming_file_tensor_and_expectation() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/gemma2");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("gemma2.gguf");
    crate::export::export_gguf(&src, None, &good, ExportType::F32).unwrap();
    let load = |name: &str, edit: &dyn Fn(&mut Meta, &mut RawTensors)| {
        let path = dir.path().join(name);
        rewrite_gguf(&good, &path, |m, t| edit(m, t));
        crate::gguf::model::load_gguf_model(&path)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let set_arch = |m: &mut Vec<(String, MetaValue)>, arch: &str| {
        for (k, v) in m.iter_mut() {
            if k == "general.architecture" {
                *v = MetaValue::String(arch.into());
            }
        }
        let renamed: Vec<_> = m
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("gemma2.")
                    .map(|rest| (format!("{arch}.{rest}"), v.clone()))
            })
            .collect();
        m.extend(renamed);
    };
    let e = load("mamba.gguf", &|m, _| set_arch(m, "mamba"));
    assert!(
        e.contains("mamba.gguf")
            && e.contains("general.architecture")
            && e.contains("`mamba`")
            && e.contains("gemma3"),
        "{e}"
    );
    // Gemma 2's tensors under `llama`: its post-attention norm is not a llama tensor.
    let e = load("as-llama.gguf", &|m, _| set_arch(m, "llama"));
    assert!(
        e.contains("as-llama.gguf")
            && e.contains("`llama`")
            && e.contains("post_attention_norm")
            && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );
    let e = load("no-post-ffw.gguf", &|_, t| {
        t.retain(|x| x.0 != "blk.1.post_ffw_norm.weight")
    });
    assert!(
        e.contains("no-post-ffw.gguf")
            && e.contains("blk.1.post_ffw_norm.weight")
            && e.contains("missing")
            && e.contains("[32]")
            && e.contains("`gemma2`"),
        "{e}"
    );
    let e = load("short-ffn.gguf", &|_, t| {
        let x = t.iter_mut().find(|x| x.0 == "blk.0.ffn_up.weight").unwrap();
        x.1 = vec![32, 64];
    });
    assert!(
        e.contains("short-ffn.gguf")
            && e.contains("blk.0.ffn_up.weight")
            && e.contains("[32, 64]")
            && e.contains("[64, 32]"),
        "{e}"
    );
    let e = load("fused.gguf", &|_, t| {
        t.push((
            "blk.0.attn_qkv.weight".into(),
            vec![2, 32],
            GgmlType::F32,
            vec![0u8; 256],
        ))
    });
    assert!(
        e.contains("fused.gguf")
            && e.contains("blk.0.attn_qkv.weight")
            && e.contains("[2, 32]")
            && e.contains("rows (q "),
        "{e}"
    );
}

/// GLM files from older converters fuse q, k and v (`attn_qkv`, weight and bias): they read as
/// the same model as the split tensors.
#[test]
fn fused_qkv_glm_reads_as_split_q_k_v() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/glm");
    let dir = tempfile::tempdir().unwrap();
    let split = dir.path().join("glm.gguf");
    crate::export::export_gguf(&src, None, &split, ExportType::F32).unwrap();
    let fused = dir.path().join("glm-fused.gguf");
    rewrite_gguf(&split, &fused, |_, tensors| {
        let mut parts: BTreeMap<String, (Vec<usize>, GgmlType, Vec<u8>)> = BTreeMap::new();
        tensors.retain(|(name, shape, ty, bytes)| {
            let is_part = ["attn_q.", "attn_k.", "attn_v."]
                .iter()
                .any(|p| name.contains(p));
            if is_part {
                parts.insert(name.clone(), (shape.clone(), *ty, bytes.clone()));
            }
            !is_part
        });
        let blocks = parts
            .keys()
            .filter(|k| k.ends_with("attn_q.weight"))
            .count();
        assert!(blocks > 0);
        for block in 0..blocks {
            for param in ["weight", "bias"] {
                let mut shape: Vec<usize> = Vec::new();
                let mut bytes = Vec::new();
                for role in ["q", "k", "v"] {
                    let (s, ty, b) = &parts[&format!("blk.{block}.attn_{role}.{param}")];
                    assert_eq!(*ty, GgmlType::F32);
                    match shape.first_mut() {
                        Some(rows) => *rows += s[0],
                        None => shape = s.clone(),
                    }
                    bytes.extend_from_slice(b);
                }
                let name = format!("blk.{block}.attn_qkv.{param}");
                tensors.push((name, shape, GgmlType::F32, bytes));
            }
        }
    });
    let (cfg_split, t_split, _) = crate::gguf::model::load_gguf_model(&split).unwrap();
    let (cfg_fused, t_fused, _) = crate::gguf::model::load_gguf_model(&fused).unwrap();
    assert_eq!(cfg_fused, cfg_split);
    assert_eq!(t_fused, t_split);
}

#[test]
fn family_tensor_names_follow_llama_cpp() {
    use crate::gguf::names::{gguf_to_hf_arch, hf_to_gguf_arch};
    use crate::model::config::Architecture::*;
    for (arch, hf, g) in [
        (
            Gemma2,
            "model.layers.1.post_attention_layernorm.weight",
            "blk.1.post_attention_norm.weight",
        ),
        (
            Gemma2,
            "model.layers.1.pre_feedforward_layernorm.weight",
            "blk.1.ffn_norm.weight",
        ),
        (
            Gemma3,
            "model.layers.1.post_feedforward_layernorm.weight",
            "blk.1.post_ffw_norm.weight",
        ),
        (
            Gemma3,
            "model.layers.1.self_attn.q_norm.weight",
            "blk.1.attn_q_norm.weight",
        ),
        (
            Glm4,
            "model.layers.0.post_self_attn_layernorm.weight",
            "blk.0.post_attention_norm.weight",
        ),
        (
            Glm4,
            "model.layers.0.post_attention_layernorm.weight",
            "blk.0.ffn_norm.weight",
        ),
        (
            Glm4,
            "model.layers.0.post_mlp_layernorm.weight",
            "blk.0.post_ffw_norm.weight",
        ),
        (
            Glm4,
            "model.layers.0.mlp.gate_up_proj.weight",
            "blk.0.ffn_up.weight",
        ),
        (
            Glm,
            "model.layers.0.mlp.gate_up_proj.weight",
            "blk.0.ffn_up.weight",
        ),
        (
            Glm,
            "model.layers.0.self_attn.q_proj.bias",
            "blk.0.attn_q.bias",
        ),
        (
            Llama,
            "model.layers.0.post_attention_layernorm.weight",
            "blk.0.ffn_norm.weight",
        ),
    ] {
        assert_eq!(hf_to_gguf_arch(hf, arch).as_deref(), Some(g), "{arch:?}");
        assert_eq!(gguf_to_hf_arch(g, arch).as_deref(), Some(hf), "{arch:?}");
    }
}

#[test]
fn family_metadata_follows_llama_cpp_keys() {
    // Gemma 2: llama.cpp's keys, norms stored as 1 + w; Mistral's window under `llama`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g2.gguf");
    crate::export::export_gguf(&root.join("gemma2"), None, &out, ExportType::F16).unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("gemma2"));
    assert_eq!(
        f.get_u64("gemma2.attention.sliding_window").unwrap(),
        Some(8)
    );
    assert_eq!(
        f.get_f64("gemma2.attn_logit_softcapping").unwrap(),
        Some(4.0)
    );
    assert_eq!(
        f.get_f64("gemma2.final_logit_softcapping").unwrap(),
        Some(6.0)
    );
    assert_eq!(f.get_u64("gemma2.attention.key_length").unwrap(), Some(16));
    // query_pre_attn_scalar 24 is not llama.cpp's 1/sqrt(head_dim): kept as attention.scale.
    let scale = f.get_f64("gemma2.attention.scale").unwrap().unwrap();
    assert!((scale - 1.0 / 24f64.sqrt()).abs() < 1e-6, "{scale}");
    assert!(f.tensor_info("output.weight").is_err(), "tied");
    let hf = crate::model::hf::load_hf_folder_tensors(root.join("gemma2")).unwrap();
    let norm = f
        .tensor_f32(f.tensor_info("blk.0.post_attention_norm.weight").unwrap())
        .unwrap();
    let w = &hf["model.layers.0.post_attention_layernorm.weight"].data;
    assert!(norm.data.iter().zip(w).all(|(g, h)| *g == h + 1.0));
    assert_eq!(
        f.tensor_info("blk.0.ffn_up.weight").unwrap().ty,
        GgmlType::F16
    );

    let out = dir.path().join("glm.gguf");
    crate::export::export_gguf(&root.join("glm"), None, &out, ExportType::F32).unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("chatglm"));
    assert_eq!(f.get_u64("chatglm.rope.dimension_count").unwrap(), Some(8));
    assert_eq!(
        f.tensor_info("blk.0.ffn_up.weight").unwrap().hf_shape(),
        vec![128, 32]
    );

    let out = dir.path().join("mistral.gguf");
    crate::export::export_gguf(&root.join("mistral_sliding"), None, &out, ExportType::F32).unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(
        f.get_u64("llama.attention.sliding_window").unwrap(),
        Some(8)
    );
    let (cfg, _, _) = crate::gguf::model::load_gguf_model(&out).unwrap();
    assert_eq!(
        (cfg.model_type.as_str(), cfg.layer_window(1)),
        ("mistral", Some(8))
    );
}

/// Qwen with a window: every layer sliding needs only the window key; sliding layers from
/// `max_window_layers` on are written as one bool per layer; both read back as the same layers.
#[test]
fn sliding_window_qwen_round_trips_through_gguf() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/qwen3");
    let dir = tempfile::tempdir().unwrap();
    let windows = |types: [&str; 3]| -> Vec<Option<usize>> {
        let model = dir.path().join(types.join("-"));
        std::fs::create_dir_all(&model).unwrap();
        for e in std::fs::read_dir(&fixture).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
        config["use_sliding_window"] = true.into();
        config["sliding_window"] = 8.into();
        config["layer_types"] = serde_json::json!(types);
        std::fs::write(model.join("config.json"), config.to_string()).unwrap();
        let out = model.join("m.gguf");
        crate::export::export_gguf(&model, None, &out, ExportType::F32).unwrap();
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(
            f.get_u64("qwen3.attention.sliding_window").unwrap(),
            Some(8)
        );
        let pattern = f.get("qwen3.attention.sliding_window_pattern").cloned();
        let all_sliding = types.iter().all(|t| *t == "sliding_attention");
        assert_eq!(pattern.is_none(), all_sliding, "{pattern:?}");
        let (cfg, _, _) = crate::gguf::model::load_gguf_model(&out).unwrap();
        (0..3).map(|i| cfg.layer_window(i)).collect()
    };
    let s = "sliding_attention";
    let f = "full_attention";
    assert_eq!(windows([s, s, s]), vec![Some(8); 3]);
    assert_eq!(windows([f, s, s]), vec![None, Some(8), Some(8)]);
}

/// A GGUF v3 header with `n_tensors` tensor infos and the given metadata entries already encoded.
fn raw_gguf(n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b.extend_from_slice(body);
    b
}

fn raw_str(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

/// One tensor info: name, dims (ggml order), type id, offset.
fn raw_tensor(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut b = raw_str(name);
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b
}

#[test]
fn hostile_counts_and_nesting_are_errors_not_crashes() {
    // A metadata count the file cannot hold is refused before anything is allocated for it.
    let e = GgufFile::from_bytes("n.gguf", raw_gguf(0, 1 << 40, &[]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("n.gguf") && e.contains("metadata count") && e.contains("bytes left"),
        "{e}"
    );
    let e = GgufFile::from_bytes("t.gguf", raw_gguf(1000, 0, &[0; 64]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor count"), "{e}");

    // Arrays of arrays 100 000 deep (12 bytes a level) used to recurse off the stack.
    let depth = 100_000;
    let mut body = raw_str("deep");
    body.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..depth {
        body.extend_from_slice(&9u32.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
    }
    let e = GgufFile::from_bytes("deep.gguf", raw_gguf(0, 1, &body))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("deep.gguf") && e.contains("`deep`") && e.contains("nested more than 8"),
        "{e}"
    );
}

#[test]
fn tensor_sizes_and_offsets_that_overflow_are_errors() {
    // 2^32 x 2^32 x 1 elements wrapped to 0 in a release build and was accepted as empty.
    let body = raw_tensor("huge", &[1 << 32, 1 << 32, 1], 0, 0);
    let e = GgufFile::from_bytes("huge.gguf", raw_gguf(1, 0, &body))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("huge.gguf") && e.contains("`huge`") && e.contains("overflow"),
        "{e}"
    );
    // Found by `cargo fuzz run gguf`: with a zero dimension the count is 0 in ggml order, but the
    // HF shape [2^32, 2^32, 0] overflowed when a reader multiplied it out.
    let body = raw_tensor("empty", &[0, 1 << 32, 1 << 32], 0, 0);
    let e = GgufFile::from_bytes("empty.gguf", raw_gguf(1, 0, &body))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`empty`") && e.contains("overflow"), "{e}");
    // An offset near 2^64 wrapped back into the file.
    let body = raw_tensor("far", &[1], 0, u64::MAX - 31);
    let e = GgufFile::from_bytes("far.gguf", raw_gguf(1, 0, &body))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("far.gguf") && e.contains("`far`") && e.contains("past the end"),
        "{e}"
    );
    // A well-formed one still reads from memory.
    let mut body = raw_tensor("ok", &[2], 0, 0);
    let header = 4 + 4 + 8 + 8 + body.len();
    body.resize(header.div_ceil(32) * 32 - 24, 0);
    body.extend_from_slice(&1.5f32.to_le_bytes());
    body.extend_from_slice(&(-2f32).to_le_bytes());
    let f = GgufFile::from_bytes("ok.gguf", raw_gguf(1, 0, &body)).unwrap();
    let t = f.tensor_f32(f.tensor_info("ok").unwrap()).unwrap();
    assert_eq!(t.data, vec![1.5, -2.0]);
}
