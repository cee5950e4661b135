//! Per-stage sections of the report: fingerprint, inputs, output files with sizes, training
//! curves (overlaid for a compared run), evaluation metrics and sample predictions.

use std::fmt::Write as _;

use serde_json::Value;

use crate::charts::{escape_xml as esc, line_chart_svg, ChartOptions, ChartSpec, Series};
use crate::report::dag::{anchor_id, duration_text};
use crate::report::page::badge;
use crate::report::record::{Prediction, RunRecord, StageArtifacts};
use crate::report::{RunView, StageRecord};

/// Characters of a fingerprint shown; the full one is in the hover title.
const FINGERPRINT_SHOWN: usize = 12;
/// Output files listed per stage before "and N more".
const FILES_SHOWN: usize = 40;
/// Characters of a prompt, prediction or reference shown.
const TEXT_SHOWN: usize = 600;

pub(crate) fn short_fingerprint(fingerprint: &str) -> &str {
    fingerprint
        .char_indices()
        .nth(FINGERPRINT_SHOWN)
        .map_or(fingerprint, |(at, _)| &fingerprint[..at])
}

/// Stage names of run `a` in order, then those only `b` has.
pub(crate) fn stage_names(a: &RunRecord, b: Option<&RunRecord>) -> Vec<String> {
    let mut names: Vec<String> = a.stages.iter().map(|s| s.name.clone()).collect();
    for stage in b.map(|b| b.stages.as_slice()).unwrap_or_default() {
        if !names.contains(&stage.name) {
            names.push(stage.name.clone());
        }
    }
    names
}

fn find<'v>(view: &'v RunView, name: &str) -> Option<(&'v StageRecord, &'v StageArtifacts)> {
    let at = view.record.stages.iter().position(|s| s.name == name)?;
    Some((&view.record.stages[at], view.artifacts.get(at)?))
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn clip(text: &str) -> String {
    if text.chars().count() <= TEXT_SHOWN {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(TEXT_SHOWN).collect::<String>())
    }
}

fn missing(text: &str) -> String {
    format!(r#"<p><span class="missing">{}</span></p>"#, esc(text))
}

fn problem(text: &str) -> String {
    format!(r#"<p><span class="missing error">{}</span></p>"#, esc(text))
}

/// Fingerprint, reason, error, inputs and artifact location of one run's stage.
fn stage_facts(label: Option<&str>, stage: &StageRecord, artifacts: &StageArtifacts) -> String {
    let prefix = label.map(|l| format!("{l}: ")).unwrap_or_default();
    let mut html = String::from(r#"<dl class="kv">"#);
    let _ = write!(
        html,
        r#"<dt>{prefix}fingerprint</dt><dd><code title="{}">{}</code></dd>"#,
        esc(&stage.fingerprint),
        esc(short_fingerprint(&stage.fingerprint))
    );
    if label.is_some() {
        let _ = write!(
            html,
            "<dt>{prefix}state</dt><dd>{} {}</dd>",
            badge(stage.state.as_str()),
            duration_text(Some(stage.duration_s))
        );
    }
    if let Some(reason) = &stage.reason {
        let _ = write!(html, "<dt>{prefix}reason</dt><dd>{}</dd>", esc(reason));
    }
    if !stage.inputs.is_empty() {
        let input_fps = artifacts
            .manifest
            .as_ref()
            .and_then(|m| m.as_ref().ok())
            .map(|m| &m.inputs);
        let inputs: Vec<String> = stage
            .inputs
            .iter()
            .map(|name| {
                let fp = input_fps.and_then(|fps| fps.get(name)).map(String::as_str);
                match fp {
                    Some(fp) => format!(
                        r##"<a href="#stage-{}">{}</a> <code title="{}">{}</code>"##,
                        esc(&anchor_id(name)),
                        esc(name),
                        esc(fp),
                        esc(short_fingerprint(fp))
                    ),
                    None => format!(
                        r##"<a href="#stage-{}">{}</a>"##,
                        esc(&anchor_id(name)),
                        esc(name)
                    ),
                }
            })
            .collect();
        let _ = write!(
            html,
            "<dt>{prefix}inputs</dt><dd>{}</dd>",
            inputs.join(", ")
        );
    }
    match &artifacts.dir {
        Some(dir) => {
            let _ = write!(
                html,
                "<dt>{prefix}artifact</dt><dd><code>{}</code></dd>",
                esc(&dir.display().to_string())
            );
        }
        None => {
            let _ = write!(
                html,
                r#"<dt>{prefix}artifact</dt><dd><span class="missing">artifact not in store</span></dd>"#
            );
        }
    }
    html.push_str("</dl>");
    if let Some(error) = &stage.error {
        let _ = write!(html, r#"<pre class="error">{}</pre>"#, esc(error));
    }
    html
}

fn files_table(artifacts: &StageArtifacts) -> String {
    match &artifacts.manifest {
        None => String::new(),
        Some(Err(message)) => problem(&format!("manifest unreadable: {message}")),
        Some(Ok(manifest)) if manifest.files.is_empty() => {
            "<p>No output files recorded.</p>".to_string()
        }
        Some(Ok(manifest)) => {
            let total: u64 = manifest.files.iter().map(|f| f.size).sum();
            let mut html = format!(
                r#"<h4>Output files ({} files, {})</h4><div class="table-wrap"><table><tr><th>File</th><th class="num">Size</th><th>blake3</th></tr>"#,
                manifest.files.len(),
                human_size(total)
            );
            for file in manifest.files.iter().take(FILES_SHOWN) {
                let _ = write!(
                    html,
                    r#"<tr><td><code>{}</code></td><td class="num">{}</td><td><code title="{}">{}</code></td></tr>"#,
                    esc(&file.path),
                    human_size(file.size),
                    esc(&file.blake3),
                    esc(short_fingerprint(&file.blake3))
                );
            }
            if manifest.files.len() > FILES_SHOWN {
                let _ = write!(
                    html,
                    r#"<tr><td colspan="3">… and {} more</td></tr>"#,
                    manifest.files.len() - FILES_SHOWN
                );
            }
            html.push_str("</table></div>");
            html
        }
    }
}

/// Overlays run A's and run B's chart specs with the same file stem: B dashed.
/// Returns each spec with per-series dashes and colours: one colour per metric, B dashed.
fn merged_charts(
    a: &[ChartSpec],
    b: Option<&[ChartSpec]>,
) -> Vec<(ChartSpec, Vec<bool>, Vec<usize>)> {
    let Some(b) = b else {
        return a
            .iter()
            .map(|s| (s.clone(), Vec::new(), Vec::new()))
            .collect();
    };
    let mut stems: Vec<&str> = a.iter().map(|s| s.file_stem.as_str()).collect();
    for spec in b {
        if !stems.contains(&spec.file_stem.as_str()) {
            stems.push(&spec.file_stem);
        }
    }
    stems
        .into_iter()
        .filter_map(|stem| {
            let sa = a.iter().find(|s| s.file_stem == stem);
            let sb = b.iter().find(|s| s.file_stem == stem);
            let base = sa.or(sb)?;
            let mut series = Vec::new();
            let mut dashed = Vec::new();
            let mut colors = Vec::new();
            let mut metrics: Vec<&str> = Vec::new();
            for (label, spec) in [("A", sa), ("B", sb)] {
                for s in spec.map(|s| s.series.as_slice()).unwrap_or_default() {
                    let metric = metrics
                        .iter()
                        .position(|m| *m == s.name)
                        .unwrap_or_else(|| {
                            metrics.push(&s.name);
                            metrics.len() - 1
                        });
                    series.push(Series {
                        name: format!("{label} · {}", s.name),
                        points: s.points.clone(),
                    });
                    dashed.push(label == "B");
                    colors.push(metric);
                }
            }
            Some((
                ChartSpec {
                    series,
                    ..base.clone()
                },
                dashed,
                colors,
            ))
        })
        .collect()
}

fn charts_html(a: Option<&StageArtifacts>, b: Option<&StageArtifacts>, comparing: bool) -> String {
    let specs_of = |art: Option<&StageArtifacts>| -> (Option<Vec<ChartSpec>>, Option<String>) {
        match art.and_then(|x| x.charts.as_ref()) {
            Some(Ok(specs)) => (Some(specs.clone()), None),
            Some(Err(message)) => (None, Some(message.clone())),
            None => (None, None),
        }
    };
    let (specs_a, error_a) = specs_of(a);
    let (specs_b, error_b) = specs_of(b);
    let mut html = String::new();
    for (label, error) in [("A", error_a), ("B", error_b)] {
        if let Some(error) = error {
            let prefix = if comparing {
                format!("{label}: ")
            } else {
                String::new()
            };
            html.push_str(&problem(&format!(
                "{prefix}training metrics unreadable: {error}"
            )));
        }
    }
    if specs_a.is_none() && specs_b.is_none() {
        return html;
    }
    let a_specs = specs_a.unwrap_or_default();
    let merged = merged_charts(
        &a_specs,
        if comparing {
            Some(specs_b.as_deref().unwrap_or_default())
        } else {
            None
        },
    );
    if merged.is_empty() {
        html.push_str("<p>metrics.jsonl has no numeric series.</p>");
        return html;
    }
    html.push_str(r#"<h4>Training curves</h4><div class="charts">"#);
    for (spec, dashed, colors) in merged {
        // Drawn near the size a two-column grid shows them at, so text stays legible.
        let opts = ChartOptions {
            width: 540,
            height: 310,
            y_label: spec.y_label.clone(),
            smoothing: spec.smoothing,
            dashed,
            colors,
            ..ChartOptions::default()
        };
        let _ = write!(
            html,
            "<figure>{}</figure>",
            line_chart_svg(&spec.title, "step", &spec.series, &opts)
        );
    }
    html.push_str("</div>");
    html
}

fn metric_text(value: &Value) -> String {
    match value.as_f64() {
        Some(v) if value.is_i64() || value.is_u64() => format!("{v}"),
        Some(v) if v != 0.0 && v.abs() < 1e-3 => format!("{v:.3e}"),
        Some(v) => format!("{v:.4}"),
        None => crate::report::diff::value_text(value),
    }
}

fn metrics_html(a: Option<&StageArtifacts>, b: Option<&StageArtifacts>, comparing: bool) -> String {
    let get = |art: Option<&StageArtifacts>| art.and_then(|x| x.eval_metrics.clone());
    let (ma, mb) = (get(a), get(b));
    let mut html = String::new();
    for (label, metrics) in [("A", &ma), ("B", &mb)] {
        if let Some(Err(message)) = metrics {
            let prefix = if comparing {
                format!("{label}: ")
            } else {
                String::new()
            };
            html.push_str(&problem(&format!(
                "{prefix}evaluation metrics unreadable: {message}"
            )));
        }
    }
    let ma = ma.and_then(Result::ok);
    let mb = mb.and_then(Result::ok).filter(|_| comparing);
    if ma.is_none() && mb.is_none() {
        return html;
    }
    let mut keys: Vec<String> = ma.iter().flat_map(|m| m.keys().cloned()).collect();
    for key in mb.iter().flat_map(|m| m.keys()) {
        if !keys.contains(key) {
            keys.push(key.clone());
        }
    }
    html.push_str(
        r#"<h4>Evaluation metrics</h4><div class="table-wrap"><table><tr><th>Metric</th>"#,
    );
    html.push_str(if comparing {
        r#"<th class="num">A</th><th class="num">B</th><th class="num">B − A</th></tr>"#
    } else {
        r#"<th class="num">Value</th></tr>"#
    });
    for key in keys {
        let va = ma.as_ref().and_then(|m| m.get(&key));
        let vb = mb.as_ref().and_then(|m| m.get(&key));
        let cell = |v: Option<&Value>| v.map_or("–".to_string(), |v| esc(&metric_text(v)));
        let _ = write!(
            html,
            r#"<tr><td>{}</td><td class="num">{}</td>"#,
            esc(&key),
            cell(va)
        );
        if comparing {
            let delta = match (va.and_then(Value::as_f64), vb.and_then(Value::as_f64)) {
                (Some(x), Some(y)) => {
                    let d = y - x;
                    let both_integers = va.is_some_and(|v| v.is_i64() || v.is_u64())
                        && vb.is_some_and(|v| v.is_i64() || v.is_u64());
                    let text = if both_integers {
                        format!("{d}")
                    } else {
                        metric_text(&serde_json::json!(d))
                    };
                    if d > 0.0 {
                        format!("+{text}")
                    } else {
                        text
                    }
                }
                _ => "–".to_string(),
            };
            let _ = write!(
                html,
                r#"<td class="num">{}</td><td class="num">{}</td>"#,
                cell(vb),
                esc(&delta)
            );
        }
        html.push_str("</tr>");
    }
    html.push_str("</table></div>");
    html
}

fn predictions_html(
    a: Option<&StageArtifacts>,
    b: Option<&StageArtifacts>,
    comparing: bool,
) -> String {
    let get = |art: Option<&StageArtifacts>| art.and_then(|x| x.predictions.clone());
    let mut html = String::new();
    let pa = match get(a) {
        Some(Ok(p)) => p,
        Some(Err(message)) => return problem(&format!("predictions unreadable: {message}")),
        None => Vec::new(),
    };
    let pb: Vec<Prediction> = if comparing {
        get(b).and_then(Result::ok).unwrap_or_default()
    } else {
        Vec::new()
    };
    if pa.is_empty() && pb.is_empty() {
        return html;
    }
    let _ = write!(
        html,
        r#"<h4>Sample predictions (first {})</h4><div class="preds">"#,
        pa.len().max(pb.len())
    );
    for index in 0..pa.len().max(pb.len()) {
        let first = pa.get(index).or(pb.get(index));
        let Some(first) = first else { continue };
        let _ = write!(
            html,
            r#"<div class="pred"><div class="prompt">{}</div><div class="pair">"#,
            esc(&clip(&first.prompt))
        );
        let _ = write!(
            html,
            r#"<div><div class="label">reference</div><div class="text">{}</div></div>"#,
            esc(&clip(&first.reference))
        );
        let column = |label: &str, p: Option<&Prediction>| {
            p.map_or(String::new(), |p| {
                format!(
                    r#"<div><div class="label">{}</div><div class="text">{}</div></div>"#,
                    esc(label),
                    esc(&clip(&p.prediction))
                )
            })
        };
        if comparing {
            html.push_str(&column("prediction A", pa.get(index)));
            // B's prediction belongs beside A's only when it answers the same prompt.
            html.push_str(&column(
                "prediction B",
                pb.get(index).filter(|p| p.prompt == first.prompt),
            ));
        } else {
            html.push_str(&column("prediction", pa.get(index)));
        }
        html.push_str("</div></div>");
    }
    html.push_str("</div>");
    html
}

fn stage_section(name: &str, a: &RunView, b: Option<&RunView>) -> String {
    let in_a = find(a, name);
    let in_b = b.and_then(|b| find(b, name));
    let comparing = b.is_some();
    let Some((first_stage, _)) = in_a.or(in_b) else {
        return String::new();
    };
    let mut html = format!(
        r#"<article class="stage" id="stage-{}"><h3>{} <span class="kind">{}</span>"#,
        esc(&anchor_id(name)),
        esc(name),
        esc(&first_stage.kind)
    );
    match (comparing, in_a, in_b) {
        (false, Some((s, _)), _) => {
            let _ = write!(
                html,
                r#" {}<span class="dur">{}</span></h3>"#,
                badge(s.state.as_str()),
                duration_text(Some(s.duration_s))
            );
        }
        _ => {
            let state = |x: Option<(&StageRecord, &StageArtifacts)>| {
                x.map_or("absent".to_string(), |(s, _)| badge(s.state.as_str()))
            };
            let _ = write!(html, " A {} → B {}</h3>", state(in_a), state(in_b));
        }
    }
    let same_artifact = matches!((in_a, in_b), (Some((x, _)), Some((y, _))) if !x.fingerprint.is_empty() && x.fingerprint == y.fingerprint);
    if same_artifact {
        if let Some((stage, artifacts)) = in_a {
            html.push_str(r#"<p class="summary">Same fingerprint in A and B: one artifact.</p>"#);
            html.push_str(&stage_facts(None, stage, artifacts));
        }
    }
    for (label, entry) in [("A", in_a), ("B", in_b)]
        .into_iter()
        .filter(|_| !same_artifact)
    {
        if let Some((stage, artifacts)) = entry {
            html.push_str(&stage_facts(comparing.then_some(label), stage, artifacts));
        } else if comparing {
            html.push_str(&missing(&format!("not in run {label}")));
        }
    }
    let art_a = in_a.map(|(_, art)| art);
    // One artifact: overlaying it on itself would only double every line.
    let art_b = in_b.map(|(_, art)| art).filter(|_| !same_artifact);
    if let Some(artifacts) = art_a.or(art_b) {
        html.push_str(&files_table(artifacts));
    }
    let compare_outputs = comparing && !same_artifact;
    html.push_str(&charts_html(art_a, art_b, compare_outputs));
    html.push_str(&metrics_html(art_a, art_b, compare_outputs));
    html.push_str(&predictions_html(art_a, art_b, compare_outputs));
    html.push_str("</article>");
    html
}

/// One section per stage name of run `a` (then those only in `b`).
pub(crate) fn stage_sections(a: &RunView, b: Option<&RunView>) -> String {
    let names = stage_names(&a.record, b.map(|v| &v.record));
    names.iter().map(|name| stage_section(name, a, b)).collect()
}
