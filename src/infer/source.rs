//! What `--model` names, resolved to files: an HF folder, `hf://Org/Name[@revision]` (downloaded
//! into the Hub cache) or a `.gguf` file (its tokenizer rebuilt from the metadata into a private
//! temporary folder). Used by `runner generate` and `runner export`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::model::config::{ConfigError, ModelConfig};
use crate::model::hf::{load_hf_folder_tensors, HfError, HostTensor};
use crate::model::hub::HubError;

/// Why a model path could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] HfError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: expected an HF model folder (config.json + model.safetensors) or a .gguf file")]
    NotAModel(PathBuf),
}

/// Model files resolved from `--model`.
pub struct ModelSource {
    pub config: ModelConfig,
    /// HF-named f32 tensors; for a GGUF empty until [`ModelSource::load_tensors`] (the CPU engine
    /// reads the file's blocks in place instead).
    pub tensors: BTreeMap<String, HostTensor>,
    /// The `.gguf` file, when the model is one.
    pub gguf: Option<PathBuf>,
    /// Folder holding tokenizer.json / tokenizer_config.json / generation_config.json.
    pub tokenizer_dir: PathBuf,
    /// For a GGUF: the private folder its tokenizer was written to, removed on drop.
    _tokenizer_scratch: Option<ScratchDir>,
}

/// A folder only this user can enter, under a name nobody can predict (another user cannot plant
/// a tokenizer there first), removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(prefix: &str) -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for attempt in 0..16u32 {
            let salt = blake3::hash(format!("{}|{nanos}|{attempt}", std::process::id()).as_bytes())
                .to_hex();
            let dir = std::env::temp_dir().join(format!("{prefix}{}", &salt[..16]));
            let mut builder = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            match builder.create(&dir) {
                Ok(()) => return Ok(Self(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free temporary folder name"))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Resolves a model path: an HF folder, `hf://Org/Name[@revision]` (downloaded into the Hub
/// cache), or a `.gguf` file (its tokenizer is rebuilt from the GGUF metadata into a cache folder).
pub fn load_model_source(path: &Path) -> Result<ModelSource, SourceError> {
    if let Some(fetched) = crate::model::hub::fetch_model(&path.to_string_lossy()) {
        let (dir, commit) = fetched?;
        tracing::info!("{} is commit {commit} ({})", path.display(), dir.display());
        return load_model_source(&dir);
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        // Metadata only: the tensors are dequantized when the burn decoder needs them.
        let file = crate::gguf::reader::GgufFile::open(path)?;
        let tokenizer = crate::gguf::tokenizer::GgufTokenizer::from_gguf(&file)?;
        let config = crate::gguf::model::config_from_gguf(&file, &tokenizer)?;
        drop(file);
        let scratch =
            ScratchDir::create("runner-gguf-tokenizer-").map_err(|source| SourceError::Io {
                what: "creating a temporary folder for the GGUF's tokenizer".into(),
                source,
            })?;
        let dir = scratch.0.clone();
        tokenizer.write_hf(&dir, path)?;
        let gen = serde_json::json!({ "eos_token_id": config.eos_token_ids, "bos_token_id": config.bos_token_id });
        let gen_path = dir.join("generation_config.json");
        std::fs::write(&gen_path, gen.to_string()).map_err(|source| SourceError::Io {
            what: format!("writing {}", gen_path.display()),
            source,
        })?;
        return Ok(ModelSource {
            config,
            tensors: BTreeMap::new(),
            gguf: Some(path.to_path_buf()),
            tokenizer_dir: dir,
            _tokenizer_scratch: Some(scratch),
        });
    }
    if !path.is_dir() {
        return Err(SourceError::NotAModel(path.to_path_buf()));
    }
    let config = ModelConfig::from_file(path.join("config.json"))?;
    let tensors = load_hf_folder_tensors(path)?;
    Ok(ModelSource {
        config,
        tensors,
        gguf: None,
        tokenizer_dir: path.to_path_buf(),
        _tokenizer_scratch: None,
    })
}

impl ModelSource {
    /// Dequantizes a GGUF's tensors into [`ModelSource::tensors`] (no-op for an HF folder or
    /// when already loaded).
    pub fn load_tensors(&mut self) -> Result<(), SourceError> {
        if let (Some(path), true) = (&self.gguf, self.tensors.is_empty()) {
            self.tensors = crate::gguf::model::load_gguf_model(path)?.1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod scratch_tests {
    use super::ScratchDir;

    #[test]
    fn scratch_folders_are_private_unpredictable_and_removed() {
        let (a, b) = (
            ScratchDir::create("runner-test-").unwrap(),
            ScratchDir::create("runner-test-").unwrap(),
        );
        assert_ne!(a.0, b.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&a.0).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        }
        std::fs::write(a.0.join("tokenizer.json"), "{}").unwrap();
        let path = a.0.clone();
        drop(a);
        assert!(!path.exists());
    }
}
