//! `model`: the base model as an HF folder in the store, from an HF folder, a `.gguf` file,
//! `hf://Org/Name[@revision]` (the Hub; the resolved commit is in the fingerprint), or
//! `init:tiny` (a byte-level BPE tokenizer trained on the input dataset and a small random Qwen2,
//! so the default recipe runs on a fresh machine with nothing downloaded).

use super::{ArtifactKind, InputSlot, Stage, StageContext, StageError};
use crate::data::Table;
use crate::model::hf::{save_hf_folder, DType};
use crate::model::init::{init_weights, tiny_qwen2_config, TinyShape};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub struct Model;

/// Shape of an `init:tiny` model; the vocabulary is what the tokenizer trainer reaches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinyParams {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
}

impl Default for TinyParams {
    fn default() -> Self {
        let s = TinyShape::default();
        Self {
            hidden_size: s.hidden,
            num_hidden_layers: s.layers,
            num_attention_heads: s.heads,
            num_key_value_heads: s.kv_heads,
            intermediate_size: s.intermediate,
            vocab_size: 4096,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// An HF folder, a `.gguf` file, `hf://Org/Name[@revision]`, or `init:tiny`.
    pub source: String,
    #[serde(default)]
    pub tiny: TinyParams,
    /// Columns whose text trains the `init:tiny` tokenizer.
    #[serde(default = "default_text_columns")]
    pub text_columns: Vec<String>,
    /// Rows of the input used to train the tokenizer, at most.
    #[serde(default = "default_max_rows")]
    pub tokenizer_rows: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn default_text_columns() -> Vec<String> {
    vec!["prompt".into(), "response".into()]
}

fn default_max_rows() -> usize {
    20_000
}

fn is_tiny(source: &str) -> bool {
    source == "init:tiny"
}

/// A relative model path is looked up next to the recipe, then in the current folder.
fn resolve(source: &str, recipe_dir: &Path) -> PathBuf {
    let p = Path::new(source);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let near = recipe_dir.join(p);
    if near.exists() {
        near
    } else {
        p.to_path_buf()
    }
}

fn hf_folder_files(dir: &Path) -> Result<Vec<PathBuf>, StageError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| StageError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            crate::model::hf::MODEL_METADATA_FILES.contains(&name.as_str())
                || name.ends_with(".safetensors")
                || name == "model.safetensors.index.json"
        })
        .collect();
    files.sort();
    if !files.iter().any(|f| f.ends_with("config.json")) {
        return Err(StageError::msg(format!(
            "{}: not an HF model folder (no config.json)",
            dir.display()
        )));
    }
    Ok(files)
}

impl Stage for Model {
    type Params = Params;
    const KIND: &'static str = "model";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const SUMMARY: &'static str = "a base model as an HF folder (HF folder, GGUF, or init:tiny)";

    fn input_slots() -> &'static [InputSlot] {
        const SLOTS: &[InputSlot] = &[InputSlot::optional(
            "input",
            &[ArtifactKind::Dataset, ArtifactKind::Prompts],
        )];
        SLOTS
    }

    fn external_files(params: &Params, recipe_dir: &Path) -> Result<Vec<PathBuf>, StageError> {
        if is_tiny(&params.source) || params.source.starts_with(crate::model::hub::SCHEME) {
            return Ok(Vec::new());
        }
        let path = resolve(&params.source, recipe_dir);
        if path.is_dir() {
            hf_folder_files(&path)
        } else if path.is_file() {
            Ok(vec![path])
        } else {
            Err(StageError::msg(format!(
                "`source = {:?}`: no such model folder or .gguf file (also tried {})",
                params.source,
                recipe_dir.join(&params.source).display()
            )))
        }
    }

    /// A Hub source enters the fingerprint as the commit its revision names now (nothing is
    /// downloaded to plan: the commit comes from the API, or from the cache when offline).
    fn source_revision(params: &Params, _recipe_dir: &Path) -> Result<Option<String>, StageError> {
        match crate::model::hub::HubModel::parse(&params.source) {
            None => Ok(None),
            Some(model) => {
                let model = model.map_err(StageError::wrap)?;
                let commit = model.resolve_commit().map_err(StageError::wrap)?;
                Ok(Some(format!("{}@{commit}", model.repo)))
            }
        }
    }

    fn validate(params: &Params) -> Result<(), (String, String)> {
        if let Some(Err(e)) = crate::model::hub::HubModel::parse(&params.source) {
            return Err(("source".into(), e.to_string()));
        }
        if params.source.starts_with("init:") && !is_tiny(&params.source) {
            return Err((
                "source".into(),
                format!("unknown initializer `{}`; use \"init:tiny\"", params.source),
            ));
        }
        let t = &params.tiny;
        if t.num_attention_heads == 0
            || !t.hidden_size.is_multiple_of(t.num_attention_heads)
            || t.num_key_value_heads == 0
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
        {
            return Err((
                "tiny".into(),
                "hidden_size must divide by num_attention_heads, which must divide by num_key_value_heads".into(),
            ));
        }
        Ok(())
    }

    fn run(params: &Params, ctx: &StageContext) -> Result<(), StageError> {
        if is_tiny(&params.source) {
            return init_tiny(params, ctx);
        }
        let path = match crate::model::hub::fetch_model(&params.source) {
            Some(fetched) => fetched.map_err(StageError::wrap)?.0,
            None => resolve(&params.source, &ctx.recipe_dir),
        };
        if path.is_dir() {
            for file in hf_folder_files(&path)? {
                let target = ctx.out(&file.file_name().unwrap_or_default().to_string_lossy());
                std::fs::copy(&file, &target).map_err(|e| StageError::io(&file, e))?;
            }
            // Fail here, not in a later stage, when the folder is not a model runner can load.
            crate::model::config::ModelConfig::from_file(path.join("config.json"))
                .map_err(StageError::wrap)?;
            Ok(())
        } else {
            crate::export::convert_gguf_to_hf(&path, &ctx.out_dir, DType::F32)
                .map_err(StageError::wrap)
        }
    }
}

fn init_tiny(params: &Params, ctx: &StageContext) -> Result<(), StageError> {
    let input = ctx.input("input").map_err(|_| {
        StageError::msg("`source = \"init:tiny\"` needs `input = \"STAGE\"`: a dataset to train its tokenizer on")
    })?;
    let manifest = crate::stages::artifact::DatasetManifest::read(&input.dir)?;
    let split = input.output.clone().unwrap_or_else(|| "train".into());
    let file = manifest.split_file(&split);
    let table = Table::read_parquet(&input.dir.join(file)).map_err(StageError::wrap)?;
    let columns: Vec<usize> = params
        .text_columns
        .iter()
        .filter_map(|c| table.column_index(c))
        .collect();
    if columns.is_empty() {
        return Err(StageError::msg(format!(
            "`text_columns` {:?} name none of the input's columns ({})",
            params.text_columns,
            table.columns.join(", ")
        )));
    }
    let texts: Vec<&str> = table
        .rows
        .iter()
        .take(params.tokenizer_rows)
        .flat_map(|r| columns.iter().filter_map(|&i| r[i].as_deref()))
        .collect();
    let tokenizer =
        crate::text::train_byte_level_bpe(texts.into_iter(), params.tiny.vocab_size, &[])
            .map_err(StageError::wrap)?;
    let t = &params.tiny;
    let mut config = tiny_qwen2_config(TinyShape {
        hidden: t.hidden_size,
        layers: t.num_hidden_layers,
        heads: t.num_attention_heads,
        kv_heads: t.num_key_value_heads,
        intermediate: t.intermediate_size,
        vocab: tokenizer.vocab_size(),
    });
    config.eos_token_ids = tokenizer.eos_ids();
    config.bos_token_id = tokenizer.bos_id();
    config.pad_token_id = tokenizer.pad_id();
    let tensors = init_weights(&config, params.seed.unwrap_or(ctx.seed));
    save_hf_folder(&ctx.out_dir, &config, &tensors, DType::F32).map_err(StageError::wrap)?;
    tokenizer.save(&ctx.out_dir).map_err(StageError::wrap)?;
    tracing::info!(
        params = config.num_parameters(),
        vocab = config.vocab_size,
        "initialized tiny model"
    );
    Ok(())
}
