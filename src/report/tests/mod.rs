//! Report tests on a fake project: two runs of a medical SFT+GRPO recipe written the way the
//! pipeline writes them (run.json, store manifests, metrics.jsonl, metrics.json, predictions).

mod browser;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::report::{latest_run_id, render_report, write_report, Error};

pub(crate) const RUN_A: &str = "20261125-213500-3f9a";
pub(crate) const RUN_B: &str = "20261125-220000-b71c";

fn fingerprint(seed: &str) -> String {
    blake_like(seed)
}

/// A stable 64-hex string per seed (FNV-1a repeated), standing in for a blake3 fingerprint.
fn blake_like(seed: &str) -> String {
    let mut out = String::new();
    let mut hash: u64 = 0xcbf29ce484222325;
    while out.len() < 64 {
        for byte in seed.bytes().chain(out.len().to_le_bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x100000001b3);
        }
        out.push_str(&format!("{hash:016x}"));
    }
    out.truncate(64);
    out
}

struct FakeStage {
    name: &'static str,
    kind: &'static str,
    inputs: &'static [&'static str],
    state: &'static str,
    duration_s: f64,
    /// Files written into the artifact; None leaves the artifact out of the store.
    files: Option<Vec<(&'static str, Vec<u8>)>>,
    error: Option<&'static str>,
}

fn write_json(path: &Path, value: &Value) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, serde_json::to_string_pretty(value).expect("json")).expect("write json");
}

fn sft_metrics(learning_rate: f64, loss_floor: f64) -> Vec<u8> {
    let mut lines = Vec::new();
    for step in 1..=120u32 {
        let t = f64::from(step);
        let noise = ((t * 12.9898).sin() * 43758.5453).fract() * 0.25;
        let warmup = (t / 10.0).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * t / 120.0).cos());
        lines.push(json!({
            "step": step, "loss": loss_floor + 2.2 * (-t / 35.0).exp() + noise,
            "lr": learning_rate * warmup * cosine, "grad_norm": 1.5 * (-t / 60.0).exp() + noise,
            "tokens_per_s": 1800.0 + 40.0 * (t / 7.0).sin(), "memory_mb": 5120.0 + (t * 0.5).min(20.0), "epoch": t / 40.0
        }));
        if step % 20 == 0 {
            lines.push(
                json!({"step": step, "eval_loss": loss_floor + 0.15 + 2.0 * (-t / 40.0).exp()}),
            );
        }
    }
    lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

fn grpo_metrics() -> Vec<u8> {
    (1..=40u32)
        .map(|step| {
            let t = f64::from(step);
            json!({"step": step, "loss": 0.02 * (t / 9.0).sin(), "reward": 0.2 + 0.5 * (1.0 - (-t / 15.0).exp()),
                "reward_std": 0.3 - t * 0.003, "rewards/format": 0.4 + 0.5 * (1.0 - (-t / 8.0).exp()),
                "rewards/accuracy": 0.1 + 0.4 * (1.0 - (-t / 25.0).exp()), "kl": 0.001 * t, "completion_length": 180.0 - t, "clip_ratio": 0.0})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

fn predictions(variant: &str) -> Vec<u8> {
    let rows = [
        json!({"prompt": "患者头痛发热三天，应该怎么办？", "prediction": format!("建议多休息，多喝水。{variant}"), "reference": "建议及时就医，查血常规。"}),
        json!({"prompt": "Is <script>alert('x')</script> safe?", "prediction": "<script>alert(1)</script> & <b>bold</b>", "reference": "No: \"escape\" it"}),
        json!({"prompt": "What is 2+2?", "prediction": "4", "reference": "4"}),
        json!({"prompt": "Line one\nline two", "prediction": "p4", "reference": "r4"}),
        json!({"prompt": "q5", "prediction": "p5", "reference": "r5"}),
        json!({"prompt": "q6 (not shown)", "prediction": "p6 never shown", "reference": "r6"}),
    ];
    rows.iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

fn write_run(
    root: &Path,
    run_id: &str,
    started: &str,
    learning_rate: f64,
    seed: u64,
    variant: &str,
) {
    let store = root.join(".runner/store");
    let stages = [
        FakeStage { name: "raw", kind: "ingest", inputs: &[], state: "cached", duration_s: 0.0, files: None, error: None },
        FakeStage { name: "prompts", kind: "format", inputs: &["raw"], state: "cached", duration_s: 0.0, files: Some(vec![("data.jsonl", vec![b'x'; 48_000])]), error: None },
        FakeStage { name: "tokens", kind: "tokenize", inputs: &["prompts"], state: "cached", duration_s: 0.0, files: Some(vec![("tokens.bin", vec![0; 1_572_864])]), error: None },
        FakeStage { name: "sft", kind: "sft", inputs: &["tokens"], state: "run", duration_s: 95.5, files: Some(vec![("adapter_model.safetensors", vec![1; 3_000]), ("metrics.jsonl", sft_metrics(learning_rate, 0.4 + learning_rate * 500.0))]), error: None },
        FakeStage { name: "eval", kind: "evaluate", inputs: &["sft", "tokens"], state: "run", duration_s: 12.25, files: Some(vec![
            ("metrics.json", serde_json::to_vec(&json!({"bleu-4": 8.1234 + learning_rate * 1e4, "rouge-1": 31.5, "rouge-2": 9.75, "rouge-l": 24.0, "count": 200})).expect("json")),
            ("predictions.jsonl", predictions(variant)),
        ]), error: None },
        FakeStage { name: "grpo", kind: "grpo", inputs: &["sft"], state: "run", duration_s: 240.0, files: Some(vec![("metrics.jsonl", grpo_metrics())]), error: None },
        FakeStage { name: "export", kind: "export", inputs: &["grpo"], state: "failed", duration_s: 0.5, files: None, error: Some("gguf writer: tensor 'lm_head.weight' has shape [49152, 576], expected [576, 49152]") },
        FakeStage { name: "check", kind: "evaluate", inputs: &["export"], state: "skipped", duration_s: 0.0, files: None, error: None },
    ];
    let mut records = Vec::new();
    for stage in &stages {
        // Stages up to tokens are shared by both runs (cached), later ones differ.
        let shared = matches!(stage.name, "raw" | "prompts" | "tokens");
        let fp = fingerprint(&if shared {
            stage.name.to_string()
        } else {
            format!("{}{run_id}", stage.name)
        });
        let dir = store.join(&fp);
        if let Some(files) = &stage.files {
            let mut entries = Vec::new();
            for (name, bytes) in files {
                fs::create_dir_all(&dir).expect("mkdir");
                fs::write(dir.join(name), bytes).expect("write file");
                entries
                    .push(json!({"path": name, "size": bytes.len(), "blake3": blake_like(name)}));
            }
            let inputs: serde_json::Map<String, Value> = stage
                .inputs
                .iter()
                .map(|i| {
                    (
                        i.to_string(),
                        json!(fingerprint(
                            &if matches!(*i, "raw" | "prompts" | "tokens") {
                                i.to_string()
                            } else {
                                format!("{i}{run_id}")
                            }
                        )),
                    )
                })
                .collect();
            write_json(
                &dir.join("manifest.json"),
                &json!({"fingerprint": fp, "stage": stage.name, "kind": stage.kind, "version": 1,
                "params": {}, "inputs": inputs, "files": entries, "created_at": started, "duration_s": stage.duration_s, "fingerprint_doc": {}}),
            );
        }
        records.push(json!({"name": stage.name, "kind": stage.kind, "fingerprint": fp, "inputs": stage.inputs, "state": stage.state,
            "reason": match stage.state { "run" => json!("not in store"), "skipped" => json!("dependency export failed"), _ => Value::Null },
            "duration_s": stage.duration_s, "artifact": dir.to_string_lossy(), "error": stage.error}));
    }
    let run = json!({
        "run_id": run_id, "recipe_path": "recipes/medical.toml", "recipe_dir": ".", "recipe_name": "medical", "store": ".runner/store", "executor": "local",
        "resolved_recipe": {"recipe": {"name": "medical", "seed": seed},
            "stages": {"raw": {"kind": "ingest", "path": "data/medical/*.csv"}, "sft": {"kind": "sft", "input": "tokens", "learning_rate": learning_rate, "lora": {"r": 8, "alpha": 16}}}},
        "overrides": [format!("stages.sft.learning_rate={learning_rate:e}")],
        "started_at": started, "finished_at": "2026-11-25T22:37:10Z", "status": "failed",
        "runner_version": "0.1.0", "git_revision": "abc123", "host": "box", "device": "cpu", "stages": records});
    write_json(
        &root.join(".runner/runs").join(run_id).join("run.json"),
        &run,
    );
}

/// Writes both fake runs under `root/.runner` and returns the runs folder.
pub(crate) fn build_fake_project(root: &Path) -> PathBuf {
    write_run(root, RUN_A, "2026-11-25T21:35:00Z", 2e-4, 42, "");
    write_run(root, RUN_B, "2026-11-25T22:00:00Z", 1e-4, 7, "（B）");
    root.join(".runner/runs")
}

fn fake() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let runs = build_fake_project(dir.path());
    (dir, runs)
}

#[test]
fn report_shows_every_stage_with_its_state() {
    let (_dir, runs) = fake();
    let html = render_report(&runs, RUN_A, None).expect("report");
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    for (name, state) in [
        ("raw", "cached"),
        ("prompts", "cached"),
        ("tokens", "cached"),
        ("sft", "run"),
        ("eval", "run"),
        ("grpo", "run"),
        ("export", "failed"),
        ("check", "skipped"),
    ] {
        let section = html
            .split(&format!("id=\"stage-{name}\""))
            .nth(1)
            .unwrap_or_else(|| panic!("no section for {name}"));
        let header = section.split("</h3>").next().unwrap_or("");
        assert!(
            header.contains(&format!(">{state}</span>")),
            "{name} should be {state}: {header}"
        );
    }
    // Header facts.
    for fact in [
        RUN_A,
        "recipes/medical.toml",
        "2026-11-25 21:35:00 UTC",
        "1h 02m",
        "abc123",
        "box · cpu",
        "stages.sft.learning_rate=2e-4",
        "8 stages: 3 run, 3 cached, 1 failed, 1 skipped",
    ] {
        assert!(html.contains(fact), "missing header fact {fact}");
    }
    // The DAG has one node per stage and one arrow per edge.
    let dag = html
        .split("<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"dag\"")
        .nth(1)
        .expect("dag svg");
    let dag = dag.split("</svg>").next().unwrap_or("");
    assert_eq!(dag.matches("href=\"#stage-").count(), 8);
    assert_eq!(dag.matches("marker-end=").count(), 8);
    assert!(dag.contains("sft · run · 1m 35s"));
    // Garbage-collected artifacts and errors are said, not crashed on.
    let raw = html.split("id=\"stage-raw\"").nth(1).expect("raw");
    assert!(raw
        .split("</article>")
        .next()
        .unwrap_or("")
        .contains("artifact not in store"));
    assert!(html.contains("tensor &#39;lm_head.weight&#39; has shape [49152, 576]"));
    assert!(html.contains("dependency export failed"));
}

#[test]
fn report_lists_files_charts_and_metrics() {
    let (_dir, runs) = fake();
    let html = render_report(&runs, RUN_A, None).expect("report");
    assert!(html.contains("<code>tokens.bin</code></td><td class=\"num\">1.5 MiB</td>"));
    assert!(html.contains("<code>data.jsonl</code></td><td class=\"num\">46.9 KiB</td>"));
    let sft = html
        .split("id=\"stage-sft\"")
        .nth(1)
        .expect("sft")
        .split("</article>")
        .next()
        .unwrap_or("");
    for chart in [
        "aria-label=\"Loss\"",
        "aria-label=\"Learning rate\"",
        "aria-label=\"Gradient norm\"",
        "aria-label=\"Throughput\"",
        "aria-label=\"Memory\"",
        "loss (smoothed)",
        ">eval_loss</text>",
    ] {
        assert!(sft.contains(chart), "sft section misses {chart}");
    }
    assert!(
        sft.contains("tokens</a> <code title=\""),
        "input fingerprint from the manifest"
    );
    let grpo = html
        .split("id=\"stage-grpo\"")
        .nth(1)
        .expect("grpo")
        .split("</article>")
        .next()
        .unwrap_or("");
    for chart in [
        "aria-label=\"Rewards\"",
        "rewards/format",
        "rewards/accuracy",
        "aria-label=\"KL divergence to the reference\"",
        "aria-label=\"Completion length\"",
    ] {
        assert!(grpo.contains(chart), "grpo section misses {chart}");
    }
    let eval = html
        .split("id=\"stage-eval\"")
        .nth(1)
        .expect("eval")
        .split("</article>")
        .next()
        .unwrap_or("");
    for cell in [
        "<td>bleu-4</td><td class=\"num\">10.1234</td>",
        "<td>rouge-l</td><td class=\"num\">24.0000</td>",
        "<td>count</td><td class=\"num\">200</td>",
    ] {
        assert!(eval.contains(cell), "eval metrics miss {cell}");
    }
    assert_eq!(
        eval.matches("class=\"pred\"").count(),
        5,
        "five predictions shown"
    );
    assert!(!eval.contains("p6 never shown"));
}

#[test]
fn report_escapes_html_and_keeps_unicode() {
    let (_dir, runs) = fake();
    let html = render_report(&runs, RUN_A, None).expect("report");
    assert!(
        !html.to_lowercase().contains("<script"),
        "raw script tag leaked"
    );
    assert!(!html.contains("<b>bold</b>"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"));
    assert!(html.contains("No: &quot;escape&quot; it"));
    assert!(
        html.contains("患者头痛发热三天，应该怎么办？")
            && html.contains("建议及时就医，查血常规。")
    );
    assert!(html.contains("<meta charset=\"utf-8\">"));
    for external in [
        "src=\"http",
        "href=\"http",
        "@import",
        "url(http",
        "<link",
        "<img",
    ] {
        assert!(!html.contains(external), "external reference {external}");
    }
}

#[test]
fn compare_shows_changed_parameters_overlaid_curves_and_both_metrics() {
    let (_dir, runs) = fake();
    let html = render_report(&runs, RUN_A, Some(RUN_B)).expect("report");
    let changes = html
        .split("id=\"changes\"")
        .nth(1)
        .expect("changes")
        .split("</section>")
        .next()
        .unwrap_or("");
    assert!(
        changes.contains(
            "<td><code>recipe.seed</code></td><td><code>42</code></td><td><code>7</code></td>"
        ),
        "{changes}"
    );
    assert!(changes.contains("<td><code>stages.sft.learning_rate</code></td><td><code>0.0002</code></td><td><code>0.0001</code></td>"));
    assert!(
        !changes.contains("stages.raw.path"),
        "unchanged keys are not listed"
    );
    let sft = html
        .split("id=\"stage-sft\"")
        .nth(1)
        .expect("sft")
        .split("</article>")
        .next()
        .unwrap_or("");
    assert!(
        sft.contains(">A · loss (smoothed)</text>")
            && sft.contains(">B · loss (smoothed)</text>")
            && sft.contains(">B · eval_loss</text>")
    );
    assert!(sft.contains("stroke-dasharray"), "run B is dashed");
    let eval = html
        .split("id=\"stage-eval\"")
        .nth(1)
        .expect("eval")
        .split("</article>")
        .next()
        .unwrap_or("");
    assert!(eval.contains("<th class=\"num\">B − A</th>"));
    assert!(eval.contains("<td>bleu-4</td><td class=\"num\">10.1234</td><td class=\"num\">9.1234</td><td class=\"num\">-1.0000</td>"), "{eval}");
    assert!(
        eval.contains("建议多休息，多喝水。（B）"),
        "B's prediction beside A's"
    );
    let tokens = html
        .split("id=\"stage-tokens\"")
        .nth(1)
        .expect("tokens")
        .split("</article>")
        .next()
        .unwrap_or("");
    assert!(tokens.contains("A ") && tokens.contains("→ B"));
    assert!(tokens.contains("Same fingerprint in A and B") && !tokens.contains("B: fingerprint"));
    assert!(eval.contains("<td>count</td><td class=\"num\">200</td><td class=\"num\">200</td><td class=\"num\">0</td>"));
    let table = html
        .split("id=\"pipeline\"")
        .nth(1)
        .expect("pipeline")
        .split("</section>")
        .next()
        .unwrap_or("");
    assert!(
        table.contains(">tokens</a></td><td>tokenize</td>")
            && table.contains("<td>yes</td>")
            && table.contains("<td>no</td>")
    );
}

#[test]
fn latest_run_is_the_last_started() {
    let (dir, runs) = fake();
    assert_eq!(latest_run_id(&runs).expect("latest"), RUN_B);
    // A folder without run.json (a run starting) is passed over.
    fs::create_dir_all(runs.join("zzzz-in-progress")).expect("mkdir");
    assert_eq!(latest_run_id(&runs).expect("latest"), RUN_B);
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).expect("mkdir");
    assert!(matches!(latest_run_id(&empty), Err(Error::NoRuns { .. })));
}

#[test]
fn write_report_defaults_beside_the_run() {
    let (dir, runs) = fake();
    let path = write_report(&runs, RUN_A, None, None).expect("write");
    assert_eq!(path, runs.join(RUN_A).join("report.html"));
    assert!(fs::read_to_string(&path).expect("read").contains(RUN_A));
    let out = dir.path().join("out/compare.html");
    let path = write_report(&runs, RUN_A, Some(RUN_B), Some(&out)).expect("write");
    assert_eq!(path, out);
    assert!(fs::read_to_string(&out)
        .expect("read")
        .contains("Changed parameters"));
}

#[test]
fn errors_name_the_run_and_file() {
    let (_dir, runs) = fake();
    let missing = render_report(&runs, "no-such-run", None)
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("no-such-run") && missing.contains("run.json"),
        "{missing}"
    );
    let missing_compare = render_report(&runs, RUN_A, Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(missing_compare.contains("nope"), "{missing_compare}");
    fs::write(runs.join(RUN_A).join("run.json"), "{\n\"run_id\": 3,\n}").expect("write");
    let broken = render_report(&runs, RUN_A, None).unwrap_err().to_string();
    assert!(broken.contains("run.json:2:"), "{broken}");
}

#[test]
fn garbage_collected_store_still_renders() {
    let (dir, runs) = fake();
    fs::remove_dir_all(dir.path().join(".runner/store")).expect("gc");
    let html = render_report(&runs, RUN_A, Some(RUN_B)).expect("report");
    // Three stages share one artifact in both runs (said once), five differ (said per run).
    assert_eq!(html.matches("artifact not in store").count(), 3 + 5 * 2);
    // A broken metrics file in a restored artifact is reported in its section only.
    let (_dir2, runs2) = fake();
    let record = crate::report::load_run(&runs2, RUN_A).expect("run");
    let sft = record.stages.iter().find(|s| s.name == "sft").expect("sft");
    fs::write(
        Path::new(&sft.artifact).join("metrics.jsonl"),
        "{\"step\":1}\nnot json\n",
    )
    .expect("write");
    let html = render_report(&runs2, RUN_A, None).expect("report");
    assert!(html.contains("training metrics unreadable") && html.contains("metrics.jsonl:2:"));
}

#[test]
fn the_latest_run_is_reported_by_default() {
    let (dir, runs) = fake();
    let out = dir.path().join("latest.html");
    let latest = crate::report::latest_run_id(&runs).expect("a run");
    assert_eq!(latest, RUN_B);
    crate::report::write_report(&runs, &latest, None, Some(&out)).expect("report");
    assert!(fs::read_to_string(out).expect("read").contains(RUN_B));
}
