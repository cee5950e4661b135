//! `runner run` as two ranks (two processes joined over TCP, started as a launcher starts them,
//! or by `runner run` itself for a stage with `resources.gpus = 2`): the medical recipe's SFT
//! stage trains data parallel and gives rank 0's artifact the losses and weights of a
//! single-process run; the other stages run once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const ARGS: [&str; 18] = [
    "run",
    "recipes/medical.toml",
    "--only",
    "raw",
    "--only",
    "prompts",
    "--only",
    "base",
    "--only",
    "tokens",
    "--only",
    "sft",
    "--set",
    "stages.sft.max_steps=3",
    "--set",
    "stages.sft.gradient_accumulation_steps=2",
    "--set",
    "stages.sft.logging_steps=1",
];

fn runner(store: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.current_dir(repo())
        .env("RUNNER_STORE", store)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_PROCID")
        .env_remove("SLURM_NTASKS");
    cmd
}

fn sft_dir(store: &Path) -> PathBuf {
    let out = runner(store)
        .args(["path", "recipes/medical.toml", "sft"])
        .args(["--set", "stages.sft.max_steps=3"])
        .args(["--set", "stages.sft.gradient_accumulation_steps=2"])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn losses(sft: &Path) -> Vec<String> {
    std::fs::read_to_string(sft.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", row["step"], row["loss"])
        })
        .collect()
}

fn check(out: &Output, who: &str) {
    assert!(
        out.status.success(),
        "{who}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_ranks_train_the_sft_stage_as_one_process_does() {
    let root = tempfile::tempdir().unwrap();
    let (one, two) = (root.path().join("one"), root.path().join("two"));
    check(&runner(&one).args(ARGS).output().unwrap(), "one process");

    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            runner(&two)
                .args(ARGS)
                .env("RUNNER_RANK", rank.to_string())
                .env("RUNNER_WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in ranks.into_iter().enumerate() {
        check(&child.wait_with_output().unwrap(), &format!("rank {rank}"));
    }
    let (a, b) = (sft_dir(&one), sft_dir(&two));
    let want = losses(&a);
    assert_eq!(want.len(), 3, "{want:?}");
    assert_eq!(losses(&b), want);
    let weights = |dir: &Path| std::fs::read(dir.join("model/model.safetensors")).unwrap();
    assert!(weights(&a) == weights(&b), "the trained weights differ");

    // `resources.gpus = 2` on the stage: `runner run` starts the two ranks itself.
    let three = root.path().join("three");
    let out = runner(&three)
        .args(ARGS)
        .args(["--set", "stages.sft.resources.gpus=2"])
        .output()
        .unwrap();
    check(&out, "runner run starting its ranks");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("starting 2 ranks"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = sft_dir(&three);
    assert_eq!(losses(&c), want);
    assert!(
        weights(&a) == weights(&c),
        "the launched ranks' weights differ"
    );
}
