//! Submission planning: resolves each job's dependencies (job keys of the same submission or
//! already-queued Slurm ids), orders jobs topologically, and folds alike jobs (same name,
//! resources, workdir, log folder and upstream jobs) into one job array whose index picks
//! the argv. A dependant of an array waits for the whole array (`afterok:<array id>`).

use std::collections::{BTreeSet, HashMap};

use crate::cluster::parse::JobRef;
use crate::cluster::{Error, JobSpec, Result};

/// One sbatch submission: a single job, or an array over several alike jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Indices into the submitted jobs; position in this list = array index.
    pub members: Vec<usize>,
    /// Groups (indices into the plan) this group waits for.
    pub upstream: BTreeSet<usize>,
    /// Already-queued Slurm jobs this group waits for.
    pub external: BTreeSet<JobRef>,
}

enum Dep {
    Job(usize),
    External(JobRef),
}

/// Orders `jobs` and groups them; `arrays = false` keeps every job its own submission.
pub fn plan(jobs: &[JobSpec], arrays: bool) -> Result<Vec<Group>> {
    let mut index_of: HashMap<&str, usize> = HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        if index_of.insert(job.key.as_str(), i).is_some() {
            return Err(Error::DuplicateKey {
                key: job.key.clone(),
            });
        }
    }
    let deps: Vec<Vec<Dep>> = jobs
        .iter()
        .map(|job| {
            job.depends_on
                .iter()
                .map(|d| match (index_of.get(d.as_str()), JobRef::parse(d)) {
                    (Some(&i), _) => Ok(Dep::Job(i)),
                    (None, Ok(id)) => Ok(Dep::External(id)),
                    (None, Err(_)) => Err(Error::UnknownDependency {
                        key: job.key.clone(),
                        dependency: d.clone(),
                    }),
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;

    let order = topological_order(jobs, &deps)?;

    let mut groups: Vec<Group> = Vec::new();
    let mut group_of = vec![usize::MAX; jobs.len()];
    for i in order {
        let mut upstream = BTreeSet::new();
        let mut external = BTreeSet::new();
        for d in &deps[i] {
            match d {
                Dep::Job(j) => {
                    upstream.insert(group_of[*j]);
                }
                Dep::External(id) => {
                    external.insert(*id);
                }
            }
        }
        // Every member of a group has the same upstream groups, all created before the group,
        // so joining one never creates a cycle among groups.
        let joinable = arrays
            .then(|| {
                groups.iter().position(|g| {
                    g.upstream == upstream
                        && g.external == external
                        && alike(&jobs[g.members[0]], &jobs[i])
                })
            })
            .flatten();
        match joinable {
            Some(g) => {
                groups[g].members.push(i);
                group_of[i] = g;
            }
            None => {
                group_of[i] = groups.len();
                groups.push(Group {
                    members: vec![i],
                    upstream,
                    external,
                });
            }
        }
    }
    Ok(groups)
}

/// Jobs that may share one array script: everything but the argv and env agrees (the script
/// sets each member's env in its own branch).
fn alike(a: &JobSpec, b: &JobSpec) -> bool {
    a.name == b.name
        && a.resources == b.resources
        && a.workdir == b.workdir
        && a.log_dir == b.log_dir
}

/// Kahn's algorithm, taking ready jobs in input order so plans are stable.
fn topological_order(jobs: &[JobSpec], deps: &[Vec<Dep>]) -> Result<Vec<usize>> {
    let mut waiting_on: Vec<usize> = vec![0; jobs.len()];
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); jobs.len()];
    for (i, ds) in deps.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for d in ds {
            if let Dep::Job(j) = d {
                if seen.insert(*j) {
                    waiting_on[i] += 1;
                    dependants[*j].push(i);
                }
            }
        }
    }
    let mut ready: BTreeSet<usize> = (0..jobs.len()).filter(|&i| waiting_on[i] == 0).collect();
    let mut order = Vec::with_capacity(jobs.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &dependants[i] {
            waiting_on[d] -= 1;
            if waiting_on[d] == 0 {
                ready.insert(d);
            }
        }
    }
    if order.len() < jobs.len() {
        let keys = (0..jobs.len())
            .filter(|i| waiting_on[*i] > 0)
            .map(|i| jobs[i].key.clone())
            .collect();
        return Err(Error::DependencyCycle { keys });
    }
    Ok(order)
}

/// The `--dependency` value for a group, given the Slurm ids of the groups before it.
pub fn dependency_arg(group: &Group, group_ids: &[u64]) -> Option<String> {
    let ids: BTreeSet<JobRef> = group
        .upstream
        .iter()
        .map(|g| JobRef {
            job: group_ids[*g],
            task: None,
        })
        .chain(group.external.iter().copied())
        .collect();
    (!ids.is_empty()).then(|| {
        format!(
            "afterok:{}",
            ids.iter()
                .map(JobRef::to_string)
                .collect::<Vec<_>>()
                .join(":")
        )
    })
}
