//! Artifact locks: an exclusive kernel lock (`flock`; on NFS the kernel maps it to fcntl
//! record locks, which the server arbitrates across hosts) on a lock file that also names its
//! owner (host, pid) for the "waiting for" message.
//!
//! The kernel drops the lock when its process ends, however it ends (kill -9 included), so no
//! one judges staleness: a paused process keeps its lock, and two waiters cannot both "break"
//! a lock and then take turns thinking they hold it. The holder removes the file before
//! unlocking; a waiter that then gets the lock of the removed file sees that the path no longer
//! names the file it opened and tries again.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockOwner {
    pub host: String,
    pub pid: u32,
    pub started_at: String,
}

impl LockOwner {
    pub fn current() -> Self {
        Self {
            host: crate::pipeline::host::host_name(),
            pid: std::process::id(),
            started_at: chrono::Utc::now().to_rfc3339(),
        }
    }

    fn unknown() -> Self {
        Self {
            host: "?".into(),
            pid: 0,
            started_at: String::new(),
        }
    }
}

/// A held lock; the file is removed, then the lock released, on drop.
pub struct LockGuard {
    path: PathBuf,
    file: File,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Removed while still locked: nobody can take the lock of a file that is about to go.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

pub enum TryLock {
    Acquired(LockGuard),
    HeldBy(LockOwner),
}

/// Whether `file` is still the file at `path` (it was not removed or replaced after opening).
#[cfg(unix)]
fn is_file_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn is_file_at(_file: &File, path: &Path) -> bool {
    path.exists()
}

/// Tries once to take the lock at `path`.
pub fn try_lock(path: &Path) -> std::io::Result<TryLock> {
    // A few rounds only when the previous holder removed the file between our open and lock.
    for _ in 0..16 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => {
                if !is_file_at(&file, path) {
                    let _ = file.unlock();
                    continue;
                }
                let mut guard = LockGuard {
                    path: path.to_path_buf(),
                    file,
                };
                let owner = serde_json::to_string(&LockOwner::current()).unwrap_or_default();
                guard.file.set_len(0)?;
                guard.file.write_all(owner.as_bytes())?;
                guard.file.sync_all()?;
                return Ok(TryLock::Acquired(guard));
            }
            Err(TryLockError::WouldBlock) => {
                return Ok(TryLock::HeldBy(
                    read_owner(path).unwrap_or_else(LockOwner::unknown),
                ))
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "{}: the lock file kept being replaced while taking it",
        path.display()
    )))
}

/// Waits until the lock is free, then takes it.
pub fn lock_blocking(path: &Path, on_wait: impl Fn(&LockOwner)) -> std::io::Result<LockGuard> {
    let mut told = false;
    loop {
        match try_lock(path)? {
            TryLock::Acquired(g) => return Ok(g),
            TryLock::HeldBy(owner) => {
                if !told {
                    on_wait(&owner);
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

pub fn read_owner(path: &Path) -> Option<LockOwner> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
}

/// Whether a live process holds the lock at `path` (a file left by a killed one is not held).
pub fn is_held(path: &Path) -> bool {
    let Ok(file) = OpenOptions::new().read(true).write(true).open(path) else {
        return false;
    };
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(TryLockError::WouldBlock) => true,
        // Cannot tell: treat as held, so nothing is deleted under a live run.
        Err(TryLockError::Error(_)) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn second_lock_waits_and_a_killed_owners_file_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.lock");
        let g = match try_lock(&p).unwrap() {
            TryLock::Acquired(g) => g,
            TryLock::HeldBy(_) => panic!("fresh lock is free"),
        };
        assert!(is_held(&p));
        assert!(matches!(try_lock(&p).unwrap(), TryLock::HeldBy(o) if o.pid == std::process::id()));
        // However old its file, a held lock stays held (a paused process keeps it).
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        assert!(matches!(try_lock(&p).unwrap(), TryLock::HeldBy(_)));
        drop(g);
        assert!(!p.exists());
        assert!(!is_held(&p));
        // The file a process killed with -9 left behind: nobody holds its kernel lock.
        let dead = LockOwner {
            host: crate::pipeline::host::host_name(),
            pid: u32::MAX - 1,
            started_at: String::new(),
        };
        std::fs::write(&p, serde_json::to_string(&dead).unwrap()).unwrap();
        assert!(!is_held(&p));
        assert!(matches!(try_lock(&p).unwrap(), TryLock::Acquired(_)));
    }

    #[test]
    fn contenders_never_hold_the_lock_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(dir.path().join("c.lock"));
        let inside = Arc::new(AtomicBool::new(false));
        let entries = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (p, inside, entries) = (p.clone(), inside.clone(), entries.clone());
                std::thread::spawn(move || {
                    for _ in 0..40 {
                        let guard = loop {
                            match try_lock(&p).unwrap() {
                                TryLock::Acquired(g) => break g,
                                TryLock::HeldBy(_) => std::thread::yield_now(),
                            }
                        };
                        assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                        entries.fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.store(false, Ordering::SeqCst);
                        drop(guard);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(entries.load(Ordering::SeqCst), 240);
        assert!(!p.exists());
    }
}
