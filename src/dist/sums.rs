//! The small sums the training loop and the scheduler make across ranks besides the gradients:
//! a logged window's loss, tokens and statistics, and rank 0's yes or no.

use crate::dist::{Collective, DistError};

/// This rank's loss and token count of a logged window, summed over the ranks (unchanged
/// without a group). The loss is an f32 value and stays exact; token counts above 2^24 a window
/// round to f32 in a group.
pub fn sum_logged_window(
    group: Option<&dyn Collective>,
    loss: f64,
    tokens: u64,
) -> Result<(f64, u64), DistError> {
    let Some(g) = group else {
        return Ok((loss, tokens));
    };
    let mut summed = [loss as f32, tokens as f32];
    g.all_reduce_sum(&mut summed)?;
    Ok((f64::from(summed[0]), summed[1] as u64))
}

/// Replaces each statistic's sum and unit count (`(name, sum, count)`) by their sums over the
/// ranks. The ranks must log the same statistics in the same order (an idle rank's weighted by
/// zero): a count and a hash of the names travel with the sums and are checked.
pub fn sum_statistics(
    group: &dyn Collective,
    stats: &mut [(&'static str, f64, f64)],
) -> Result<(), DistError> {
    let world = group.world();
    let mut flat: Vec<f32> = stats
        .iter()
        .flat_map(|s| [s.1 as f32, s.2 as f32])
        .collect();
    flat.extend([stats.len() as f32, names_check(stats) as f32]);
    group.all_reduce_sum(&mut flat)?;
    let (n, check) = (flat[flat.len() - 2] as usize, flat[flat.len() - 1] as usize);
    for (what, mine, sum) in [
        ("the statistics logged", stats.len(), n),
        ("the statistics' names", names_check(stats), check),
    ] {
        if sum != mine * world.size {
            return Err(DistError::Mismatch {
                rank: world.rank,
                world: world.size,
                what,
                mine,
                sum,
            });
        }
    }
    for (s, pair) in stats.iter_mut().zip(flat.chunks(2)) {
        (s.1, s.2) = (f64::from(pair[0]), f64::from(pair[1]));
    }
    Ok(())
}

/// Rank 0's `flag` on every rank (the others' is ignored): whether it builds a stage, whether it
/// committed it.
pub fn leader_says(group: &dyn Collective, flag: bool) -> Result<bool, DistError> {
    let mut said = [f32::from(u8::from(flag && group.world().rank == 0))];
    group.all_reduce_sum(&mut said)?;
    Ok(said[0] > 0.0)
}

/// A small number that differs, with high probability, between two lists of statistic names
/// (their FNV-1a hash, 16 bits so that its sum over the ranks stays exact in f32).
fn names_check(stats: &[(&'static str, f64, f64)]) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for (name, _, _) in stats {
        for b in name.bytes().chain([0]) {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }
    (h >> 16) as usize
}
