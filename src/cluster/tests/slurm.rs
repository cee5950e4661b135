//! Integration tests against a real Slurm cluster: the single-node one that
//! scripts/slurm/start-local-cluster.sh starts (the tests run the script, which is idempotent).
//! Ignored by default; run with `cargo test cluster::tests::slurm -- --ignored`. When Slurm cannot be
//! installed or started they print why and return, unless RUNNER_SLURM_TESTS=1 (set by CI after
//! starting the cluster), which makes that a failure.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::cluster::{
    cancel, status, submit, JobSpec, JobState, JobStatus, Resources, SlurmCommands, SubmitOptions,
    Submitted,
};

/// Starts (or finds) the local cluster once per test run; None means skip.
fn local_cluster() -> Option<SlurmCommands> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    let outcome = STARTED.get_or_init(|| {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/slurm/start-local-cluster.sh"
        );
        let out = std::process::Command::new(script)
            .output()
            .map_err(|e| format!("cannot run {script}: {e}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            Some(0) => Ok(()),
            Some(3) | Some(4) => Err(format!(
                "{script} could not install or start Slurm:\n{stderr}"
            )),
            _ => panic!("{script} failed ({}):\n{stderr}", out.status),
        }
    });
    match outcome {
        Ok(()) => Some(SlurmCommands::from_env()),
        Err(why) if std::env::var("RUNNER_SLURM_TESTS").as_deref() == Ok("1") => {
            panic!("RUNNER_SLURM_TESTS=1 but no cluster: {why}")
        }
        Err(why) => {
            crate::testing::test_skip(&format!("Slurm integration test: {why}"));
            None
        }
    }
}

fn shell_job(dir: &Path, key: &str, name: &str, script: &str, deps: &[&str]) -> JobSpec {
    JobSpec {
        key: key.into(),
        name: name.into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        workdir: dir.to_path_buf(),
        env: vec![("RUNNER_TEST_MARK".into(), format!("mark of {key}"))],
        resources: Resources {
            cpus: Some(1),
            mem: Some("200M".into()),
            time: Some("5".into()),
            partition: Some("cpu".into()),
            ..Default::default()
        },
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        log_dir: dir.join("logs"),
    }
}

fn ids(submitted: &[Submitted]) -> Vec<String> {
    submitted.iter().map(Submitted::slurm_id).collect()
}

/// Polls `status` until every job has finished.
fn wait_finished(job_ids: &[String], commands: &SlurmCommands) -> Vec<JobStatus> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let statuses = status(job_ids, commands).unwrap();
        if statuses.iter().all(|s| s.state.is_finished()) {
            return statuses;
        }
        assert!(
            Instant::now() < deadline,
            "jobs did not finish in 180 s: {statuses:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

#[test]
#[ignore = "needs Slurm: cargo test cluster::tests::slurm -- --ignored (starts scripts/slurm/start-local-cluster.sh)"]
fn three_chained_jobs_run_in_order() {
    let Some(commands) = local_cluster() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let jobs = vec![
        // `a` is slow so that `b` would see no a.done if the dependency did not hold it back.
        shell_job(
            dir,
            "a",
            "chain-a",
            "sleep 2; echo a >> order.txt; echo \"a says $RUNNER_TEST_MARK\"",
            &[],
        ),
        shell_job(
            dir,
            "b",
            "chain-b",
            "grep -qx a order.txt && echo b >> order.txt",
            &["a"],
        ),
        shell_job(
            dir,
            "c",
            "chain-c",
            "grep -qx b order.txt && echo c >> order.txt",
            &["b"],
        ),
    ];
    let mut opts = SubmitOptions::new(dir.join("submission"));
    opts.commands = commands.clone();
    let submitted = submit(&jobs, &opts).unwrap();
    assert!(submitted.iter().all(|s| s.array_index.is_none()));
    let statuses = wait_finished(&ids(&submitted), &commands);
    for (s, sub) in statuses.iter().zip(&submitted) {
        assert_eq!(s.state, JobState::Done, "{s:?}");
        assert_eq!(s.log_path.as_ref(), Some(&sub.log_path));
    }
    assert_eq!(read(dir.join("order.txt")), "a\nb\nc\n");
    assert_eq!(read(&submitted[0].log_path), "a says mark of a\n");
}

#[test]
#[ignore = "needs Slurm: cargo test cluster::tests::slurm -- --ignored (starts scripts/slurm/start-local-cluster.sh)"]
fn a_two_point_array_shares_one_upstream_run() {
    let Some(commands) = local_cluster() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let jobs = vec![
        shell_job(
            dir,
            "prep",
            "sweep-prep",
            "sleep 1; echo run >> prep-runs.txt; echo ready > prep.txt",
            &[],
        ),
        shell_job(
            dir,
            "train@0.1",
            "sweep-train",
            "test -f prep.txt && echo lr=0.1 > train-0.1.txt",
            &["prep"],
        ),
        shell_job(
            dir,
            "train@0.2",
            "sweep-train",
            "test -f prep.txt && echo lr=0.2 > train-0.2.txt",
            &["prep"],
        ),
    ];
    let mut opts = SubmitOptions::new(dir.join("submission"));
    opts.commands = commands.clone();
    let submitted = submit(&jobs, &opts).unwrap();
    assert_eq!(
        submitted[1].job_id, submitted[2].job_id,
        "the sweep should be one job array"
    );
    assert_eq!(
        (submitted[1].array_index, submitted[2].array_index),
        (Some(0), Some(1))
    );
    assert_ne!(submitted[0].job_id, submitted[1].job_id);

    let mut all = ids(&submitted);
    all.push(submitted[1].job_id.to_string()); // the array as a whole
    let statuses = wait_finished(&all, &commands);
    assert!(
        statuses.iter().all(|s| s.state == JobState::Done),
        "{statuses:#?}"
    );
    assert_eq!(read(dir.join("prep-runs.txt")), "run\n");
    assert_eq!(read(dir.join("train-0.1.txt")), "lr=0.1\n");
    assert_eq!(read(dir.join("train-0.2.txt")), "lr=0.2\n");
    assert_eq!(statuses[2].log_path.as_ref(), Some(&submitted[2].log_path));
    assert!(submitted[2].log_path.exists());
}

#[test]
#[ignore = "needs Slurm: cargo test cluster::tests::slurm -- --ignored (starts scripts/slurm/start-local-cluster.sh)"]
fn a_failed_job_cancels_its_dependants() {
    let Some(commands) = local_cluster() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let jobs = vec![
        shell_job(dir, "bad", "fail-bad", "echo boom; exit 3", &[]),
        shell_job(dir, "after", "fail-after", "touch after-ran", &["bad"]),
        shell_job(dir, "after2", "fail-after2", "touch after2-ran", &["after"]),
    ];
    let mut opts = SubmitOptions::new(dir.join("submission"));
    opts.commands = commands.clone();
    let submitted = submit(&jobs, &opts).unwrap();
    let statuses = wait_finished(&ids(&submitted), &commands);

    assert_eq!(
        statuses[0].state,
        JobState::Failed {
            exit_code: Some(3),
            reason: Some("NonZeroExitCode".into())
        }
    );
    assert_eq!(statuses[0].log_path.as_ref(), Some(&submitted[0].log_path));
    assert_eq!(read(&submitted[0].log_path), "boom\n");
    for (s, sub) in statuses[1..].iter().zip(&submitted[1..]) {
        assert_eq!(
            s.state,
            JobState::Cancelled {
                reason: Some("DependencyNeverSatisfied".into())
            },
            "{s:?}"
        );
        assert_eq!(s.log_path.as_ref(), Some(&sub.log_path));
        assert!(
            !sub.log_path.exists(),
            "a cancelled job never ran, so it has no log"
        );
    }
    assert!(!dir.join("after-ran").exists() && !dir.join("after2-ran").exists());

    // Once slurmctld forgets them, the jobcomp/filetxt file still tells the outcome.
    let records = crate::cluster::status::finished_from_jobcomp(&commands).unwrap();
    let bad = crate::cluster::parse::JobRef::parse(&submitted[0].slurm_id()).unwrap();
    let bad_record = records
        .iter()
        .find(|r| r.matches(&bad))
        .expect("the failed job in the jobcomp file");
    assert_eq!(
        (bad_record.state.as_str(), bad_record.exit.map(|e| e.code)),
        ("FAILED", Some(3))
    );
    let after = crate::cluster::parse::JobRef::parse(&submitted[1].slurm_id()).unwrap();
    assert!(records
        .iter()
        .any(|r| r.matches(&after) && r.state == "CANCELLED"));
}

#[test]
#[ignore = "needs Slurm: cargo test cluster::tests::slurm -- --ignored (starts scripts/slurm/start-local-cluster.sh)"]
fn a_running_job_can_be_cancelled() {
    let Some(commands) = local_cluster() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let jobs = vec![shell_job(
        tmp.path(),
        "sleeper",
        "cancel-me",
        "sleep 120",
        &[],
    )];
    let mut opts = SubmitOptions::new(tmp.path().join("submission"));
    opts.commands = commands.clone();
    let submitted = submit(&jobs, &opts).unwrap();
    let live = status(&ids(&submitted), &commands).unwrap();
    assert!(
        matches!(live[0].state, JobState::Pending | JobState::Running),
        "{live:?}"
    );
    cancel(&ids(&submitted), &commands).unwrap();
    let statuses = wait_finished(&ids(&submitted), &commands);
    assert_eq!(statuses[0].state, JobState::Cancelled { reason: None });
}

#[test]
#[ignore = "needs Slurm: cargo test cluster::tests::slurm -- --ignored (starts scripts/slurm/start-local-cluster.sh)"]
fn a_gpu_stage_with_default_resources_runs_without_gpus() {
    let Some(commands) = local_cluster() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut sft = shell_job(
        tmp.path(),
        "sft@x",
        "gpu-sft",
        "echo trained > sft.txt",
        &[],
    );
    // sft defaults: 1 GPU, 8 CPUs, 64G, 4 h; more than the local node has.
    let recipe = Resources {
        partition: Some("gpu".into()),
        time: Some("5".into()),
        ..Default::default()
    };
    sft.resources = Resources::for_stage("sft", Some(&recipe)).unwrap();
    let mut opts = SubmitOptions::new(tmp.path().join("submission"));
    opts.commands = commands.clone();
    let submitted = submit(&[sft], &opts).unwrap();
    let warnings = &submitted[0].warnings;
    assert!(
        warnings[0].starts_with("sft@x: dropped --gpus=1: no node of partition gpu has GPU gres"),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.starts_with("sft@x: mem 64G -> ")),
        "{warnings:?}"
    );
    let statuses = wait_finished(&ids(&submitted), &commands);
    assert_eq!(statuses[0].state, JobState::Done, "{statuses:?}");
    assert_eq!(read(tmp.path().join("sft.txt")), "trained\n");
}
