//! The engine: plan a validated DAG of stages from a recipe, fingerprint each stage, and run what
//! the artifact store does not already hold.
//!
//! ```text
//! recipe.toml -> RawRecipe -> Plan (DAG, fingerprints) -> [cached | to run] -> store -> run record
//! ```

pub mod context;
pub mod file_hashes;
pub mod fingerprint;
pub mod host;
pub mod lock;
pub mod plan;
pub mod record;
pub mod run;
pub mod stage;
pub mod store;

pub use file_hashes::FileHashes;
pub use plan::{Plan, PlannedStage};
pub use record::{RunRecord, StageRecord, StageState};
pub use run::{execute, RunOptions};
pub use store::Store;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Recipe(#[from] crate::recipe::RecipeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(String),
    #[error("{failed} of {total} stages failed")]
    StagesFailed { failed: usize, total: usize },
}

impl PipelineError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PipelineError::Io {
            path: path.into(),
            source,
        }
    }
}
