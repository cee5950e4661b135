//! The content-addressed artifact store: `<root>/<fingerprint>/` holds one finished artifact.
//!
//! A stage writes into `<root>/tmp/<fingerprint>-<pid>-<nanos>/`; `manifest.json` (every file with
//! its size and blake3) is written last and the folder is committed with one rename, so a crash
//! never leaves a half artifact under a fingerprint. Per-fingerprint locks live in `<root>/locks/`.

use super::lock::{self, LockGuard, LockOwner};
use super::PipelineError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub fingerprint: String,
    pub stage: String,
    pub kind: String,
    pub version: u32,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, String>,
    pub files: Vec<FileEntry>,
    pub created_at: String,
    pub duration_s: f64,
    /// Everything that went into the fingerprint, to explain later cache misses.
    pub fingerprint_doc: serde_json::Value,
}

pub struct Store {
    pub root: PathBuf,
}

impl Store {
    /// `--store`, else `RUNNER_STORE`, else `.runner/store` under the current folder.
    pub fn default_root() -> PathBuf {
        std::env::var_os("RUNNER_STORE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".runner/store"))
    }

    pub fn open(root: &Path) -> Result<Self, PipelineError> {
        for dir in [root.to_path_buf(), root.join("tmp"), root.join("locks")] {
            std::fs::create_dir_all(&dir).map_err(|e| PipelineError::io(&dir, e))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The memo of external files' hashes kept in this store (see [`super::FileHashes`]).
    pub fn file_hashes(&self) -> super::FileHashes {
        super::FileHashes::open(&self.root.join("file-hashes.json"))
    }

    pub fn artifact(&self, fingerprint: &str) -> PathBuf {
        self.root.join(fingerprint)
    }

    /// Whether a whole artifact of `fingerprint` is here: its manifest reads and every file it
    /// lists is present with its recorded size (a cheap check; `verify` re-hashes). A damaged
    /// artifact is not "cached": the run builds it again and its commit replaces it.
    pub fn contains(&self, fingerprint: &str) -> bool {
        let Some(manifest) = self.manifest(fingerprint) else {
            return false;
        };
        let dir = self.artifact(fingerprint);
        manifest.files.iter().all(|file| {
            std::fs::metadata(dir.join(&file.path))
                .is_ok_and(|m| m.is_file() && m.len() == file.size)
        })
    }

    pub fn manifest(&self, fingerprint: &str) -> Option<Manifest> {
        let text = std::fs::read_to_string(self.artifact(fingerprint).join(MANIFEST)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn lock_path(&self, fingerprint: &str) -> PathBuf {
        self.root.join("locks").join(format!("{fingerprint}.lock"))
    }

    /// Takes the build lock of `fingerprint`, waiting while another live process holds it.
    pub fn lock(
        &self,
        fingerprint: &str,
        on_wait: impl Fn(&LockOwner),
    ) -> Result<LockGuard, PipelineError> {
        let path = self.lock_path(fingerprint);
        lock::lock_blocking(&path, on_wait).map_err(|e| PipelineError::io(path, e))
    }

    /// The folder of `fingerprint` that survives a killed or failed run (resumable checkpoints).
    /// Its name starts with the fingerprint, so `abandoned_temps` and `gc` treat it as a temp
    /// folder of that artifact.
    pub fn work_dir(&self, fingerprint: &str) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{fingerprint}-checkpoints"))
    }

    pub fn new_temp(&self, fingerprint: &str) -> Result<PathBuf, PipelineError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = self
            .root
            .join("tmp")
            .join(format!("{fingerprint}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| PipelineError::io(&dir, e))?;
        Ok(dir)
    }

    /// Lists, hashes and commits a finished temp folder; replaces an existing artifact (forced runs).
    pub fn commit(&self, temp: &Path, mut manifest: Manifest) -> Result<PathBuf, PipelineError> {
        manifest.files = list_files(temp)?;
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| PipelineError::Store(e.to_string()))?;
        let manifest_path = temp.join(MANIFEST);
        std::fs::write(&manifest_path, text).map_err(|e| PipelineError::io(&manifest_path, e))?;
        // Every file and folder on disk before the rename publishes them: a crash right after
        // the commit must not leave a "cached" artifact with empty or missing files.
        sync_tree(temp)?;
        let target = self.artifact(&manifest.fingerprint);
        if target.exists() {
            let aside = self.new_temp(&format!("{}-replaced", manifest.fingerprint))?;
            std::fs::remove_dir(&aside).map_err(|e| PipelineError::io(&aside, e))?;
            std::fs::rename(&target, &aside).map_err(|e| PipelineError::io(&target, e))?;
            std::fs::rename(temp, &target).map_err(|e| PipelineError::io(&target, e))?;
            let _ = std::fs::remove_dir_all(aside);
        } else {
            std::fs::rename(temp, &target).map_err(|e| PipelineError::io(&target, e))?;
        }
        sync_dir(&self.root)?;
        Ok(target)
    }

    pub fn list(&self) -> Vec<Manifest> {
        let mut out: Vec<Manifest> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| self.manifest(&e.file_name().to_string_lossy()))
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        out
    }

    /// Re-hashes every committed file; returns one line per problem found.
    pub fn verify(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            if name == "tmp" || name == "locks" || !entry.path().is_dir() {
                continue;
            }
            let Some(manifest) = self.manifest(&name) else {
                problems.push(format!("{name}: no readable {MANIFEST}"));
                continue;
            };
            if manifest.fingerprint != name {
                problems.push(format!(
                    "{name}: manifest says fingerprint {}",
                    manifest.fingerprint
                ));
            }
            for file in &manifest.files {
                let path = entry.path().join(&file.path);
                match crate::pipeline::host::hash_file(&path) {
                    Ok(h) if h == file.blake3 => {}
                    Ok(_) => problems.push(format!("{name}/{}: content changed", file.path)),
                    Err(e) => problems.push(format!("{name}/{}: {e}", file.path)),
                }
            }
        }
        problems
    }

    /// Temp folders whose build lock is free: leftovers of killed runs.
    pub fn abandoned_temps(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let fingerprint = p
                    .file_name()
                    .map(|n| n.to_string_lossy().chars().take(64).collect::<String>())
                    .unwrap_or_default();
                !lock::is_held(&self.lock_path(&fingerprint))
            })
            .collect()
    }

    /// Removes artifacts not in `keep` and abandoned temp folders; returns (count, bytes).
    pub fn gc(&self, keep: &HashSet<String>) -> Result<(usize, u64), PipelineError> {
        let mut removed = 0;
        let mut bytes = 0;
        for manifest in self.list() {
            if keep.contains(&manifest.fingerprint) {
                continue;
            }
            // Under its lock (a run building or reading it keeps it), moved out of the store
            // by one rename, then deleted: a crash mid-delete leaves a temp folder, never a
            // "cached" artifact with missing files.
            let lock_path = self.lock_path(&manifest.fingerprint);
            let _guard =
                match lock::try_lock(&lock_path).map_err(|e| PipelineError::io(&lock_path, e))? {
                    lock::TryLock::Acquired(guard) => guard,
                    lock::TryLock::HeldBy(_) => continue,
                };
            let dir = self.artifact(&manifest.fingerprint);
            let aside = self.new_temp(&format!("{}-gc", manifest.fingerprint))?;
            std::fs::remove_dir(&aside).map_err(|e| PipelineError::io(&aside, e))?;
            std::fs::rename(&dir, &aside).map_err(|e| PipelineError::io(&dir, e))?;
            bytes += manifest.files.iter().map(|f| f.size).sum::<u64>();
            std::fs::remove_dir_all(&aside).map_err(|e| PipelineError::io(&aside, e))?;
            removed += 1;
        }
        for temp in self.abandoned_temps() {
            bytes += dir_size(&temp);
            std::fs::remove_dir_all(&temp).map_err(|e| PipelineError::io(&temp, e))?;
            removed += 1;
        }
        Ok((removed, bytes))
    }
}

pub fn dir_size(path: &Path) -> u64 {
    walk(path)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn list_files(root: &Path) -> Result<Vec<FileEntry>, PipelineError> {
    walk(root)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != MANIFEST) || p.parent() != Some(root))
        .map(|p| {
            let size = std::fs::metadata(&p)
                .map_err(|e| PipelineError::io(&p, e))?
                .len();
            let blake3 =
                crate::pipeline::host::hash_file(&p).map_err(|e| PipelineError::io(&p, e))?;
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .replace('\\', "/");
            Ok(FileEntry {
                path: rel,
                size,
                blake3,
            })
        })
        .collect()
}

/// fsync of a folder (its entries: names created or renamed in it).
fn sync_dir(dir: &Path) -> Result<(), PipelineError> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PipelineError::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// fsync of every file and folder under `root`.
fn sync_tree(root: &Path) -> Result<(), PipelineError> {
    let entries = std::fs::read_dir(root).map_err(|e| PipelineError::io(root, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| PipelineError::io(root, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| PipelineError::io(&path, e))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| PipelineError::io(&path, e))?;
        }
    }
    sync_dir(root)
}
