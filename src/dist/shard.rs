//! Which micro-batches of a step a rank computes.

use crate::dist::World;

/// A rank's share of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MicroBatchShare {
    /// These micro-batches, in order.
    Owned(Vec<usize>),
    /// None is this rank's: it runs micro-batch 0 weighted by zero, so that its gradients and
    /// statistics (all zero) take part in the sums like every other rank's.
    Idle,
}

impl MicroBatchShare {
    /// The micro-batches the rank runs: its own, or micro-batch 0 when idle.
    pub fn indices(&self) -> Vec<usize> {
        match self {
            MicroBatchShare::Owned(owned) => owned.clone(),
            MicroBatchShare::Idle => vec![0],
        }
    }
}

/// Micro-batch `m` of a step goes to rank `m % world.size`, so the ranks' loads differ by at most
/// one micro-batch and the leader always has the first. One rank ([`World::SOLO`]) owns them all;
/// a step without micro-batches leaves every rank owning none.
pub fn step_share(micro_batches: usize, world: World) -> MicroBatchShare {
    let owned: Vec<usize> = (world.rank..micro_batches).step_by(world.size).collect();
    if owned.is_empty() && micro_batches > 0 {
        MicroBatchShare::Idle
    } else {
        MicroBatchShare::Owned(owned)
    }
}
