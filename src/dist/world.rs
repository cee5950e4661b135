//! A rank's place in its group, as launchers describe it in the environment.

use crate::dist::DistError;

/// A rank, the group's size and the rank's index on its node (which GPU it takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
}

impl World {
    /// The single-process group.
    pub const SOLO: World = World {
        rank: 0,
        size: 1,
        local_rank: 0,
    };

    /// This process's place, from the first launcher convention present: runner's own
    /// (`RUNNER_RANK`, `RUNNER_WORLD_SIZE`, `RUNNER_LOCAL_RANK`), torchrun's (`RANK`,
    /// `WORLD_SIZE`, `LOCAL_RANK`) or Slurm's under srun (`SLURM_PROCID`, `SLURM_NTASKS`,
    /// `SLURM_LOCALID`). `None` when none is set.
    pub fn from_env() -> Result<Option<World>, DistError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`World::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<World>, DistError> {
        const CONVENTIONS: [[&str; 3]; 3] = [
            ["RUNNER_RANK", "RUNNER_WORLD_SIZE", "RUNNER_LOCAL_RANK"],
            ["RANK", "WORLD_SIZE", "LOCAL_RANK"],
            ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"],
        ];
        for [rank, size, local] in CONVENTIONS {
            let (Some(r), Some(s)) = (var(rank), var(size)) else {
                continue;
            };
            let number = |name: &'static str, value: String| {
                value.trim().parse::<usize>().map_err(|_| DistError::Env {
                    var: name,
                    value,
                    expected: "a whole number".into(),
                })
            };
            let world = World {
                rank: number(rank, r)?,
                size: number(size, s.clone())?,
                local_rank: match var(local) {
                    Some(l) => number(local, l)?,
                    None => 0,
                },
            };
            if world.size == 0 {
                return Err(DistError::Env {
                    var: size,
                    value: s,
                    expected: "at least 1 rank".into(),
                });
            }
            if world.rank >= world.size {
                return Err(DistError::Env {
                    var: rank,
                    value: world.rank.to_string(),
                    expected: format!("a rank below {size}={}", world.size),
                });
            }
            return Ok(Some(world));
        }
        Ok(None)
    }
}

/// The first host of a Slurm host list (`SLURM_JOB_NODELIST`: `gpu[07-09,12],cpu1` names gpu07,
/// gpu08, gpu09, gpu12 and cpu1), where rank 0 runs and the others find it (`MASTER_ADDR`).
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if !list[end..].starts_with('[') {
        return (!prefix.is_empty()).then(|| prefix.to_string());
    }
    let inner = &list[end + 1..];
    let first = inner.split([',', '-', ']']).next()?;
    (!first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{prefix}{first}"))
}
