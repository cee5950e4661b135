//! A group of ranks that are threads of one process: sums through shared memory.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::dist::{timeout, Collective, DistError, World};

/// One member of a group of threads; [`LocalGroup::new`] makes all of them.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    round: Mutex<Round>,
    done: Condvar,
}

/// The collective operation in progress: each rank's values as it arrives, then the sum.
#[derive(Default)]
struct Round {
    /// Completed operations; a waiting rank watches it change.
    generation: u64,
    arrived: Vec<Option<Vec<f32>>>,
    /// The last completed operation's sum, or why it failed.
    result: Option<Result<Arc<Vec<f32>>, String>>,
}

impl LocalGroup {
    /// The `size` members of a new group, rank 0 first.
    pub fn new(size: usize) -> Vec<Arc<LocalGroup>> {
        let shared = Arc::new(Shared {
            size,
            round: Mutex::new(Round {
                arrived: vec![None; size],
                ..Round::default()
            }),
            done: Condvar::new(),
        });
        (0..size)
            .map(|rank| {
                Arc::new(LocalGroup {
                    rank,
                    shared: shared.clone(),
                })
            })
            .collect()
    }
}

impl Collective for LocalGroup {
    fn world(&self) -> World {
        World {
            rank: self.rank,
            size: self.shared.size,
            local_rank: self.rank,
        }
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), DistError> {
        let shared = &self.shared;
        let mut round = shared.round.lock().unwrap_or_else(|e| e.into_inner());
        let generation = round.generation;
        round.arrived[self.rank] = Some(values.to_vec());
        if round.arrived.iter().all(Option::is_some) {
            let parts: Vec<Vec<f32>> = round.arrived.iter_mut().filter_map(Option::take).collect();
            round.result = Some(if parts.iter().any(|p| p.len() != values.len()) {
                let lengths: Vec<usize> = parts.iter().map(Vec::len).collect();
                Err(format!(
                    "the ranks summed buffers of different lengths {lengths:?}"
                ))
            } else {
                let mut sum = parts[0].clone();
                for part in &parts[1..] {
                    for (s, v) in sum.iter_mut().zip(part) {
                        *s += v;
                    }
                }
                Ok(Arc::new(sum))
            });
            round.generation += 1;
            shared.done.notify_all();
        } else {
            let limit = timeout();
            let started = Instant::now();
            while round.generation == generation {
                let left = limit.saturating_sub(started.elapsed());
                if left.is_zero() {
                    round.arrived[self.rank] = None;
                    return Err(DistError::Timeout {
                        rank: self.rank,
                        world: shared.size,
                        waited_s: limit.as_secs(),
                    });
                }
                round = shared
                    .done
                    .wait_timeout(round, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        // The next operation cannot complete before this rank arrives at it, so `result` is
        // still this one's.
        match round.result.as_ref().expect("a completed operation") {
            Ok(sum) => {
                values.copy_from_slice(sum);
                Ok(())
            }
            Err(message) => Err(DistError::Failed {
                rank: self.rank,
                message: message.clone(),
            }),
        }
    }
}
