//! Hugging Face checkpoint folders on the host: safetensors in, safetensors out.
//!
//! Reads `model.safetensors` or the shards listed by `model.safetensors.index.json`
//! (memory-mapped; f32/f16/bf16 widened to f32) and writes safetensors atomically
//! (temp file + rename). Reference: the safetensors format spec and transformers'
//! `modeling_utils.load_state_dict` / `save_pretrained` (metadata `{"format": "pt"}`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::model::config::ModelConfig;

/// Errors reading or writing checkpoint files.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { path: PathBuf },
    #[error("{path}: invalid safetensors file (truncated or corrupt?): {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: invalid index: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; expected F32, F16 or BF16")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// The files of a model folder besides its weights (`model.safetensors`, or
/// `model.safetensors.index.json` and its shards): what copying or downloading a model takes.
pub const MODEL_METADATA_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Floating-point storage types handled for model weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    fn safetensors(self) -> Dtype {
        match self {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        }
    }

    /// The `torch_dtype` spelling (`float32`, `float16`, `bfloat16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
}

/// A dense row-major tensor in host memory, widened to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// The dtype it was stored in (what a save should default to).
    pub source_dtype: DType,
}

impl HostTensor {
    /// A tensor from f32 data; `shape` must match `data.len()`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self {
            shape,
            data,
            source_dtype: DType::F32,
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Loads every tensor of an HF folder (`model.safetensors` or an index of shards).
pub fn load_hf_folder_tensors(
    dir: impl AsRef<Path>,
) -> Result<BTreeMap<String, HostTensor>, HfError> {
    let dir = dir.as_ref();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return load_safetensors_file(&single);
    }
    if !index.is_file() {
        return Err(HfError::NoWeights {
            path: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|source| HfError::Io {
        path: index.clone(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| HfError::Index {
        path: index.clone(),
        message: e.to_string(),
    })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| HfError::Index {
            path: index.clone(),
            message: "missing object `weight_map`".into(),
        })?;
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| HfError::Index {
            path: index.clone(),
            message: format!("weight_map[{tensor:?}] is not a file name"),
        })?;
        by_shard
            .entry(shard.to_string())
            .or_default()
            .push(tensor.clone());
    }
    let mut out = BTreeMap::new();
    for (shard, names) in by_shard {
        let path = dir.join(&shard);
        let mut tensors = load_safetensors_file(&path)?;
        for name in names {
            let t = tensors.remove(&name).ok_or_else(|| HfError::Tensor {
                path: path.clone(),
                tensor: name.clone(),
                message: format!("listed in {} but absent from the shard", index.display()),
            })?;
            out.insert(name, t);
        }
    }
    Ok(out)
}

/// Loads every tensor of one safetensors file (memory-mapped).
pub fn load_safetensors_file(path: &Path) -> Result<BTreeMap<String, HostTensor>, HfError> {
    let file = std::fs::File::open(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the map is read-only and dropped before return; a concurrent writer could
    // change the bytes under us, which at worst gives wrong values, not UB in safe readers.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    load_safetensors_bytes(&mmap, path)
}

/// [`load_safetensors_file`] on the file's bytes in memory; `path` names the file in errors.
pub fn load_safetensors_bytes(
    bytes: &[u8],
    path: &Path,
) -> Result<BTreeMap<String, HostTensor>, HfError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| match truncated_tensor(bytes) {
        Some(tensor) => HfError::Tensor {
            path: path.to_path_buf(),
            tensor,
            message: format!("data runs past the end of the file (truncated?): {e}"),
        },
        None => HfError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = widen(&view).map_err(|dtype| HfError::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: name.clone(),
            dtype,
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

/// The first tensor (by offset) whose bytes lie beyond the end of a truncated file.
fn truncated_tensor(buffer: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(buffer.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(buffer.get(8..8usize.checked_add(n)?)?).ok()?;
    let available = buffer.len() - 8 - n;
    let mut past: Vec<(u64, String)> = header
        .as_object()?
        .iter()
        .filter_map(|(name, info)| {
            let offsets = info.get("data_offsets")?.as_array()?;
            let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
            (end as usize > available).then(|| (start, name.clone()))
        })
        .collect();
    past.sort();
    past.into_iter().next().map(|(_, name)| name)
}

fn widen(view: &TensorView<'_>) -> Result<HostTensor, String> {
    let bytes = view.data();
    let (data, source_dtype): (Vec<f32>, DType) = match view.dtype() {
        Dtype::F32 => (
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F32,
        ),
        Dtype::F16 => (
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16,
        ),
        Dtype::BF16 => (
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16,
        ),
        other => return Err(format!("{other:?}")),
    };
    Ok(HostTensor {
        shape: view.shape().to_vec(),
        data,
        source_dtype,
    })
}

/// Bytes of one tensor narrowed to the save dtype.
struct Narrowed {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Narrowed {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn narrow(t: &HostTensor, dtype: DType) -> Narrowed {
    let bytes = match dtype {
        DType::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t
            .data
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::BF16 => t
            .data
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
    };
    Narrowed {
        dtype: dtype.safetensors(),
        shape: t.shape.clone(),
        bytes,
    }
}

/// Writes `tensors` as one safetensors file in `dtype`, atomically (temp file + rename).
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, HostTensor>,
    dtype: DType,
) -> Result<(), HfError> {
    let path = path.as_ref();
    let write_err = |message: String| HfError::Write {
        path: path.to_path_buf(),
        message,
    };
    for (name, t) in tensors {
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(HfError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                message: format!("shape {:?} does not hold {} values", t.shape, t.data.len()),
            });
        }
    }
    let narrowed: Vec<(String, Narrowed)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), narrow(t, dtype)))
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = temp_sibling(path);
    safetensors::serialize_to_file(
        narrowed.iter().map(|(k, n)| (k.as_str(), n)),
        Some(metadata),
        &tmp,
    )
    .map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(e.to_string())
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(e.to_string())
    })
}

/// Writes text atomically (temp file + rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), HfError> {
    let tmp = temp_sibling(path);
    std::fs::write(&tmp, contents)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            HfError::Write {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Writes an HF folder transformers loads: config.json, generation_config.json and
/// model.safetensors in `dtype`.
pub fn save_hf_folder(
    dir: impl AsRef<Path>,
    config: &ModelConfig,
    tensors: &BTreeMap<String, HostTensor>,
    dtype: DType,
) -> Result<(), HfError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| HfError::Write {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut cfg = config.clone();
    cfg.dtype = Some(dtype.torch_name().to_string());
    let json = serde_json::to_string_pretty(&cfg.to_hf_json()).unwrap_or_default();
    write_atomic(&dir.join("config.json"), json.as_bytes())?;
    let mut gen = serde_json::Map::new();
    if let Some(b) = cfg.bos_token_id {
        gen.insert("bos_token_id".into(), b.into());
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            gen.insert("eos_token_id".into(), (*one).into());
        }
        many => {
            gen.insert("eos_token_id".into(), many.to_vec().into());
        }
    }
    if let Some(p) = cfg.pad_token_id {
        gen.insert("pad_token_id".into(), p.into());
    }
    let gen = serde_json::to_string_pretty(&serde_json::Value::Object(gen)).unwrap_or_default();
    write_atomic(&dir.join("generation_config.json"), gen.as_bytes())?;
    save_safetensors(dir.join("model.safetensors"), tensors, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, HostTensor> {
        BTreeMap::from([
            (
                "a.weight".to_string(),
                HostTensor::new(vec![2, 3], vec![1.0, -2.5, 3.25, 0.0, 1e-3, 7.0]),
            ),
            (
                "b.bias".to_string(),
                HostTensor::new(vec![2], vec![0.5, -0.75]),
            ),
        ])
    }

    #[test]
    fn round_trip_each_dtype() {
        let dir = tempfile::tempdir().unwrap();
        for (dtype, tol) in [(DType::F32, 0.0), (DType::F16, 1e-3), (DType::BF16, 1e-2)] {
            save_safetensors(dir.path().join("model.safetensors"), &sample(), dtype).unwrap();
            let back = load_hf_folder_tensors(dir.path()).unwrap();
            assert_eq!(back.len(), 2);
            for (k, t) in sample() {
                let b = &back[&k];
                assert_eq!(b.shape, t.shape);
                assert_eq!(b.source_dtype, dtype);
                for (x, y) in b.data.iter().zip(&t.data) {
                    assert!((x - y).abs() <= tol * y.abs().max(1.0), "{k}: {x} vs {y}");
                }
            }
        }
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn sharded_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample();
        let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) =
            s.into_iter().partition(|(k, _)| k.starts_with('a'));
        save_safetensors(
            dir.path().join("model-00001-of-00002.safetensors"),
            &a,
            DType::BF16,
        )
        .unwrap();
        save_safetensors(
            dir.path().join("model-00002-of-00002.safetensors"),
            &b,
            DType::F32,
        )
        .unwrap();
        let index = r#"{"metadata":{},"weight_map":{"a.weight":"model-00001-of-00002.safetensors",
            "b.bias":"model-00002-of-00002.safetensors","c.weight":"model-00002-of-00002.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let e = load_hf_folder_tensors(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("c.weight") && e.contains("model-00002-of-00002"),
            "{e}"
        );
        let index = index.replace(r#","c.weight":"model-00002-of-00002.safetensors""#, "");
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let all = load_hf_folder_tensors(dir.path()).unwrap();
        assert_eq!(all["b.bias"].data, vec![0.5, -0.75]);
        assert_eq!(all["a.weight"].data[1], -2.5);
    }

    #[test]
    fn missing_and_truncated_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_hf_folder_tensors(dir.path()).unwrap_err().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        let path = dir.path().join("model.safetensors");
        save_safetensors(&path, &sample(), DType::F32).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let e = load_hf_folder_tensors(dir.path()).unwrap_err().to_string();
        // sample() is written sorted by name: b.bias is last in the file.
        assert!(
            e.contains("model.safetensors") && e.contains("`b.bias`") && e.contains("truncated"),
            "{e}"
        );
        std::fs::write(&path, &bytes[..4]).unwrap();
        let e = load_hf_folder_tensors(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("invalid safetensors"),
            "{e}"
        );
    }
}
