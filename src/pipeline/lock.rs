//! Artifact locks that work on a shared filesystem (NFS) as well as locally.
//!
//! A lock is a file created with O_EXCL holding its owner (host, pid); a background thread touches
//! it as a heartbeat. A lock whose owner process is gone (same host) or whose heartbeat is older
//! than [`STALE_AFTER`] (any host) is stale and is broken by renaming it away, which only one
//! contender can win.

use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub const HEARTBEAT: Duration = Duration::from_secs(5);
pub const STALE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockOwner {
    pub host: String,
    pub pid: u32,
    pub started_at: String,
}

impl LockOwner {
    pub fn current() -> Self {
        Self {
            host: crate::util::host_name(),
            pid: std::process::id(),
            started_at: chrono::Utc::now().to_rfc3339(),
        }
    }
}

/// A held lock; released (file removed) on drop.
pub struct LockGuard {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

pub enum TryLock {
    Acquired(LockGuard),
    HeldBy(LockOwner),
}

/// Tries once to take the lock at `path`, breaking it first if it is stale.
pub fn try_lock(path: &Path) -> std::io::Result<TryLock> {
    for _ in 0..3 {
        match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut file) => {
                let owner = LockOwner::current();
                file.write_all(serde_json::to_string(&owner).unwrap_or_default().as_bytes())?;
                file.sync_all()?;
                return Ok(TryLock::Acquired(start_heartbeat(path.to_path_buf())));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = read_owner(path);
                if is_stale(path, owner.as_ref()) {
                    break_lock(path);
                    continue;
                }
                return Ok(TryLock::HeldBy(owner.unwrap_or(LockOwner {
                    host: "?".into(),
                    pid: 0,
                    started_at: String::new(),
                })));
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "{}: could not take the lock after breaking a stale one",
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

/// Whether the lock file at `path` no longer protects anything.
pub fn is_stale(path: &Path, owner: Option<&LockOwner>) -> bool {
    if let Some(owner) = owner {
        if owner.host == crate::util::host_name() && !process_alive(owner.pid) {
            return true;
        }
    }
    let age = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    match (owner, age) {
        (_, Some(age)) => age > STALE_AFTER,
        // A lock file we cannot read or stat: only stale once it is old, so give it time.
        (_, None) => false,
    }
}

fn break_lock(path: &Path) {
    let aside = path.with_extension(format!("stale-{}-{}", std::process::id(), nanos()));
    if std::fs::rename(path, &aside).is_ok() {
        let _ = std::fs::remove_file(aside);
    }
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn start_heartbeat(path: PathBuf) -> LockGuard {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let beat_path = path.clone();
    let heartbeat = std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            std::thread::park_timeout(HEARTBEAT);
            if flag.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(f) = OpenOptions::new().write(true).open(&beat_path) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
    });
    LockGuard {
        path,
        stop,
        heartbeat: Some(heartbeat),
    }
}

#[cfg(target_os = "linux")]
pub fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(not(target_os = "linux"))]
pub fn process_alive(_pid: u32) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_waits_and_dead_owner_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.lock");
        let g = match try_lock(&p).unwrap() {
            TryLock::Acquired(g) => g,
            TryLock::HeldBy(_) => panic!("fresh lock is free"),
        };
        assert!(matches!(try_lock(&p).unwrap(), TryLock::HeldBy(o) if o.pid == std::process::id()));
        drop(g);
        assert!(!p.exists());
        // A lock left by a process that no longer exists (kill -9) is recovered.
        let dead = LockOwner {
            host: crate::util::host_name(),
            pid: u32::MAX - 1,
            started_at: String::new(),
        };
        std::fs::write(&p, serde_json::to_string(&dead).unwrap()).unwrap();
        assert!(matches!(try_lock(&p).unwrap(), TryLock::Acquired(_)));
    }

    #[test]
    fn foreign_host_lock_is_live_until_heartbeat_expires() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.lock");
        let other = LockOwner {
            host: "another-node".into(),
            pid: 1,
            started_at: String::new(),
        };
        std::fs::write(&p, serde_json::to_string(&other).unwrap()).unwrap();
        assert!(!is_stale(&p, Some(&other)));
        let old = SystemTime::now() - STALE_AFTER - Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(is_stale(&p, Some(&other)));
    }
}
