//! A memo of the blake3 hashes of a recipe's external files (data, model folders), kept in the
//! store, so planning a recipe whose model holds gigabytes does not read them all again each
//! time. An entry is used only while the file's size, modification time and inode are those it
//! was hashed with, and only if the file was last modified more than [`RACY_NS`] before it was
//! hashed: a write within the same timestamp tick could leave size and time unchanged (git's
//! "racy" rule), so such a file is hashed again until it is old enough to trust.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How long after a file's last modification its hash may be remembered.
const RACY_NS: u64 = 2_000_000_000;

/// Files at least this large are hashed with every core (blake3's tree hash over a memory map).
const PARALLEL_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    modified_ns: u64,
    inode: u64,
    hashed_at_ns: u64,
    blake3: String,
}

/// Remembered hashes; [`FileHashes::save`] writes them back to the file they were read from.
#[derive(Debug, Default)]
pub struct FileHashes {
    file: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Whether a file was hashed since the memo was read (else `save` has nothing to write).
    changed: AtomicBool,
}

impl FileHashes {
    /// A memo that lives only as long as this value (nothing read or written).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// The memo kept in `file`. A missing or unreadable file is an empty memo: it only saves work.
    pub fn open(file: &Path) -> Self {
        let entries = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Self {
            file: Some(file.to_path_buf()),
            entries: Mutex::new(entries),
            changed: AtomicBool::new(false),
        }
    }

    /// blake3 of `path`'s content, from the memo when the file is unchanged since.
    pub fn hash(&self, path: &Path) -> std::io::Result<String> {
        let meta = std::fs::metadata(path)?;
        let key = std::fs::canonicalize(path)?.to_string_lossy().into_owned();
        let (size, modified_ns, inode) = stamp(&meta);
        if let Some(entry) = self.lock().get(&key) {
            let trusted = entry.hashed_at_ns >= modified_ns.saturating_add(RACY_NS);
            if trusted && (entry.size, entry.modified_ns, entry.inode) == (size, modified_ns, inode)
            {
                return Ok(entry.blake3.clone());
            }
        }
        let hashed_at_ns = now_ns();
        let blake3 = hash_content(path, size)?;
        self.changed.store(true, Ordering::Relaxed);
        self.lock().insert(
            key,
            Entry {
                size,
                modified_ns,
                inode,
                hashed_at_ns,
                blake3: blake3.clone(),
            },
        );
        Ok(blake3)
    }

    /// Writes the memo back (through a temporary file and a rename), without entries of files
    /// that are gone. Failing to write only costs the next plan the hashing.
    pub fn save(&self) {
        let Some(file) = &self.file else { return };
        if !self.changed.load(Ordering::Relaxed) {
            return;
        }
        let mut entries = self.lock().clone();
        entries.retain(|path, _| Path::new(path).exists());
        let Ok(text) = serde_json::to_string(&entries) else {
            return;
        };
        let temp = file.with_extension(format!("{}.tmp", std::process::id()));
        if std::fs::write(&temp, text).is_ok() && std::fs::rename(&temp, file).is_err() {
            let _ = std::fs::remove_file(&temp);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock leaves a map that is still whole.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn stamp(meta: &std::fs::Metadata) -> (u64, u64, u64) {
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let inode = 0;
    (meta.len(), modified_ns, inode)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn hash_content(path: &Path, size: u64) -> std::io::Result<String> {
    if size < PARALLEL_BYTES {
        return crate::pipeline::host::hash_file(path);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path)?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn set_modified(path: &Path, at: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(at)
            .unwrap();
    }

    #[test]
    fn an_unchanged_file_is_not_read_again_and_a_changed_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("weights.bin");
        let memo_file = dir.path().join("file-hashes.json");
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::write(&file, b"aaaa").unwrap();
        set_modified(&file, old);
        let first = FileHashes::open(&memo_file).hash(&file).unwrap();
        assert_eq!(first, blake3::hash(b"aaaa").to_hex().to_string());

        // Same size and time, other bytes: the memo answers, so the file was not read. (Real
        // edits change the time; this only shows that the memo is what answered.)
        let memo = FileHashes::open(&memo_file);
        memo.hash(&file).unwrap();
        memo.save();
        std::fs::write(&file, b"bbbb").unwrap();
        set_modified(&file, old);
        let reopened = FileHashes::open(&memo_file);
        assert_eq!(reopened.hash(&file).unwrap(), first);

        // A new modification time (an edit) is hashed again.
        set_modified(&file, old + Duration::from_secs(1));
        let second = reopened.hash(&file).unwrap();
        assert_eq!(second, blake3::hash(b"bbbb").to_hex().to_string());
    }

    #[test]
    fn a_file_modified_just_before_hashing_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.csv");
        std::fs::write(&file, b"q,a\n1,2\n").unwrap();
        let memo = FileHashes::in_memory();
        memo.hash(&file).unwrap();
        // Rewritten within the same tick: same size, and the time may read the same.
        let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::fs::write(&file, b"q,a\n3,4\n").unwrap();
        set_modified(&file, modified);
        assert_eq!(
            memo.hash(&file).unwrap(),
            blake3::hash(b"q,a\n3,4\n").to_hex().to_string()
        );
    }

    #[test]
    fn large_files_hash_as_small_ones_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.bin");
        let bytes: Vec<u8> = (0..PARALLEL_BYTES as usize + 12_345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(
            FileHashes::in_memory().hash(&file).unwrap(),
            crate::pipeline::host::hash_file(&file).unwrap()
        );
    }

    #[test]
    fn a_broken_memo_file_is_an_empty_memo() {
        let dir = tempfile::tempdir().unwrap();
        let memo_file = dir.path().join("file-hashes.json");
        std::fs::write(&memo_file, b"{not json").unwrap();
        let file = dir.path().join("x");
        std::fs::write(&file, b"x").unwrap();
        let memo = FileHashes::open(&memo_file);
        assert_eq!(
            memo.hash(&file).unwrap(),
            blake3::hash(b"x").to_hex().to_string()
        );
        memo.save();
        let saved: BTreeMap<String, Entry> =
            serde_json::from_str(&std::fs::read_to_string(&memo_file).unwrap()).unwrap();
        assert_eq!(saved.len(), 1);
    }
}
