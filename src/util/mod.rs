//! Small helpers shared by stages: JSON files, hashing.

use crate::stages::StageError;
use std::path::Path;

pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| StageError::msg(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| StageError::io(path, e))
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| StageError::msg(format!("{}: {e}", path.display())))
}

/// blake3 of a file's content, streamed.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// This machine's host name, for lock owners and run records.
pub fn host_name() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

/// Says on the real stderr that a test skipped and why. The test harness captures `println!`
/// and `eprintln!`, so a skip printed with them is seen by no one; `.ci/run` counts these lines.
#[cfg(test)]
pub fn test_skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}
