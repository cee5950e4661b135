//! End-to-end tests of the pipeline core through the `runner` binary: ingest in mixed encodings,
//! bad rows, caching, reruns, interrupted runs and recipe errors.

use assert_cmd::Command;
use runner::data::Table;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[path = "support/fake_hub.rs"]
mod fake_hub;

fn runner(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("runner").unwrap();
    cmd.current_dir(dir).env_remove("RUNNER_STORE");
    cmd
}

fn write(path: PathBuf, bytes: impl AsRef<[u8]>) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn gbk(text: &str) -> Vec<u8> {
    let (bytes, _, bad) = encoding_rs::GBK.encode(text);
    assert!(!bad, "test text must be GBK-encodable");
    bytes.into_owned()
}

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const INGEST_RECIPE: &str = r#"
[recipe]
name = "t"
seed = 7

[stages.raw]
kind = "ingest"
path = "csv"
encoding = "auto"
columns = { instruction = "ask", output = "answer" }

[stages.prompts]
kind = "format"
input = "raw"
template = "alpaca"
"#;

/// Six department files in the encodings users actually have.
fn mixed_encoding_folder(dir: &Path) -> Vec<(String, String)> {
    let csv = dir.join("csv");
    let mut expected = Vec::new();
    let mut push = |ask: &str, answer: &str| expected.push((ask.to_string(), answer.to_string()));
    write(
        csv.join("a_gbk.csv"),
        gbk("department,ask,answer\n内科,头痛怎么办？,多休息。\n外科,骨折,打石膏\n"),
    );
    push("头痛怎么办？", "多休息。");
    push("骨折", "打石膏");
    let (gb, _, _) =
        encoding_rs::GB18030.encode("department,ask,answer\n儿科,𠀀字怎么读？,读作“上”。\n");
    write(csv.join("b_gb18030.csv"), &gb);
    push("𠀀字怎么读？", "读作“上”。");
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice("department,ask,answer\n妇科,UTF-8 带 BOM,好的\n".as_bytes());
    write(csv.join("c_bom.csv"), bom);
    push("UTF-8 带 BOM", "好的");
    write(
        csv.join("d_crlf.csv"),
        gbk("department,ask,answer\r\n男科,行尾是CRLF,对\r\n"),
    );
    push("行尾是CRLF", "对");
    write(
        csv.join("e_quoted.csv"),
        gbk("department,ask,answer\n肿瘤科,\"逗号, 在里面\",\"换行\n第二行 \"\"引号\"\"\"\n"),
    );
    push("逗号, 在里面", "换行\n第二行 \"引号\"");
    write(
        csv.join("f_utf8.csv"),
        "department,ask,answer\n眼科,plain utf-8 ✓,yes\n",
    );
    push("plain utf-8 ✓", "yes");
    expected
}

#[test]
fn ingest_mixed_encodings_keeps_every_row_and_character() {
    let dir = tempfile::tempdir().unwrap();
    let expected = mixed_encoding_folder(dir.path());
    write(dir.path().join("r.toml"), INGEST_RECIPE);
    runner(dir.path())
        .args(["run", "r.toml"])
        .assert()
        .success();
    let artifact = stdout(runner(dir.path()).args(["path", "r.toml", "raw"]));
    let table = Table::read_parquet(&Path::new(artifact.trim()).join("train.parquet")).unwrap();
    let mut got: Vec<(String, String)> = table
        .rows
        .iter()
        .map(|r| {
            (
                table.get(r, "instruction").unwrap().to_string(),
                table.get(r, "output").unwrap().to_string(),
            )
        })
        .collect();
    let mut want = expected;
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(table.column_index("source_file").is_some());
    assert!(table.column_index("department").is_some());
}

#[test]
fn bad_row_fails_with_file_and_line_and_leaves_no_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("department,ask,answer,extra\n");
    for i in 0..4 {
        text.push_str(&format!("内科,问题{i},回答{i},无\n"));
    }
    text.push_str("内科,问题,回答,多,出来\n"); // line 6: five fields
    write(dir.path().join("csv/bad.csv"), gbk(&text));
    write(dir.path().join("r.toml"), INGEST_RECIPE);
    let out = runner(dir.path()).args(["run", "r.toml"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.csv:6:"), "{err}");
    assert!(err.contains("found 5"), "{err}");
    runner(dir.path())
        .args(["path", "r.toml", "raw"])
        .assert()
        .code(1);
}

#[test]
fn second_run_is_cached_and_a_change_reruns_only_dependants() {
    let dir = tempfile::tempdir().unwrap();
    mixed_encoding_folder(dir.path());
    write(dir.path().join("r.toml"), INGEST_RECIPE);
    runner(dir.path())
        .args(["run", "r.toml"])
        .assert()
        .success();
    let out = runner(dir.path()).args(["run", "r.toml"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("0 ran, 2 cached"), "{err}");
    assert!(!err.contains("running"), "{err}");

    // A format parameter changes: ingest stays cached, format reruns.
    let plan = stdout(runner(dir.path()).args([
        "plan",
        "r.toml",
        "--set",
        "stages.prompts.system=Be brief.",
    ]));
    assert!(plan.contains("cached  raw"), "{plan}");
    assert!(plan.contains("run     prompts"), "{plan}");
    assert!(plan.contains("params.system"), "{plan}");
    let out = runner(dir.path())
        .args(["run", "r.toml", "--set", "stages.prompts.system=Be brief."])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 ran, 1 cached"), "{err}");

    // An ingest parameter changes: both rerun.
    let out = runner(dir.path())
        .args(["run", "r.toml", "--set", "stages.raw.encoding=gb18030"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // raw reruns and fails on the UTF-8 file with the BOM, which is not GB18030, naming file and
    // line; nothing after it runs.
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("running  raw"), "{err}");
    assert!(
        err.contains(
            "FAILED   raw          ingest    csv/c_bom.csv:2: byte 40 is not valid gb18030"
        ),
        "{err}"
    );
    assert!(!err.contains("running  prompts"), "{err}");
}

#[test]
fn a_damaged_artifact_is_built_again_and_the_memo_of_file_hashes_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    mixed_encoding_folder(dir.path());
    write(dir.path().join("r.toml"), INGEST_RECIPE);
    runner(dir.path())
        .args(["run", "r.toml"])
        .assert()
        .success();
    // The plan hashed the input files once and remembered them in the store.
    let memo = dir.path().join(".runner/store/file-hashes.json");
    let memo: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(memo).unwrap()).unwrap();
    assert_eq!(memo.as_object().unwrap().len(), 6, "{memo}");

    // A file of raw's artifact is lost (a crash of an old runner, a hand's `rm`): raw is not
    // "cached" any more; its rebuild replaces it and format, whose input is unchanged, stays.
    let raw = stdout(runner(dir.path()).args(["path", "r.toml", "raw"]));
    std::fs::remove_file(Path::new(raw.trim()).join("train.parquet")).unwrap();
    let plan = stdout(runner(dir.path()).args(["plan", "r.toml"]));
    assert!(plan.contains("run     raw"), "{plan}");
    let out = runner(dir.path()).args(["run", "r.toml"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 ran, 1 cached"), "{err}");
    let verify = stdout(runner(dir.path()).args(["cache", "verify"]));
    assert!(verify.contains("none corrupt"), "{verify}");
}

#[test]
fn runs_of_one_recipe_at_once_build_each_stage_once_and_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    mixed_encoding_folder(dir.path());
    write(dir.path().join("r.toml"), INGEST_RECIPE);
    let bin = assert_cmd::cargo::cargo_bin("runner");
    let children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(&bin)
                .current_dir(dir.path())
                .env_remove("RUNNER_STORE")
                .args(["run", "r.toml"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut built = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        built += err.matches("done     ").count();
    }
    // Each of the two stages was built by exactly one of the runs; the others waited for its
    // lock and then found it cached.
    assert_eq!(built, 2);
    let verify = stdout(runner(dir.path()).args(["cache", "verify"]));
    assert!(verify.contains("none corrupt"), "{verify}");
    let runs = stdout(runner(dir.path()).args(["runs"]));
    assert_eq!(runs.matches(" succeeded ").count(), 4, "{runs}");
    assert_eq!(
        std::fs::read_dir(dir.path().join(".runner/store/tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn interrupted_run_leftovers_are_recovered() {
    let dir = tempfile::tempdir().unwrap();
    mixed_encoding_folder(dir.path());
    write(dir.path().join("r.toml"), INGEST_RECIPE);
    // Fake what kill -9 leaves behind: a lock owned by a dead process and a half-written temp folder.
    let plan = stdout(runner(dir.path()).args(["plan", "r.toml", "--json"]));
    let raw: serde_json::Value = serde_json::from_str(plan.lines().next().unwrap()).unwrap();
    let fingerprint = raw["fingerprint"].as_str().unwrap();
    let store = dir.path().join(".runner/store");
    write(
        store
            .join("tmp")
            .join(format!("{fingerprint}-999999-1/train.parquet")),
        b"PAR1 truncated",
    );
    let host = hostname::get().unwrap().to_string_lossy().to_string();
    write(
        store.join("locks").join(format!("{fingerprint}.lock")),
        format!("{{\"host\":\"{host}\",\"pid\":4294967294,\"started_at\":\"\"}}"),
    );
    runner(dir.path())
        .args(["path", "r.toml", "raw"])
        .assert()
        .code(1);
    runner(dir.path())
        .args(["run", "r.toml"])
        .assert()
        .success();
    let verify = stdout(runner(dir.path()).args(["cache", "verify"]));
    assert!(verify.contains("none corrupt"), "{verify}");
    runner(dir.path()).args(["cache", "gc"]).assert().success();
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0);
}

#[test]
fn recipe_errors_name_file_line_and_nearest_key() {
    let dir = tempfile::tempdir().unwrap();
    mixed_encoding_folder(dir.path());
    let cases = [
        (
            INGEST_RECIPE.replace("encoding = \"auto\"", "encodng = \"auto\""),
            "r.toml:9:1",
            "did you mean `encoding`",
        ),
        (
            INGEST_RECIPE.replace("kind = \"format\"", "kind = \"fromat\""),
            "r.toml:13:1",
            "did you mean `format`",
        ),
        (
            INGEST_RECIPE.replace("input = \"raw\"", "input = \"rwa\""),
            "r.toml:14:1",
            "did you mean `raw`",
        ),
        (
            INGEST_RECIPE.replace("seed = 7", "seed = \"seven\""),
            "r.toml:4:1",
            "non-negative integer",
        ),
        (
            INGEST_RECIPE.replace("encoding = \"auto\"", "encoding = \"latin1\""),
            "r.toml:9:1",
            "unknown variant `latin1`",
        ),
        // A stage name reaches folder names and Slurm batch scripts: a newline could inject a
        // command there.
        (
            INGEST_RECIPE.replace("[stages.prompts]", "[stages.\"x\\ntouch p #\"]"),
            "r.toml:12:9",
            "stage name \"x\\ntouch p #\" is not allowed: use letters, digits, `_` and `-` only",
        ),
    ];
    for (text, location, message) in cases {
        write(dir.path().join("r.toml"), &text);
        let out = runner(dir.path()).args(["run", "r.toml"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(location), "expected {location} in: {err}");
        assert!(err.contains(message), "expected {message} in: {err}");
    }
    // A cycle: two sft stages, each taking the other's trained model as its base (the kinds
    // fit, so only the cycle is wrong).
    let cyclic = format!(
        "{INGEST_RECIPE}\n[stages.base]\nkind = \"model\"\nsource = \"init:tiny\"\ninput = \"prompts\"\n\
         [stages.tokens]\nkind = \"tokenize\"\ninput = \"prompts\"\nmodel = \"base\"\n\
         [stages.a]\nkind = \"sft\"\ninput = \"tokens\"\nmodel = \"b\"\n\
         [stages.b]\nkind = \"sft\"\ninput = \"tokens\"\nmodel = \"a\"\n"
    );
    write(dir.path().join("r.toml"), &cyclic);
    let out = runner(dir.path())
        .args(["plan", "r.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("depends on itself through its inputs (a cycle)"),
        "{err}"
    );
}

#[test]
fn runs_are_recorded_and_can_be_rerun() {
    let dir = tempfile::tempdir().unwrap();
    mixed_encoding_folder(dir.path());
    write(dir.path().join("r.toml"), INGEST_RECIPE);
    runner(dir.path())
        .args(["run", "r.toml", "--set", "stages.prompts.system=S"])
        .assert()
        .success();
    let runs = stdout(runner(dir.path()).args(["runs"]));
    let id = runs.split_whitespace().next().unwrap().to_string();
    assert!(runs.contains("--set stages.prompts.system=S"), "{runs}");
    // Changing the recipe file does not change what `rerun` repeats.
    write(
        dir.path().join("r.toml"),
        INGEST_RECIPE.replace("alpaca", "chat"),
    );
    let out = runner(dir.path()).args(["rerun", &id]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("0 ran, 2 cached"), "{err}");
    let graph = stdout(runner(dir.path()).args(["graph", "r.toml", "--format", "mermaid"]));
    assert!(graph.contains("raw --> prompts"), "{graph}");
}

#[test]
fn a_trained_stage_is_the_base_of_the_next_one() {
    // Full SFT of the tiny model, then LoRA on the model it made (as SFT before GRPO).
    let dir = tempfile::tempdir().unwrap();
    mixed_encoding_folder(dir.path());
    let recipe = format!(
        "{INGEST_RECIPE}\n[stages.base]\nkind = \"model\"\nsource = \"init:tiny\"\ninput = \"prompts\"\n\
         tiny = {{ hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, intermediate_size = 64, vocab_size = 300 }}\n\
         [stages.tokens]\nkind = \"tokenize\"\ninput = \"prompts\"\nmodel = \"base\"\nmax_seq_len = 64\n\
         [stages.full]\nkind = \"sft\"\ninput = \"tokens\"\nmodel = \"base\"\nmethod = \"full\"\nmax_steps = 2\n\
         [stages.lora]\nkind = \"sft\"\ninput = \"tokens\"\nmodel = \"full\"\nmethod = \"lora\"\nmax_steps = 2\n"
    );
    write(dir.path().join("r.toml"), &recipe);
    let out = runner(dir.path()).args(["run", "r.toml"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let path = |stage: &str| {
        PathBuf::from(stdout(runner(dir.path()).args(["path", "r.toml", stage])).trim())
    };
    let adapter: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path("lora").join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    // The adapter's base is the full stage's trained model, not the random one.
    let base = adapter["base_model_name_or_path"].as_str().unwrap();
    assert!(
        dir.path().join(base).starts_with(path("full")),
        "{base} is not inside {}",
        path("full").display()
    );
    assert!(path("lora").join("merged/config.json").is_file());

    // Checkpoint and logging intervals are not part of what a stage computes: still cached.
    let plan = stdout(runner(dir.path()).args([
        "plan",
        "r.toml",
        "--set",
        "stages.full.save_steps=1",
        "--set",
        "stages.full.logging_steps=1",
        "--set",
        "stages.full.resume=true",
    ]));
    assert!(plan.contains("cached  full"), "{plan}");
    assert!(plan.contains("cached  lora"), "{plan}");
    let plan = stdout(runner(dir.path()).args([
        "plan",
        "r.toml",
        "--set",
        "stages.full.learning_rate=1e-3",
    ]));
    assert!(plan.contains("run     full"), "{plan}");
}

const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// The Qwen3 family fixture as a repository's files.
fn tiny_repo_files() -> BTreeMap<String, Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/qwen3");
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with("expected.json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

const HUB_RECIPE: &str = r#"
[recipe]
name = "hub"
seed = 1

[stages.base]
kind = "model"
source = "hf://tiny-org/tiny-qwen3"
"#;

#[test]
fn hub_models_download_into_the_shared_cache_and_are_fingerprinted_by_commit() {
    let hub = fake_hub::FakeHub::start("tiny-org/tiny-qwen3");
    hub.commit(SHA_A, "main", tiny_repo_files());
    let dir = tempfile::tempdir().unwrap();
    let hf_home = dir.path().join("hf-home");
    let cmd = |offline: bool| {
        let mut c = runner(dir.path());
        c.env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HOME", &hf_home)
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        c
    };
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/families/qwen3/expected.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let prompt = &expected["prompts"][0];

    // `--model hf://...` downloads into the Python library's cache layout and generates.
    let out = stdout(cmd(false).args([
        "generate",
        "--model",
        "hf://tiny-org/tiny-qwen3",
        "--prompt",
        prompt["text"].as_str().unwrap(),
        "--max-new-tokens",
        "16",
        "--greedy",
        "--device",
        "cpu",
        "--json",
    ]));
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(line["token_ids"], prompt["tokens"], "{out}");
    let repo = hf_home.join("hub/models--tiny-org--tiny-qwen3");
    assert!(repo
        .join(format!("snapshots/{SHA_A}/model.safetensors"))
        .is_file());
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main"))
            .unwrap()
            .trim(),
        SHA_A
    );
    let downloads = hub.downloads.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        downloads, 5,
        "config, generation config, tokenizer (2), weights"
    );

    // A recipe's model stage: cached on the second run, nothing downloaded again.
    write(dir.path().join("r.toml"), HUB_RECIPE);
    write(
        dir.path().join("pinned.toml"),
        HUB_RECIPE.replace("tiny-qwen3\"", &format!("tiny-qwen3@{SHA_A}\"")),
    );
    for recipe in ["r.toml", "pinned.toml", "r.toml"] {
        let out = cmd(false).args(["run", recipe]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let err = |out: std::process::Output| String::from_utf8_lossy(&out.stderr).to_string();
    let again = err(cmd(false).args(["run", "r.toml"]).output().unwrap());
    assert!(again.contains("0 ran, 1 cached"), "{again}");
    assert_eq!(
        hub.downloads.load(std::sync::atomic::Ordering::SeqCst),
        downloads
    );

    // main moves: the branch's recipe reruns, the pinned one stays cached.
    let mut moved = tiny_repo_files();
    moved.insert(
        "generation_config.json".into(),
        br#"{"eos_token_id": 2, "bos_token_id": 1}"#.to_vec(),
    );
    hub.commit(SHA_B, "main", moved);
    let branch = err(cmd(false).args(["run", "r.toml"]).output().unwrap());
    assert!(branch.contains("1 ran, 0 cached"), "{branch}");
    let pinned = err(cmd(false).args(["run", "pinned.toml"]).output().unwrap());
    assert!(pinned.contains("0 ran, 1 cached"), "{pinned}");

    // Offline: the cached commit of main serves; an uncached repository is a clear error.
    let offline = err(cmd(true).args(["run", "r.toml"]).output().unwrap());
    assert!(offline.contains("0 ran, 1 cached"), "{offline}");
    let missing = cmd(true)
        .args([
            "run",
            "r.toml",
            "--set",
            "stages.base.source=hf://tiny-org/other",
        ])
        .output()
        .unwrap();
    let text = err(missing.clone());
    assert!(!missing.status.success());
    assert!(
        text.contains("tiny-org/other") && text.contains("HF_HUB_OFFLINE"),
        "{text}"
    );
    // A malformed reference names the key.
    let bad = err(cmd(false)
        .args([
            "run",
            "r.toml",
            "--set",
            "stages.base.source=hf://just-a-name",
        ])
        .output()
        .unwrap());
    assert!(
        bad.contains("source") && bad.contains("hf://Org/Name"),
        "{bad}"
    );
}

/// The issue's check of every family: `runner generate --greedy --device cpu --json` on each
/// fixture folder (tiny random models saved by transformers, `scripts/make_family_fixtures.py`)
/// gives transformers' prompt ids and greedy tokens on every prompt of its `expected.json`.
#[test]
fn every_family_fixture_generates_transformers_greedy_tokens_from_the_command_line() {
    let families = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families");
    let mut checked = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&families)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    let work = tempfile::tempdir().unwrap();
    for dir in &dirs {
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        let prompts = expected["prompts"].as_array().unwrap();
        assert!(!prompts.is_empty(), "{}", dir.display());
        for prompt in prompts {
            let new_tokens = prompt["tokens"].as_array().unwrap().len().to_string();
            let out = stdout(runner(work.path()).args([
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                prompt["text"].as_str().unwrap(),
                "--max-new-tokens",
                &new_tokens,
                "--greedy",
                "--device",
                "cpu",
                "--json",
            ]));
            let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            let name = dir.file_name().unwrap().to_string_lossy();
            assert_eq!(line["prompt_ids"], prompt["ids"], "{name}: {out}");
            assert_eq!(line["token_ids"], prompt["tokens"], "{name}: {out}");
        }
        checked.push(dir.file_name().unwrap().to_string_lossy().to_string());
    }
    // The seven families of issue 28; a fixture folder lost would otherwise pass silently.
    for family in [
        "gemma2",
        "gemma3",
        "glm",
        "glm4",
        "llama3_rope",
        "mistral_sliding",
        "qwen3",
    ] {
        assert!(checked.iter().any(|c| c == family), "{family}: {checked:?}");
    }
}
