//! The report page: CSS, run header, changed parameters, stage graph, stage table, resolved
//! recipe. Per-stage sections come from `stage.rs`. Plain HTML that reads without JavaScript,
//! reflows in a narrow window and prints without cut charts.

use std::fmt::Write as _;

use crate::charts::escape_xml as esc;
use crate::report::dag::{anchor_id, dag_svg, duration_text};
use crate::report::diff::{diff_recipes, recipe_text, value_text};
use crate::report::record::RunRecord;
use crate::report::{stage, RunView};

const CSS: &str = r#"
:root{--fg:#1b1b1b;--muted:#5f6368;--line:#dcdfe3;--soft:#f6f7f9;--accent:#1f5fae}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans","Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;color:var(--fg);background:#fff}
main{max-width:1120px;margin:0 auto;padding:20px 20px 48px}
h1{font-size:1.6rem;margin:.1rem 0 .6rem;line-height:1.25;overflow-wrap:anywhere}
h2{font-size:1.2rem;margin:2.2rem 0 .7rem;padding-bottom:.3rem;border-bottom:2px solid var(--line)}
h3{font-size:1.05rem;margin:0;display:flex;flex-wrap:wrap;gap:.5rem;align-items:center}
h4{font-size:.95rem;margin:1.1rem 0 .4rem;color:#333}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:.86em}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:.7rem .9rem;overflow-x:auto;white-space:pre-wrap;overflow-wrap:anywhere}
a{color:var(--accent)}
.eyebrow{margin:0;color:var(--muted);font-size:.8rem;letter-spacing:.06em;text-transform:uppercase}
.badge{display:inline-block;padding:.05rem .55rem;border-radius:999px;font-size:.78rem;font-weight:600;border:1px solid;white-space:nowrap;vertical-align:middle}
.s-succeeded,.s-run{background:#e2f3e6;color:#1e5e22;border-color:#2e7d32}
.s-cached{background:#e1ecf9;color:#174a88;border-color:#1f5fae}
.s-failed{background:#fde2df;color:#9b1c1c;border-color:#c62828}
.s-skipped{background:#f2f2f2;color:#555;border-color:#8a8a8a;border-style:dashed}
.s-running{background:#fff4d6;color:#7a5200;border-color:#b7860b}
.s-unknown{background:#fff;color:#444;border-color:#888}
.table-wrap{overflow-x:auto;margin:.4rem 0 .8rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
th{background:var(--soft);font-weight:600;white-space:nowrap}
td.reason{min-width:20rem}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.meta th{width:9.5rem;background:none;color:var(--muted);font-weight:500}
table.meta td{overflow-wrap:anywhere}
.summary{color:var(--muted);margin:.3rem 0 0}
.dag{display:block;max-width:100%;height:auto}
.dag-wrap{overflow-x:auto;border:1px solid var(--line);border-radius:8px;padding:6px;background:#fff}
.stage{border:1px solid var(--line);border-radius:10px;padding:14px 16px;margin:14px 0;background:#fff}
.stage .kind{color:var(--muted);font-weight:500;font-size:.9rem}
.stage .dur{color:var(--muted);font-weight:400;font-size:.9rem;margin-left:auto}
.kv{display:grid;grid-template-columns:max-content 1fr;gap:.15rem .9rem;margin:.7rem 0 0;font-size:.92rem}
.kv dt{color:var(--muted)}
.kv dd{margin:0;overflow-wrap:anywhere}
.missing{color:#8a5a00;background:#fff7e0;border:1px solid #f0d48a;border-radius:6px;padding:.35rem .6rem;display:inline-block}
.error{color:#9b1c1c;background:#fdf0ee;border-color:#f3c1bb}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,440px),1fr));gap:12px;margin:.5rem 0}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:4px;background:#fff}
figure svg{display:block;width:100%;height:auto}
.preds{display:grid;gap:10px}
.pred{border:1px solid var(--line);border-radius:8px;padding:.5rem .7rem;font-size:.9rem}
.pred .prompt{color:var(--muted);white-space:pre-wrap;overflow-wrap:anywhere;margin-bottom:.4rem}
.pred .pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,240px),1fr));gap:.4rem .9rem}
.pred .label{font-size:.75rem;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.pred .text{white-space:pre-wrap;overflow-wrap:anywhere}
details>summary{cursor:pointer;color:var(--accent);margin:.3rem 0}
footer{margin-top:2.5rem;color:var(--muted);font-size:.82rem}
@media (max-width:600px){main{padding:12px 10px 32px}body{font-size:14px}.stage{padding:10px}.kv{grid-template-columns:1fr}.kv dt{margin-top:.3rem}}
@media print{main{max-width:none;padding:0}a{color:inherit;text-decoration:none}.stage h3,.kv,figure,.pred,tr,.dag-wrap{break-inside:avoid}.stage h3{break-after:avoid}h2{break-after:avoid}.charts{grid-template-columns:1fr 1fr}.dag{min-width:0!important}.table-wrap,.dag-wrap{overflow:visible}details>summary{display:none}}
"#;

/// CSS class of a run status or stage state badge.
pub(crate) fn state_class(state: &str) -> &'static str {
    match state {
        "succeeded" => "s-succeeded",
        "run" => "s-run",
        "cached" => "s-cached",
        "failed" => "s-failed",
        "skipped" => "s-skipped",
        "interrupted" => "s-failed",
        "running" => "s-running",
        _ => "s-unknown",
    }
}

pub(crate) fn badge(state: &str) -> String {
    let text = if state.is_empty() { "unknown" } else { state };
    format!(
        r#"<span class="badge {}">{}</span>"#,
        state_class(state),
        esc(text)
    )
}

fn parse_time(text: Option<&str>) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(text?).ok()
}

fn time_text(text: Option<&str>) -> String {
    match (parse_time(text), text) {
        (Some(t), _) if t.offset().local_minus_utc() == 0 => {
            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
        }
        (Some(t), _) => t.format("%Y-%m-%d %H:%M:%S %:z").to_string(),
        (None, Some(raw)) if !raw.is_empty() => raw.to_string(),
        _ => "–".to_string(),
    }
}

fn wall_time(record: &RunRecord) -> String {
    match (
        parse_time(Some(&record.started_at)),
        parse_time(record.finished_at.as_deref()),
    ) {
        (Some(start), Some(end)) => {
            duration_text(Some((end - start).num_milliseconds() as f64 / 1000.0))
        }
        _ => "–".to_string(),
    }
}

fn opt(text: &str) -> String {
    if text.is_empty() {
        "–".to_string()
    } else {
        esc(text)
    }
}

fn recipe_title(record: &RunRecord) -> String {
    Some(record.recipe_name.clone())
        .filter(|name| !name.is_empty())
        .or_else(|| {
            record
                .resolved_recipe
                .pointer("/recipe/name")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unnamed recipe".to_string())
}

fn state_counts(record: &RunRecord) -> String {
    let mut parts = Vec::new();
    for state in ["run", "cached", "failed", "skipped"] {
        let count = record
            .stages
            .iter()
            .filter(|s| s.state.as_str() == state)
            .count();
        if count > 0 {
            parts.push(format!("{count} {state}"));
        }
    }
    format!("{} stages: {}", record.stages.len(), parts.join(", "))
}

/// The run header as a field table; one value column per run.
fn header_table(runs: &[&RunRecord]) -> String {
    type Field = fn(&RunRecord) -> String;
    let rows: [(&str, Field); 11] = [
        ("Run id", |r| format!("<code>{}</code>", esc(&r.run_id))),
        ("Status", |r| badge(&r.status)),
        ("Recipe", |r| opt(&r.recipe_path)),
        ("Started", |r| time_text(Some(&r.started_at))),
        ("Finished", |r| time_text(r.finished_at.as_deref())),
        ("Wall time", wall_time),
        ("Stages", state_counts),
        ("runner", |r| opt(&r.runner_version)),
        ("Git revision", |r| {
            r.git_revision
                .as_deref()
                .map_or("–".into(), |g| format!("<code>{}</code>", esc(g)))
        }),
        ("Host · device", |r| {
            format!("{} · {}", opt(&r.host), opt(&r.device))
        }),
        ("Overrides", |r| {
            if r.overrides.is_empty() {
                "none".to_string()
            } else {
                r.overrides
                    .iter()
                    .map(|o| format!("<code>{}</code>", esc(o)))
                    .collect::<Vec<_>>()
                    .join("<br>")
            }
        }),
    ];
    let mut html = String::from(r#"<div class="table-wrap"><table class="meta">"#);
    if runs.len() > 1 {
        html.push_str("<tr><th></th><th>A (this run)</th><th>B (compared)</th></tr>");
    }
    for (name, field) in rows {
        let _ = write!(html, "<tr><th>{name}</th>");
        for run in runs {
            let _ = write!(html, "<td>{}</td>", field(run));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table></div>");
    html
}

fn changes_section(a: &RunRecord, b: &RunRecord) -> String {
    let changes = diff_recipes(&a.resolved_recipe, &b.resolved_recipe);
    let mut html = String::from(r#"<section id="changes"><h2>Changed parameters</h2>"#);
    if changes.is_empty() {
        html.push_str("<p>The two resolved recipes are identical.</p></section>");
        return html;
    }
    html.push_str(
        r#"<div class="table-wrap"><table><tr><th>Parameter</th><th>A</th><th>B</th></tr>"#,
    );
    for change in changes {
        let cell = |v: &Option<serde_json::Value>| {
            v.as_ref().map_or_else(
                || "<em>absent</em>".to_string(),
                |v| format!("<code>{}</code>", esc(&value_text(v))),
            )
        };
        let _ = write!(
            html,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            esc(&change.key),
            cell(&change.left),
            cell(&change.right)
        );
    }
    html.push_str("</table></div></section>");
    html
}

fn stage_table(a: &RunRecord, b: Option<&RunRecord>) -> String {
    let mut html =
        String::from(r#"<div class="table-wrap"><table><tr><th>Stage</th><th>Kind</th>"#);
    match b {
        Some(_) => html.push_str(r#"<th>A</th><th class="num">A time</th><th>B</th><th class="num">B time</th><th>Same artifact</th></tr>"#),
        None => html.push_str(r#"<th>State</th><th class="num">Duration</th><th>Fingerprint</th><th>Reason</th></tr>"#),
    }
    for name in stage::stage_names(a, b) {
        let sa = a.stages.iter().find(|s| s.name == name);
        let sb = b.and_then(|b| b.stages.iter().find(|s| s.name == name));
        let kind = sa.or(sb).map_or("", |s| s.kind.as_str());
        let _ = write!(
            html,
            "<tr><td><a href=\"#stage-{}\">{}</a></td><td>{}</td>",
            esc(&anchor_id(&name)),
            esc(&name),
            esc(kind)
        );
        let state_cells = |s: Option<&crate::report::StageRecord>| match s {
            Some(s) => format!(
                r#"<td>{}</td><td class="num">{}</td>"#,
                badge(s.state.as_str()),
                duration_text(Some(s.duration_s))
            ),
            None => r#"<td>absent</td><td class="num">–</td>"#.to_string(),
        };
        html.push_str(&state_cells(sa));
        if b.is_some() {
            html.push_str(&state_cells(sb));
            let same = match (sa, sb) {
                (Some(x), Some(y))
                    if !x.fingerprint.is_empty() && x.fingerprint == y.fingerprint =>
                {
                    "yes"
                }
                (Some(_), Some(_)) => "no",
                _ => "–",
            };
            let _ = write!(html, "<td>{same}</td>");
        } else if let Some(s) = sa {
            // The full error is in the stage's section; one line of it is enough here.
            let reason = s.error.as_deref().or(s.reason.as_deref()).unwrap_or("");
            let first_line = reason.lines().next().unwrap_or("");
            let reason =
                if first_line.chars().count() > 140 || first_line.len() < reason.trim_end().len() {
                    format!("{}…", first_line.chars().take(140).collect::<String>())
                } else {
                    first_line.to_string()
                };
            let _ = write!(
                html,
                r#"<td><code title="{}">{}</code></td><td class="reason">{}</td>"#,
                esc(&s.fingerprint),
                esc(stage::short_fingerprint(&s.fingerprint)),
                esc(&reason)
            );
        }
        html.push_str("</tr>");
    }
    html.push_str("</table></div>");
    html
}

fn recipe_section(view: &RunView, label: &str) -> String {
    let (text, language) = recipe_text(&view.record.resolved_recipe);
    format!(
        r#"<details open><summary>{} ({})</summary><pre><code>{}</code></pre></details>"#,
        esc(label),
        language.to_uppercase(),
        esc(&text)
    )
}

/// The whole page for run `a`, compared with `b` when given.
pub(crate) fn render_page(a: &RunView, b: Option<&RunView>) -> String {
    let ra = &a.record;
    let rb = b.map(|v| &v.record);
    let title = match rb {
        Some(rb) => format!("{} — {} vs {}", recipe_title(ra), ra.run_id, rb.run_id),
        None => format!("{} — {}", recipe_title(ra), ra.run_id),
    };
    let mut html = String::with_capacity(64 * 1024);
    let _ = write!(
        html,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:"><meta name="generator" content="runner {}"><title>{}</title><style>{CSS}</style></head><body><main>"#,
        esc(&ra.runner_version),
        esc(&format!("runner report: {title}"))
    );
    let _ = write!(
        html,
        r#"<header><p class="eyebrow">runner {}</p><h1>{} {}</h1>"#,
        if rb.is_some() {
            "run comparison"
        } else {
            "run report"
        },
        esc(&recipe_title(ra)),
        badge(&ra.status)
    );
    let runs: Vec<&RunRecord> = std::iter::once(ra).chain(rb).collect();
    html.push_str(&header_table(&runs));
    html.push_str("</header>");

    if let Some(rb) = rb {
        html.push_str(&changes_section(ra, rb));
    }
    html.push_str(r#"<section id="pipeline"><h2>Pipeline</h2>"#);
    for (view, label) in std::iter::once((a, "A")).chain(b.map(|v| (v, "B"))) {
        if b.is_some() {
            let _ = write!(
                html,
                "<h4>{label}: <code>{}</code></h4>",
                esc(&view.record.run_id)
            );
        }
        let svg = dag_svg(&view.record.stages);
        if svg.is_empty() {
            html.push_str("<p>This run has no stages.</p>");
        } else {
            let _ = write!(html, r#"<div class="dag-wrap">{svg}</div>"#);
        }
    }
    html.push_str(&stage_table(ra, rb));
    html.push_str("</section>");

    html.push_str(r#"<section id="stages"><h2>Stages</h2>"#);
    html.push_str(&stage::stage_sections(a, b));
    html.push_str("</section>");

    html.push_str(r#"<section id="recipe"><h2>Resolved recipe</h2>"#);
    html.push_str(&recipe_section(
        a,
        if b.is_some() {
            "A: resolved recipe"
        } else {
            "resolved recipe"
        },
    ));
    if let Some(b) = b {
        html.push_str(&recipe_section(b, "B: resolved recipe"));
    }
    html.push_str("</section>");
    let _ = write!(
        html,
        "<footer>Written by runner report from <code>{}</code>. No scripts, fonts or network requests: this file is the whole report.</footer></main></body></html>",
        esc(&ra.run_id)
    );
    html.push('\n');
    html
}
