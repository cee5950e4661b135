//! A trained model as `runner generate` and the `evaluate` stage run it: base weights with a
//! peft adapter folder in effect. LoRA, DoRA and AdaLoRA adapters go onto the projections
//! (unmerged, as peft's `PeftModel.from_pretrained` leaves them); prefix tuning, prompt tuning
//! and P-Tuning adapters come back beside the model, as generation takes them. Writing a merged
//! model (`export`) goes through [`crate::peft::merge`] instead, on the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::model::config::ModelConfig;
use crate::model::decoder::CausalLm;
use crate::model::hf::HostTensor;
use crate::model::prompt::{
    prompt_adapter_kind, read_prompt_adapter, PromptAdapter, PromptAdapterFile,
};
use crate::peft::adalora::apply_adalora_adapter;
use crate::peft::adalora_files::{read_adalora_adapter, AdaLoraAdapter};
use crate::peft::files::{read_config_json, read_lora_adapter, LoraAdapter};
use crate::peft::lora::apply_adapter;
use crate::peft::AdapterError;

/// A peft adapter folder, read by the `peft_type` of its adapter_config.json.
pub enum Adapter {
    /// LoRA, with DoRA's magnitudes when it has them.
    Lora(LoraAdapter),
    AdaLora(AdaLoraAdapter),
    /// Prefix tuning, prompt tuning or P-Tuning: virtual tokens or a KV prefix, read with the
    /// folder they came from (P-Tuning's encoder weights are beside them).
    Prompt {
        dir: PathBuf,
        file: PromptAdapterFile,
    },
}

impl Adapter {
    /// Reads the adapter in `dir`; errors name the file and what is wrong with it.
    pub fn read(dir: &Path) -> Result<Self, AdapterError> {
        if prompt_adapter_kind(dir).is_some() {
            return Ok(Adapter::Prompt {
                dir: dir.to_path_buf(),
                file: read_prompt_adapter(dir)?,
            });
        }
        let (config, _) = read_config_json(dir)?;
        Ok(match config.get("peft_type").and_then(|v| v.as_str()) {
            Some("ADALORA") => Adapter::AdaLora(read_adalora_adapter(dir)?),
            _ => Adapter::Lora(read_lora_adapter(dir)?),
        })
    }
}

/// The decoder of `config` and `tensors` with `adapter` in effect, and the prompt-learning
/// adapter to generate with when `adapter` is one.
pub fn load_trained<B: Backend>(
    config: &ModelConfig,
    tensors: &BTreeMap<String, HostTensor>,
    adapter: Option<&Adapter>,
    device: &B::Device,
) -> Result<(CausalLm<B>, Option<PromptAdapter<B>>), AdapterError> {
    let model = CausalLm::<B>::from_hf_tensors(config, tensors, device)?;
    Ok(match adapter {
        None => (model, None),
        Some(Adapter::Lora(lora)) => (apply_adapter(model, lora, device)?, None),
        Some(Adapter::AdaLora(adalora)) => (apply_adalora_adapter(model, adalora, device)?, None),
        Some(Adapter::Prompt { dir, file }) => {
            let prompt = PromptAdapter::<B>::from_file(file, config, dir, device)?;
            (model, Some(prompt))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::{init_weights, tiny_qwen2_config, TinyShape};
    use crate::peft::files::{write_lora_adapter, DenseTensor, LoraAdapterConfig, LoraModule};
    use crate::peft::files::{LoraPair, TargetModules};
    use crate::testing::TB;

    const SHAPE: TinyShape = TinyShape {
        hidden: 32,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 64,
        vocab: 64,
    };

    fn dense(shape: [usize; 2], seed: u32) -> DenseTensor {
        let data = (0..shape[0] * shape[1])
            .map(|i| ((i as u32 * 2_654_435_761).wrapping_add(seed) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        DenseTensor {
            shape: shape.to_vec(),
            data,
        }
    }

    /// A LoRA adapter loaded for generation (unmerged, on the model) gives the logits of the
    /// same adapter merged into the host weights, as `export` writes them.
    #[test]
    fn a_loaded_lora_adapter_gives_the_logits_of_its_merge() {
        let config = tiny_qwen2_config(SHAPE);
        let tensors = init_weights(&config, 5);
        let dir = tempfile::tempdir().unwrap();
        let r = 4;
        let mut pairs = Vec::new();
        for layer in 0..SHAPE.layers {
            for (module, name) in [
                (LoraModule::QProj, "self_attn.q_proj"),
                (LoraModule::DownProj, "mlp.down_proj"),
            ] {
                let w = &tensors[&format!("model.layers.{layer}.{name}.weight")];
                let (out, inp) = (w.shape[0], w.shape[1]);
                pairs.push(LoraPair {
                    layer,
                    module,
                    a: dense([r, inp], 7 + layer as u32),
                    b: dense([out, r], 11 + layer as u32),
                });
            }
        }
        let targets = TargetModules::List(vec!["q_proj".into(), "down_proj".into()]);
        write_lora_adapter(dir.path(), &LoraAdapterConfig::new(r, 8.0, targets), &pairs).unwrap();

        let adapter = Adapter::read(dir.path()).unwrap();
        assert!(matches!(adapter, Adapter::Lora(_)));
        let device = Default::default();
        let ids = [1u32, 5, 9, 2, 33, 17];
        let logits = |model: &CausalLm<TB>, prompt: Option<&PromptAdapter<TB>>| {
            crate::model::generate::prompted_logits(model, prompt, &ids)
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap()
        };
        let (loaded, prompt) =
            load_trained::<TB>(&config, &tensors, Some(&adapter), &device).unwrap();
        assert!(prompt.is_none());
        let mut merged_tensors = tensors.clone();
        let merged = crate::peft::merge::merge_lora(&mut merged_tensors, dir.path()).unwrap();
        assert_eq!(merged.len(), 2 * SHAPE.layers);
        let (merged_model, _) =
            load_trained::<TB>(&config, &merged_tensors, None, &device).unwrap();
        let (base, _) = load_trained::<TB>(&config, &tensors, None, &device).unwrap();
        let (a, b, c) = (
            logits(&loaded, None),
            logits(&merged_model, None),
            logits(&base, None),
        );
        let max_diff = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(
            max_diff(&a, &b) < 1e-4,
            "loaded vs merged: {}",
            max_diff(&a, &b)
        );
        assert!(max_diff(&a, &c) > 1e-2, "the adapter changed nothing");
    }

    /// GLM: `target_modules = ["gate_up_proj"]` (peft's name for its fused MLP input) wraps the
    /// gate and up halves; the adapter is written under peft's fused name, and loading it or
    /// merging it into the fused HF weight gives the trained model's logits.
    #[test]
    fn a_glm_gate_up_proj_adapter_is_written_as_peft_names_it_and_loads_and_merges_the_same() {
        use burn::module::Param;
        use burn::tensor::{Distribution, Tensor};
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/glm");
        let config = ModelConfig::from_file(folder.join("config.json")).unwrap();
        let tensors = crate::model::hf::load_hf_folder_tensors(&folder).unwrap();
        assert!(tensors.contains_key("model.layers.0.mlp.gate_up_proj.weight"));
        let device = Default::default();
        let base = CausalLm::<TB>::from_hf_tensors(&config, &tensors, &device).unwrap();
        let targets = TargetModules::List(vec!["gate_up_proj".into(), "q_proj".into()]);
        let adapter_config = LoraAdapterConfig::new(4, 8.0, targets);
        let (mut model, wrapped) =
            crate::peft::lora::add_lora(base, &adapter_config, 3, &device).unwrap();
        assert_eq!(wrapped, 3 * config.num_hidden_layers);
        // B starts at zero; a random B makes every adapter count.
        for (_, _, lin) in crate::peft::lora::projections_mut(&mut model) {
            if let Some(b) = lin.lora_b.take() {
                let shape = b.val().shape();
                let t = Tensor::<TB, 2>::random(shape, Distribution::Uniform(-0.5, 0.5), &device);
                lin.lora_b = Some(Param::from_tensor(t));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        crate::peft::lora::write_model_adapter(dir.path(), &adapter_config, &model).unwrap();
        let saved = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
        assert!(saved.contains("\"gate_up_proj\""), "{saved}");
        let weights =
            crate::model::hf::load_safetensors_file(&dir.path().join("adapter_model.safetensors"))
                .unwrap();
        assert!(weights
            .keys()
            .any(|k| k.ends_with("layers.0.mlp.gate_up_proj.lora_A.weight")));
        assert!(!weights.keys().any(|k| k.contains("gate_proj")));

        let ids = [1u32, 5, 9, 2, 33, 17];
        let logits = |model: &CausalLm<TB>| {
            crate::model::generate::prompted_logits(model, None, &ids)
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap()
        };
        let max_diff = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max)
        };
        let trained = logits(&model);
        let adapter = Adapter::read(dir.path()).unwrap();
        let (loaded, _) = load_trained::<TB>(&config, &tensors, Some(&adapter), &device).unwrap();
        let d = max_diff(&trained, &logits(&loaded));
        assert!(d < 1e-4, "loaded vs trained: {d}");
        let mut merged_tensors = tensors.clone();
        let merged = crate::peft::merge::merge_lora(&mut merged_tensors, dir.path()).unwrap();
        assert!(
            merged.iter().any(|m| m.ends_with("mlp.gate_up_proj")),
            "{merged:?}"
        );
        let (merged_model, _) =
            load_trained::<TB>(&config, &merged_tensors, None, &device).unwrap();
        let d = max_diff(&trained, &logits(&merged_model));
        assert!(d < 1e-4, "merged vs trained: {d}");
        let (plain, _) = load_trained::<TB>(&config, &tensors, None, &device).unwrap();
        assert!(
            max_diff(&trained, &logits(&plain)) > 1e-2,
            "the adapter changed nothing"
        );
    }

    #[test]
    fn adapter_folders_that_are_not_adapters_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Adapter::read(dir.path()).err().unwrap().to_string();
        assert!(missing.contains("adapter_config.json"), "{missing}");
        std::fs::write(dir.path().join("adapter_config.json"), "{ r = 8 }").unwrap();
        let bad = Adapter::read(dir.path()).err().unwrap().to_string();
        assert!(
            bad.contains("adapter_config.json") && bad.contains("invalid adapter config"),
            "{bad}"
        );
    }
}
