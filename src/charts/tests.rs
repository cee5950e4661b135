//! Tests of the SVG line charts and of grouping metrics.jsonl keys into charts.

use super::*;
use serde_json::json;

fn series(name: &str, points: &[(f64, f64)]) -> Series {
    Series {
        name: name.to_string(),
        points: points.to_vec(),
    }
}

fn polyline_point_counts(svg: &str) -> Vec<usize> {
    svg.split("points=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap_or("").split(' ').count())
        .collect()
}

#[test]
fn chart_has_title_axes_ticks_and_legend() {
    let loss = series("loss", &[(0.0, 2.4), (50.0, 1.1), (100.0, 0.3)]);
    let svg = line_chart_svg(
        "Loss <train>",
        "step",
        &[loss],
        &ChartOptions {
            y_label: "loss".into(),
            ..ChartOptions::default()
        },
    );
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.ends_with("</svg>"));
    assert!(svg.contains("Loss &lt;train&gt;"), "title must be escaped");
    for tick in [">0<", ">0.5<", ">1.0<", ">2.5<", ">20<", ">100<"] {
        assert!(svg.contains(tick), "missing tick {tick}");
    }
    assert!(svg.contains(">step</text>") && svg.contains("rotate(-90"));
    assert!(svg.contains(">loss</text>"), "legend entry");
    assert_eq!(polyline_point_counts(&svg), vec![3]);
    assert_eq!(svg.matches("<circle").count(), 3);
}

#[test]
fn empty_series_say_no_data() {
    let svg = line_chart_svg(
        "Empty",
        "step",
        &[series("loss", &[])],
        &ChartOptions::default(),
    );
    assert!(svg.contains("no data"));
    assert!(!svg.contains("<polyline"));
    let none = line_chart_svg("None", "step", &[], &ChartOptions::default());
    assert!(none.contains("no data"));
}

#[test]
fn single_point_is_drawn_as_a_marker() {
    let svg = line_chart_svg(
        "One",
        "step",
        &[series("eval_loss", &[(10.0, 1.5)])],
        &ChartOptions::default(),
    );
    assert_eq!(svg.matches("<circle").count(), 1);
    assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    assert!(svg.contains(">10<"), "x tick at the single step");
}

#[test]
fn non_finite_values_are_skipped() {
    let points = [
        (0.0, 1.0),
        (1.0, f64::NAN),
        (2.0, 0.5),
        (f64::INFINITY, 0.2),
        (3.0, f64::NEG_INFINITY),
        (4.0, 0.25),
    ];
    let svg = line_chart_svg(
        "Loss",
        "step",
        &[series("loss", &points)],
        &ChartOptions::default(),
    );
    assert!(!svg.contains("NaN") && !svg.contains("inf"));
    assert_eq!(polyline_point_counts(&svg), vec![3]);
    let all_nan = line_chart_svg(
        "Loss",
        "step",
        &[series("loss", &[(0.0, f64::NAN)])],
        &ChartOptions::default(),
    );
    assert!(all_nan.contains("no data"));
}

#[test]
fn log_scale_skips_non_positive_values_and_uses_decades() {
    let points = [(0.0, 0.0), (1.0, 0.2), (2.0, 3.0), (3.0, -1.0), (4.0, 40.0)];
    let opts = ChartOptions {
        log_y: true,
        ..ChartOptions::default()
    };
    let svg = line_chart_svg("Loss", "step", &[series("loss", &points)], &opts);
    assert_eq!(polyline_point_counts(&svg), vec![3]);
    for tick in [">0.1<", ">1<", ">10<", ">100<"] {
        assert!(svg.contains(tick), "missing log tick {tick}");
    }
}

#[test]
fn smoothing_draws_raw_and_smoothed_lines_for_long_series_only() {
    let noisy: Vec<(f64, f64)> = (0..50)
        .map(|i| {
            (
                i as f64,
                2.0 - i as f64 * 0.03 + if i % 2 == 0 { 0.2 } else { -0.2 },
            )
        })
        .collect();
    let eval = series("eval_loss", &[(10.0, 1.8), (40.0, 1.0)]);
    let opts = ChartOptions {
        smoothing: Some(0.6),
        ..ChartOptions::default()
    };
    let svg = line_chart_svg("Loss", "step", &[series("loss", &noisy), eval], &opts);
    assert!(svg.contains("loss (smoothed)</text>"));
    assert!(!svg.contains("eval_loss (smoothed)"));
    assert_eq!(polyline_point_counts(&svg), vec![50, 50, 2]);
    assert!(svg.contains("stroke-opacity=\"0.25\""));
}

#[test]
fn ema_matches_tensorboard_debiased_formula() {
    let smoothed = smooth_ema(&[(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)], 0.5);
    // Closed form: sum_i w^(n-i) (1-w) y_i / (1 - w^n).
    let expected = [
        1.0,
        (0.5 * 0.5 * 1.0 + 0.5 * 3.0) / 0.75,
        (0.25 * 0.5 * 1.0 + 0.5 * 0.5 * 3.0 + 0.5 * 2.0) / 0.875,
    ];
    for ((_, got), want) in smoothed.iter().zip(expected) {
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
}

#[test]
fn dashed_series_and_colours_follow_index() {
    let opts = ChartOptions {
        dashed: vec![false, true],
        ..ChartOptions::default()
    };
    let svg = line_chart_svg(
        "Loss",
        "step",
        &[
            series("A", &[(0.0, 1.0), (1.0, 0.5)]),
            series("B", &[(0.0, 1.2), (1.0, 0.6)]),
        ],
        &opts,
    );
    assert_eq!(
        svg.matches("stroke-dasharray").count(),
        2,
        "legend swatch and line of B"
    );
    assert!(svg.contains(PALETTE[0]) && svg.contains(PALETTE[1]));
    let same_colour = ChartOptions {
        colors: vec![3, 3],
        ..opts
    };
    let svg = line_chart_svg(
        "Loss",
        "step",
        &[
            series("A", &[(0.0, 1.0), (1.0, 0.5)]),
            series("B", &[(0.0, 1.2), (1.0, 0.6)]),
        ],
        &same_colour,
    );
    assert!(svg.contains(PALETTE[3]) && !svg.contains(PALETTE[0]) && !svg.contains(PALETTE[1]));
}

#[test]
fn many_points_are_decimated_but_keep_extremes() {
    let mut points: Vec<(f64, f64)> = (0..20_000).map(|i| (i as f64, 1.0)).collect();
    points[12_345].1 = 9.0;
    let svg = line_chart_svg(
        "Loss",
        "step",
        &[series("loss", &points)],
        &ChartOptions::default(),
    );
    let counts = polyline_point_counts(&svg);
    assert!(counts[0] < 5_000, "{counts:?}");
    assert!(svg.len() < 100_000);
    // The spike is the maximum, so it sits on the top tick line of the plot.
    assert!(svg.contains(">9<") || svg.contains(">9.0<") || svg.contains(">10<"));
}

fn rows(values: &[serde_json::Value]) -> Vec<serde_json::Map<String, serde_json::Value>> {
    values
        .iter()
        .map(|v| v.as_object().cloned().unwrap_or_default())
        .collect()
}

#[test]
fn metrics_keys_are_grouped_into_charts() {
    let rows = rows(&[
        json!({"step": 1, "loss": 2.0, "lr": 1e-4, "grad_norm": 3.0, "tokens_per_s": 900.0, "memory_mb": 512, "epoch": 0.1}),
        json!({"step": 2, "loss": 1.5, "lr": 2e-4, "reward": 0.2, "reward_std": 0.1, "rewards/format": 0.5, "rewards/accuracy": 0.1, "kl": 0.01, "completion_length": 80, "clip_ratio": 0.0}),
        json!({"step": 2, "eval_loss": 1.7, "custom/a": 1, "custom/b": 2, "weird key": 3, "note": "text", "flag": true}),
        json!({"step": 2, "eval_rewards/format": 0.4, "eval_reward": 0.3, "eval_completion_length": 70}),
    ]);
    let specs = training_chart_specs(&rows);
    let stems: Vec<&str> = specs.iter().map(|s| s.file_stem.as_str()).collect();
    assert_eq!(
        stems,
        [
            "loss",
            "lr",
            "grad_norm",
            "throughput",
            "memory",
            "rewards",
            "eval_rewards",
            "kl",
            "completion_length",
            "clip_ratio",
            "custom",
            "weird_key"
        ]
    );
    let loss = &specs[0];
    assert_eq!(
        loss.series
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["loss", "eval_loss"]
    );
    assert_eq!(loss.series[0].points, vec![(1.0, 2.0), (2.0, 1.5)]);
    assert_eq!(loss.series[1].points, vec![(2.0, 1.7)]);
    assert_eq!(loss.smoothing, Some(0.6));
    let rewards: Vec<&str> = specs[5].series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        rewards,
        ["reward", "reward_std", "rewards/format", "rewards/accuracy"]
    );
    let eval: Vec<&str> = specs[6].series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(eval, ["eval_reward", "eval_rewards/format"]);
    let lengths: Vec<&str> = specs[8].series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(lengths, ["completion_length", "eval_completion_length"]);
    assert_eq!(specs[10].series.len(), 2);
}

#[test]
fn rows_without_step_use_their_index() {
    let specs = training_chart_specs(&rows(&[json!({"loss": 3.0}), json!({"loss": 2.0})]));
    assert_eq!(specs[0].series[0].points, vec![(0.0, 3.0), (1.0, 2.0)]);
}

#[test]
fn write_training_charts_writes_only_charts_with_data() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lines: Vec<String> = (0..30)
        .map(|step| {
            json!({"step": step, "loss": 3.0 / (1.0 + step as f64), "lr": 2e-4}).to_string()
        })
        .collect();
    std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n") + "\n\n").expect("write");
    let written = write_training_charts(dir.path()).expect("charts");
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["loss.svg", "lr.svg"]);
    let loss = std::fs::read_to_string(dir.path().join("loss.svg")).expect("read");
    assert!(loss.contains("loss (smoothed)"));
    assert!(!dir.path().join("grad_norm.svg").exists());
}

#[test]
fn metrics_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = write_training_charts(dir.path()).unwrap_err().to_string();
    assert!(missing.contains("metrics.jsonl"), "{missing}");
    std::fs::write(
        dir.path().join("metrics.jsonl"),
        "{\"step\":1,\"loss\":1}\n[1,2]\n",
    )
    .expect("write");
    let error = write_training_charts(dir.path()).unwrap_err().to_string();
    assert!(
        error.contains("metrics.jsonl:2:") && error.contains("got an array"),
        "{error}"
    );
    std::fs::write(
        dir.path().join("metrics.jsonl"),
        "{\"step\":1,\"loss\":1}\n{oops\n",
    )
    .expect("write");
    let error = write_training_charts(dir.path()).unwrap_err().to_string();
    assert!(error.contains("metrics.jsonl:2:"), "{error}");
}
