//! Merging a PEFT LoRA adapter into base weights: W += scale · B·A with scale = alpha/r, or
//! alpha/√r with `use_rslora` (peft/tuners/lora/layer.py `LoraLayer.update_layer`,
//! `get_delta_weight`). Adapter tensors are named
//! `base_model.model.<base name without .weight>.lora_{A,B}.weight`. DoRA adapters also carry
//! `<module>.lora_magnitude_vector` (`[out]`): the merged weight is
//! `m / ||W + scale·B·A|| · (W + scale·B·A)`, norms over each output row (peft
//! `tuners/lora/variants.py` `DoraLinearVariant.merge_safe`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::peft::files::{read_config_json, LoraAdapterConfig};
use crate::peft::AdapterError as Error;

type Result<T> = std::result::Result<T, Error>;
use crate::model::hf::{load_safetensors_file, HostTensor};

/// What merging reads from adapter_config.json: peft's LoRA settings (`files::LoraAdapterConfig`,
/// whose `scaling_for` applies `rank_pattern`/`alpha_pattern`) and the weight layout.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    pub lora: LoraAdapterConfig,
    /// Conv1D-style base weights stored `[in, out]` (GPT-2); peft's `fan_in_fan_out`.
    pub fan_in_fan_out: bool,
}

impl MergeConfig {
    /// Reads `adapter_config.json` in `adapter_dir`. A config without `peft_type` is taken as LoRA
    /// (older peft releases and hand-written configs leave it out); any other type is refused.
    pub fn read(adapter_dir: &Path) -> Result<MergeConfig> {
        let (mut json, path) = read_config_json(adapter_dir)?;
        if let Value::Object(map) = &mut json {
            map.entry("peft_type").or_insert(Value::from("LORA"));
        }
        let lora = LoraAdapterConfig::from_json(&json, &path)?;
        let fan_in_fan_out = lora
            .extra
            .get("fan_in_fan_out")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(MergeConfig {
            lora,
            fan_in_fan_out,
        })
    }
}

/// Strips PEFT's prefix and adapter-name infix: `base_model.model.X.lora_A.default.weight` → (X, "A").
fn split_lora_name(name: &str) -> Option<(String, char)> {
    let stem = name.strip_prefix("base_model.model.").unwrap_or(name);
    for (tag, which) in [(".lora_A.", 'A'), (".lora_B.", 'B')] {
        if let Some(pos) = stem.find(tag) {
            return Some((stem[..pos].to_string(), which));
        }
    }
    None
}

/// Merges the adapter in `adapter_dir` into `base` (HF names) in place; returns merged module names.
pub fn merge_lora(
    base: &mut BTreeMap<String, HostTensor>,
    adapter_dir: &Path,
) -> Result<Vec<String>> {
    let cfg = MergeConfig::read(adapter_dir)?;
    let adapter =
        load_safetensors_file(&adapter_dir.join("adapter_model.safetensors")).map_err(|e| {
            Error::Invalid {
                path: adapter_dir.to_path_buf(),
                what: e.to_string(),
            }
        })?;
    let mut pairs: BTreeMap<String, (Option<&HostTensor>, Option<&HostTensor>)> = BTreeMap::new();
    let mut replaced = Vec::new();
    let mut magnitudes: BTreeMap<String, &HostTensor> = BTreeMap::new();
    for (name, t) in &adapter {
        if let Some(pos) = name.find(".lora_magnitude_vector") {
            let stem = name.strip_prefix("base_model.model.").unwrap_or(name);
            let module = stem[..pos - (name.len() - stem.len())].to_string();
            magnitudes.insert(module, t);
            continue;
        }
        match split_lora_name(name) {
            Some((module, 'A')) => pairs.entry(module).or_default().0 = Some(t),
            Some((module, _)) => pairs.entry(module).or_default().1 = Some(t),
            None => {
                // modules_to_save: full replacement weights
                let stem = name
                    .strip_prefix("base_model.model.")
                    .unwrap_or(name)
                    .replace(".modules_to_save.default", "");
                if !base.contains_key(&stem) {
                    return Err(Error::Invalid {
                        path: adapter_dir.to_path_buf(),
                        what: format!("tensor `{name}` matches no base weight `{stem}`"),
                    });
                }
                base.insert(stem.clone(), t.clone());
                replaced.push(stem);
            }
        }
    }
    let mut merged = Vec::new();
    for (module, (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::Invalid {
                path: adapter_dir.to_path_buf(),
                what: format!("module `{module}` lacks lora_A or lora_B"),
            });
        };
        let wname = format!("{module}.weight");
        let w = base.get_mut(&wname).ok_or_else(|| Error::Invalid {
            path: adapter_dir.to_path_buf(),
            what: format!("adapter module `{module}` has no base weight `{wname}`"),
        })?;
        let (r, n_in) = match a.shape.as_slice() {
            [r, i] => (*r, *i),
            s => {
                return Err(Error::Invalid {
                    path: adapter_dir.to_path_buf(),
                    what: format!("`{module}` lora_A shape {s:?} is not 2-D"),
                })
            }
        };
        let n_out = match b.shape.as_slice() {
            [o, rb] if *rb == r => *o,
            s => {
                return Err(Error::Invalid {
                    path: adapter_dir.to_path_buf(),
                    what: format!("`{module}` lora_B shape {s:?} does not match rank {r}"),
                })
            }
        };
        let expect = if cfg.fan_in_fan_out {
            vec![n_in, n_out]
        } else {
            vec![n_out, n_in]
        };
        if w.shape != expect {
            return Err(Error::Invalid {
                path: adapter_dir.to_path_buf(),
                what: format!(
                    "`{wname}` has shape {:?}, the adapter implies {expect:?}",
                    w.shape
                ),
            });
        }
        let scale = cfg.lora.scaling_for(&module) as f32;
        // delta = (B·A)·scale, then W += delta, in PEFT's order of operations
        let mut delta = vec![0f32; n_in];
        for o in 0..n_out {
            delta.iter_mut().for_each(|d| *d = 0.0);
            for (k, &bk) in b.data[o * r..(o + 1) * r].iter().enumerate() {
                for (d, &ak) in delta.iter_mut().zip(&a.data[k * n_in..(k + 1) * n_in]) {
                    *d += bk * ak;
                }
            }
            for (i, d) in delta.iter().enumerate() {
                let idx = if cfg.fan_in_fan_out {
                    i * n_out + o
                } else {
                    o * n_in + i
                };
                w.data[idx] += d * scale;
            }
        }
        if let Some(m) = magnitudes.remove(&module) {
            if m.data.len() != n_out {
                return Err(Error::Invalid {
                    path: adapter_dir.to_path_buf(),
                    what: format!(
                        "`{module}` lora_magnitude_vector has {} values, expected {n_out}",
                        m.data.len()
                    ),
                });
            }
            let idx = |o: usize, i: usize| {
                if cfg.fan_in_fan_out {
                    i * n_out + o
                } else {
                    o * n_in + i
                }
            };
            for (o, &mag) in m.data.iter().enumerate() {
                let norm = (0..n_in)
                    .map(|i| f64::from(w.data[idx(o, i)]).powi(2))
                    .sum::<f64>()
                    .sqrt() as f32;
                let factor = mag / norm;
                for i in 0..n_in {
                    w.data[idx(o, i)] *= factor;
                }
            }
        }
        merged.push(module);
    }
    if let Some(module) = magnitudes.keys().next() {
        return Err(Error::Invalid {
            path: adapter_dir.to_path_buf(),
            what: format!("`{module}` has a lora_magnitude_vector but no lora_A/lora_B"),
        });
    }
    merged.extend(replaced);
    Ok(merged)
}
