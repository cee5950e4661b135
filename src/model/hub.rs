//! Models from the Hugging Face Hub: `hf://Org/Name` or `hf://Org/Name@revision`.
//!
//! Downloads go through the `hf-hub` crate into the cache the Python library uses
//! (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`: `blobs/`,
//! `snapshots/<commit>/`, `refs/<branch>`), resumable, with a progress bar, and only the files a
//! model needs (config, generation config, tokenizer files, chat template, safetensors weights
//! and their index). `HF_ENDPOINT`, `HF_TOKEN` (else the token file in `HF_HOME`) and
//! `HF_HUB_OFFLINE=1` mean what they mean to the Python library. A revision resolves to its
//! commit sha, which the `model` stage puts in its fingerprint: a moved branch reruns the
//! stage, a pinned commit never does.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};

use crate::model::hf::MODEL_METADATA_FILES;

/// The scheme of a Hub model reference.
pub const SCHEME: &str = "hf://";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{uri}`: {message}")]
    BadReference { uri: String, message: String },
    #[error("{repo}@{revision}: HF_HUB_OFFLINE is set and the revision is not in the cache ({cache}); download it once without HF_HUB_OFFLINE, or name a local folder")]
    NotCached {
        repo: String,
        revision: String,
        cache: PathBuf,
    },
    #[error("{repo}@{revision}: {what}: {message} (check the repository name and revision, HF_ENDPOINT, and HF_TOKEN for a gated or private model)")]
    Request {
        repo: String,
        revision: String,
        what: String,
        message: String,
    },
    #[error("{repo}@{revision}: no config.json and no safetensors weights in the repository (files: {files})")]
    NotAModel {
        repo: String,
        revision: String,
        files: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A parsed `hf://Org/Name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    pub repo: String,
    /// A branch, tag or commit sha; `main` when none is given.
    pub revision: String,
}

impl HubModel {
    /// `None` when `source` is not an `hf://` reference; an error when it is one but malformed.
    pub fn parse(source: &str) -> Option<Result<Self, HubError>> {
        let rest = source.strip_prefix(SCHEME)?;
        let bad = |message: &str| HubError::BadReference {
            uri: source.to_string(),
            message: message.to_string(),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (rest, "main"),
        };
        let plain = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !s.starts_with('.')
        };
        let parts: Vec<&str> = repo.split('/').collect();
        Some(match parts.as_slice() {
            [org, name] if plain(org) && plain(name) => {
                if revision.is_empty()
                    || revision.contains("..")
                    || revision.chars().any(|c| c.is_whitespace())
                {
                    Err(bad(
                        "expected a revision after `@` (a branch, tag or commit)",
                    ))
                } else {
                    Ok(Self {
                        repo: repo.to_string(),
                        revision: revision.to_string(),
                    })
                }
            }
            _ => Err(bad("expected hf://Org/Name or hf://Org/Name@revision")),
        })
    }

    /// The commit `revision` names now: from the cache when offline (or when the revision is
    /// already a commit sha there), else from the Hub's API.
    pub fn resolve_commit(&self) -> Result<String, HubError> {
        let cache = cache_dir();
        if is_commit(&self.revision) && snapshot_dir(&cache, self, &self.revision).is_dir() {
            return Ok(self.revision.clone());
        }
        if offline() {
            return cached_commit(&cache, self).ok_or_else(|| HubError::NotCached {
                repo: self.repo.clone(),
                revision: self.revision.clone(),
                cache,
            });
        }
        let info = self
            .api_repo(&self.revision)?
            .info()
            .map_err(|e| self.request_error("reading the repository's file list", e))?;
        Ok(info.sha)
    }

    /// The snapshot folder of `commit` with every file the model needs, downloading what the
    /// cache lacks.
    pub fn download(&self, commit: &str) -> Result<PathBuf, HubError> {
        let cache = cache_dir();
        let dir = snapshot_dir(&cache, self, commit);
        // A commit never changes: a complete snapshot needs no request (nor a network).
        if snapshot_complete(&dir) {
            return Ok(dir);
        }
        if offline() {
            return Err(HubError::NotCached {
                repo: self.repo.clone(),
                revision: commit.to_string(),
                cache,
            });
        }
        let repo = self.api_repo(commit)?;
        let info = repo
            .info()
            .map_err(|e| self.request_error("reading the repository's file list", e))?;
        let available: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let mut wanted: Vec<String> = available
            .iter()
            .filter(|f| MODEL_METADATA_FILES.contains(&f.as_str()))
            .cloned()
            .collect();
        let has = |name: &str| available.iter().any(|f| f == name);
        if has("model.safetensors") {
            wanted.push("model.safetensors".into());
        } else if has("model.safetensors.index.json") {
            wanted.push("model.safetensors.index.json".into());
        }
        if !has("config.json") || !wanted.iter().any(|f| f.starts_with("model.safetensors")) {
            return Err(HubError::NotAModel {
                repo: self.repo.clone(),
                revision: commit.to_string(),
                files: available.join(", "),
            });
        }
        for file in &wanted {
            self.fetch(&repo, &dir, file)?;
        }
        // Shards named by the index.
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            for shard in shard_names(&index)? {
                self.fetch(&repo, &dir, &shard)?;
            }
        }
        Ok(dir)
    }

    /// One file into the snapshot folder (skipped when already there).
    fn fetch(&self, repo: &ApiRepo, dir: &Path, file: &str) -> Result<(), HubError> {
        if dir.join(file).is_file() {
            return Ok(());
        }
        let got = repo
            .download(file)
            .map_err(|e| self.request_error(&format!("downloading {file}"), e))?;
        // hf-hub links the file under the snapshot of the commit the server reported; that is
        // `dir` because `repo` asks for the commit itself.
        if !dir.join(file).is_file() {
            let target = dir.join(file);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|source| HubError::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            std::fs::copy(&got, &target).map_err(|source| HubError::Io {
                path: target.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn api_repo(&self, revision: &str) -> Result<ApiRepo, HubError> {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| hf_hub::Cache::new(cache_dir()).token());
        let api = ApiBuilder::from_env()
            .with_cache_dir(cache_dir())
            .with_token(token)
            .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .build()
            .map_err(|e| self.request_error("setting up the Hub client", e))?;
        Ok(api.repo(Repo::with_revision(
            self.repo.clone(),
            RepoType::Model,
            revision.to_string(),
        )))
    }

    fn request_error(&self, what: &str, e: impl std::fmt::Display) -> HubError {
        HubError::Request {
            repo: self.repo.clone(),
            revision: self.revision.clone(),
            what: what.to_string(),
            message: e.to_string(),
        }
    }
}

/// Resolves `source` when it is an `hf://` reference: the local snapshot folder and its commit.
pub fn fetch_model(source: &str) -> Option<Result<(PathBuf, String), HubError>> {
    let model = match HubModel::parse(source)? {
        Ok(m) => m,
        Err(e) => return Some(Err(e)),
    };
    Some(model.resolve_commit().and_then(|commit| {
        let dir = model.download(&commit)?;
        model.remember_ref(&commit)?;
        Ok((dir, commit))
    }))
}

impl HubModel {
    /// Records which commit a branch or tag named (`refs/<revision>`, as the Python library
    /// does), so that an offline run resolves it from the cache.
    fn remember_ref(&self, commit: &str) -> Result<(), HubError> {
        if is_commit(&self.revision) || offline() {
            return Ok(());
        }
        let path = repo_dir(&cache_dir(), self)
            .join("refs")
            .join(&self.revision);
        let io = |source| HubError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&path, commit).map_err(io)
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The hub cache folder as the Python library finds it.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    hf_hub::Cache::from_env().path().clone()
}

fn repo_dir(cache: &Path, model: &HubModel) -> PathBuf {
    cache.join(format!("models--{}", model.repo.replace('/', "--")))
}

fn snapshot_dir(cache: &Path, model: &HubModel, commit: &str) -> PathBuf {
    repo_dir(cache, model).join("snapshots").join(commit)
}

fn cached_commit(cache: &Path, model: &HubModel) -> Option<String> {
    if is_commit(&model.revision) {
        return snapshot_dir(cache, model, &model.revision)
            .is_dir()
            .then(|| model.revision.clone());
    }
    let text =
        std::fs::read_to_string(repo_dir(cache, model).join("refs").join(&model.revision)).ok()?;
    let commit = text.trim().to_string();
    snapshot_dir(cache, model, &commit)
        .is_dir()
        .then_some(commit)
}

/// Whether `dir` holds a model's config and all its weights (fetched last, so the metadata files
/// came before them).
fn snapshot_complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    if dir.join("model.safetensors").is_file() {
        return true;
    }
    let index = dir.join("model.safetensors.index.json");
    index.is_file()
        && shard_names(&index).is_ok_and(|shards| shards.iter().all(|s| dir.join(s).is_file()))
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The shard files a `model.safetensors.index.json` names.
fn shard_names(index: &Path) -> Result<Vec<String>, HubError> {
    let io = |source| HubError::Io {
        path: index.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(index).map_err(io)?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    let mut shards: Vec<String> = value["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    // A shard name is a plain file name in the repository's root.
    if let Some(bad) = shards
        .iter()
        .find(|s| s.contains('/') || s.contains("..") || s.is_empty())
    {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("shard name {bad:?} is not a file in the repository's root"),
        )));
    }
    Ok(shards)
}
