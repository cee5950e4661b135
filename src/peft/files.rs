//! PEFT-format LoRA adapters: `adapter_config.json` with the keys peft 0.21 writes for a
//! `LoraConfig` (`peft/config.py` `PeftConfigMixin`/`PeftConfig`, `peft/tuners/lora/config.py`
//! `LoraConfig`; `save_pretrained` writes `json.dumps(asdict(config), indent=2, sort_keys=True)`
//! without `runtime_config`), and `adapter_model.safetensors` with peft's saved names
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight` ([r, in]) and
//! `lora_B.weight` ([out, r]) (`peft/utils/save_and_load.py` strips the adapter name on save), and for
//! DoRA `...{proj}.lora_magnitude_vector` ([out]; peft 0.21 saves it without `.weight`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The peft release whose `LoraConfig` keys are written.
pub const PEFT_VERSION: &str = "0.21.2";

/// Errors of adapter reading and writing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid adapter config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: safetensors: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: tensor {name}: {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("layer {layer} {module}: {message}")]
    BadPair {
        layer: usize,
        module: &'static str,
        message: String,
    },
}

/// `target_modules`: a list of module-name suffixes, or one string (a regex that must match the
/// whole module path, or peft's shorthand `"all-linear"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// The LoRA settings of `adapter_config.json`; keys runner does not use are kept in `extra`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapterConfig {
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank overrides (module regex -> rank), `{}` when unused.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (module regex -> alpha), `{}` when unused.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Every other key read from a file (written back unchanged, over the defaults).
    pub extra: Map<String, Value>,
}

impl LoraAdapterConfig {
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        Self {
            base_model_name_or_path: None,
            revision: None,
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules,
            use_rslora: false,
            use_dora: false,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            extra: Map::new(),
        }
    }

    /// The factor on `B @ A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (peft `LoraLayer.update_layer`).
    pub fn scaling(&self) -> f64 {
        self.scaling_with(self.lora_alpha, self.r)
    }

    /// The scaling peft gives the module at `path`: `rank_pattern`/`alpha_pattern` keys match as
    /// peft matches them (the whole name or a `.`-separated suffix), else `r` and `lora_alpha`.
    pub fn scaling_for(&self, path: &str) -> f64 {
        let matches = |key: &str| path == key || path.ends_with(&format!(".{key}"));
        let rank = self.rank_pattern.iter().find(|(k, _)| matches(k));
        let alpha = self.alpha_pattern.iter().find(|(k, _)| matches(k));
        self.scaling_with(
            alpha.map_or(self.lora_alpha, |(_, a)| *a),
            rank.map_or(self.r, |(_, r)| *r),
        )
    }

    /// The alpha that gives a module of `rank` this config's global scaling.
    fn alpha_keeping_scaling(&self, rank: usize) -> f64 {
        self.scaling() / self.scaling_with(1.0, rank)
    }

    fn scaling_with(&self, alpha: f64, rank: usize) -> f64 {
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }

    /// Whether peft would wrap the module at `path` (e.g. `model.layers.3.self_attn.q_proj`), as
    /// `check_target_module_exists`: exact name or `.suffix` for lists, full regex match for strings,
    /// all linear projections but `lm_head` for `"all-linear"`; then `layers_to_transform`.
    pub fn targets(&self, path: &str) -> Result<bool, regex::Error> {
        let found = match &self.target_modules {
            TargetModules::List(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            TargetModules::Pattern(p) if p == "all-linear" => LoraModule::ALL
                .iter()
                .any(|m| path.ends_with(&format!(".{}", m.path()))),
            TargetModules::Pattern(p) => {
                regex::Regex::new(&format!(r"\A(?:{p})\z"))?.is_match(path)
            }
        };
        Ok(found
            && match (&self.layers_to_transform, layer_of(path)) {
                (Some(layers), Some(layer)) => layers.contains(&layer),
                _ => true,
            })
    }

    /// The JSON object peft 0.21 writes for this config (all `LoraConfig` fields, sorted keys).
    pub fn to_json(&self) -> Value {
        let alpha = number(self.lora_alpha);
        let mut out: BTreeMap<String, Value> = BTreeMap::new();
        let defaults = json!({
            "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
            "auto_mapping": null, "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none", "corda_config": null, "ensure_weight_tying": false, "eva_config": null,
            "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": true,
            "init_lora_weights": true, "kasa_config": null, "layer_replication": null,
            "layers_pattern": null, "layers_to_transform": self.layers_to_transform,
            "loftq_config": {}, "lora_alpha": alpha, "lora_bias": false, "lora_dropout": self.lora_dropout,
            "lora_ga_config": null, "megatron_config": null, "megatron_core": "megatron.core",
            "modules_to_save": null, "monteclora_config": null, "peft_type": "LORA",
            "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": self.r, "rank_pattern": self.rank_pattern,
            "revision": self.revision, "target_modules": self.target_modules, "target_parameters": null,
            "task_type": "CAUSAL_LM", "trainable_token_indices": null, "use_bdlora": null,
            "use_dora": self.use_dora, "use_qalora": false, "use_rslora": self.use_rslora,
            "velora_config": null,
        });
        if let Value::Object(map) = defaults {
            out.extend(map);
        }
        out.insert(
            "alpha_pattern".into(),
            Value::Object(
                self.alpha_pattern
                    .iter()
                    .map(|(k, v)| (k.clone(), number(*v)))
                    .collect(),
            ),
        );
        for (key, value) in &self.extra {
            out.insert(key.clone(), value.clone());
        }
        Value::Object(out.into_iter().collect())
    }

    /// Reads the keys runner needs from an `adapter_config.json` object.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self, Error> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let Value::Object(map) = value else {
            return Err(bad("expected a JSON object".into()));
        };
        match map.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => {
                return Err(bad(format!(
                    "key `peft_type`: expected \"LORA\", got {other:?}"
                )))
            }
        }
        fn field<T: serde::de::DeserializeOwned>(
            map: &Map<String, Value>,
            key: &str,
            default: Option<T>,
        ) -> Result<T, String> {
            match map.get(key) {
                Some(v) => {
                    serde_json::from_value(v.clone()).map_err(|e| format!("key `{key}`: {e}"))
                }
                None => default.ok_or_else(|| format!("missing key `{key}`")),
            }
        }
        let config = (|| -> Result<Self, String> {
            let target_modules: Option<TargetModules> = field(map, "target_modules", Some(None))?;
            let target_modules = target_modules
                .ok_or("key `target_modules`: null is not supported (peft infers it per model)")?;
            let nullable_map = |key: &str| -> Result<Option<Map<String, Value>>, String> {
                field(map, key, Some(None))
            };
            let rank_pattern = nullable_map("rank_pattern")?
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        serde_json::from_value(v).map_err(|e| format!("rank_pattern.{k}: {e}"))?,
                    ))
                })
                .collect::<Result<_, String>>()?;
            let alpha_pattern = nullable_map("alpha_pattern")?
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        serde_json::from_value(v).map_err(|e| format!("alpha_pattern.{k}: {e}"))?,
                    ))
                })
                .collect::<Result<_, String>>()?;
            // layers_to_transform may be a single int in peft.
            let layers_to_transform = match map.get("layers_to_transform") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => Some(vec![n
                    .as_u64()
                    .ok_or("key `layers_to_transform`: not a layer index")?
                    as usize]),
                Some(v) => Some(
                    serde_json::from_value(v.clone())
                        .map_err(|e| format!("key `layers_to_transform`: {e}"))?,
                ),
            };
            const KNOWN: [&str; 11] = [
                "base_model_name_or_path",
                "revision",
                "r",
                "lora_alpha",
                "lora_dropout",
                "target_modules",
                "use_rslora",
                "use_dora",
                "layers_to_transform",
                "rank_pattern",
                "alpha_pattern",
            ];
            let defaults = Self::new(8, 8.0, TargetModules::List(vec![])).to_json();
            let extra = map
                .iter()
                .filter(|(k, v)| {
                    !KNOWN.contains(&k.as_str()) && defaults.get(k.as_str()) != Some(v)
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Ok(Self {
                base_model_name_or_path: field(map, "base_model_name_or_path", Some(None))?,
                revision: field(map, "revision", Some(None))?,
                r: field(map, "r", Some(8))?,
                lora_alpha: field(map, "lora_alpha", Some(8.0))?,
                lora_dropout: field(map, "lora_dropout", Some(0.0))?,
                target_modules,
                use_rslora: field(map, "use_rslora", Some(false))?,
                use_dora: field(map, "use_dora", Some(false))?,
                layers_to_transform,
                rank_pattern,
                alpha_pattern,
                extra,
            })
        })()
        .map_err(bad)?;
        if config.r == 0 {
            return Err(bad("key `r`: must be > 0".into()));
        }
        Ok(config)
    }
}

/// Python's json writes integral ints without `.0`; peft configs carry `lora_alpha` as an int.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

fn layer_of(path: &str) -> Option<usize> {
    let rest = &path[path.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// The seven projections of a Llama/Qwen2 decoder layer that LoRA targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
    /// GLM's fused MLP input projection as peft names it (`mlp.gate_up_proj`, gate rows
    /// first). Only in adapter files: runner's decoder holds it as `gate_proj` and `up_proj`
    /// ([`fuse_gate_up`] on writing, [`split_gate_up`] on reading).
    GateUpProj,
}

impl LoraModule {
    pub const ALL: [LoraModule; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The module path inside a decoder layer, e.g. `self_attn.q_proj`.
    pub fn path(self) -> &'static str {
        match self {
            Self::QProj => "self_attn.q_proj",
            Self::KProj => "self_attn.k_proj",
            Self::VProj => "self_attn.v_proj",
            Self::OProj => "self_attn.o_proj",
            Self::GateProj => "mlp.gate_proj",
            Self::UpProj => "mlp.up_proj",
            Self::DownProj => "mlp.down_proj",
            Self::GateUpProj => "mlp.gate_up_proj",
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([Self::GateUpProj])
            .find(|m| m.path() == path)
    }
}

/// A dense f32 tensor (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct DenseTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The LoRA factors of one projection: `a` is [r, in], `b` is [out, r].
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub layer: usize,
    pub module: LoraModule,
    pub a: DenseTensor,
    pub b: DenseTensor,
}

/// A PEFT adapter directory's contents.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    pub config: LoraAdapterConfig,
    /// Sorted by (layer, module).
    pub pairs: Vec<LoraPair>,
    /// DoRA magnitude vectors `[out]` by (layer, module); empty without DoRA.
    pub magnitudes: BTreeMap<(usize, LoraModule), DenseTensor>,
}

/// peft's saved name of a DoRA magnitude vector: `base_model.model.model.layers.{i}.{path}.lora_magnitude_vector`.
pub fn magnitude_name(layer: usize, module: LoraModule) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_magnitude_vector",
        module.path()
    )
}

/// (layer, module) of a magnitude vector name, with or without the `base_model.model.` prefix and
/// with `.weight` or `.<adapter>.weight` after `lora_magnitude_vector` (peft's in-memory names).
pub fn parse_magnitude_name(name: &str) -> Option<(usize, LoraModule)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = rest.strip_prefix("model.").unwrap_or(rest);
    let (layer, rest) = rest.strip_prefix("layers.")?.split_once('.')?;
    let (module_path, suffix) = rest.split_once(".lora_magnitude_vector")?;
    let suffix_ok = suffix.is_empty()
        || suffix == ".weight"
        || suffix
            .strip_prefix('.')
            .and_then(|s| s.strip_suffix(".weight"))
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_alphanumeric() || c == '_'));
    (suffix_ok)
        .then(|| Some((layer.parse().ok()?, LoraModule::from_path(module_path)?)))
        .flatten()
}

/// peft's saved name of a factor: `base_model.model.model.layers.{i}.{path}.lora_{A|B}.weight`.
pub fn tensor_name(layer: usize, module: LoraModule, factor: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{factor}.weight",
        module.path()
    )
}

fn check_pair(pair: &LoraPair) -> Result<(), Error> {
    let bad = |message: String| Error::BadPair {
        layer: pair.layer,
        module: pair.module.path(),
        message,
    };
    for (name, t) in [("A", &pair.a), ("B", &pair.b)] {
        if t.shape.len() != 2 || t.shape.iter().product::<usize>() != t.data.len() {
            return Err(bad(format!(
                "lora_{name}: shape {:?} does not hold {} values",
                t.shape,
                t.data.len()
            )));
        }
    }
    if pair.a.shape[0] != pair.b.shape[1] {
        return Err(bad(format!(
            "rank mismatch: A is {:?} ([r, in]), B is {:?} ([out, r])",
            pair.a.shape, pair.b.shape
        )));
    }
    Ok(())
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` (f32, metadata `format: pt`) into `dir`.
pub fn write_lora_adapter(
    dir: &Path,
    config: &LoraAdapterConfig,
    pairs: &[LoraPair],
) -> Result<(), Error> {
    write_adapter_with_magnitudes(dir, config, pairs, &BTreeMap::new())
}

/// [`write_lora_adapter`] plus DoRA magnitude vectors (`config.use_dora` should be set).
pub fn write_adapter_with_magnitudes(
    dir: &Path,
    config: &LoraAdapterConfig,
    pairs: &[LoraPair],
    magnitudes: &BTreeMap<(usize, LoraModule), DenseTensor>,
) -> Result<(), Error> {
    for pair in pairs {
        check_pair(pair)?;
        if config.rank_pattern.is_empty() && pair.a.shape[0] != config.r {
            return Err(Error::BadPair {
                layer: pair.layer,
                module: pair.module.path(),
                message: format!(
                    "rank {} differs from config r = {}",
                    pair.a.shape[0], config.r
                ),
            });
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
    let mut buffers = Vec::with_capacity(pairs.len() * 2);
    for pair in pairs {
        for (factor, t) in [('A', &pair.a), ('B', &pair.b)] {
            let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            buffers.push((
                tensor_name(pair.layer, pair.module, factor),
                t.shape.clone(),
                bytes,
            ));
        }
    }
    for (&(layer, module), m) in magnitudes {
        let bytes: Vec<u8> = m.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((magnitude_name(layer, module), m.shape.clone(), bytes));
    }
    write_f32_tensors(&weights_path, &buffers)
}

/// Writes f32 tensors (name, shape, little-endian bytes) as a weights file the way peft saves
/// them (`format: pt` metadata).
pub(crate) fn write_f32_tensors(
    path: &Path,
    buffers: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<(), Error> {
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Tensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Splits a saved name into (layer, module, factor). Accepts peft's variants: with or without the
/// `base_model.model.` prefix and the `.weight` suffix, and with an adapter name (`lora_A.default.weight`).
pub fn parse_tensor_name(name: &str) -> Option<(usize, LoraModule, char)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = rest.strip_prefix("model.").unwrap_or(rest);
    let rest = rest.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (module_path, factor_part) = match rest.find(".lora_A") {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => rest.find(".lora_B").map(|i| (&rest[..i], &rest[i + 1..]))?,
    };
    let module = LoraModule::from_path(module_path)?;
    let factor = if factor_part.starts_with("lora_A") {
        'A'
    } else {
        'B'
    };
    let suffix = &factor_part["lora_A".len()..];
    let suffix = suffix
        .strip_suffix(".weight")
        .or_else(|| (suffix == ".weight").then_some(""))
        .unwrap_or(suffix);
    let adapter_name_ok = suffix.is_empty()
        || suffix
            .strip_prefix('.')
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_alphanumeric() || c == '_'));
    adapter_name_ok.then_some((layer, module, factor))
}

pub(crate) fn to_f32(view: &TensorView, path: &Path, name: &str) -> Result<Vec<f32>, Error> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Tensor {
                path: path.to_path_buf(),
                name: name.to_string(),
                message: format!("dtype {other:?} not supported (expected F32, F16 or BF16)"),
            })
        }
    })
}

/// `adapter_config.json` of the adapter folder `dir` as JSON, with its path for errors.
pub fn read_config_json(dir: &Path) -> Result<(Value, PathBuf), Error> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let json = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok((json, path))
}

/// The bytes of `adapter_model.safetensors` in `dir`, with its path for errors.
pub(crate) fn read_weights(dir: &Path) -> Result<(Vec<u8>, PathBuf), Error> {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    Ok((bytes, path))
}

/// The tensors of the weights file read from `path`.
pub(crate) fn parse_weights<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>, Error> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads a PEFT LoRA adapter directory written by peft or by `write_lora_adapter`.
pub fn read_lora_adapter(dir: &Path) -> Result<LoraAdapter, Error> {
    let (json, config_path) = read_config_json(dir)?;
    let config = LoraAdapterConfig::from_json(&json, &config_path)?;

    let (bytes, weights_path) = read_weights(dir)?;
    let tensors = parse_weights(&bytes, &weights_path)?;
    let mut factors: BTreeMap<(usize, LoraModule), [Option<DenseTensor>; 2]> = BTreeMap::new();
    let mut magnitudes = BTreeMap::new();
    for (name, view) in tensors.iter() {
        let tensor_err = |message: String| Error::Tensor {
            path: weights_path.clone(),
            name: name.to_string(),
            message,
        };
        if let Some(key) = parse_magnitude_name(name) {
            let data = to_f32(&view, &weights_path, name)?;
            if view.shape().len() != 1 {
                return Err(tensor_err(format!(
                    "a DoRA magnitude vector is 1-D [out], got shape {:?}",
                    view.shape()
                )));
            }
            let shape = view.shape().to_vec();
            if magnitudes
                .insert(key, DenseTensor { shape, data })
                .is_some()
            {
                return Err(tensor_err("duplicate magnitude vector".into()));
            }
            continue;
        }
        let (layer, module, factor) = parse_tensor_name(name).ok_or_else(|| {
            tensor_err("not a LoRA factor of a decoder projection (expected e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)".into())
        })?;
        let data = to_f32(&view, &weights_path, name)?;
        let slot = &mut factors.entry((layer, module)).or_default()[usize::from(factor == 'B')];
        if slot.is_some() {
            return Err(tensor_err(
                "duplicate factor (two spellings of one name)".into(),
            ));
        }
        *slot = Some(DenseTensor {
            shape: view.shape().to_vec(),
            data,
        });
    }
    let mut pairs = Vec::with_capacity(factors.len());
    for ((layer, module), [a, b]) in factors {
        let missing = |f: char| Error::Tensor {
            path: weights_path.clone(),
            name: tensor_name(layer, module, f),
            message: "missing: every lora_A needs its lora_B".into(),
        };
        let pair = LoraPair {
            layer,
            module,
            a: a.ok_or_else(|| missing('A'))?,
            b: b.ok_or_else(|| missing('B'))?,
        };
        check_pair(&pair)?;
        if let Some(m) = magnitudes.get(&(layer, module)) {
            if m.shape[0] != pair.b.shape[0] {
                return Err(Error::BadPair {
                    layer,
                    module: module.path(),
                    message: format!(
                        "lora_magnitude_vector has {} entries, lora_B has {} rows",
                        m.shape[0], pair.b.shape[0]
                    ),
                });
            }
        }
        pairs.push(pair);
    }
    if let Some(&(layer, module)) = magnitudes
        .keys()
        .find(|k| !pairs.iter().any(|p| (p.layer, p.module) == **k))
    {
        return Err(Error::Tensor {
            path: weights_path.clone(),
            name: magnitude_name(layer, module),
            message: "a magnitude vector without lora_A/lora_B".into(),
        });
    }
    split_gate_up(LoraAdapter {
        config,
        pairs,
        magnitudes,
    })
    .map_err(|message| Error::Tensor {
        path: weights_path.clone(),
        name: "mlp.gate_up_proj".into(),
        message,
    })
}

/// The layers of a model with a fused `gate_up_proj` (GLM), written as peft would save an
/// adapter of that model: each layer's `gate_proj` and `up_proj` pairs (same rank r) become one
/// `gate_up_proj` pair of rank 2r, A stacked and B block-diagonal, so its product is theirs
/// exactly; `rank_pattern`/`alpha_pattern` give the fused module rank 2r at the same scaling,
/// and `target_modules` names `gate_up_proj` instead. DoRA magnitudes (per output row) are
/// stacked. A layer with only one of the two (or different ranks) is left as it is.
pub fn fuse_gate_up(
    config: &mut LoraAdapterConfig,
    pairs: Vec<LoraPair>,
    mut magnitudes: BTreeMap<(usize, LoraModule), DenseTensor>,
) -> (Vec<LoraPair>, BTreeMap<(usize, LoraModule), DenseTensor>) {
    let (mut gates, mut ups) = (BTreeMap::new(), BTreeMap::new());
    let mut out = Vec::with_capacity(pairs.len());
    for p in pairs {
        match p.module {
            LoraModule::GateProj => {
                gates.insert(p.layer, p);
            }
            LoraModule::UpProj => {
                ups.insert(p.layer, p);
            }
            _ => out.push(p),
        }
    }
    let mut fused_ranks = BTreeMap::new();
    for (layer, gate) in gates {
        let up = ups.remove(&layer);
        let dora = |m: LoraModule| magnitudes.contains_key(&(layer, m));
        let fits = up.as_ref().is_some_and(|up| {
            up.a.shape == gate.a.shape
                && up.b.shape == gate.b.shape
                && dora(LoraModule::GateProj) == dora(LoraModule::UpProj)
        });
        let (true, Some(up)) = (fits, up.as_ref()) else {
            out.push(gate);
            out.extend(up);
            continue;
        };
        let (r, rows) = (gate.a.shape[0], gate.b.shape[0]);
        let mut a = gate.a.data.clone();
        a.extend_from_slice(&up.a.data);
        // B = [[B_gate, 0], [0, B_up]]: [2 rows, 2r].
        let mut b = vec![0f32; 2 * rows * 2 * r];
        for o in 0..rows {
            b[o * 2 * r..o * 2 * r + r].copy_from_slice(&gate.b.data[o * r..(o + 1) * r]);
            let row = (rows + o) * 2 * r;
            b[row + r..row + 2 * r].copy_from_slice(&up.b.data[o * r..(o + 1) * r]);
        }
        out.push(LoraPair {
            layer,
            module: LoraModule::GateUpProj,
            a: DenseTensor {
                shape: vec![2 * r, gate.a.shape[1]],
                data: a,
            },
            b: DenseTensor {
                shape: vec![2 * rows, 2 * r],
                data: b,
            },
        });
        if let (Some(mg), Some(mu)) = (
            magnitudes.remove(&(layer, LoraModule::GateProj)),
            magnitudes.remove(&(layer, LoraModule::UpProj)),
        ) {
            let mut data = mg.data;
            data.extend(mu.data);
            let shape = vec![data.len()];
            magnitudes.insert((layer, LoraModule::GateUpProj), DenseTensor { shape, data });
        }
        fused_ranks.insert(layer, 2 * r);
    }
    out.extend(ups.into_values());
    out.sort_by_key(|p| (p.layer, p.module));
    if fused_ranks.is_empty() {
        return (out, magnitudes);
    }
    // The fused module keeps each half's scaling under its own rank.
    let uniform = fused_ranks.values().min() == fused_ranks.values().max();
    let mut patterns = Vec::new();
    for (layer, rank) in &fused_ranks {
        let key = if uniform {
            "gate_up_proj".to_string()
        } else {
            format!("model.layers.{layer}.mlp.gate_up_proj")
        };
        patterns.push((key, *rank));
    }
    for (key, rank) in patterns {
        config
            .alpha_pattern
            .insert(key.clone(), config.alpha_keeping_scaling(rank));
        config.rank_pattern.insert(key, rank);
    }
    if let TargetModules::List(names) = &mut config.target_modules {
        names.retain(|n| n != "gate_proj" && n != "up_proj");
        if !names.iter().any(|n| n == "gate_up_proj") {
            names.push("gate_up_proj".into());
        }
    }
    (out, magnitudes)
}

/// Each `gate_up_proj` pair (peft's, or [`fuse_gate_up`]'s) as the `gate_proj` and `up_proj`
/// pairs runner's decoder holds: B's first half of rows is the gate's, the second the up's,
/// both with the fused A, so each half's product is exact. B is rescaled from the fused module's
/// scaling (its `rank_pattern`/`alpha_pattern`) to the adapter's global one, which runner applies.
pub fn split_gate_up(mut adapter: LoraAdapter) -> Result<LoraAdapter, String> {
    if !adapter
        .pairs
        .iter()
        .any(|p| p.module == LoraModule::GateUpProj)
    {
        return Ok(adapter);
    }
    let global = adapter.config.scaling();
    let mut out = Vec::with_capacity(adapter.pairs.len() + 8);
    for p in std::mem::take(&mut adapter.pairs) {
        if p.module != LoraModule::GateUpProj {
            out.push(p);
            continue;
        }
        let (layer, r, rows) = (p.layer, p.b.shape[1], p.b.shape[0]);
        if rows % 2 != 0 {
            return Err(format!(
                "layer {layer}: lora_B of gate_up_proj has {rows} rows, expected an even number (gate rows, then up rows)"
            ));
        }
        if [LoraModule::GateProj, LoraModule::UpProj].iter().any(|m| {
            out.iter()
                .any(|q: &LoraPair| q.layer == layer && q.module == *m)
        }) {
            return Err(format!(
                "layer {layer}: both gate_up_proj and gate_proj/up_proj factors"
            ));
        }
        let path = format!("model.layers.{layer}.mlp.gate_up_proj");
        let factor = (adapter.config.scaling_for(&path) / global) as f32;
        let half = rows / 2;
        for (i, module) in [LoraModule::GateProj, LoraModule::UpProj]
            .into_iter()
            .enumerate()
        {
            let b = p.b.data[i * half * r..(i + 1) * half * r]
                .iter()
                .map(|v| v * factor)
                .collect();
            out.push(LoraPair {
                layer,
                module,
                a: p.a.clone(),
                b: DenseTensor {
                    shape: vec![half, r],
                    data: b,
                },
            });
        }
        if let Some(m) = adapter.magnitudes.remove(&(layer, LoraModule::GateUpProj)) {
            for (i, module) in [LoraModule::GateProj, LoraModule::UpProj]
                .into_iter()
                .enumerate()
            {
                let data = m.data[i * half..(i + 1) * half].to_vec();
                adapter.magnitudes.insert(
                    (layer, module),
                    DenseTensor {
                        shape: vec![half],
                        data,
                    },
                );
            }
        }
    }
    out.sort_by_key(|p| (p.layer, p.module));
    adapter.pairs = out;
    Ok(adapter)
}

#[cfg(test)]
mod tests;
