//! Model export: GGUF (optionally merging a PEFT LoRA adapter first, with an Ollama Modelfile
//! beside it), Hugging Face safetensors folders, normalized PEFT adapter folders, and GGUF →
//! HF conversion. References: llama.cpp convert_hf_to_gguf.py / llama-quantize, peft
//! `merge_and_unload`, transformers `save_pretrained` file layout.

pub mod modelfile;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::gguf::mix::ExportType;
use crate::gguf::model::{load_gguf_model, write_gguf_model};
use crate::gguf::tokenizer::GgufTokenizer;
use crate::gguf::GgmlType;
use crate::model::config::ModelConfig;
use crate::model::hf::{
    load_hf_folder_tensors, load_safetensors_file, save_hf_folder, save_safetensors, DType,
    HostTensor,
};

/// Errors of the `export` module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] crate::gguf::Error),
    #[error("{path}: {what}")]
    Model { path: PathBuf, what: String },
    #[error("adapter {path}: {what}")]
    Adapter { path: PathBuf, what: String },
    #[error(transparent)]
    Merge(#[from] crate::peft::AdapterError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A loaded model: config, HF-named f32 tensors, tokenizer, and a display name.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub tensors: BTreeMap<String, HostTensor>,
    pub tokenizer: GgufTokenizer,
    pub name: String,
    /// The HF folder it came from (tokenizer files are copied from it), None for a GGUF.
    pub hf_dir: Option<PathBuf>,
}

fn model_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        what: e.to_string(),
    }
}

/// Loads an HF folder (config.json + *.safetensors + tokenizer.json) or a `.gguf` file.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    if path.is_dir() {
        let config =
            ModelConfig::from_file(path.join("config.json")).map_err(|e| model_err(path, e))?;
        let tensors = load_hf_folder_tensors(path).map_err(|e| model_err(path, e))?;
        let tokenizer = GgufTokenizer::from_hf_dir(path, Some(config.vocab_size), &name)?;
        let mut tokenizer = tokenizer;
        tokenizer.context_length = Some(config.max_position_embeddings);
        if tokenizer.eos_id.is_none() {
            tokenizer.eos_id = config.eos_token_ids.first().copied();
        }
        if tokenizer.bos_id.is_none() {
            tokenizer.bos_id = config.bos_token_id;
        }
        Ok(LoadedModel {
            config,
            tensors,
            tokenizer,
            name,
            hf_dir: Some(path.to_path_buf()),
        })
    } else {
        let (config, tensors, tokenizer) = load_gguf_model(path)?;
        Ok(LoadedModel {
            config,
            tensors,
            tokenizer,
            name,
            hf_dir: None,
        })
    }
}

/// Loads `model` and merges `adapter` into it when given.
pub fn load_merged(model: &Path, adapter: Option<&Path>) -> Result<LoadedModel> {
    let mut m = load_model(model)?;
    if let Some(a) = adapter {
        let merged = crate::peft::merge::merge_lora(&mut m.tensors, a)?;
        tracing::info!("merged {} LoRA modules from {}", merged.len(), a.display());
    }
    Ok(m)
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    pub gguf: PathBuf,
    pub modelfile: PathBuf,
    pub tensor_types: Vec<(String, GgmlType)>,
}

/// Exports `model` (HF folder or GGUF), with `adapter` merged, as a GGUF of type `et` at `out`
/// (a file, or a folder that receives `<name>-<TYPE>.gguf`), plus `<stem>.Modelfile` beside it.
pub fn export_gguf(
    model: &Path,
    adapter: Option<&Path>,
    out: &Path,
    et: ExportType,
) -> Result<GgufExport> {
    let m = load_merged(model, adapter)?;
    let gguf = if out.is_dir() {
        out.join(format!("{}-{}.gguf", m.name, et.label()))
    } else {
        out.to_path_buf()
    };
    if let Some(parent) = gguf.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| Error::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let tensor_types = write_gguf_model(&gguf, &m.config, &m.tensors, &m.tokenizer, et, &m.name)?;
    let file_name = gguf
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = gguf
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let modelfile = gguf.with_file_name(format!("{stem}.Modelfile"));
    std::fs::write(&modelfile, modelfile::modelfile(&file_name, &m.tokenizer)).map_err(
        |source| Error::Io {
            path: modelfile.clone(),
            source,
        },
    )?;
    Ok(GgufExport {
        gguf,
        modelfile,
        tensor_types,
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| model_err(path, e))?;
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes an HF folder transformers loads: config.json, model.safetensors, tokenizer files,
/// generation_config.json. A tied lm_head is left out, as `save_pretrained` does.
pub fn write_hf_folder(m: &LoadedModel, out_dir: &Path, dtype: DType) -> Result<()> {
    let mut tensors = m.tensors.clone();
    if m.config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    save_hf_folder(out_dir, &m.config, &tensors, dtype).map_err(|e| model_err(out_dir, e))?;
    match &m.hf_dir {
        Some(src) => {
            for f in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "chat_template.jinja",
                "vocab.json",
                "merges.txt",
            ] {
                let p = src.join(f);
                if p.exists() {
                    std::fs::copy(&p, out_dir.join(f)).map_err(|source| Error::Io {
                        path: p.clone(),
                        source,
                    })?;
                }
            }
        }
        None => m.tokenizer.write_hf(out_dir, out_dir)?,
    }
    Ok(())
}

/// `runner export --format safetensors`: merged model as an HF folder.
pub fn export_safetensors(
    model: &Path,
    adapter: Option<&Path>,
    out_dir: &Path,
    dtype: DType,
) -> Result<()> {
    let m = load_merged(model, adapter)?;
    write_hf_folder(&m, out_dir, dtype)
}

/// `runner convert x.gguf --to hf DIR`.
pub fn convert_gguf_to_hf(gguf: &Path, out_dir: &Path, dtype: DType) -> Result<()> {
    let m = load_model(gguf)?;
    write_hf_folder(&m, out_dir, dtype)
}

/// `runner export --format peft`: copies an adapter folder, normalizing tensor names (no
/// `.default` adapter-name infix) and adapter_config.json (peft_type, task_type, base model).
pub fn export_peft(adapter: &Path, base_model: Option<&Path>, out_dir: &Path) -> Result<()> {
    if crate::model::prompt::prompt_adapter_kind(adapter).is_some() {
        return export_prompt_adapter(adapter, base_model, out_dir);
    }
    let (mut cfg, cfg_path) =
        crate::peft::files::read_config_json(adapter).map_err(crate::peft::AdapterError::from)?;
    let obj = cfg.as_object_mut().ok_or_else(|| Error::Adapter {
        path: cfg_path.clone(),
        what: "not a JSON object".into(),
    })?;
    obj.entry("peft_type").or_insert(json!("LORA"));
    obj.entry("task_type").or_insert(json!("CAUSAL_LM"));
    if let Some(b) = base_model {
        obj.insert("base_model_name_or_path".into(), json!(b.to_string_lossy()));
    }
    // The LoRA keys must read as the adapter reader and merge read them.
    crate::peft::files::LoraAdapterConfig::from_json(&cfg, &cfg_path)
        .map_err(crate::peft::AdapterError::from)?;
    let tensors =
        load_safetensors_file(&adapter.join("adapter_model.safetensors")).map_err(|e| {
            Error::Adapter {
                path: adapter.to_path_buf(),
                what: e.to_string(),
            }
        })?;
    let normalized: BTreeMap<String, HostTensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace(".lora_A.default.", ".lora_A.")
                .replace(".lora_B.default.", ".lora_B.");
            let k = if k.starts_with("base_model.model.") {
                k
            } else {
                format!("base_model.model.{k}")
            };
            (k, v)
        })
        .collect();
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    write_json(&out_dir.join("adapter_config.json"), &cfg)?;
    let st = out_dir.join("adapter_model.safetensors");
    save_safetensors(&st, &normalized, DType::F32).map_err(|e| model_err(&st, e))
}

/// Prompt tuning, P-Tuning and prefix adapters (one `prompt_embeddings` tensor) are copied after
/// a check of their config and tensor.
fn export_prompt_adapter(adapter: &Path, base_model: Option<&Path>, out_dir: &Path) -> Result<()> {
    let file = crate::model::prompt::read_prompt_adapter(adapter).map_err(|e| Error::Adapter {
        path: adapter.to_path_buf(),
        what: e.to_string(),
    })?;
    let mut cfg = file.config;
    if let (Some(b), Some(o)) = (base_model, cfg.as_object_mut()) {
        o.insert("base_model_name_or_path".into(), json!(b.to_string_lossy()));
    }
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    write_json(&out_dir.join("adapter_config.json"), &cfg)?;
    let tensors = [(
        crate::model::prompt::PROMPT_EMBEDDINGS.to_string(),
        file.prompt_embeddings,
    )]
    .into_iter()
    .collect();
    let st = out_dir.join("adapter_model.safetensors");
    save_safetensors(&st, &tensors, DType::F32).map_err(|e| model_err(&st, e))
}
