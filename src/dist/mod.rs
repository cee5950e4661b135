//! Data-parallel training: one process (or, in tests, one thread) per rank, each with its share
//! of every optimizer step, the trainable parameters' gradients summed across the ranks before
//! the identical update on each.
//!
//! How a step is shared ([`shard`]): its micro-batches are dealt round-robin, micro-batch `m` to
//! rank `m % world`. A micro-batch's loss is already normalised by its step's totals (see
//! `train::objective`), so the sum of the ranks' gradients is the gradient the same step has on
//! one device: the global batch is the recipe's `batch_size x gradient_accumulation_steps`
//! whatever the world size, the loss curve is the single-device one, and a checkpoint resumes
//! under any world size. A rank dealt no micro-batch (a step with fewer micro-batches than
//! ranks) runs micro-batch 0 weighted by zero, so every rank brings the same gradients and
//! statistics to the sums.
//!
//! The sums go through a [`Collective`]: [`LocalGroup`] joins threads of one process (the tests
//! run several ranks this way); [`TcpGroup`] joins processes through rank 0 over TCP; with the
//! `cuda` feature on a machine with GPUs, processes sum through NCCL (`NcclGroup`), the TCP
//! group only carrying NCCL's id (`RUNNER_DIST_BACKEND=tcp` keeps the sums on TCP). Every rank
//! sets `NCCL_NVLS_ENABLE=0` (NVLink multicast off). Rank 0 (the leader) writes metrics and
//! checkpoints and evaluates.

mod bucket;
mod local;
#[cfg(feature = "cuda")]
mod nccl;
mod shard;
mod sums;
mod tcp;
mod world;

use std::sync::Arc;

pub use bucket::{all_reduce_grads, bucket_ranges, DEFAULT_BUCKET_VALUES};
pub use local::LocalGroup;
#[cfg(feature = "cuda")]
pub use nccl::NcclGroup;
pub use shard::{step_share, MicroBatchShare};
pub use sums::{leader_says, sum_logged_window, sum_statistics};
pub use tcp::{rendezvous_from_env, TcpGroup};
pub use world::{first_host, World};

/// Why a collective operation or the set-up of a group failed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("environment variable {var}={value:?}: {expected}")]
    Env {
        var: &'static str,
        value: String,
        expected: String,
    },
    #[error(
        "rank {rank}: the ranks disagree on {what} (this rank {mine}, the sum over {world} ranks \
         {sum}); every rank must run the same recipe"
    )]
    Mismatch {
        rank: usize,
        world: usize,
        what: &'static str,
        mine: usize,
        sum: usize,
    },
    #[error(
        "rank {rank}: waited {waited_s} s for the other ranks of {world} at a collective \
         operation; a rank failed or stopped (RUNNER_DIST_TIMEOUT_S sets the wait)"
    )]
    Timeout {
        rank: usize,
        world: usize,
        waited_s: u64,
    },
    #[error("rank {rank}: a collective operation failed on another rank: {message}")]
    Failed { rank: usize, message: String },
}

/// The ranks a training process or thread belongs to, and the sums across them.
pub trait Collective: Send + Sync {
    /// This member's rank and the group's size.
    fn world(&self) -> World;

    /// Replaces `values` on every rank by their element-wise sum over the ranks; every rank
    /// holds the same bits (the thread and TCP groups add in rank order). Every rank calls it
    /// with the same length.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), DistError>;
}

thread_local! {
    static THREAD_GROUP: std::cell::RefCell<Option<Arc<dyn Collective>>> =
        const { std::cell::RefCell::new(None) };
}

/// The group of this process, once [`join_from_env`] joined one.
static PROCESS_GROUP: std::sync::OnceLock<Arc<dyn Collective>> = std::sync::OnceLock::new();

/// The group the calling thread trains in: the one [`with_group`] set, else this process's
/// (see [`join_from_env`]), else none (one rank).
pub fn group() -> Option<Arc<dyn Collective>> {
    THREAD_GROUP
        .with(|g| g.borrow().clone())
        .or_else(|| PROCESS_GROUP.get().cloned())
}

/// Joins this process's group when the environment names one of more than one rank (see
/// [`World::from_env`]), or of one rank with `RUNNER_DIST_BACKEND` set (the collective code
/// path on one GPU): over TCP through rank 0 at [`rendezvous_from_env`], summing over NCCL
/// where there are GPUs. Returns the world joined, `None` for a single process. Call once,
/// before training.
pub fn join_from_env() -> Result<Option<World>, DistError> {
    let forced = std::env::var_os("RUNNER_DIST_BACKEND").is_some();
    let Some(world) = World::from_env()?.filter(|w| w.size > 1 || forced) else {
        return Ok(None);
    };
    if let Some(g) = PROCESS_GROUP.get() {
        return Ok(Some(g.world()));
    }
    pin_gpu(world.local_rank)?;
    // NVLink multicast off in every rank's NCCL (see KINDS.md of the GPU machines).
    std::env::set_var("NCCL_NVLS_ENABLE", "0");
    let (host, port) = rendezvous_from_env()?;
    let tcp = TcpGroup::join(world, &host, port)?;
    let group: Arc<dyn Collective> = match std::env::var("RUNNER_DIST_BACKEND").as_deref() {
        Ok("tcp") => Arc::new(tcp),
        #[cfg(feature = "cuda")]
        Ok("nccl") => Arc::new(NcclGroup::join(&tcp)?),
        #[cfg(feature = "cuda")]
        Err(_) if crate::model::device::cuda_driver_present() => Arc::new(NcclGroup::join(&tcp)?),
        Err(_) => Arc::new(tcp),
        Ok(other) => {
            return Err(DistError::Env {
                var: "RUNNER_DIST_BACKEND",
                value: other.to_string(),
                expected: if cfg!(feature = "cuda") {
                    "nccl or tcp".into()
                } else {
                    "tcp (this build has no CUDA, so no NCCL)".into()
                },
            })
        }
    };
    let _ = PROCESS_GROUP.set(group);
    Ok(Some(world))
}

/// How many GPUs this process may use: the entries of `CUDA_VISIBLE_DEVICES` when set, else
/// the NVIDIA driver's GPUs (`/proc/driver/nvidia/gpus`); `None` without a driver.
pub fn visible_gpus() -> Option<usize> {
    let driver = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .ok()
        .map(|entries| entries.count());
    driver.map(|n| gpus_visible(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(), n))
}

/// [`visible_gpus`] from `CUDA_VISIBLE_DEVICES` (`visible`) and the driver's count.
fn gpus_visible(visible: Option<&str>, driver: usize) -> usize {
    match visible.map(str::trim) {
        None => driver,
        Some("") => 0,
        Some(list) => list.split(',').filter(|id| !id.trim().is_empty()).count(),
    }
}

/// Makes the local rank's GPU the only one this process sees (its device 0, which the engine
/// and the kernels address), unless the launcher already left it one.
fn pin_gpu(local_rank: usize) -> Result<(), DistError> {
    const VAR: &str = "CUDA_VISIBLE_DEVICES";
    let visible = std::env::var(VAR).ok();
    if let Some(pinned) = pinned_gpu(visible.as_deref(), local_rank)? {
        // Before any CUDA library is loaded: the process has joined no device yet.
        std::env::set_var(VAR, pinned);
    }
    Ok(())
}

/// What `CUDA_VISIBLE_DEVICES` becomes for `local_rank` when it was `visible`: the rank's entry
/// of a list, the rank's index when unset, unchanged (`None`) when it names one GPU.
fn pinned_gpu(visible: Option<&str>, local_rank: usize) -> Result<Option<String>, DistError> {
    let list = match visible.map(str::trim) {
        None | Some("") => return Ok(Some(local_rank.to_string())),
        Some(list) => list,
    };
    let ids: Vec<&str> = list.split(',').map(str::trim).collect();
    if ids.len() == 1 {
        return Ok(None);
    }
    match ids.get(local_rank) {
        Some(id) => Ok(Some(id.to_string())),
        None => Err(DistError::Env {
            var: "CUDA_VISIBLE_DEVICES",
            value: list.to_string(),
            expected: format!("a GPU for local rank {local_rank}"),
        }),
    }
}

/// The process's own group when it trains as one of several ranks (not a thread's test group).
pub fn process_group() -> Option<Arc<dyn Collective>> {
    PROCESS_GROUP.get().cloned()
}

/// Runs `f` with `member` as the calling thread's group (see [`group`]), restoring the one
/// before afterwards.
pub fn with_group<T>(member: Arc<dyn Collective>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Arc<dyn Collective>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            THREAD_GROUP.with(|g| *g.borrow_mut() = previous);
        }
    }
    let _restore = Restore(THREAD_GROUP.with(|g| g.borrow_mut().replace(member)));
    f()
}

/// Whether the calling thread writes the training's files: rank 0, or no group.
pub fn is_leader() -> bool {
    group().is_none_or(|g| g.world().rank == 0)
}

/// How long a rank waits for the others at one collective operation.
fn timeout() -> std::time::Duration {
    let secs = std::env::var("RUNNER_DIST_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1800);
    std::time::Duration::from_secs(secs)
}

#[cfg(test)]
mod tests;
