//! The interface between the pipeline and the stage kinds: what a stage declares (its
//! parameters, input slots, output kind, version) and runs ([`Stage`]), and the object-safe
//! face the planner and scheduler work with ([`DynStage`]). The kinds themselves live in
//! [`crate::stages`] and reach the pipeline through the registry the caller hands to
//! [`crate::pipeline::plan::Plan::build`]; the pipeline knows no stage by name.

use crate::pipeline::context::StageContext;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What a stage's artifact folder holds, so the planner can reject a wrong wiring before running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// Parquet tables, one per split, plus `dataset.json`.
    Dataset,
    /// Prompt/response records (Parquet per split).
    Prompts,
    /// An HF model folder (config.json, safetensors, tokenizer).
    Model,
    /// Token ids and labels per split.
    Tokens,
    /// A fine-tuned adapter or model with its training metrics.
    Trained,
    /// Predictions and metrics.
    Evaluation,
    /// Exported files (GGUF, safetensors, adapters).
    Export,
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok();
        write!(f, "{}", s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// A parameter key whose value names other stages (`input = "raw"`, `inputs = ["a", "b.test"]`).
#[derive(Debug, Clone, Copy)]
pub struct InputSlot {
    pub key: &'static str,
    pub accepts: &'static [ArtifactKind],
    pub required: bool,
    /// Whether the slot takes a list of stages.
    pub many: bool,
}

impl InputSlot {
    /// A slot that must name exactly one stage.
    pub const fn one(key: &'static str, accepts: &'static [ArtifactKind]) -> Self {
        Self {
            key,
            accepts,
            required: true,
            many: false,
        }
    }

    /// A slot that may name one stage.
    pub const fn optional(key: &'static str, accepts: &'static [ArtifactKind]) -> Self {
        Self {
            key,
            accepts,
            required: false,
            many: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A JSON file of an artifact that does not parse as the type it holds; `key` is the
    /// dotted path of the value at fault (empty for the whole file).
    #[error("{path}: {}{source}", if key.is_empty() { String::new() } else { format!("`{key}`: ") })]
    Json {
        path: PathBuf,
        key: String,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Other(#[from] Box<dyn std::error::Error + Send + Sync>),
}

impl StageError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        StageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn msg(message: impl Into<String>) -> Self {
        StageError::Failed(message.into())
    }

    /// A library error as the stage's failure: its message as it prints, its source chain kept.
    pub fn wrap(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StageError::Other(Box::new(e))
    }
}

/// One kind of stage. Implementations are unit structs; parameters come in `Params`.
pub trait Stage: Send + Sync + 'static {
    /// Parameters as written in the recipe (input slots and `kind` removed).
    type Params: DeserializeOwned + Serialize;
    const KIND: &'static str;
    /// Bump when the artifact bytes change for the same parameters and inputs.
    const VERSION: u32;
    const OUTPUT: ArtifactKind;
    const SUMMARY: &'static str;

    fn input_slots() -> &'static [InputSlot] {
        &[]
    }

    /// Named sub-outputs other stages may reference as `stage.name` (dataset splits).
    fn named_outputs(_params: &Self::Params) -> Vec<String> {
        Vec::new()
    }

    /// Files outside the store that the stage reads; they enter the fingerprint by content.
    fn external_files(
        _params: &Self::Params,
        _recipe_dir: &Path,
    ) -> Result<Vec<PathBuf>, StageError> {
        Ok(Vec::new())
    }

    /// An identity of an external source that is not a local file (a Hub repository's resolved
    /// commit); it enters the fingerprint.
    fn source_revision(
        _params: &Self::Params,
        _recipe_dir: &Path,
    ) -> Result<Option<String>, StageError> {
        Ok(None)
    }

    /// Cross-field checks that serde cannot express; the message names the key.
    fn validate(_params: &Self::Params) -> Result<(), (String, String)> {
        Ok(())
    }

    /// Whether the stage wants the accelerator; the scheduler runs one such stage at a time.
    fn heavy() -> bool {
        false
    }

    /// Whether every rank of a data-parallel process group runs the stage together (training:
    /// see `crate::dist`); rank 0 alone commits its artifact. Other stages run once, in
    /// whichever rank takes the store's lock first.
    fn data_parallel() -> bool {
        false
    }

    /// Parameters that change how a run is watched or saved, not what it computes (logging and
    /// checkpoint intervals): left out of the fingerprint, so turning checkpoints on after a
    /// crash resumes the same work instead of starting a new artifact.
    fn operational_keys() -> &'static [&'static str] {
        &[]
    }

    fn run(params: &Self::Params, ctx: &StageContext) -> Result<(), StageError>;
}

/// Parameter parsing failure: the dotted key inside the stage and what was wrong.
#[derive(Debug)]
pub struct ParamError {
    pub key: String,
    pub message: String,
}

/// Object-safe face of [`Stage`] used by the pipeline.
pub trait DynStage: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn output(&self) -> ArtifactKind;
    fn summary(&self) -> &'static str;
    fn input_slots(&self) -> &'static [InputSlot];
    fn heavy(&self) -> bool;
    fn data_parallel(&self) -> bool;
    fn operational_keys(&self) -> &'static [&'static str];
    /// Parses and canonicalizes parameters (defaults filled in).
    fn parse(&self, params: &toml::Table) -> Result<serde_json::Value, ParamError>;
    fn named_outputs(&self, params: &serde_json::Value) -> Vec<String>;
    fn external_files(
        &self,
        params: &serde_json::Value,
        recipe_dir: &Path,
    ) -> Result<Vec<PathBuf>, StageError>;
    fn source_revision(
        &self,
        params: &serde_json::Value,
        recipe_dir: &Path,
    ) -> Result<Option<String>, StageError>;
    fn run(&self, params: &serde_json::Value, ctx: &StageContext) -> Result<(), StageError>;
}

struct Erased<S>(std::marker::PhantomData<S>);

impl<S: Stage> Erased<S> {
    fn typed(params: &serde_json::Value) -> Result<S::Params, StageError> {
        serde_json::from_value(params.clone())
            .map_err(|e| StageError::msg(format!("{} parameters: {e}", S::KIND)))
    }
}

impl<S: Stage> DynStage for Erased<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> u32 {
        S::VERSION
    }
    fn output(&self) -> ArtifactKind {
        S::OUTPUT
    }
    fn summary(&self) -> &'static str {
        S::SUMMARY
    }
    fn input_slots(&self) -> &'static [InputSlot] {
        S::input_slots()
    }
    fn heavy(&self) -> bool {
        S::heavy()
    }
    fn data_parallel(&self) -> bool {
        S::data_parallel()
    }
    fn operational_keys(&self) -> &'static [&'static str] {
        S::operational_keys()
    }

    fn parse(&self, params: &toml::Table) -> Result<serde_json::Value, ParamError> {
        let value = toml::Value::Table(params.clone());
        let typed: S::Params = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ParamError {
                key: if path == "." { String::new() } else { path },
                message: e.into_inner().to_string(),
            }
        })?;
        S::validate(&typed).map_err(|(key, message)| ParamError { key, message })?;
        serde_json::to_value(&typed).map_err(|e| ParamError {
            key: String::new(),
            message: e.to_string(),
        })
    }

    fn named_outputs(&self, params: &serde_json::Value) -> Vec<String> {
        Self::typed(params)
            .map(|p| S::named_outputs(&p))
            .unwrap_or_default()
    }

    fn external_files(
        &self,
        params: &serde_json::Value,
        recipe_dir: &Path,
    ) -> Result<Vec<PathBuf>, StageError> {
        S::external_files(&Self::typed(params)?, recipe_dir)
    }

    fn source_revision(
        &self,
        params: &serde_json::Value,
        recipe_dir: &Path,
    ) -> Result<Option<String>, StageError> {
        S::source_revision(&Self::typed(params)?, recipe_dir)
    }

    fn run(&self, params: &serde_json::Value, ctx: &StageContext) -> Result<(), StageError> {
        S::run(&Self::typed(params)?, ctx)
    }
}

/// The pipeline's view of a stage kind.
pub fn erase<S: Stage>() -> Box<dyn DynStage> {
    Box::new(Erased::<S>(std::marker::PhantomData))
}
