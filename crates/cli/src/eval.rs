//! `mdeq eval`: scores a checkpoint on the recipe's evaluation split, at one or several forward
//! solver thresholds (the accuracy-against-compute curve, printed and drawn).

use crate::compute::ComputeArgs;
use anyhow::Result;
use mdeq_checkpoint::format;
use mdeq_checkpoint::format::TrainingState;
use mdeq_data::Split;
use mdeq_distributed::World;
use mdeq_model::Compute;
use mdeq_recipe::ExperimentConfig;
use mdeq_train::data::RecipeSplit;
use mdeq_train::evaluate::{evaluate, EvalResult, Forward};
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
    /// PNG of the accuracy-against-compute curve (default with several --f-thres:
    /// accuracy_vs_compute.png beside the checkpoint).
    #[arg(long)]
    pub plot: Option<PathBuf>,
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

/// Evaluates, draws the curve where there is one, and prints the table or the JSON report.
pub fn run(args: Args) -> Result<()> {
    let plot = args.plot.clone().or_else(|| {
        (args.f_thres.len() > 1).then(|| {
            args.checkpoint
                .parent()
                .unwrap_or(Path::new("."))
                .join("accuracy_vs_compute.png")
        })
    });
    let (points, names) = evaluate_checkpoint(&args)?;
    if let Some(path) = &plot {
        match self::plot(&points, path) {
            Ok(()) => eprintln!("wrote {}", path.display()),
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

/// One threshold's scores.
#[derive(Debug, Clone)]
pub struct EvalPoint {
    /// Forward threshold.
    pub f_thres: usize,
    /// Scores.
    pub result: EvalResult,
}

/// Runs the evaluation; returns one point per threshold and the class names.
pub fn evaluate_checkpoint(req: &Args) -> Result<(Vec<EvalPoint>, Vec<String>)> {
    let compute = req.compute.resolve()?;
    compute.run(|| evaluate_on(req, &compute))
}

fn evaluate_on(req: &Args, compute: &Compute) -> Result<(Vec<EvalPoint>, Vec<String>)> {
    let (cfg, model, state) =
        format::load_with_state(&req.checkpoint, compute.dtype, &compute.device)?;
    let forward = chosen_forward(&cfg, state.as_ref(), req.mode, &req.checkpoint);
    let data = req
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cfg.data.root));
    let test = RecipeSplit::open(&cfg, &data, Split::Test)?;
    let loader = test.loader(&cfg, req.batch_size, 0, 0);
    let thresholds = if req.f_thres.is_empty() {
        vec![cfg.deq.f_thres]
    } else {
        req.f_thres.clone()
    };
    let mut points = Vec::new();
    for t in thresholds {
        let mut deq = cfg.deq.clone();
        deq.f_thres = t;
        let rt = deq.runtime();
        let result = evaluate(
            &model,
            &loader,
            forward.mode(&cfg, &rt),
            req.limit,
            &World::single(),
        )?;
        points.push(EvalPoint { f_thres: t, result });
    }
    Ok((points, test.kind.class_names(cfg.model.num_classes)))
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

/// The human-readable report: one line per threshold, then the per-class IoU table of the last.
pub fn report(points: &[EvalPoint], class_names: &[String]) -> String {
    let mut out = String::new();
    for p in points {
        out += &format!(
            "f_thres {:>3}: {} ({:.1} solver steps per batch)\n",
            p.f_thres,
            p.result.summary(),
            p.result.mean_steps
        );
    }
    if let Some(iou) = points.last().and_then(|p| p.result.class_iou.as_ref()) {
        out += "class                  IoU\n";
        for (name, v) in class_names.iter().zip(iou) {
            out += &format!("{name:<20} {:>6.2}%\n", 100.0 * v);
        }
    }
    out
}

/// The `--json` object: the scores of a single threshold, or `{"curve": [...]}`.
pub fn json_report(points: &[EvalPoint]) -> serde_json::Value {
    let one = |p: &EvalPoint| {
        let mut v = serde_json::to_value(&p.result).expect("plain numbers");
        v["f_thres"] = p.f_thres.into();
        v
    };
    match points {
        [p] => one(p),
        _ => json!({ "curve": points.iter().map(one).collect::<Vec<_>>() }),
    }
}

/// Draws the accuracy-against-compute curve of several thresholds.
pub fn plot(points: &[EvalPoint], path: &Path) -> Result<()> {
    let metric = if points.iter().any(|p| p.result.miou.is_some()) {
        "mIoU"
    } else {
        "top-1 accuracy"
    };
    let xy: Vec<(usize, f64)> = points
        .iter()
        .map(|p| (p.f_thres, p.result.score()))
        .collect();
    mdeq_train::plots::accuracy_vs_compute(path, metric, &xy)
}
