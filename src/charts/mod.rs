//! Self-made SVG line charts (no JavaScript, no fonts, no dependencies): nice-tick axes, legend,
//! several series, optional TensorBoard-style debiased EMA smoothing and log10 y axis.
//! Reference for smoothing: TensorBoard's scalar dashboard (`vz_line_chart2` smoothing).

pub mod axis;
pub mod training;

use std::fmt::Write as _;

pub use training::{
    read_metrics_jsonl, render_chart_spec, training_chart_specs, write_training_charts, ChartSpec,
    Error,
};

use axis::Scale;

/// One named line: (x, y) points in drawing order. Non-finite points are skipped when drawn.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// How a chart is drawn. `Default` gives a 720x340 linear chart without smoothing.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartOptions {
    pub width: u32,
    pub height: u32,
    /// Text beside the y axis; empty for none.
    pub y_label: String,
    /// log10 y axis; points with y <= 0 are then skipped.
    pub log_y: bool,
    /// EMA weight in [0, 1) for noisy series (0.6 is TensorBoard's default). Applied only to
    /// series with at least `SMOOTH_MIN_POINTS` points: the raw line is drawn faint behind it.
    pub smoothing: Option<f64>,
    /// Per series index: draw dashed (used to tell a compared run apart). Missing means solid.
    pub dashed: Vec<bool>,
    /// Per series index: `PALETTE` index, so the same metric of two runs shares a colour.
    /// Missing means the series index.
    pub colors: Vec<usize>,
}

impl Default for ChartOptions {
    fn default() -> Self {
        ChartOptions {
            width: 720,
            height: 340,
            y_label: String::new(),
            log_y: false,
            smoothing: None,
            dashed: Vec::new(),
            colors: Vec::new(),
        }
    }
}

/// Fewer points than this are drawn as they are even when smoothing is asked for (eval curves).
pub const SMOOTH_MIN_POINTS: usize = 10;
/// Series with at most this many points get a marker (with a hover title) on each point.
const MARKER_MAX_POINTS: usize = 25;
/// Okabe-Ito colours, distinguishable with colour-blindness, yellow left out (unreadable on white).
pub const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#999999",
];
const FONT: &str = "system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif";
const CHAR_WIDTH: f64 = 6.6; // average glyph width at 12px, for layout without font metrics

/// Escapes text for XML/HTML content and attribute values.
pub fn escape_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Debiased exponential moving average (TensorBoard's smoothing) of the y values.
pub fn smooth_ema(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let weight = weight.clamp(0.0, 0.999);
    let mut accumulated = 0.0;
    let mut correction = 1.0;
    points
        .iter()
        .map(|&(x, y)| {
            accumulated = accumulated * weight + (1.0 - weight) * y;
            correction *= weight;
            (x, accumulated / (1.0 - correction))
        })
        .collect()
}

/// Renders one line chart as a standalone SVG document (also valid inline in HTML).
pub fn line_chart_svg(
    title: &str,
    x_label: &str,
    series: &[Series],
    opts: &ChartOptions,
) -> String {
    let width = f64::from(opts.width.max(200));
    let height = f64::from(opts.height.max(150));
    // (series index, series, its finite points)
    type Drawable<'s> = (usize, &'s Series, Vec<(f64, f64)>);
    let drawable: Vec<Drawable> = series
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let points = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!opts.log_y || *y > 0.0))
                .collect::<Vec<_>>();
            (index, s, points)
        })
        .filter(|(_, _, points)| !points.is_empty())
        .collect();

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="{label}" font-family="{FONT}" font-size="12">"#,
        label = escape_xml(title),
    );
    let _ = write!(
        svg,
        r##"<title>{t}</title><rect width="100%" height="100%" fill="#ffffff"/><text x="{x}" y="20" text-anchor="middle" font-size="14" font-weight="600" fill="#222">{t}</text>"##,
        t = escape_xml(title),
        x = width / 2.0,
    );
    if drawable.is_empty() {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#777">no data</text></svg>"##,
            width / 2.0,
            height / 2.0
        );
        return svg;
    }

    // Legend rows first: they decide where the plot starts.
    let legend_entries: Vec<(usize, String, bool)> = drawable
        .iter()
        .map(|(index, s, points)| {
            let smoothed = smoothing_applies(opts, points.len());
            let name = if smoothed {
                format!("{} (smoothed)", s.name)
            } else {
                s.name.clone()
            };
            (*index, name, is_dashed(opts, *index))
        })
        .collect();
    let mut legend = String::new();
    let (mut lx, mut ly) = (12.0, 38.0);
    for (index, name, dashed) in &legend_entries {
        let item_width = 26.0 + name.chars().count() as f64 * CHAR_WIDTH + 14.0;
        if lx + item_width > width - 8.0 && lx > 12.0 {
            lx = 12.0;
            ly += 17.0;
        }
        let _ = write!(
            legend,
            r##"<line x1="{lx}" y1="{y}" x2="{x2}" y2="{y}" stroke="{c}" stroke-width="2.5"{dash}/><text x="{tx}" y="{ty}" fill="#333">{n}</text>"##,
            y = ly - 4.0,
            x2 = lx + 20.0,
            c = series_color(opts, *index),
            dash = dash_attr(*dashed),
            tx = lx + 26.0,
            ty = ly,
            n = escape_xml(name),
        );
        lx += item_width;
    }
    svg.push_str(&legend);

    let all = drawable.iter().flat_map(|(_, _, p)| p.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    let y_scale = if opts.log_y {
        Scale::log10(y_min, y_max)
    } else {
        Scale::linear(y_min, y_max, 6)
    };
    let x_scale = if x_max > x_min {
        Scale::linear(x_min, x_max, 8)
    } else {
        Scale::linear(x_min, x_max, 3)
    };

    let y_label_chars = y_scale
        .ticks
        .iter()
        .map(|t| y_scale.label(*t).chars().count())
        .max()
        .unwrap_or(1);
    let left =
        14.0 + y_label_chars as f64 * CHAR_WIDTH + if opts.y_label.is_empty() { 0.0 } else { 18.0 };
    let right = width - 18.0;
    let top = ly + 14.0;
    let bottom = height - if x_label.is_empty() { 26.0 } else { 42.0 };
    let plot_width = right - left;
    let plot_height = bottom - top;
    let px = |x: f64| left + x_scale.fraction(x) * plot_width;
    let py = |y: f64| bottom - y_scale.fraction(y) * plot_height;

    // Grid, ticks and axis labels.
    for tick in &y_scale.ticks {
        let y = py(*tick);
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#e6e6e6"/><text x="{tx}" y="{ty:.1}" text-anchor="end" fill="#555">{l}</text>"##,
            tx = left - 6.0,
            ty = y + 4.0,
            l = escape_xml(&y_scale.label(*tick)),
        );
    }
    for tick in &x_scale.ticks {
        let x = px(*tick);
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#f0f0f0"/><line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{b5}" stroke="#888"/><text x="{x:.1}" y="{ty}" text-anchor="middle" fill="#555">{l}</text>"##,
            b5 = bottom + 5.0,
            ty = bottom + 18.0,
            l = escape_xml(&x_scale.label(*tick)),
        );
    }
    let _ = write!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{plot_width}" height="{plot_height}" fill="none" stroke="#888"/>"##
    );
    if !x_label.is_empty() {
        let _ = write!(
            svg,
            r##"<text x="{x}" y="{y}" text-anchor="middle" fill="#333">{l}</text>"##,
            x = left + plot_width / 2.0,
            y = height - 8.0,
            l = escape_xml(x_label),
        );
    }
    if !opts.y_label.is_empty() {
        let (x, y) = (14.0, top + plot_height / 2.0);
        let _ = write!(
            svg,
            r##"<text x="{x}" y="{y}" transform="rotate(-90 {x} {y})" text-anchor="middle" fill="#333">{l}</text>"##,
            l = escape_xml(&opts.y_label),
        );
    }

    // Lines last so they sit above the grid.
    for (index, s, points) in &drawable {
        let colour = series_color(opts, *index);
        let dash = dash_attr(is_dashed(opts, *index));
        let name = escape_xml(&s.name);
        let to_pixels = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
            decimate(
                pts.iter().map(|&(x, y)| (px(x), py(y))).collect(),
                plot_width,
            )
        };
        if let Some(weight) = opts
            .smoothing
            .filter(|_| smoothing_applies(opts, points.len()))
        {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-opacity="0.25" stroke-width="1.2"{dash} points="{p}"><title>{name} (raw)</title></polyline>"#,
                p = polyline(&to_pixels(points)),
            );
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} stroke-linejoin="round" points="{p}"><title>{name} (smoothed)</title></polyline>"#,
                p = polyline(&to_pixels(&smooth_ema(points, weight))),
            );
        } else {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} stroke-linejoin="round" points="{p}"><title>{name}</title></polyline>"#,
                p = polyline(&to_pixels(points)),
            );
        }
        // Markers mark raw values; on a smoothed line they would read as the smoothed ones.
        if points.len() <= MARKER_MAX_POINTS && !smoothing_applies(opts, points.len()) {
            for &(x, y) in points {
                let _ = write!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2.6" fill="{colour}"><title>{name}: {} at {}</title></circle>"#,
                    px(x),
                    py(y),
                    axis::format_number(y, y.abs() / 1000.0),
                    axis::format_number(x, 1.0),
                );
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

fn smoothing_applies(opts: &ChartOptions, points: usize) -> bool {
    opts.smoothing.is_some_and(|w| w > 0.0) && points >= SMOOTH_MIN_POINTS
}

fn series_color(opts: &ChartOptions, index: usize) -> &'static str {
    color(opts.colors.get(index).copied().unwrap_or(index))
}

fn is_dashed(opts: &ChartOptions, index: usize) -> bool {
    opts.dashed.get(index).copied().unwrap_or(false)
}

fn dash_attr(dashed: bool) -> &'static str {
    if dashed {
        r#" stroke-dasharray="7 4""#
    } else {
        ""
    }
}

/// Colour of the series at `index` (cycles through `PALETTE`).
pub fn color(index: usize) -> &'static str {
    PALETTE[index % PALETTE.len()]
}

fn polyline(points: &[(f64, f64)]) -> String {
    let mut out = String::with_capacity(points.len() * 12);
    for (x, y) in points {
        let _ = write!(out, "{x:.1},{y:.1} ");
    }
    out.pop();
    out
}

/// Long runs have more points than pixels: keep the first, min and max of each pixel column
/// (in order) so spikes stay visible while the SVG stays small.
fn decimate(points: Vec<(f64, f64)>, plot_width: f64) -> Vec<(f64, f64)> {
    if points.len() as f64 <= plot_width * 3.0 {
        return points;
    }
    let mut out = Vec::new();
    let mut bucket: Vec<(f64, f64)> = Vec::new();
    let flush = |bucket: &mut Vec<(f64, f64)>, out: &mut Vec<(f64, f64)>| {
        if bucket.is_empty() {
            return;
        }
        let first = bucket[0];
        let last = bucket[bucket.len() - 1];
        let low = bucket
            .iter()
            .copied()
            .fold(first, |a, b| if b.1 > a.1 { b } else { a });
        let high = bucket
            .iter()
            .copied()
            .fold(first, |a, b| if b.1 < a.1 { b } else { a });
        let mut keep = vec![first, low, high, last];
        keep.sort_by(|a, b| a.0.total_cmp(&b.0));
        keep.dedup();
        out.extend(keep);
        bucket.clear();
    };
    let mut column = f64::NAN;
    for point in points {
        let this_column = point.0.floor();
        if this_column != column {
            flush(&mut bucket, &mut out);
            column = this_column;
        }
        bucket.push(point);
    }
    flush(&mut bucket, &mut out);
    out
}

#[cfg(test)]
mod tests;
