//! PNG plots of a run: training loss, scores, solver residual against solver step, and the
//! accuracy-against-compute curve of `mdeq eval --f-thres`.

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;
use std::sync::OnceLock;

/// Where a TrueType font for the labels is looked for (`MDEQ_FONT` first).
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn ensure_font() -> Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates = std::env::var("MDEQ_FONT")
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps registered fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "no TrueType font found (set MDEQ_FONT or install fonts-dejavu-core; looked in {})",
            FONT_PATHS.join(", ")
        ))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One named line.
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// Points a chart can show: finite, and small enough that the axis range stays finite (a
/// resumed metrics.jsonl holding ±1e308 made the range infinite and the mesh loop forever).
fn plottable(&(x, y): &(f64, f64)) -> bool {
    const LIMIT: f64 = 1e100;
    x.abs() <= LIMIT && y.abs() <= LIMIT
}

/// Draws `series` as lines with markers into a 900×600 PNG at `path`.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    ensure_font()?;
    let points = series.iter().flat_map(|s| s.points.iter());
    let finite: Vec<&(f64, f64)> = points.filter(|p| plottable(p)).collect();
    if finite.is_empty() {
        bail!("{}: nothing to plot", path.display());
    }
    let range = |f: fn(&(f64, f64)) -> f64| {
        let lo = finite.iter().map(|p| f(p)).fold(f64::INFINITY, f64::min);
        let hi = finite
            .iter()
            .map(|p| f(p))
            .fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.05).max(1e-9 * hi.abs().max(lo.abs()).max(1.0));
        (lo - pad)..(hi + pad)
    };
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(range(|p| p.0), range(|p| p.1))
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| draw(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(plottable).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if pts.len() <= 40 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| draw(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

fn records(dir: &Path) -> Result<Vec<Value>> {
    let path = dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

fn series_of(recs: &[&Value], name: &str, key: &str) -> Series {
    Series {
        name: name.to_string(),
        points: recs
            .iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .collect(),
    }
}

/// `loss.png`, `score.png` and `residuals.png` in `dir` from its `metrics.jsonl`.
pub fn training_plots(dir: &Path) -> Result<()> {
    let all = records(dir)?;
    let steps: Vec<&Value> = all.iter().filter(|r| r["kind"] == "step").collect();
    let evals: Vec<&Value> = all.iter().filter(|r| r["kind"] == "eval").collect();
    line_chart(
        &dir.join("loss.png"),
        "training loss",
        "optimizer step",
        "loss",
        &[series_of(&steps, "training loss", "loss")],
    )?;
    let eval_key = if evals.iter().any(|r| r["miou"].is_number()) {
        "miou"
    } else {
        "top1"
    };
    line_chart(
        &dir.join("score.png"),
        "accuracy",
        "optimizer step",
        "fraction",
        &[
            series_of(&steps, "training batch (top-1 / mIoU)", "batch_score"),
            series_of(&evals, &format!("validation {eval_key}"), eval_key),
        ],
    )?;
    let deq: Vec<&Value> = steps
        .iter()
        .copied()
        .filter(|r| r["forward_trace"].as_array().is_some_and(|a| !a.is_empty()))
        .collect();
    if deq.is_empty() {
        return Ok(());
    }
    // Up to three records spread over the DEQ phase: first, middle, last.
    let picks = [0, deq.len() / 2, deq.len() - 1];
    let mut series = Vec::new();
    for (i, &k) in picks.iter().enumerate() {
        if i > 0 && k == picks[i - 1] {
            continue;
        }
        for (dir_name, key) in [("forward", "forward_trace"), ("backward", "backward_trace")] {
            let trace = deq[k][key].as_array().cloned().unwrap_or_default();
            series.push(Series {
                name: format!("{dir_name}, training step {}", deq[k]["step"]),
                points: trace
                    .iter()
                    .enumerate()
                    .filter_map(|(j, v)| Some(((j + 1) as f64, v.as_f64()?.max(1e-30).log10())))
                    .collect(),
            });
        }
    }
    line_chart(
        &dir.join("residuals.png"),
        "solver residual (batch mean)",
        "solver step",
        "log10 relative residual",
        &series,
    )
}

/// The accuracy-against-compute curve: each series' points are (forward solver threshold, score).
pub fn accuracy_vs_compute(path: &Path, metric: &str, series: &[Series]) -> Result<()> {
    line_chart(
        path,
        &format!("{metric} against the forward solver's step limit"),
        "forward threshold F_THRES (f evaluations)",
        metric,
        series,
    )
}

/// The anytime-inference curve: each series' points are (mean f evaluations per image, score)
/// of one solve at each tolerance, the samples leaving the solve as they converge.
pub fn accuracy_vs_tolerance(path: &Path, metric: &str, series: &[Series]) -> Result<()> {
    line_chart(
        path,
        &format!("{metric} against compute, per-sample early exit at each tolerance"),
        "mean f evaluations per image",
        metric,
        series,
    )
}
