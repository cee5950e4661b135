//! `runner submit` / `status` / `cancel` against a real single-node Slurm cluster started by
//! scripts/slurm/start-local-cluster.sh. Ignored by default: run them with
//! `scripts/slurm/start-local-cluster.sh && cargo test --profile ci --test integration slurm -- --ignored`.
//! Without a cluster they print why and pass, unless RUNNER_SLURM_TESTS=1 (CI), which fails them.

use assert_cmd::Command;
use std::path::Path;
use std::time::{Duration, Instant};

fn cluster_available() -> bool {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/slurm/start-local-cluster.sh"
    );
    let out = std::process::Command::new(script).output();
    let ok = matches!(&out, Ok(o) if o.status.success());
    if !ok {
        let why = out
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_else(|e| e.to_string());
        if std::env::var("RUNNER_SLURM_TESTS").as_deref() == Ok("1") {
            panic!("RUNNER_SLURM_TESTS=1 but the local Slurm cluster did not start: {why}");
        }
        skip(&format!("no local Slurm cluster ({why})"));
    }
    ok
}

fn runner(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("runner").unwrap();
    cmd.current_dir(dir).env_remove("RUNNER_STORE");
    cmd
}

const RECIPE: &str = r#"
[recipe]
name = "slurm-test"

[stages.raw]
kind = "ingest"
path = "data.csv"
split = { test_rows = 1 }
resources = { cpus = 1, mem = "500M", time = "5:00", partition = "cpu" }

[stages.prompts]
kind = "format"
input = "raw"
template = "alpaca"
resources = { cpus = 1, mem = "500M", time = "5:00", partition = "cpu" }

[stages.test_prompts]
kind = "format"
input = "raw.test"
template = "chat"
resources = { cpus = 1, mem = "500M", time = "5:00", partition = "cpu" }
"#;

fn setup(csv: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.toml"), RECIPE).unwrap();
    std::fs::write(dir.path().join("data.csv"), csv).unwrap();
    dir
}

const GOOD: &str = "instruction,output\n问一,答一\nq2,a2\nq3,a3\n";

fn submit(dir: &Path, extra: &[&str]) -> String {
    let out = runner(dir)
        .args(["submit", "r.toml"])
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "submit failed: {err}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Polls `runner status` until no job is pending or running.
fn wait(dir: &Path, run_id: &str) -> String {
    let start = Instant::now();
    loop {
        let out = runner(dir).args(["status", run_id]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains(": succeeded") || text.contains(": failed") {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "jobs did not finish:\n{text}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
#[ignore = "needs Slurm: scripts/slurm/start-local-cluster.sh"]
fn slurm_recipe_runs_as_jobs_and_resubmit_is_a_no_op() {
    if !cluster_available() {
        return;
    }
    let dir = setup(GOOD);
    let run_id = submit(dir.path(), &[]);
    let status = wait(dir.path(), &run_id);
    assert!(status.contains(": succeeded"), "{status}");
    assert_eq!(status.matches(" done").count(), 3, "{status}");
    for stage in ["raw", "prompts", "test_prompts"] {
        runner(dir.path())
            .args(["path", "r.toml", stage])
            .assert()
            .success();
    }
    let out = runner(dir.path())
        .args(["submit", "r.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0 job(s)"), "{err}");
}

#[test]
#[ignore = "needs Slurm: scripts/slurm/start-local-cluster.sh"]
fn slurm_sweep_runs_shared_stages_once() {
    if !cluster_available() {
        return;
    }
    let dir = setup(GOOD);
    let run_id = submit(dir.path(), &["--sweep", "stages.prompts.system=A,B"]);
    let status = wait(dir.path(), &run_id);
    assert!(status.contains(": succeeded"), "{status}");
    // raw and test_prompts once, prompts twice.
    assert_eq!(
        status.lines().filter(|l| l.starts_with("raw ")).count(),
        1,
        "{status}"
    );
    assert_eq!(
        status.lines().filter(|l| l.starts_with("prompts[")).count(),
        2,
        "{status}"
    );
    assert_eq!(
        status
            .lines()
            .filter(|l| l.starts_with("test_prompts "))
            .count(),
        1,
        "{status}"
    );
    for system in ["A", "B"] {
        runner(dir.path())
            .args(["path", "r.toml", "prompts", "--set"])
            .arg(format!("stages.prompts.system={system}"))
            .assert()
            .success();
    }
}

#[test]
#[ignore = "needs Slurm: scripts/slurm/start-local-cluster.sh"]
fn slurm_failed_stage_cancels_dependants() {
    if !cluster_available() {
        return;
    }
    let dir = setup("instruction,output\nq1,a1\nq2,a2,extra\n");
    let run_id = submit(dir.path(), &[]);
    let status = wait(dir.path(), &run_id);
    assert!(status.contains(": failed"), "{status}");
    let raw = status.lines().find(|l| l.starts_with("raw ")).unwrap();
    assert!(raw.contains("failed") && raw.contains("log:"), "{status}");
    let prompts = status.lines().find(|l| l.starts_with("prompts ")).unwrap();
    assert!(prompts.contains("cancelled"), "{status}");
}

/// A skip on the real stderr (the harness captures `eprintln!`); `.ci/run` counts these lines.
fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}
