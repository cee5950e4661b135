//! `submit`, `status` and `cancel` against stand-in Slurm programs (shell scripts that record
//! their arguments and print captured Slurm output), so the command lines runner builds are
//! checked without a cluster.

use std::path::{Path, PathBuf};

use crate::cluster::tests::job;
use crate::cluster::{
    cancel, read_manifest, status, submit, Error, JobState, SlurmCommands, SubmitOptions,
};

fn fixture_path(name: &str) -> String {
    format!(
        "{}/tests/fixtures/cluster/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn write_program(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Fakes that log each call as one line to `calls.log`; sbatch prints ids 100, 101, ... and
/// fails for a job named "boom".
fn fakes(dir: &Path) -> SlurmCommands {
    let calls = dir.join("calls.log");
    let log = format!("echo \"$(basename \"$0\") $*\" >> '{}'", calls.display());
    let counter = dir.join("next_id");
    std::fs::write(&counter, "100").unwrap();
    let sbatch = format!(
        "{log}\ncase \"$*\" in *--job-name=boom*) echo 'sbatch: error: invalid partition specified: nope' >&2; exit 1;; esac\n\
         id=$(cat '{c}'); echo $((id + 1)) > '{c}'; echo \"$id\"",
        c = counter.display()
    );
    SlurmCommands {
        sbatch: write_program(dir, "sbatch", &sbatch),
        squeue: write_program(dir, "squeue", &format!("{log}\necho 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1")),
        scontrol: write_program(
            dir,
            "scontrol",
            &format!(
                "{log}\nif [ \"$1\" = show ] && [ \"$2\" = config ]; then sed 's#/var/log/slurm/jobcomp.log#{}#' '{}'; exit 0; fi\n\
                 echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
                fixture_path("jobcomp_filetxt.log"),
                fixture_path("scontrol_show_config.txt")
            ),
        ),
        scancel: write_program(dir, "scancel", &log),
        sinfo: write_program(dir, "sinfo", &format!("{log}\ncat '{}'", fixture_path("sinfo_local.txt"))),
        sacct: write_program(dir, "sacct", &format!("{log}\necho 'Slurm accounting storage is disabled' >&2; exit 1")),
    }
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn submit_builds_chained_sbatch_calls_and_arrays() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = SubmitOptions::new(tmp.path().join("sub"));
    opts.commands = fakes(tmp.path());
    let logs = tmp.path().join("logs");
    let mut jobs = vec![
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
        job("report", "report", &["true"], &["sft@1", "555_2"]),
    ];
    for j in &mut jobs {
        j.log_dir = logs.clone();
        j.workdir = tmp.path().to_path_buf();
    }
    jobs[1].resources.gpus = Some(1);
    jobs[2].resources.gpus = Some(1);
    let submitted = submit(&jobs, &opts).unwrap();

    let ids: Vec<String> = submitted.iter().map(|s| s.slurm_id()).collect();
    assert_eq!(ids, ["100", "101_0", "101_1", "102"]);
    assert_eq!(submitted[2].log_path, logs.join("sft-101_1.log"));
    assert_eq!(submitted[3].log_path, logs.join("report-102.log"));
    assert_eq!(
        submitted[1].warnings,
        vec!["sft@1: dropped --gpus=1: no node of partition (default) has GPU gres".to_string()]
    );
    let sub = tmp.path().join("sub");
    let l = logs.display();
    let w = tmp.path().display();
    assert_eq!(
        calls(tmp.path()),
        vec![
            "sinfo -h -o %P|%c|%m|%G".to_string(),
            format!("sbatch --parsable --job-name=tokenize --output={l}/tokenize-%j.log --chdir={w} --cpus-per-task=1 --mem=100M {}/000-tokenize.sbatch", sub.display()),
            format!("sbatch --parsable --job-name=sft --output={l}/sft-%A_%a.log --chdir={w} --cpus-per-task=1 --mem=100M --array=0-1 --dependency=afterok:100 --kill-on-invalid-dep=yes {}/001-sft.sbatch", sub.display()),
            format!("sbatch --parsable --job-name=report --output={l}/report-%j.log --chdir={w} --cpus-per-task=1 --mem=100M --dependency=afterok:101:555_2 --kill-on-invalid-dep=yes {}/002-report.sbatch", sub.display()),
        ]
    );
    let script = std::fs::read_to_string(sub.join("001-sft.sbatch")).unwrap();
    assert!(
        script.contains("  0) exec runner --set lr=1e-4 ;;\n  1) exec runner --set lr=2e-4 ;;"),
        "{script}"
    );
    assert!(logs.is_dir());
    assert_eq!(read_manifest(&sub).unwrap(), submitted);
}

#[test]
fn a_failed_sbatch_cancels_what_was_queued_and_names_the_command() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = SubmitOptions::new(tmp.path().join("sub"));
    opts.commands = fakes(tmp.path());
    opts.fit_to_nodes = false;
    let mut jobs = vec![
        job("a", "a", &["true"], &[]),
        job("b", "boom", &["true"], &["a"]),
    ];
    for j in &mut jobs {
        j.log_dir = tmp.path().join("logs");
    }
    let err = submit(&jobs, &opts).unwrap_err();
    let Error::Submit {
        key,
        source,
        cancelled,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (key.as_str(), cancelled.as_slice()),
        ("b", ["100".to_string()].as_slice())
    );
    let msg = source.to_string();
    assert!(
        msg.contains("sbatch --parsable --job-name=boom")
            && msg.contains(
                "failed (exit status 1): sbatch: error: invalid partition specified: nope"
            ),
        "{msg}"
    );
    assert_eq!(calls(tmp.path()).last().unwrap(), "scancel 100");
}

#[test]
fn missing_sbatch_says_how_to_get_slurm() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = SubmitOptions::new(tmp.path().join("sub"));
    opts.commands = SlurmCommands {
        sbatch: tmp.path().join("no-sbatch"),
        ..fakes(tmp.path())
    };
    let err = submit(&[job("a", "a", &["true"], &[])], &opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}/no-sbatch not found: is Slurm installed? see scripts/slurm/start-local-cluster.sh (or set RUNNER_SBATCH)",
            tmp.path().display()
        )
    );
}

#[test]
fn status_falls_back_to_the_jobcomp_file() {
    let tmp = tempfile::tempdir().unwrap();
    let commands = fakes(tmp.path());
    let ids: Vec<String> = ["1", "2_1", "3", "2", "77"].map(String::from).to_vec();
    let states: Vec<JobState> = status(&ids, &commands)
        .unwrap()
        .into_iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(
        states,
        vec![
            JobState::Done,
            JobState::Failed {
                exit_code: Some(1),
                reason: None
            },
            JobState::Cancelled { reason: None },
            JobState::Failed {
                exit_code: Some(1),
                reason: None
            },
            JobState::Unknown,
        ]
    );
    let log = calls(tmp.path());
    assert_eq!(
        log[0],
        format!(
            "squeue -h -r -t all -j 1,2,3,77 -O {}",
            crate::cluster::parse::SQUEUE_FORMAT
        )
    );
    assert!(log.contains(&"scontrol -o show job 2_1".to_string()));
    assert!(log
        .contains(&"sacct -n -P -X -j 1,2_1,3,2,77 -o JobID,JobIDRaw,State,ExitCode".to_string()));
    assert_eq!(log.last().unwrap(), "scontrol show config");

    cancel(&["5".into(), "6_1".into()], &commands).unwrap();
    assert_eq!(calls(tmp.path()).last().unwrap(), "scancel 5 6_1");
    assert!(matches!(
        cancel(&["5;rm".into()], &commands),
        Err(Error::InvalidJobId { .. })
    ));
}
