//! The shipped recipes end to end through the binary: recipes/medical.toml on the committed data
//! and the tiny model it makes itself, and a real model (SmolLM2-135M-Instruct GGUF, fetched by
//! scripts/fetch-smollm2.sh; skipped with a message when absent).

use assert_cmd::Command;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The artifact folder of `stage` of `recipe` run with `sets` overrides.
fn artifact(store: &Path, recipe: &str, sets: &[&str], stage: &str) -> PathBuf {
    let mut path = runner(store);
    path.args(["path", recipe, stage]);
    for s in sets {
        path.args(["--set", s]);
    }
    let out = path.output().unwrap();
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn runner(store: &Path) -> Command {
    let mut cmd = Command::cargo_bin("runner").unwrap();
    cmd.current_dir(repo()).env("RUNNER_STORE", store);
    cmd
}

fn path_of(store: &Path, stage: &str) -> PathBuf {
    let out = runner(store)
        .args(["path", "recipes/medical.toml", stage])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn medical_recipe_trains_evaluates_exports_and_then_is_cached() {
    // Run records go beside the store, so keep both inside the temp folder.
    let root = tempfile::tempdir().unwrap();
    let store = &root.path().join("store");
    let out = runner(store)
        .args(["run", "recipes/medical.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("7 ran, 0 cached"), "{err}");

    // The tiny model starts from random weights and is trained in full: it must visibly learn.
    let sft = path_of(store, "sft");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sft.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["model_type"], "qwen2");
    assert!(sft.join("model/model.safetensors").is_file());
    let losses: Vec<f64> = std::fs::read_to_string(sft.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.65 * first, "loss {first} -> {last}: {losses:?}");
    assert!(sft.join("loss.svg").is_file());

    // Its answers are varied Chinese text, not one repeated character.
    let eval = path_of(store, "eval");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["count"], 16);
    for key in ["bleu-4", "rouge-1", "rouge-2", "rouge-l"] {
        assert!(metrics[key].is_number(), "{metrics}");
    }
    assert!(metrics["rouge-l"].as_f64().unwrap() >= 10.0, "{metrics}");
    let predictions: Vec<String> = std::fs::read_to_string(eval.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            row["prediction"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(predictions.len(), 16);
    let varied = predictions
        .iter()
        .filter(|p| {
            let chars: std::collections::BTreeSet<char> = p.chars().collect();
            chars.len() >= 10 && p.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))
        })
        .count();
    assert!(
        varied * 10 >= 16 * 8,
        "{varied} of 16 varied: {predictions:?}"
    );

    let gguf = path_of(store, "gguf");
    let file = std::fs::read_dir(&gguf)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .expect("a .gguf file");
    let reader = runner::gguf::reader::GgufFile::open(&file).unwrap();
    assert_eq!(
        reader.get_str("general.architecture").unwrap(),
        Some("qwen2")
    );

    // Nothing changed: nothing runs. A changed SFT parameter reruns sft and what depends on it.
    let out = runner(store)
        .args(["run", "recipes/medical.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0 ran, 7 cached"), "{err}");
    let plan = runner(store)
        .args([
            "plan",
            "recipes/medical.toml",
            "--set",
            "stages.sft.learning_rate=1e-3",
        ])
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout);
    for stage in ["raw", "prompts", "base", "tokens"] {
        assert!(plan.contains(&format!("cached  {stage} ")), "{plan}");
    }
    for stage in ["sft", "eval", "gguf"] {
        assert!(plan.contains(&format!("run     {stage} ")), "{plan}");
    }
}

fn smollm2() -> Option<PathBuf> {
    let p = std::env::var("RUNNER_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if p.exists() {
        Some(p)
    } else {
        skip("SmolLM2 GGUF not found; run scripts/fetch-smollm2.sh or set RUNNER_SMOLLM2_GGUF");
        None
    }
}

#[test]
fn smollm2_gguf_generates_fluent_english() {
    let Some(model) = smollm2() else { return };
    let root = tempfile::tempdir().unwrap();
    let store = &root.path().join("store");
    let out = runner(store)
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "8",
            "--greedy",
            "--device",
            "cpu",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    // llama.cpp's tokenization of the prompt: no BOS (the GGUF says add_bos_token = false).
    assert_eq!(
        line["prompt_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    assert!(line["text"].as_str().unwrap().contains("Paris"), "{line}");
    assert_eq!(line["token_ids"].as_array().unwrap().len(), 8);
}

#[test]
fn medical_recipe_with_prefix_tuning_evaluates_on_the_base_and_exports_the_adapter() {
    let root = tempfile::tempdir().unwrap();
    let store = &root.path().join("store");
    let sets = [
        "stages.sft.method=prefix",
        "stages.sft.pre_seq_len=4",
        "stages.sft.learning_rate=1e-2",
        "stages.sft.max_steps=6",
        "stages.eval.limit=4",
        "stages.gguf.format=peft",
    ];
    let mut cmd = runner(store);
    cmd.args(["run", "recipes/medical.toml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = |stage: &str| artifact(store, "recipes/medical.toml", &sets, stage);
    // The sft artifact holds only the adapter; evaluate ran it beside the base model.
    let sft = dir("sft");
    assert!(!sft.join("merged").exists());
    let predictions = std::fs::read_to_string(dir("eval").join("predictions.jsonl")).unwrap();
    assert_eq!(predictions.lines().count(), 4);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir("gguf").join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "PREFIX_TUNING");
    assert_eq!(config["num_virtual_tokens"], 4);
}

#[test]
fn training_past_the_memory_limit_fails_the_stage_with_advice_and_commits_nothing() {
    let root = tempfile::tempdir().unwrap();
    let store = &root.path().join("store");
    // 1 MiB is far below what even the tiny model's training takes (its peak resident set on
    // the CPU, where the limit reads that).
    let out = runner(store)
        .env("RUNNER_MEMORY_LIMIT", "1M")
        .args([
            "run",
            "recipes/medical.toml",
            "--set",
            "stages.sft.max_steps=2",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("sft"), "{err}");
    assert!(err.contains("out of memory on cpu"), "{err}");
    assert!(err.contains("over RUNNER_MEMORY_LIMIT = 1.0 MiB"), "{err}");
    assert!(
        err.contains("gradient_checkpointing = \"offload\""),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The stages before it are kept; sft and what follows it are not in the store.
    let path = |stage: &str| {
        runner(store)
            .args(["path", "recipes/medical.toml", stage])
            .args(["--set", "stages.sft.max_steps=2"])
            .output()
            .unwrap()
    };
    assert!(path("tokens").status.success());
    for stage in ["sft", "eval", "gguf"] {
        assert!(!path(stage).status.success(), "{stage} was committed");
    }
    // The run record says why.
    let runs = runner(store).args(["runs"]).output().unwrap();
    let runs = String::from_utf8_lossy(&runs.stdout);
    assert!(runs.contains("failed"), "{runs}");
}

const KILL_SETS: [&str; 3] = [
    "stages.sft.max_steps=40",
    "stages.sft.save_steps=10",
    "stages.eval.limit=2",
];

/// Starts the medical recipe (40 steps, a checkpoint every 10) and kills it with SIGKILL once
/// the first checkpoint is in the stage's resumable work folder.
fn run_and_kill_after_a_checkpoint(store: &Path) {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("runner"));
    cmd.current_dir(repo())
        .env("RUNNER_STORE", store)
        .args(["run", "recipes/medical.toml"])
        .stderr(std::process::Stdio::null());
    for s in KILL_SETS {
        cmd.args(["--set", s]);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let found = std::fs::read_dir(store.join("tmp")).ok().and_then(|dirs| {
            dirs.flatten()
                .map(|d| d.path().join("checkpoint-10"))
                .find(|p| p.join("trainer_state.json").is_file())
        });
        if found.is_some() {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a checkpoint"
        );
        assert!(std::time::Instant::now() < deadline, "no checkpoint-10");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Runs the killed recipe again (`extra` arguments added) and returns its stderr and sft.json.
fn rerun(store: &Path, extra: &[&str]) -> (String, serde_json::Value) {
    let mut cmd = runner(store);
    cmd.args(["run", "recipes/medical.toml"]).args(extra);
    for s in KILL_SETS {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    let mut path = runner(store);
    path.args(["path", "recipes/medical.toml"]);
    for s in KILL_SETS {
        path.args(["--set", s]);
    }
    let dir = String::from_utf8(path.arg("sft").output().unwrap().stdout).unwrap();
    let sft = std::fs::read_to_string(PathBuf::from(dir.trim()).join("sft.json")).unwrap();
    (err, serde_json::from_str(&sft).unwrap())
}

#[test]
fn a_run_killed_after_a_checkpoint_resumes_from_it_unless_forced() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");

    run_and_kill_after_a_checkpoint(&store);
    // Its record was left `running`; its process is gone.
    let runs = runner(&store).args(["runs"]).output().unwrap();
    let runs = String::from_utf8_lossy(&runs.stdout);
    assert!(runs.contains(" interrupted "), "{runs}");
    let (err, sft) = rerun(&store, &[]);
    // The kill may land after a later checkpoint than the one seen.
    assert!(err.contains("resuming sft from checkpoint-"), "{err}");
    assert!(sft["resumed_from"].as_u64().unwrap() >= 10, "{sft}");
    assert_eq!(sft["steps"], 40);

    // Killed again, then forced: it starts over instead of resuming.
    run_and_kill_after_a_checkpoint(&root.path().join("store2"));
    let (err, sft) = rerun(&root.path().join("store2"), &["--force", "sft"]);
    assert!(!err.contains("resuming"), "{err}");
    assert!(sft["resumed_from"].is_null(), "{sft}");
    assert_eq!(sft["steps"], 40);
}

const CHAOS_SETS: [&str; 3] = [
    "stages.sft.max_steps=40",
    "stages.sft.save_steps=5",
    "stages.eval.limit=2",
];

/// Every file of `dir` (recursively, by relative path) and its bytes.
fn files_of(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_path_buf();
                files.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// kill -9 at ten pseudo-random moments (seeded, so a failure can be replayed) of the medical
/// recipe's training stage, then a run to the end: it completes, the store verifies clean, and
/// the trained weights equal an uninterrupted run's bit for bit.
#[test]
fn ten_kills_at_random_moments_then_a_full_run_give_the_uninterrupted_weights() {
    let root = tempfile::tempdir().unwrap();
    let run = |store: &Path| {
        let mut cmd = runner(store);
        cmd.args(["run", "recipes/medical.toml"]);
        for s in CHAOS_SETS {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        err
    };
    let reference = root.path().join("reference");
    let reference_log = run(&reference);
    // The uninterrupted training stage's time ("done sft sft 22.91s ..."): kills land within it
    // on a machine of any speed.
    let train_s: f64 = reference_log
        .lines()
        .find(|l| l.split_whitespace().take(3).eq(["done", "sft", "sft"]))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|t| t.trim_end_matches('s').parse().ok())
        .unwrap_or_else(|| panic!("no sft time in:\n{reference_log}"));

    let store = root.path().join("chaos");
    // xorshift64: each kill lands between 0.05 and 0.25 of that time after training starts (a
    // resumed run redoes at most one checkpoint interval), so several kills find it alive.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut landed = 0;
    for attempt in 0..10 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let fraction = 0.05 + 0.2 * (state % 1000) as f64 / 1000.0;
        let log_path = root.path().join(format!("attempt-{attempt}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("runner"));
        cmd.current_dir(repo())
            .env("RUNNER_STORE", &store)
            .args(["run", "recipes/medical.toml"])
            .stderr(log);
        for s in CHAOS_SETS {
            cmd.args(["--set", s]);
        }
        let mut child = cmd.spawn().unwrap();
        let training = |log: &str| {
            log.lines()
                .any(|l| l.split_whitespace().take(3).eq(["running", "sft", "sft"]))
        };
        while child.try_wait().unwrap().is_none()
            && !training(&std::fs::read_to_string(&log_path).unwrap())
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(fraction * train_s));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            landed += 1;
        }
        child.wait().unwrap();
    }
    eprintln!("{landed} of 10 kills found the run alive");
    assert!(landed >= 3, "only {landed} of 10 kills found the run alive");
    let logs: String = (0..10)
        .map(|a| std::fs::read_to_string(root.path().join(format!("attempt-{a}.log"))).unwrap())
        .collect();
    let last = run(&store);
    assert!(
        logs.contains("resuming sft from checkpoint-")
            || last.contains("resuming sft from checkpoint-"),
        "no run resumed from a checkpoint:\n{logs}\n{last}"
    );

    let verify = runner(&store).args(["cache", "verify"]).output().unwrap();
    let report = String::from_utf8_lossy(&verify.stdout).to_string()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{report}");
    assert!(report.contains("none corrupt"), "{report}");

    let weights = |store: &Path| {
        files_of(&artifact(store, "recipes/medical.toml", &CHAOS_SETS, "sft").join("model"))
    };
    let (want, got) = (weights(&reference), weights(&store));
    assert!(
        want.contains_key(Path::new("model.safetensors")),
        "{:?}",
        want.keys()
    );
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &want {
        assert!(
            got[name] == *bytes,
            "{} differs from the uninterrupted run's",
            name.display()
        );
    }
}

/// A skip on the real stderr (the harness captures `eprintln!`); `.ci/run` counts these lines.
fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP: {why}");
}

/// recipes/dpo.toml, shortened: pairs made from the dialogues, SFT, DPO and evaluation of the DPO
/// model through the binary; the dpo stage logs TRL's reward metrics; a misspelt key is refused
/// with the nearest one.
#[test]
fn dpo_recipe_runs_pairs_through_sft_dpo_and_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path();
    let sets = [
        "stages.base.tokenizer_rows=500",
        "stages.sft.max_steps=10",
        "stages.dpo.max_steps=6",
        "stages.dpo.logging_steps=2",
        "stages.dpo.eval_steps=3",
        "stages.eval_sft.limit=2",
        "stages.eval_dpo.limit=2",
        "stages.eval_dpo.max_new_tokens=8",
        "stages.eval_sft.max_new_tokens=8",
    ];
    let mut cmd = runner(store);
    cmd.args(["run", "recipes/dpo.toml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = |stage: &str| artifact(store, "recipes/dpo.toml", &sets, stage);
    let dpo = dir("dpo");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dpo.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Logged at steps 2, 4 and 6; the evaluation at step 3 has a row of its own.
    let logged: Vec<&serde_json::Value> = rows.iter().filter(|r| r["loss"].is_f64()).collect();
    assert_eq!(logged.len(), 3);
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "loss",
    ] {
        assert!(logged.iter().all(|r| r[key].is_f64()), "{key} in {rows:?}");
    }
    assert!(rows.iter().any(|r| r["eval_rewards/accuracies"].is_f64()));
    assert!(dpo.join("model/config.json").is_file());
    assert!(dpo.join("accuracies.svg").is_file());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dpo.join("dpo.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 6);
    let predictions = std::fs::read_to_string(dir("eval_dpo").join("predictions.jsonl")).unwrap();
    assert_eq!(predictions.lines().count(), 2);
    // Every pair has a chosen and a different rejected answer.
    let tokens = std::fs::read_to_string(dir("pair_tokens").join("train.jsonl")).unwrap();
    for line in tokens.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(row["rejected_input_ids"].is_array());
        assert_ne!(row["input_ids"], row["rejected_input_ids"]);
    }

    let mut typo = runner(store);
    typo.args(["plan", "recipes/dpo.toml", "--set", "stages.dpo.bta=0.2"]);
    let out = typo.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unknown key `bta`") && stderr.contains("did you mean `beta`"),
        "{stderr}"
    );
    let mut wrong_kind = runner(store);
    wrong_kind.args(["plan", "recipes/dpo.toml", "--set", "stages.dpo.gamma=1.0"]);
    let out = wrong_kind.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("gamma") && stderr.contains("simpo"),
        "{stderr}"
    );
}
