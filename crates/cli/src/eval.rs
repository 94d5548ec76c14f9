//! `mdeq eval`: scores a checkpoint on the recipe's evaluation split, at one or several forward
//! solver thresholds and tolerances (the accuracy-against-compute and anytime-inference curves,
//! printed and drawn), and with `--diagnose` describes the equilibria it found.

use crate::compute::ComputeArgs;
use anyhow::{bail, Result};
use mdeq_checkpoint::format;
use mdeq_checkpoint::format::TrainingState;
use mdeq_data::Split;
use mdeq_distributed::World;
use mdeq_model::Compute;
use mdeq_recipe::{DeqConfig, ExperimentConfig};
use mdeq_train::data::RecipeSplit;
use mdeq_train::evaluate::{evaluate, EvalResult, Forward};
use mdeq_train::plots::{self, Series};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Flags of `mdeq eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// An mdeq checkpoint (its embedded recipe decides dataset and solver).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Dataset directory (default: the recipe's data.root).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Forward solver step limits to evaluate at (default: the recipe's F_THRES); several give
    /// the accuracy-against-compute curve.
    #[arg(long, value_delimiter = ',')]
    pub f_thres: Vec<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Evaluate at most N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Solver tolerances to evaluate at, each with per-sample early exit up to F_THRES
    /// (default: the recipe's eps); several give the anytime-inference curve, accuracy against
    /// the f evaluations each image took.
    #[arg(long, value_delimiter = ',')]
    pub tol: Vec<f64>,
    /// Also report the distribution of the final residuals and the spectral radius of J at
    /// every image's equilibrium (power iteration, 30 VJPs per batch).
    #[arg(long)]
    pub diagnose: bool,
    /// Folder for the curves' PNGs (default: the checkpoint's folder).
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The forward to evaluate with [default: the one the checkpoint was trained with —
    /// unrolled for a checkpoint written during pretraining, else deq].
    #[arg(long, value_enum)]
    pub mode: Option<Forward>,
    /// Where and in what the model computes.
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Power iterations of `--diagnose` per batch: enough for two significant digits of a
/// dominant eigenvalue separated from the next by 10% (0.9^30 ≈ 0.04).
pub const POWER_ITERATIONS: usize = 30;

/// Evaluates, draws the curves where there are some, and prints the table or the JSON report.
pub fn run(args: Args) -> Result<()> {
    let (points, names) = evaluate_checkpoint(&args)?;
    let dir = args.plots.clone().unwrap_or_else(|| {
        args.checkpoint
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf()
    });
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("warning: no plots: {}: {e}", dir.display());
    }
    for drawn in plot(&points, &dir) {
        match drawn {
            Ok(path) => eprintln!("wrote {}", path.display()),
            Err(e) => eprintln!("warning: no plot: {e:#}"),
        }
    }
    if args.json {
        println!("{}", json_report(&points));
    } else {
        print!("{}", report(&points, &names));
    }
    Ok(())
}

/// One (threshold, tolerance) setting's scores.
#[derive(Debug, Clone)]
pub struct EvalPoint {
    /// Forward threshold.
    pub f_thres: usize,
    /// Forward tolerance.
    pub tol: f64,
    /// The forward evaluated with.
    pub forward: Forward,
    /// Scores.
    pub result: EvalResult,
}

/// Runs the evaluation; returns one point per (threshold, tolerance), thresholds outermost,
/// and the class names.
pub fn evaluate_checkpoint(req: &Args) -> Result<(Vec<EvalPoint>, Vec<String>)> {
    let compute = req.compute.resolve()?;
    compute.run(|| evaluate_on(req, &compute))
}

fn evaluate_on(req: &Args, compute: &Compute) -> Result<(Vec<EvalPoint>, Vec<String>)> {
    let (cfg, model, state) =
        format::load_with_state(&req.checkpoint, compute.dtype, &compute.device)?;
    let forward = chosen_forward(&cfg, state.as_ref(), req.mode, &req.checkpoint);
    let settings = settings(&cfg.deq, &req.f_thres, &req.tol)?;
    if forward == Forward::Unrolled && (req.diagnose || !req.tol.is_empty()) {
        bail!(
            "--tol and --diagnose describe the DEQ solve; this evaluation runs unrolled \
             (--mode deq asks for the solve)"
        );
    }
    let data = req
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cfg.data.root));
    let test = RecipeSplit::open(&cfg, &data, Split::Test)?;
    let loader = test.loader(&cfg, req.batch_size, 0, 0);
    let mut points = Vec::new();
    for deq in settings {
        let rt = deq.runtime();
        let result = evaluate(
            &model,
            &loader,
            forward.mode(&cfg, &rt),
            req.limit,
            req.diagnose.then_some(POWER_ITERATIONS),
            &World::single(),
        )?;
        points.push(EvalPoint {
            f_thres: deq.f_thres,
            tol: deq.eps,
            forward,
            result,
        });
    }
    Ok((points, test.kind.class_names(cfg.model.num_classes)))
}

/// The recipe's `[deq]` section at every (threshold, tolerance) asked for, thresholds
/// outermost; an empty list is the recipe's own value.
fn settings(recipe: &DeqConfig, f_thres: &[usize], tol: &[f64]) -> Result<Vec<DeqConfig>> {
    let f_thres = if f_thres.is_empty() {
        &[recipe.f_thres][..]
    } else {
        f_thres
    };
    let tol = if tol.is_empty() {
        &[recipe.eps][..]
    } else {
        tol
    };
    let mut all = Vec::new();
    for &t in f_thres {
        for &eps in tol {
            let deq = DeqConfig {
                f_thres: t,
                eps,
                ..recipe.clone()
            };
            deq.validate()
                .map_err(|e| anyhow::anyhow!("--f-thres {t} --tol {eps}: {e}"))?;
            all.push(deq);
        }
    }
    Ok(all)
}

/// The forward `mode` asks for, else the one the checkpoint was trained with; says on stderr
/// which, and why.
pub fn chosen_forward(
    cfg: &ExperimentConfig,
    state: Option<&TrainingState>,
    mode: Option<Forward>,
    checkpoint: &Path,
) -> Forward {
    let trained = Forward::trained(cfg, state.map(|s| s.step));
    let why = match (mode, state) {
        (Some(m), _) if m != trained => format!("as --mode asks; it was trained {trained:?}"),
        (Some(_), _) => "as --mode asks".to_string(),
        (None, Some(s)) if trained == Forward::Unrolled => format!(
            "written at step {} of {} unrolled pretraining steps: not yet trained as a DEQ; \
             --mode deq solves instead",
            s.step, cfg.deq.pretrain_steps
        ),
        (None, Some(s)) => format!("trained as a DEQ (written at step {})", s.step),
        (None, None) => "imported weights".to_string(),
    };
    let forward = mode.unwrap_or(trained);
    let name = match forward {
        Forward::Deq => "DEQ mode (the forward solve)",
        Forward::Unrolled => "unrolled mode",
    };
    eprintln!("evaluating {} in {name}: {why}", checkpoint.display());
    forward
}

/// The human-readable report: one line per setting, the diagnostics of each that has them,
/// then the per-class IoU table of the last.
pub fn report(points: &[EvalPoint], class_names: &[String]) -> String {
    let mut out = String::new();
    for p in points {
        let r = &p.result;
        out += &format!(
            "f_thres {:>3}, tol {:.0e}: {}",
            p.f_thres,
            p.tol,
            r.summary()
        );
        if let (Some(evals), Some(res), Some(conv)) =
            (r.mean_evaluations, r.mean_residual, r.converged)
        {
            out += &format!(
                "; {evals:.2} f evaluations per image, mean residual {res:.2e}, \
                 {:.1}% converged",
                100.0 * conv
            );
        }
        out += &format!("; {:.2} ms per image\n", 1e3 * r.seconds_per_image);
        if let Some(d) = &r.diagnostics {
            out += &format!("  final relative residual: {}\n", d.residual.summary());
            out += &format!(
                "  spectral radius of J at z* ({} power iterations): {}\n",
                d.power_iterations,
                d.spectral_radius.summary()
            );
        }
    }
    if let Some(iou) = points.last().and_then(|p| p.result.class_iou.as_ref()) {
        out += "class                  IoU\n";
        for (name, v) in class_names.iter().zip(iou) {
            out += &format!("{name:<20} {:>6.2}%\n", 100.0 * v);
        }
    }
    out
}

/// The `--json` object: the scores of a single setting, or `{"curve": [...]}`.
pub fn json_report(points: &[EvalPoint]) -> serde_json::Value {
    let one = |p: &EvalPoint| {
        let mut v = serde_json::to_value(&p.result).expect("plain numbers");
        v["f_thres"] = p.f_thres.into();
        v["tol"] = p.tol.into();
        v["forward"] = serde_json::to_value(p.forward).expect("a name");
        v
    };
    match points {
        [p] => one(p),
        _ => json!({ "curve": points.iter().map(one).collect::<Vec<_>>() }),
    }
}

/// Draws, into `dir`, the accuracy-against-threshold curve when several thresholds were
/// evaluated (one line per tolerance) and the anytime curve when several tolerances were (one
/// line per threshold); returns each file written or why not.
pub fn plot(points: &[EvalPoint], dir: &Path) -> Vec<Result<PathBuf>> {
    let metric = if points.iter().any(|p| p.result.miou.is_some()) {
        "mIoU"
    } else {
        "top-1 accuracy"
    };
    // Series keyed by the other setting, in order of first appearance.
    let series = |name: &dyn Fn(&EvalPoint) -> String, x: &dyn Fn(&EvalPoint) -> f64| {
        let mut all: Vec<Series> = Vec::new();
        for p in points {
            let label = name(p);
            let xy = (x(p), p.result.score());
            match all.iter_mut().find(|s| s.name == label) {
                Some(s) => s.points.push(xy),
                None => all.push(Series {
                    name: label,
                    points: vec![xy],
                }),
            }
        }
        all
    };
    let tol_name = |p: &EvalPoint| format!("tol {:.0e}", p.tol);
    let thres_name = |p: &EvalPoint| format!("F_THRES {}", p.f_thres);
    // A curve where some line has two points: one line per tolerance across the thresholds,
    // one per threshold across the tolerances.
    let mut drawn = Vec::new();
    let by_tol = series(&tol_name, &|p| p.f_thres as f64);
    if by_tol.iter().any(|s| s.points.len() > 1) {
        let path = dir.join("accuracy_vs_compute.png");
        drawn.push(plots::accuracy_vs_compute(&path, metric, &by_tol).map(|()| path));
    }
    let evals = |p: &EvalPoint| p.result.mean_evaluations.unwrap_or(f64::NAN);
    let by_thres = series(&thres_name, &evals);
    if by_thres.iter().any(|s| s.points.len() > 1) {
        let path = dir.join("accuracy_vs_tolerance.png");
        drawn.push(plots::accuracy_vs_tolerance(&path, metric, &by_thres).map(|()| path));
    }
    drawn
}
