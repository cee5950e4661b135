//! The recipe's stage graph as inline SVG: layered layout by dependency depth (a simple
//! Sugiyama-style layering with one barycenter pass to reduce crossings), arrows from inputs to
//! consumers, nodes coloured by cache state and labelled with their duration.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::charts::escape_xml;
use crate::report::record::StageRecord;

const NODE_WIDTH: f64 = 178.0;
const NODE_HEIGHT: f64 = 54.0;
const LAYER_GAP: f64 = 34.0;
const ROW_GAP: f64 = 16.0;
const MARGIN: f64 = 10.0;
const LEGEND_HEIGHT: f64 = 30.0;

/// Fill, stroke and dash of a node in the given state.
pub fn state_colors(state: &str) -> (&'static str, &'static str, bool) {
    match state {
        "run" => ("#e2f3e6", "#2e7d32", false),
        "cached" => ("#e1ecf9", "#1f5fae", false),
        "failed" => ("#fde2df", "#c62828", false),
        "skipped" => ("#f2f2f2", "#8a8a8a", true),
        _ => ("#ffffff", "#666666", false),
    }
}

/// Dependency depth of every stage: 0 without inputs, else one more than its deepest input.
/// Inputs that name no stage of the run are ignored; a cycle (which the pipeline rejects)
/// is cut where it is found rather than looping.
pub fn depths(stages: &[StageRecord]) -> Vec<usize> {
    let index: HashMap<&str, usize> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    fn visit(
        i: usize,
        stages: &[StageRecord],
        index: &HashMap<&str, usize>,
        memo: &mut Vec<Option<usize>>,
        on_path: &mut Vec<bool>,
    ) -> usize {
        if let Some(depth) = memo[i] {
            return depth;
        }
        if on_path[i] {
            return 0;
        }
        on_path[i] = true;
        let depth = stages[i]
            .inputs
            .iter()
            .filter_map(|name| index.get(name.as_str()))
            .map(|&j| visit(j, stages, index, memo, on_path) + 1)
            .max()
            .unwrap_or(0);
        on_path[i] = false;
        memo[i] = Some(depth);
        depth
    }
    let mut memo = vec![None; stages.len()];
    let mut on_path = vec![false; stages.len()];
    (0..stages.len())
        .map(|i| visit(i, stages, &index, &mut memo, &mut on_path))
        .collect()
}

/// Duration as shown on nodes and in tables.
pub fn duration_text(seconds: Option<f64>) -> String {
    match seconds {
        None => "–".to_string(),
        Some(s) if !s.is_finite() => "–".to_string(),
        Some(s) if s < 60.0 => format!("{s:.1} s"),
        Some(s) if s < 3600.0 => format!("{}m {:02}s", (s / 60.0).floor(), (s % 60.0).floor()),
        Some(s) => format!(
            "{}h {:02}m",
            (s / 3600.0).floor(),
            ((s % 3600.0) / 60.0).floor()
        ),
    }
}

fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let kept: String = text.chars().take(max_chars.saturating_sub(1)).collect();
        format!("{kept}…")
    }
}

/// Renders the stage graph. Returns an empty string for a run without stages.
pub fn dag_svg(stages: &[StageRecord]) -> String {
    if stages.is_empty() {
        return String::new();
    }
    let depth = depths(stages);
    let layer_count = depth.iter().max().map_or(1, |d| d + 1);
    let mut layers: Vec<Vec<usize>> = vec![Vec::new(); layer_count];
    for (i, d) in depth.iter().enumerate() {
        layers[*d].push(i);
    }
    let index: HashMap<&str, usize> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    // Barycenter pass: order each layer by the mean row of its inputs.
    let mut row_of = vec![0.0f64; stages.len()];
    for layer in &mut layers {
        let key = |i: &usize| {
            let rows: Vec<f64> = stages[*i]
                .inputs
                .iter()
                .filter_map(|n| index.get(n.as_str()))
                .map(|&j| row_of[j])
                .collect();
            if rows.is_empty() {
                *i as f64
            } else {
                rows.iter().sum::<f64>() / rows.len() as f64
            }
        };
        layer.sort_by(|a, b| key(a).total_cmp(&key(b)).then(a.cmp(b)));
        for (row, &i) in layer.iter().enumerate() {
            row_of[i] = row as f64;
        }
    }
    let tallest = layers.iter().map(Vec::len).max().unwrap_or(1) as f64;
    let graph_height = tallest * NODE_HEIGHT + (tallest - 1.0) * ROW_GAP;
    let width =
        MARGIN * 2.0 + layer_count as f64 * NODE_WIDTH + (layer_count as f64 - 1.0) * LAYER_GAP;
    let height = MARGIN * 2.0 + graph_height + LEGEND_HEIGHT;
    let mut position = vec![(0.0, 0.0); stages.len()];
    for (d, layer) in layers.iter().enumerate() {
        let layer_height = layer.len() as f64 * NODE_HEIGHT + (layer.len() as f64 - 1.0) * ROW_GAP;
        let top = MARGIN + (graph_height - layer_height) / 2.0;
        for (row, &i) in layer.iter().enumerate() {
            position[i] = (
                MARGIN + d as f64 * (NODE_WIDTH + LAYER_GAP),
                top + row as f64 * (NODE_HEIGHT + ROW_GAP),
            );
        }
    }

    // Below ~75% of its natural size node text gets too small: the page scrolls it instead.
    let min_width = width * 0.75;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="dag" viewBox="0 0 {width} {height}" width="{width}" height="{height}" style="min-width:{min_width:.0}px" role="img" aria-label="Stage graph" font-family="system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif" font-size="12"><title>Stage graph</title><defs><marker id="runner-dag-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>"##
    );
    for (i, stage) in stages.iter().enumerate() {
        let (x, y) = position[i];
        for input in &stage.inputs {
            let Some(&j) = index.get(input.as_str()) else {
                continue;
            };
            let (from_x, from_y) = (
                position[j].0 + NODE_WIDTH,
                position[j].1 + NODE_HEIGHT / 2.0,
            );
            let (to_x, to_y) = (x - 2.0, y + NODE_HEIGHT / 2.0);
            let mid = (from_x + to_x) / 2.0;
            let _ = write!(
                svg,
                r##"<path d="M{from_x:.1},{from_y:.1} C{mid:.1},{from_y:.1} {mid:.1},{to_y:.1} {to_x:.1},{to_y:.1}" fill="none" stroke="#666" stroke-width="1.4" marker-end="url(#runner-dag-arrow)"/>"##
            );
        }
    }
    for (i, stage) in stages.iter().enumerate() {
        let (x, y) = position[i];
        let (fill, stroke, dashed) = state_colors(stage.state.as_str());
        let dash = if dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let state = stage.state.as_str();
        let detail = format!(
            "{} · {} · {}",
            stage.kind,
            state,
            duration_text(Some(stage.duration_s))
        );
        let tooltip = format!(
            "{} ({})\nstate: {}\nfingerprint: {}{}",
            stage.name,
            stage.kind,
            state,
            stage.fingerprint,
            stage
                .reason
                .as_deref()
                .map(|r| format!("\nreason: {r}"))
                .unwrap_or_default()
        );
        let _ = write!(
            svg,
            r##"<a href="#stage-{anchor}"><g><title>{tooltip}</title><rect x="{x:.1}" y="{y:.1}" width="{NODE_WIDTH}" height="{NODE_HEIGHT}" rx="7" fill="{fill}" stroke="{stroke}" stroke-width="1.6"{dash}/><text x="{tx:.1}" y="{ny:.1}" text-anchor="middle" font-weight="600" font-size="15" fill="#1a1a1a">{name}</text><text x="{tx:.1}" y="{dy:.1}" text-anchor="middle" fill="#444" font-size="12.5">{detail}</text></g></a>"##,
            anchor = escape_xml(&anchor_id(&stage.name)),
            tooltip = escape_xml(&tooltip),
            tx = x + NODE_WIDTH / 2.0,
            ny = y + 23.0,
            dy = y + 42.0,
            name = escape_xml(&shorten(&stage.name, 20)),
            detail = escape_xml(&shorten(&detail, 28)),
        );
    }
    let mut legend_x = MARGIN;
    let legend_y = height - LEGEND_HEIGHT + 10.0;
    for state in ["run", "cached", "failed", "skipped"] {
        let (fill, stroke, dashed) = state_colors(state);
        let dash = if dashed {
            r#" stroke-dasharray="4 2""#
        } else {
            ""
        };
        let _ = write!(
            svg,
            r##"<rect x="{legend_x}" y="{legend_y}" width="14" height="14" rx="3" fill="{fill}" stroke="{stroke}"{dash}/><text x="{tx}" y="{ty}" fill="#333" font-size="13">{state}</text>"##,
            tx = legend_x + 19.0,
            ty = legend_y + 11.5,
        );
        legend_x += 32.0 + state.len() as f64 * 7.5;
    }
    svg.push_str("</svg>");
    svg
}

/// HTML id of a stage's section (stage names are recipe keys, but be safe).
pub fn anchor_id(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, inputs: &[&str], state: &str) -> StageRecord {
        StageRecord {
            name: name.into(),
            kind: name.into(),
            fingerprint: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            state: serde_json::from_value(serde_json::json!(state)).unwrap(),
            reason: None,
            duration_s: 1.25,
            artifact: String::new(),
            error: None,
            job_id: None,
            log_path: None,
        }
    }

    #[test]
    fn depth_follows_the_longest_input_chain() {
        let stages = [
            stage("eval", &["sft", "tokens"], "run"),
            stage("raw", &[], "cached"),
            stage("tokens", &["raw"], "cached"),
            stage("sft", &["tokens"], "run"),
            stage("lonely", &["missing"], "skipped"),
        ];
        assert_eq!(depths(&stages), vec![3, 0, 1, 2, 0]);
    }

    #[test]
    fn cycles_do_not_loop() {
        let stages = [stage("a", &["b"], "run"), stage("b", &["a"], "run")];
        assert_eq!(depths(&stages).len(), 2);
    }

    #[test]
    fn svg_has_a_node_per_stage_and_an_arrow_per_edge() {
        let stages = [
            stage("raw", &[], "cached"),
            stage("sft<x>", &["raw"], "failed"),
        ];
        let svg = dag_svg(&stages);
        assert_eq!(
            svg.matches("<rect x=").count(),
            2 + 4,
            "two nodes and four legend swatches"
        );
        assert_eq!(svg.matches("marker-end=").count(), 1);
        assert!(svg.contains("sft&lt;x&gt;") && svg.contains("#c62828"));
        assert!(svg.contains("raw · cached · 1.2 s") || svg.contains("raw · cached · 1.3 s"));
        assert!(svg.contains("href=\"#stage-sft-x-\""));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_text(Some(0.0)), "0.0 s");
        assert_eq!(duration_text(Some(75.0)), "1m 15s");
        assert_eq!(duration_text(Some(7300.0)), "2h 01m");
        assert_eq!(duration_text(None), "–");
    }
}
