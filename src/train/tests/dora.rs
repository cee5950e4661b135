//! DoRA and QLoRA checks: one DoRA step on the tiny Qwen2 equals peft's loss and gradients, a
//! peft-written DoRA adapter gives peft's logits (unmerged and merged by `runner export`'s merge),
//! and a QLoRA model trains with its base held in NF4. Fixtures: `scripts/make_dora_fixtures.py`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::decoder::CausalLm;
use crate::model::hf::HostTensor;
use crate::model::init::tiny_qwen2_config;
use crate::model::nf4_linear::BaseWeight;
use crate::peft::files::{parse_magnitude_name, parse_tensor_name, read_lora_adapter};
use crate::peft::lora::{apply_adapter, projections_mut, quantize_base_nf4};
use crate::train::data::{make_batch, summed_cross_entropy};
use crate::train::sft::CausalModel;
use crate::train::tests::{fixture_examples, fixture_tensors, SHAPE};

use crate::testing::AD;
use crate::testing::TB;

fn base_of(floats: &BTreeMap<String, HostTensor>) -> BTreeMap<String, HostTensor> {
    floats
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("base.").map(|n| (n.to_string(), v.clone())))
        .collect()
}

fn max_rel(got: &[f32], want: &[f32]) -> (f32, f32) {
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    (diff, scale)
}

#[test]
fn dora_loss_and_gradients_match_peft() {
    let (floats, ints) = fixture_tensors("sft_dora_grads.safetensors");
    let mut config = tiny_qwen2_config(SHAPE);
    config.rope_theta = 10_000.0;
    let device = Default::default();
    let mut model = CausalLm::<AD>::from_hf_tensors(&config, &base_of(&floats), &device)
        .unwrap()
        .no_grad();
    let get = |prefix: &str, layer: usize, module, factor: char| {
        floats
            .iter()
            .find(|(k, _)| match k.strip_prefix(prefix) {
                Some(n) if factor == 'M' => parse_magnitude_name(n) == Some((layer, module)),
                Some(n) => parse_tensor_name(n) == Some((layer, module, factor)),
                None => false,
            })
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    for (layer, module, slot) in projections_mut(&mut model) {
        let t2 =
            |t: HostTensor| Tensor::<AD, 2>::from_data(TensorData::new(t.data, t.shape), &device);
        let m = get("init.", layer, module, 'M');
        let lin = std::mem::replace(
            slot,
            crate::model::lora::LoraLinear::new(Tensor::zeros([1, 1], &device), None),
        );
        *slot = lin
            .with_lora_tensors(
                t2(get("init.", layer, module, 'A')),
                t2(get("init.", layer, module, 'B')),
                2.0,
            )
            .with_magnitude(Tensor::from_data(TensorData::new(m.data, m.shape), &device));
    }
    let examples = fixture_examples(&ints);
    let batch = make_batch::<AD>(&examples, &[0, 1], 0, &device);
    let loss = summed_cross_entropy(model.logits(batch.input_ids.clone()), &batch)
        .div_scalar(batch.num_items as f64);
    let got: f32 = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let want = floats["loss"].data[0];
    let loss_rel = ((got - want) / want).abs();
    assert!(loss_rel < 1e-4, "loss {got} vs peft {want}");
    let grads = loss.backward();
    let mut worst = 0f32;
    for (layer, module, slot) in projections_mut(&mut model) {
        let a = slot.lora_a.as_ref().unwrap().val();
        let b = slot.lora_b.as_ref().unwrap().val();
        let m = slot.magnitude.as_ref().unwrap().val();
        let pairs = [
            ('A', a.grad(&grads).unwrap().into_data()),
            ('B', b.grad(&grads).unwrap().into_data()),
            ('M', m.grad(&grads).unwrap().into_data()),
        ];
        for (factor, g) in pairs {
            let g = g.to_vec::<f32>().unwrap();
            let (diff, scale) = max_rel(&g, &get("grad.", layer, module, factor).data);
            assert!(
                scale > 0.0 && diff <= 1e-4 * scale,
                "layer {layer} {module:?} {factor}: {diff} vs scale {scale}"
            );
            worst = worst.max(diff / scale);
        }
    }
    println!("dora parity: loss rel {loss_rel:e}, worst grad rel {worst:e}");
}

fn fixture_ids() -> (Vec<i64>, Vec<f32>) {
    let (floats, ints) = fixture_tensors("sft_dora_grads.safetensors");
    // Row 0 of the batch (7 tokens, no padding) and its logits [7, 64].
    (
        ints["input_ids"][..7].to_vec(),
        floats["logits"].data[..7 * 64].to_vec(),
    )
}

#[test]
fn peft_written_dora_adapter_gives_peft_logits() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/peft_dora_adapter");
    let adapter = read_lora_adapter(&dir).unwrap();
    assert!(adapter.config.use_dora);
    assert_eq!((adapter.pairs.len(), adapter.magnitudes.len()), (14, 14));
    let (floats, _) = fixture_tensors("sft_dora_grads.safetensors");
    let mut config = tiny_qwen2_config(SHAPE);
    config.rope_theta = 10_000.0;
    let base = base_of(&floats);
    let device = Default::default();
    let (ids, want) = fixture_ids();
    let ids = Tensor::<TB, 2, Int>::from_data(TensorData::new(ids, [1, 7]), &device);
    let model = CausalLm::<TB>::from_hf_tensors(&config, &base, &device).unwrap();
    let model = apply_adapter(model, &adapter, &device).unwrap();
    let got = model
        .logits(ids.clone())
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let (unmerged, _) = max_rel(&got, &want);
    assert!(
        unmerged < 1e-4,
        "unmerged DoRA logits differ from peft's by {unmerged}"
    );

    // Merged in memory (LoraLinear::merged) and by the export merge on host tensors.
    let merged = crate::peft::lora::merged(model);
    let got = merged
        .logits(ids.clone())
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let (in_memory, _) = max_rel(&got, &want);
    assert!(in_memory < 1e-4, "merged DoRA logits differ by {in_memory}");
    let mut host = base.clone();
    let modules = crate::peft::merge::merge_lora(&mut host, &dir).unwrap();
    assert_eq!(modules.len(), 14);
    let exported = CausalLm::<TB>::from_hf_tensors(&config, &host, &device).unwrap();
    let got = exported.logits(ids).into_data().to_vec::<f32>().unwrap();
    let (export, _) = max_rel(&got, &want);
    assert!(
        export < 1e-4,
        "export-merged DoRA logits differ by {export}"
    );
    println!("peft DoRA adapter: max |logit diff| unmerged {unmerged:e}, merged {in_memory:e}, export {export:e}");
}

#[test]
fn qlora_holds_the_base_in_nf4_and_equals_the_dequantized_forward() {
    let (floats, _) = fixture_tensors("sft_dora_grads.safetensors");
    let mut config = tiny_qwen2_config(SHAPE);
    config.rope_theta = 10_000.0;
    let device = Default::default();
    let dense = CausalLm::<TB>::from_hf_tensors(&config, &base_of(&floats), &device).unwrap();
    let mut q = quantize_base_nf4(dense).unwrap();
    // The dense model built from the host NF4 round trip (model::nf4) of every projection.
    let mut host = base_of(&floats);
    let mut bytes = (0usize, 0usize);
    for (layer, module, slot) in projections_mut(&mut q) {
        let BaseWeight::Nf4(w) = &slot.weight else {
            panic!("layer {layer} {module:?} is not NF4");
        };
        let name = format!("model.layers.{layer}.{}.weight", module.path());
        let t = host.get_mut(&name).unwrap();
        let nq = crate::model::nf4::quantize_nf4(&t.data, &t.shape).unwrap();
        t.data = nq.dequantize().unwrap();
        let n = t.data.len();
        // ndarray ints are i64: 8 nibbles per 8 bytes; an i32 backend halves the int part.
        assert_eq!(w.packed.dims()[0], n.div_ceil(64) * 8);
        assert_eq!(w.absmax_codes.dims()[0], n.div_ceil(64).div_ceil(4));
        bytes.0 += slot.weight.device_bytes();
        bytes.1 += n * 4;
    }
    println!("nf4 bytes (i64 ints) {} vs dense f32 {}", bytes.0, bytes.1);
    let reference = CausalLm::<TB>::from_hf_tensors(&config, &host, &device).unwrap();
    let (ids, _) = fixture_ids();
    let ids = Tensor::<TB, 2, Int>::from_data(TensorData::new(ids, [1, 7]), &device);
    let a = q.logits(ids.clone()).into_data().to_vec::<f32>().unwrap();
    let b = reference.logits(ids).into_data().to_vec::<f32>().unwrap();
    let (diff, _) = max_rel(&a, &b);
    assert!(
        diff <= 1e-5,
        "NF4 forward differs from the dequantized dense forward by {diff}"
    );
    // Export dequantizes: merged() gives dense weights equal to the host round trip.
    let merged = crate::peft::lora::merged(q).to_hf_tensors();
    assert_eq!(
        merged["model.layers.1.mlp.down_proj.weight"].data,
        host["model.layers.1.mlp.down_proj.weight"].data
    );
}
