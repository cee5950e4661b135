//! Unit tests: resources syntax and merging, planning into arrays, dependency strings, script
//! text, and parsing of outputs captured from Slurm 22.05 (tests/fixtures/cluster/).

mod fake_slurm;
mod slurm;

use std::path::PathBuf;

use crate::cluster::parse::{
    key_values, parse_config, parse_key_value_jobs, parse_sacct, parse_sbatch_parsable,
    parse_squeue, ExitInfo, JobRef, Record, TaskSet,
};
use crate::cluster::plan::{dependency_arg, plan};
use crate::cluster::script::{render, shell_quote};
use crate::cluster::status::summarize;
use crate::cluster::submit::fit_resources;
use crate::cluster::{ClusterInfo, Error, GpuPolicy, JobSpec, JobState, Resources};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/cluster/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub(crate) fn job(key: &str, name: &str, argv: &[&str], deps: &[&str]) -> JobSpec {
    JobSpec {
        key: key.into(),
        name: name.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        workdir: PathBuf::from("/work dir"),
        env: vec![("RUNNER_HOME".into(), "/opt/runner".into())],
        resources: Resources {
            cpus: Some(1),
            mem: Some("100M".into()),
            ..Default::default()
        },
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        log_dir: PathBuf::from("/logs"),
    }
}

// ---------------------------------------------------------------- resources

#[test]
fn a_data_parallel_job_runs_a_rank_per_gpu_on_every_node_through_srun() {
    let mut j = job("sft@abc", "sft", &["/bin/runner", "run", "r.toml"], &[]);
    j.resources.gpus = Some(4);
    j.resources.nodes = Some(2);
    crate::cluster::spread_ranks(&mut j);
    assert_eq!(
        j.resources.sbatch_args(),
        [
            "--cpus-per-task=1",
            "--mem=100M",
            "--nodes=2",
            "--ntasks-per-node=4",
            "--gpus-per-node=4"
        ]
    );
    assert_eq!(j.argv[..3], ["srun", "--kill-on-bad-exit=1", "/bin/runner"]);
    let port: u32 = j
        .env
        .iter()
        .find(|(k, _)| k == "MASTER_PORT")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!((20000..40000).contains(&port));
    assert!(j.env.contains(&("NCCL_NVLS_ENABLE".into(), "0".into())));
    let script = crate::cluster::script::render(&[&j], "sbatch ...").unwrap();
    assert!(
        script.contains("exec srun --kill-on-bad-exit=1 /bin/runner run r.toml"),
        "{script}"
    );
    // One GPU on one node stays a plain job.
    let mut one = job("sft@abd", "sft", &["/bin/runner"], &[]);
    one.resources.gpus = Some(1);
    let before = one.clone();
    crate::cluster::spread_ranks(&mut one);
    assert_eq!(one, before);
    assert_eq!(one.resources.sbatch_args()[2], "--gpus=1");
    // nodes = 0 is refused by name.
    let zero = Resources {
        nodes: Some(0),
        ..Default::default()
    };
    assert!(zero.validate().unwrap_err().to_string().contains("nodes"));
}

#[test]
fn resources_parse_from_recipe_toml_and_reject_unknown_keys() {
    #[derive(serde::Deserialize)]
    struct Stage {
        resources: Resources,
    }
    let stage: Stage = toml::from_str(
        "[resources]\ngpus = 1\ncpus = 8\nmem = \"64G\"\ntime = \"4:00:00\"\npartition = \"gpu\"\nextra = [\"--qos=normal\"]\n",
    )
    .unwrap();
    assert_eq!(
        stage.resources,
        Resources {
            gpus: Some(1),
            cpus: Some(8),
            mem: Some("64G".into()),
            time: Some("4:00:00".into()),
            partition: Some("gpu".into()),
            extra: vec!["--qos=normal".into()],
            ..Default::default()
        }
    );
    let err = toml::from_str::<Stage>("[resources]\ngpu = 1\n")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("unknown field `gpu`"), "{err}");
}

#[test]
fn recipe_values_override_kind_defaults() {
    let sft = Resources::default_for_kind("sft");
    assert_eq!(
        (sft.gpus, sft.cpus, sft.mem.as_deref(), sft.time.as_deref()),
        (Some(1), Some(8), Some("64G"), Some("4:00:00"))
    );
    assert_eq!(Resources::default_for_kind("evaluate").gpus, Some(1));
    assert_eq!(Resources::default_for_kind("tokenize").gpus, Some(0));
    let recipe = Resources {
        mem: Some("16G".into()),
        extra: vec!["--qos=high".into()],
        ..Default::default()
    };
    let merged = Resources::for_stage("sft", Some(&recipe)).unwrap();
    assert_eq!(merged.mem.as_deref(), Some("16G"));
    assert_eq!(merged.cpus, Some(8));
    assert_eq!(merged.extra, vec!["--qos=high".to_string()]);
    assert_eq!(
        merged.sbatch_args(),
        [
            "--cpus-per-task=8",
            "--mem=16G",
            "--time=4:00:00",
            "--gpus=1",
            "--qos=high"
        ]
        .map(String::from)
    );
}

#[test]
fn mem_and_time_syntax() {
    let r = |mem: &str, time: &str| Resources {
        mem: Some(mem.into()),
        time: Some(time.into()),
        ..Default::default()
    };
    assert_eq!(r("64G", "1").mem_mb().unwrap(), Some(65536));
    assert_eq!(r("512", "1").mem_mb().unwrap(), Some(512));
    assert_eq!(r("2048k", "1").mem_mb().unwrap(), Some(2));
    assert_eq!(r("1T", "1").mem_mb().unwrap(), Some(1 << 20));
    assert_eq!(
        r("1G", "4:00:00").time_seconds().unwrap(),
        Some(Some(4 * 3600))
    );
    assert_eq!(r("1G", "30").time_seconds().unwrap(), Some(Some(1800)));
    assert_eq!(r("1G", "10:30").time_seconds().unwrap(), Some(Some(630)));
    assert_eq!(
        r("1G", "1-12").time_seconds().unwrap(),
        Some(Some(36 * 3600))
    );
    assert_eq!(
        r("1G", "2-0:30:05").time_seconds().unwrap(),
        Some(Some(2 * 86400 + 1805))
    );
    assert_eq!(r("1G", "UNLIMITED").time_seconds().unwrap(), Some(None));
    for bad in ["64GB", "G", "-1G", "1.5G", "0"] {
        let err = r(bad, "1").validate().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "resources.mem = {bad:?} is invalid: expected a whole number"
            )),
            "{err}"
        );
    }
    for bad in ["4h", "1:2:3:4", "1-", "::", "0", "1-2:3:4:5"] {
        let err = r("1G", bad).validate().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "resources.time = {bad:?} is invalid: expected minutes"
            )),
            "{err}"
        );
    }
}

#[test]
fn extra_options_that_runner_owns_are_refused() {
    for bad in [
        "--array=0-3",
        "-d",
        "--output=x.log",
        "-ox.log",
        "--parsable",
        "qos=normal",
    ] {
        let r = Resources {
            extra: vec![bad.into()],
            ..Default::default()
        };
        assert!(
            matches!(
                r.validate(),
                Err(Error::InvalidResource { key: "extra", .. })
            ),
            "{bad}"
        );
    }
    let ok = Resources {
        extra: vec!["--qos=normal".into(), "--exclusive".into(), "-A".into()],
        ..Default::default()
    };
    ok.validate().unwrap();
}

// ---------------------------------------------------------------- planning

#[test]
fn sweep_points_fold_into_one_array_after_a_shared_upstream() {
    let jobs = vec![
        job(
            "tokenize@a",
            "tokenize",
            &["runner", "run", "r.toml", "--only", "tokenize"],
            &[],
        ),
        job(
            "sft@1",
            "sft",
            &["runner", "--set", "lr=1e-4"],
            &["tokenize@a"],
        ),
        job(
            "sft@2",
            "sft",
            &["runner", "--set", "lr=2e-4"],
            &["tokenize@a"],
        ),
        job("eval@1", "evaluate", &["runner", "eval", "1"], &["sft@1"]),
        job("eval@2", "evaluate", &["runner", "eval", "2"], &["sft@2"]),
    ];
    let groups = plan(&jobs, true).unwrap();
    let members: Vec<Vec<usize>> = groups.iter().map(|g| g.members.clone()).collect();
    assert_eq!(members, vec![vec![0], vec![1, 2], vec![3, 4]]);
    assert_eq!(
        groups[1].upstream.iter().copied().collect::<Vec<_>>(),
        vec![0]
    );
    // Both evaluations wait for the whole sft array, so they share one array too.
    assert_eq!(
        groups[2].upstream.iter().copied().collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(dependency_arg(&groups[0], &[]), None);
    assert_eq!(
        dependency_arg(&groups[2], &[100, 101]).as_deref(),
        Some("afterok:101")
    );

    let singles = plan(&jobs, false).unwrap();
    assert_eq!(singles.len(), 5);
    assert_eq!(
        dependency_arg(&singles[4], &[10, 11, 12, 13]).as_deref(),
        Some("afterok:12")
    );
}

#[test]
fn jobs_that_differ_stay_apart_and_order_follows_dependencies() {
    let mut big = job("sft@2", "sft", &["b"], &[]);
    big.resources.cpus = Some(4);
    let jobs = vec![
        job("eval", "evaluate", &["e"], &["sft@1", "sft@2", "9001_3"]),
        job("sft@1", "sft", &["a"], &[]),
        big,
    ];
    let groups = plan(&jobs, true).unwrap();
    let members: Vec<Vec<usize>> = groups.iter().map(|g| g.members.clone()).collect();
    assert_eq!(members, vec![vec![1], vec![2], vec![0]]);
    assert_eq!(
        dependency_arg(&groups[2], &[77, 5]).as_deref(),
        Some("afterok:5:77:9001_3")
    );
}

#[test]
fn bad_dependencies_are_named() {
    let cyc = plan(
        &[
            job("a", "x", &["a"], &["b"]),
            job("b", "y", &["b"], &["a"]),
            job("c", "z", &["c"], &[]),
        ],
        true,
    );
    assert_eq!(
        cyc.unwrap_err().to_string(),
        "dependency cycle among jobs [\"a\", \"b\"]"
    );
    let unknown = plan(&[job("a", "x", &["a"], &["tokenize@zz"])], true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        unknown,
        "job \"a\" depends on \"tokenize@zz\", which is neither a job key of this submission nor a Slurm job id (123 or 123_4)"
    );
    let dup = plan(
        &[job("a", "x", &["a"], &[]), job("a", "x", &["b"], &[])],
        true,
    )
    .unwrap_err();
    assert!(matches!(dup, Error::DuplicateKey { key } if key == "a"));
}

// ---------------------------------------------------------------- scripts

#[test]
fn single_and_array_scripts() {
    let a = job(
        "sft@1",
        "sft",
        &["/opt/runner", "run", "my recipe.toml", "--set", "note=it's"],
        &[],
    );
    let script = render(&[&a], "sbatch --parsable x.sbatch").unwrap();
    assert_eq!(
        script,
        "#!/bin/bash\n# Written by runner; submitted with:\n#   sbatch --parsable x.sbatch\n# job -: sft@1\nset -eu\n\
         cd '/work dir'\nexport RUNNER_HOME=/opt/runner\nexec /opt/runner run 'my recipe.toml' --set 'note=it'\\''s'\n"
    );
    let b = job("sft@2", "sft", &["/opt/runner", "--set", "lr=2e-4"], &[]);
    let script = render(&[&a, &b], "sbatch y").unwrap();
    assert!(script.contains(
        "case \"${SLURM_ARRAY_TASK_ID:-}\" in\n  0) exec /opt/runner run 'my recipe.toml' --set 'note=it'\\''s' ;;\n  \
         1) exec /opt/runner --set lr=2e-4 ;;\n  *) echo"
    ));
    assert!(script.contains("# job 0: sft@1\n# job 1: sft@2\n"));
    let mut c = b.clone();
    c.env = vec![("LR".into(), "3e-4".into())];
    let script = render(&[&b, &c], "sbatch z").unwrap();
    assert!(!script.contains("\nexport"));
    assert!(script.contains("  0) export RUNNER_HOME=/opt/runner; exec /opt/runner --set lr=2e-4 ;;\n  1) export LR=3e-4; exec"));
    assert_eq!(shell_quote(""), "''");
    assert_eq!(shell_quote("$HOME"), "'$HOME'");

    let mut bad = job("k", "n", &[], &[]);
    assert_eq!(
        render(&[&bad], "").unwrap_err().to_string(),
        "job \"k\": argv is empty: a job needs a command to run"
    );
    bad.argv = vec!["true".into()];
    bad.env = vec![("NOT-A-NAME".into(), "1".into())];
    assert!(render(&[&bad], "")
        .unwrap_err()
        .to_string()
        .contains("\"NOT-A-NAME\" is not a shell identifier"));
}

#[test]
fn a_newline_in_a_job_key_or_the_submit_line_stays_inside_its_comment() {
    let a = job("x\ntouch /tmp/p #@1", "x", &["/opt/runner", "run"], &[]);
    let script = render(&[&a], "sbatch\rrm -rf ~").unwrap();
    assert!(
        script.contains("# job -: x\\ntouch /tmp/p #@1\n"),
        "{script}"
    );
    assert!(script.contains("#   sbatch\\rrm -rf ~\n"), "{script}");
    for line in script.lines() {
        assert!(
            line.starts_with('#')
                || ["set -eu", "cd ", "export ", "exec "]
                    .iter()
                    .any(|p| line.starts_with(p)),
            "unexpected command line {line:?} in\n{script}"
        );
    }
}

// ---------------------------------------------------------------- parsing

#[test]
fn job_refs_and_task_sets() {
    assert_eq!(
        JobRef::parse("123").unwrap(),
        JobRef {
            job: 123,
            task: None
        }
    );
    assert_eq!(JobRef::parse("123_4").unwrap().to_string(), "123_4");
    for bad in ["", "12a", "123_", "_1", "123_[1-3]", "1_2_3"] {
        assert!(
            matches!(JobRef::parse(bad), Err(Error::InvalidJobId { .. })),
            "{bad}"
        );
    }
    let set = TaskSet::parse("[1-3,5%2]").unwrap();
    assert_eq!(set, TaskSet(vec![(1, 3), (5, 5)]));
    assert!(set.contains(2) && set.contains(5) && !set.contains(4) && !set.contains(0));
    assert_eq!(TaskSet::parse("7").unwrap().single(), Some(7));
    assert_eq!(TaskSet::parse("x"), None);
    assert_eq!(
        ExitInfo::from_wait_status(512),
        ExitInfo { code: 2, signal: 0 }
    );
    assert_eq!(
        ExitInfo::from_wait_status(15),
        ExitInfo {
            code: 0,
            signal: 15
        }
    );
    assert_eq!(parse_sbatch_parsable("42\n").unwrap(), 42);
    assert_eq!(
        parse_sbatch_parsable("sbatch: warning: x\n43;cluster1\n").unwrap(),
        43
    );
    assert!(parse_sbatch_parsable("Submitted batch job 5").is_err());
}

fn status_of(records: &[Record], id: &str) -> crate::cluster::JobStatus {
    let r = JobRef::parse(id).unwrap();
    let matching: Vec<&Record> = records.iter().filter(|rec| rec.matches(&r)).collect();
    summarize(&r, &matching)
}

#[test]
fn squeue_records_of_finished_jobs() {
    let records = parse_squeue(&fixture("squeue_all.txt")).unwrap();
    assert_eq!(records.len(), 10);
    let done = status_of(&records, "1");
    assert_eq!(
        (done.state, done.log_path),
        (
            JobState::Done,
            Some(PathBuf::from("/cluster/home/slt/a-1.log"))
        )
    );
    let failed = status_of(&records, "2_1");
    assert_eq!(
        failed.state,
        JobState::Failed {
            exit_code: Some(1),
            reason: Some("NonZeroExitCode".into())
        }
    );
    assert_eq!(
        failed.log_path,
        Some(PathBuf::from("/cluster/home/slt/b-2_1.log"))
    );
    let cancelled = status_of(&records, "3");
    assert_eq!(
        cancelled.state,
        JobState::Cancelled {
            reason: Some("DependencyNeverSatisfied".into())
        }
    );
    assert_eq!(
        cancelled.log_path,
        Some(PathBuf::from("/cluster/home/slt/slurm-3.out"))
    );
    // The whole array: one task completed, two failed.
    let array = status_of(&records, "2");
    assert_eq!(
        array.state,
        JobState::Failed {
            exit_code: Some(1),
            reason: Some("NonZeroExitCode".into())
        }
    );
    assert_eq!(array.slurm_state.as_deref(), Some("COMPLETED,FAILED"));
    // Killed by scancel while running: SIGTERM, no exit code; the path keeps its space.
    let killed = status_of(&records, "7");
    assert_eq!(killed.state, JobState::Cancelled { reason: None });
    assert_eq!(
        killed.log_path,
        Some(PathBuf::from("/cluster/home/slt/x y-7.log"))
    );
    assert_eq!(
        status_of(&records, "8_0").log_path,
        Some(PathBuf::from("/cluster/home/slt/y-8_0.log"))
    );
    assert_eq!(status_of(&records, "99").state, JobState::Unknown);
}

#[test]
fn squeue_records_of_live_jobs_with_bracketed_tasks() {
    let records = parse_squeue(&fixture("squeue_live_unexpanded.txt")).unwrap();
    assert_eq!(status_of(&records, "10").state, JobState::Running);
    assert_eq!(status_of(&records, "11_0").state, JobState::Running);
    let throttled = status_of(&records, "11_3");
    assert_eq!(
        (throttled.state, throttled.reason.as_deref()),
        (JobState::Pending, Some("JobArrayTaskLimit"))
    );
    assert_eq!(
        throttled.log_path,
        Some(PathBuf::from("/cluster/home/slt/y-11_3.log"))
    );
    assert_eq!(status_of(&records, "11").state, JobState::Running);
    let waiting = status_of(&records, "12");
    assert_eq!(
        (waiting.state, waiting.reason.as_deref()),
        (JobState::Pending, Some("Dependency"))
    );
    let err = parse_squeue("12|x|12|N/A|PENDING|None|0|/x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("a numeric JobID in field 2"), "{err}");
}

#[test]
fn scontrol_records() {
    let records =
        parse_key_value_jobs(&fixture("scontrol_show_job.txt"), "scontrol show job").unwrap();
    assert_eq!(records.len(), 7);
    let dep = status_of(&records, "3");
    assert_eq!(
        dep.state,
        JobState::Cancelled {
            reason: Some("DependencyNeverSatisfied".into())
        }
    );
    assert_eq!(
        dep.log_path,
        Some(PathBuf::from("/cluster/home/slt/slurm-3.out"))
    );
    let task = status_of(&records[1..2], "2_1");
    assert_eq!(
        task.state,
        JobState::Failed {
            exit_code: Some(1),
            reason: Some("NonZeroExitCode".into())
        }
    );
    assert_eq!(
        task.log_path,
        Some(PathBuf::from("/cluster/home/slt/b-2_1.log"))
    );
    // The pending remainder of a throttled array: "ArrayTaskId=1-3%1".
    assert!(records[5].matches(&JobRef::parse("8_2").unwrap()));
    let kv = key_values("JobId=1 WorkDir=/a b/c StdOut=/a b/c/x.log Power= ");
    assert_eq!(kv["WorkDir"], "/a b/c");
    assert_eq!(kv["StdOut"], "/a b/c/x.log");
    assert_eq!(kv["Power"], "");
}

#[test]
fn jobcomp_records() {
    let records = parse_key_value_jobs(&fixture("jobcomp_filetxt.log"), "jobcomp/filetxt").unwrap();
    assert_eq!(records.len(), 9);
    assert_eq!(status_of(&records, "1").state, JobState::Done);
    assert_eq!(
        status_of(&records, "2_2").state,
        JobState::Failed {
            exit_code: Some(2),
            reason: None
        }
    );
    assert_eq!(
        status_of(&records, "3").state,
        JobState::Cancelled { reason: None }
    );
    assert_eq!(status_of(&records, "2_2").log_path, None);
}

#[test]
fn sacct_and_config_and_sinfo() {
    // sacct -n -P -X -o JobID,JobIDRaw,State,ExitCode (format per sacct(1); no slurmdbd here).
    let records =
        parse_sacct("41|41|COMPLETED|0:0\n42_0|43|FAILED|3:0\n42_[1-2]|42|CANCELLED by 0|0:0\n44|44|TIMEOUT|0:15\n").unwrap();
    assert_eq!(
        status_of(&records, "42_0").state,
        JobState::Failed {
            exit_code: Some(3),
            reason: None
        }
    );
    assert_eq!(
        status_of(&records, "42_2").state,
        JobState::Cancelled { reason: None }
    );
    assert_eq!(
        status_of(&records, "44").state,
        JobState::Failed {
            exit_code: None,
            reason: Some("TIMEOUT (signal 15)".into())
        }
    );

    let config = parse_config(&fixture("scontrol_show_config.txt"));
    assert_eq!(config["JobCompType"], "jobcomp/filetxt");
    assert_eq!(config["JobCompLoc"], "/var/log/slurm/jobcomp.log");

    let local = ClusterInfo::parse(&fixture("sinfo_local.txt")).unwrap();
    assert_eq!(local.partitions.len(), 2);
    assert!(
        local.partitions[0].default
            && local.partitions[0].name == "cpu"
            && local.partitions[0].gres.is_empty()
    );
    assert_eq!(
        (local.partitions[1].cpus, local.partitions[1].mem_mb),
        (2, 24105)
    );
}

#[test]
fn resources_fit_the_cluster() {
    let local = ClusterInfo::parse(&fixture("sinfo_local.txt")).unwrap();
    let sft = Resources {
        partition: Some("gpu".into()),
        ..Resources::default_for_kind("sft")
    };
    let (fitted, warnings) = fit_resources("sft@1", &sft, &local, GpuPolicy::Auto, true).unwrap();
    assert_eq!(
        (fitted.gpus, fitted.cpus, fitted.mem.as_deref()),
        (Some(0), Some(2), Some("24105M"))
    );
    assert_eq!(
        warnings[0],
        "sft@1: dropped --gpus=1: no node of partition gpu has GPU gres"
    );
    assert!(warnings[1].starts_with("sft@1: cpus 8 -> 2"));
    assert!(warnings[2].starts_with("sft@1: mem 64G -> 24105M"));
    let err = fit_resources("sft@1", &sft, &local, GpuPolicy::Error, false)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "job \"sft@1\" asks for 1 GPU(s) but no node of partition gpu has GPU gres (gpu policy: error)");
    let (kept, warnings) = fit_resources("sft@1", &sft, &local, GpuPolicy::Keep, false).unwrap();
    assert_eq!((kept, warnings.len()), (sft.clone(), 0));

    // A GPU cluster (sinfo format, hand-written): GPUs stay, nothing is capped.
    let gpu_cluster =
        ClusterInfo::parse("cpu*|64|256000|(null)\ngpu|96|1000000|gpu:a100:8(S:0-1),shard:8\n")
            .unwrap();
    assert_eq!(
        gpu_cluster.partitions[1].gres,
        vec!["gpu:a100:8(S:0-1)".to_string(), "shard:8".to_string()]
    );
    let (fitted, warnings) =
        fit_resources("sft@1", &sft, &gpu_cluster, GpuPolicy::Error, true).unwrap();
    assert_eq!((fitted, warnings.len()), (sft.clone(), 0));
    // Without a partition, the default one (no GPUs) decides.
    let no_partition = Resources {
        partition: None,
        ..sft
    };
    let (fitted, _) =
        fit_resources("sft@1", &no_partition, &gpu_cluster, GpuPolicy::Auto, true).unwrap();
    assert_eq!(fitted.gpus, Some(0));
}

#[test]
fn a_failed_job_is_described_by_its_exit_code_and_reason() {
    use crate::cluster::JobState;
    let oom = JobState::Failed {
        exit_code: Some(137),
        reason: Some("OUT_OF_MEMORY".into()),
    };
    assert_eq!(
        oom.failure_detail().as_deref(),
        Some("exit 137, OUT_OF_MEMORY")
    );
    let signalled = JobState::Failed {
        exit_code: None,
        reason: None,
    };
    assert_eq!(signalled.failure_detail().as_deref(), Some("exit -"));
    assert_eq!(JobState::Done.failure_detail(), None);
}
