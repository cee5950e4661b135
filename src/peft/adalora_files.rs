//! AdaLoRA pieces that need no model: the recipe keys, the cubic rank-budget schedule, and
//! peft's adapter files (`adapter_config.json` with `peft_type: "ADALORA"`, and
//! `adapter_model.safetensors` with `base_model.model.model.layers.{i}.{path}.lora_{A|E|B}`,
//! no `.weight` suffix since peft keeps these as `ParameterDict` entries; tensors cut to the
//! triplets `rank_pattern` keeps).
//!
//! Reference: Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
//! Fine-Tuning"; peft 0.21 `tuners/adalora/config.py` (`AdaLoraConfig`), `layer.py`
//! (`RankAllocator.budget_schedule`), `model.py` (`_get_adapter_state_dict`,
//! `resize_state_dict_by_rank_pattern`, `resize_modules_by_rank_pattern`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::peft::files::{
    parse_weights, read_config_json, read_weights, to_f32, write_f32_tensors, DenseTensor, Error,
    LoraAdapterConfig, LoraModule, CONFIG_FILE, WEIGHTS_FILE,
};

/// The `adalora` table of the `sft` stage (peft `AdaLoraConfig` defaults). `lora_alpha`,
/// `lora_dropout` and `target_modules` are the stage's LoRA keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaLoraParams {
    /// Rank each adapter starts with.
    pub init_r: usize,
    /// Average rank per adapter left at the end.
    pub target_r: usize,
    /// Steps before any pruning.
    pub tinit: u64,
    /// Final steps with the rank pattern fixed.
    pub tfinal: u64,
    /// Steps between two budget allocations.
    #[serde(rename = "deltaT", alias = "delta_t")]
    pub delta_t: u64,
    /// EMA factor of the sensitivity.
    pub beta1: f64,
    /// EMA factor of the uncertainty.
    pub beta2: f64,
    /// Weight of the orthogonality regularizer.
    pub orth_reg_weight: f64,
    /// Steps the schedule spans; default: the planned optimizer steps.
    pub total_step: Option<u64>,
}

impl Default for AdaLoraParams {
    fn default() -> Self {
        Self {
            init_r: 12,
            target_r: 8,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: None,
        }
    }
}

impl AdaLoraParams {
    /// peft's checks (`AdaLoraConfig.__post_init__`, `RankAllocator.__init__`) for a run of
    /// `planned` steps: `(key, message)` of the first violation.
    pub fn check(&self, planned: u64) -> Result<(), (&'static str, String)> {
        if self.init_r == 0 {
            return Err(("adalora.init_r", "must be >= 1".into()));
        }
        if self.target_r > self.init_r {
            return Err((
                "adalora.target_r",
                format!("must be <= init_r ({}), got {}", self.init_r, self.target_r),
            ));
        }
        if self.delta_t == 0 {
            return Err(("adalora.deltaT", "must be >= 1".into()));
        }
        for (key, b) in [("adalora.beta1", self.beta1), ("adalora.beta2", self.beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return Err((key, format!("must be in (0, 1), got {b}")));
            }
        }
        if self.orth_reg_weight.is_nan() || self.orth_reg_weight < 0.0 {
            return Err((
                "adalora.orth_reg_weight",
                format!("must be >= 0, got {}", self.orth_reg_weight),
            ));
        }
        let total = self.total_step.unwrap_or(planned);
        if total == 0 {
            return Err(("adalora.total_step", "must be >= 1".into()));
        }
        if self.tinit + self.tfinal >= total {
            return Err((
                "adalora.tinit",
                format!(
                    "tinit ({}) + tfinal ({}) leave no budgeting phase in {total} steps",
                    self.tinit, self.tfinal
                ),
            ));
        }
        Ok(())
    }
}

/// peft's `RankAllocator.budget_schedule` over `init_bgt` starting triplets.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSchedule {
    pub init_bgt: usize,
    pub target_bgt: usize,
    pub tinit: u64,
    pub tfinal: u64,
    pub delta_t: u64,
    pub total_step: u64,
}

impl BudgetSchedule {
    /// `adapters` projections of rank `params.init_r` trained for `total_step` steps.
    pub fn new(params: &AdaLoraParams, adapters: usize, total_step: u64) -> Self {
        Self {
            init_bgt: params.init_r * adapters,
            target_bgt: params.target_r * adapters,
            tinit: params.tinit,
            tfinal: params.tfinal,
            delta_t: params.delta_t.max(1),
            total_step,
        }
    }

    /// The first step of the final phase (`total_step - tfinal`).
    pub fn final_start(&self) -> u64 {
        self.total_step.saturating_sub(self.tfinal)
    }

    /// (budget, whether to mask) at 0-based `step`: the full budget up to `tinit`, the target
    /// after `total_step - tfinal`, and in between a cubic decrease, masking every `deltaT`.
    pub fn at(&self, step: u64) -> (usize, bool) {
        if step <= self.tinit {
            (self.init_bgt, false)
        } else if step > self.final_start() {
            (self.target_bgt, true)
        } else {
            let span = (self.total_step - self.tfinal - self.tinit) as f64;
            let mul = 1.0 - (step - self.tinit) as f64 / span;
            let spread = (self.init_bgt - self.target_bgt) as f64;
            let budget = (spread * mul.powi(3) + self.target_bgt as f64) as usize;
            (budget, step.is_multiple_of(self.delta_t))
        }
    }
}

/// The `(k - 1)`-th smallest score with `k = scores.len() - budget` triplets to drop (torch's
/// `kthvalue`), and the keep mask `score > threshold`. Nothing is dropped when `k` is 0.
pub fn keep_mask(scores: &[f32], budget: usize) -> Vec<bool> {
    let k = scores.len().saturating_sub(budget);
    if k == 0 {
        return vec![true; scores.len()];
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    let threshold = sorted[k - 1];
    scores.iter().map(|&s| s > threshold).collect()
}

/// peft's `rank_pattern` key of a projection: `model.layers.{i}.{path}.lora_E`.
pub fn pattern_key(layer: usize, module: LoraModule) -> String {
    format!("model.layers.{layer}.{}.lora_E", module.path())
}

/// The factors of one projection: `a` `[r, in]`, `e` `[r, 1]`, `b` `[out, r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaLoraTriplet {
    pub layer: usize,
    pub module: LoraModule,
    pub a: DenseTensor,
    pub e: DenseTensor,
    pub b: DenseTensor,
}

impl AdaLoraTriplet {
    pub fn rank(&self) -> usize {
        self.a.shape[0]
    }

    /// Keeps the triplets whose `keep` entry is true (rows of A and E, columns of B).
    pub fn select(&self, keep: &[bool]) -> Self {
        let kept = keep.iter().filter(|&&k| k).count();
        let rows = |t: &DenseTensor| {
            let width = t.shape[1];
            let data: Vec<f32> = keep
                .iter()
                .enumerate()
                .filter(|(_, k)| **k)
                .flat_map(|(i, _)| t.data[i * width..(i + 1) * width].iter().copied())
                .collect();
            DenseTensor {
                shape: vec![kept, width],
                data,
            }
        };
        let (out, r) = (self.b.shape[0], self.b.shape[1]);
        let cols: Vec<usize> = (0..r).filter(|&i| keep[i]).collect();
        let b = DenseTensor {
            shape: vec![out, cols.len()],
            data: (0..out)
                .flat_map(|o| cols.iter().map(move |&c| (o, c)))
                .map(|(o, c)| self.b.data[o * r + c])
                .collect(),
        };
        Self {
            layer: self.layer,
            module: self.module,
            a: rows(&self.a),
            e: rows(&self.e),
            b,
        }
    }
}

/// An AdaLoRA `adapter_config.json`: the LoRA keys, the AdaLoRA keys, and the rank pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaLoraAdapterConfig {
    /// `target_modules`, `lora_alpha`, `lora_dropout`, base model... (`r` is ignored by AdaLoRA).
    pub lora: LoraAdapterConfig,
    /// `total_step` is always set in a written config (peft requires it).
    pub params: AdaLoraParams,
    /// `pattern_key` -> kept triplets; `None` before the first allocation.
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
}

const ADALORA_KEYS: [&str; 9] = [
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
];

impl AdaLoraAdapterConfig {
    /// peft's factor before the rank: `lora_alpha`, or `init_r` when alpha is not positive.
    pub fn alpha(&self) -> f64 {
        if self.lora.lora_alpha > 0.0 {
            self.lora.lora_alpha
        } else {
            self.params.init_r as f64
        }
    }

    /// The factor on `B (A * E)`: `alpha / (ranknum + 1e-5)` with `ranknum = init_r`, also for
    /// adapters resized by a rank pattern (`resize_modules_by_rank_pattern` copies ranknum).
    pub fn scaling(&self) -> f64 {
        self.alpha() / (self.params.init_r as f64 + 1e-5)
    }

    /// The JSON object peft 0.21 writes for an `AdaLoraConfig` (sorted keys).
    pub fn to_json(&self) -> Value {
        let mut lora = self.lora.clone();
        lora.r = 8; // AdaLoraConfig keeps LoraConfig's default `r`, which it ignores.
        let Value::Object(mut map) = lora.to_json() else {
            unreachable!("LoraAdapterConfig::to_json returns an object")
        };
        let p = &self.params;
        map.insert("peft_type".into(), json!("ADALORA"));
        for (k, v) in [
            ("init_r", json!(p.init_r)),
            ("target_r", json!(p.target_r)),
            ("tinit", json!(p.tinit)),
            ("tfinal", json!(p.tfinal)),
            ("deltaT", json!(p.delta_t)),
            ("beta1", json!(p.beta1)),
            ("beta2", json!(p.beta2)),
            ("orth_reg_weight", json!(p.orth_reg_weight)),
            ("total_step", json!(p.total_step)),
            ("rank_pattern", json!(self.rank_pattern)),
        ] {
            map.insert(k.into(), v);
        }
        let sorted: BTreeMap<String, Value> = map.into_iter().collect();
        Value::Object(sorted.into_iter().collect())
    }

    pub fn from_json(value: &Value, path: &Path) -> Result<Self, Error> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let Value::Object(map) = value else {
            return Err(bad("expected a JSON object".into()));
        };
        match map.get("peft_type").and_then(Value::as_str) {
            Some("ADALORA") => {}
            other => {
                return Err(bad(format!(
                    "key `peft_type`: expected \"ADALORA\", got {other:?}"
                )))
            }
        }
        let mut lora_map: Map<String, Value> = map.clone();
        lora_map.insert("peft_type".into(), json!("LORA"));
        lora_map.remove("rank_pattern");
        let mut ada = Map::new();
        for key in ADALORA_KEYS {
            if let Some(v) = lora_map.remove(key) {
                ada.insert(key.to_string(), v);
            }
        }
        let lora = LoraAdapterConfig::from_json(&Value::Object(lora_map), path)?;
        let params: AdaLoraParams = serde_json::from_value(Value::Object(ada))
            .map_err(|e| bad(format!("AdaLoRA keys: {e}")))?;
        let rank_pattern = match map.get("rank_pattern") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value(v.clone())
                    .map_err(|e| bad(format!("key `rank_pattern`: {e}")))?,
            ),
        };
        if let Err((key, message)) = params.check(params.total_step.unwrap_or(0)) {
            return Err(bad(format!("key `{key}`: {message}")));
        }
        Ok(Self {
            lora,
            params,
            rank_pattern,
        })
    }
}

/// peft's saved name of a factor: `base_model.model.model.layers.{i}.{path}.lora_{A|E|B}`.
pub fn tensor_name(layer: usize, module: LoraModule, factor: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{factor}",
        module.path()
    )
}

/// (layer, module, factor) of a saved name; also accepts an adapter-name suffix
/// (`lora_E.default`) and a missing `base_model.model.` prefix.
pub fn parse_tensor_name(name: &str) -> Option<(usize, LoraModule, char)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let i = rest.find(".lora_")?;
    let module = LoraModule::ALL
        .into_iter()
        .find(|m| m.path() == &rest[..i])?;
    let tail = &rest[i + ".lora_".len()..];
    let factor = tail
        .chars()
        .next()
        .filter(|c| matches!(c, 'A' | 'E' | 'B'))?;
    let suffix = &tail[1..];
    let ok = suffix.is_empty()
        || suffix
            .strip_prefix('.')
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_alphanumeric() || c == '_'));
    ok.then_some((layer.parse().ok()?, module, factor))
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` as peft's `save_pretrained`:
/// each triplet cut to the entries its rank pattern keeps (when the pattern is shorter than it).
pub fn write_adalora_adapter(
    dir: &Path,
    config: &AdaLoraAdapterConfig,
    triplets: &[AdaLoraTriplet],
) -> Result<(), Error> {
    let mut buffers = Vec::with_capacity(triplets.len() * 3);
    for t in triplets {
        let t = match config
            .rank_pattern
            .as_ref()
            .and_then(|p| p.get(&pattern_key(t.layer, t.module)))
        {
            Some(keep) if keep.iter().filter(|&&k| k).count() != t.rank() => {
                if keep.len() != t.rank() {
                    return Err(Error::BadPair {
                        layer: t.layer,
                        module: t.module.path(),
                        message: format!(
                            "rank pattern has {} entries for rank {}",
                            keep.len(),
                            t.rank()
                        ),
                    });
                }
                t.select(keep)
            }
            _ => t.clone(),
        };
        for (factor, d) in [('A', &t.a), ('B', &t.b), ('E', &t.e)] {
            let bytes: Vec<u8> = d.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            buffers.push((
                tensor_name(t.layer, t.module, factor),
                d.shape.clone(),
                bytes,
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let config_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config.to_json()).expect("JSON values serialize");
    std::fs::write(&config_path, text).map_err(|source| Error::Io {
        path: config_path.clone(),
        source,
    })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    write_f32_tensors(&weights_path, &buffers)
}

/// An AdaLoRA adapter folder: config and triplets (sorted by layer, module; ranks as stored).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaLoraAdapter {
    pub config: AdaLoraAdapterConfig,
    pub triplets: Vec<AdaLoraTriplet>,
}

/// Reads an AdaLoRA adapter written by peft or by [`write_adalora_adapter`].
pub fn read_adalora_adapter(dir: &Path) -> Result<AdaLoraAdapter, Error> {
    let (json, config_path) = read_config_json(dir)?;
    let config = AdaLoraAdapterConfig::from_json(&json, &config_path)?;
    let (bytes, weights_path) = read_weights(dir)?;
    let tensors = parse_weights(&bytes, &weights_path)?;
    let mut found: BTreeMap<(usize, LoraModule), [Option<DenseTensor>; 3]> = BTreeMap::new();
    for (name, view) in tensors.iter() {
        let err = |message: String| Error::Tensor {
            path: weights_path.clone(),
            name: name.to_string(),
            message,
        };
        let (layer, module, factor) = parse_tensor_name(name).ok_or_else(|| {
            err("not an AdaLoRA factor of a decoder projection (expected e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_E)".into())
        })?;
        let index = match factor {
            'A' => 0,
            'E' => 1,
            _ => 2,
        };
        let slot = &mut found.entry((layer, module)).or_default()[index];
        if slot.is_some() {
            return Err(err("duplicate factor (two spellings of one name)".into()));
        }
        if view.shape().len() != 2 {
            return Err(err(format!(
                "expected 2 dimensions, got {:?}",
                view.shape()
            )));
        }
        *slot = Some(DenseTensor {
            shape: view.shape().to_vec(),
            data: to_f32(&view, &weights_path, name)?,
        });
    }
    let mut triplets = Vec::with_capacity(found.len());
    for ((layer, module), [a, e, b]) in found {
        let missing = |f: char| Error::Tensor {
            path: weights_path.clone(),
            name: tensor_name(layer, module, f),
            message: "missing: every projection needs lora_A, lora_E and lora_B".into(),
        };
        let t = AdaLoraTriplet {
            layer,
            module,
            a: a.ok_or_else(|| missing('A'))?,
            e: e.ok_or_else(|| missing('E'))?,
            b: b.ok_or_else(|| missing('B'))?,
        };
        let r = t.rank();
        if t.e.shape != [r, 1] || t.b.shape[1] != r {
            return Err(Error::BadPair {
                layer,
                module: module.path(),
                message: format!(
                    "shapes A {:?}, E {:?}, B {:?} are not [r, in], [r, 1], [out, r]",
                    t.a.shape, t.e.shape, t.b.shape
                ),
            });
        }
        triplets.push(t);
    }
    Ok(AdaLoraAdapter { config, triplets })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_follows_peft_cubic_schedule() {
        // init_r 4, target_r 2, 14 adapters, 10 steps, tinit 2, tfinal 3, deltaT 2 (the fixture run).
        let p = AdaLoraParams {
            init_r: 4,
            target_r: 2,
            tinit: 2,
            tfinal: 3,
            delta_t: 2,
            ..AdaLoraParams::default()
        };
        let s = BudgetSchedule::new(&p, 14, 10);
        let got: Vec<(usize, bool)> = (0..10).map(|i| s.at(i)).collect();
        assert_eq!(
            got,
            vec![
                (56, false),
                (56, false),
                (56, false),
                (42, false),
                (34, true),
                (29, false),
                (28, true),
                (28, false),
                (28, true),
                (28, true),
            ]
        );
        assert_eq!(
            keep_mask(&[0.3, 0.1, 0.2, 0.4], 2),
            vec![true, false, false, true]
        );
        assert_eq!(keep_mask(&[0.3, 0.1], 2), vec![true, true]);
    }

    #[test]
    fn names_parse_and_tensors_cut_by_pattern() {
        assert_eq!(
            parse_tensor_name("base_model.model.model.layers.3.mlp.up_proj.lora_E"),
            Some((3, LoraModule::UpProj, 'E'))
        );
        assert_eq!(
            parse_tensor_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"),
            Some((0, LoraModule::QProj, 'A'))
        );
        assert_eq!(
            parse_tensor_name("base_model.model.model.layers.0.self_attn.q_proj.ranknum"),
            None
        );
        let d = |shape: Vec<usize>| DenseTensor {
            data: (0..shape.iter().product::<usize>())
                .map(|v| v as f32)
                .collect(),
            shape,
        };
        let t = AdaLoraTriplet {
            layer: 0,
            module: LoraModule::VProj,
            a: d(vec![3, 2]),
            e: d(vec![3, 1]),
            b: d(vec![2, 3]),
        };
        let s = t.select(&[true, false, true]);
        assert_eq!(s.a.data, vec![0., 1., 4., 5.]);
        assert_eq!(s.e.data, vec![0., 2.]);
        assert_eq!(
            (s.b.shape.clone(), s.b.data.clone()),
            (vec![2, 2], vec![0., 2., 3., 5.])
        );
        let none = t.select(&[false, false, false]);
        assert_eq!((none.a.shape, none.b.shape), (vec![0, 2], vec![2, 0]));
    }
}
