//! The training loop: unrolled pretraining, then DEQ mode with the configured backward; metrics
//! as JSON lines; atomic checkpoints holding model, optimizer and step, so that `resume`
//! continues exactly where a run stopped (batches and dropout masks are functions of the seed
//! and the step).

use crate::data::RecipeSplit;
use crate::evaluate::{batch_score, evaluate, EvalResult, Forward};
use crate::optimizer::Optimizer;
use crate::run_log::{RunLog, StepRecord};
use crate::step::{train_step, Phase, StepPlan};
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use mdeq_checkpoint::format::{self, TrainingCheckpoint, TrainingState};
use mdeq_data::Split;
use mdeq_model::{Compute, Mdeq, Task};
use mdeq_recipe::ExperimentConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of one training run (the `mdeq train` flags beside `--config`).
#[derive(Debug, Clone, clap::Args)]
pub struct TrainOptions {
    /// Dataset directory (default: the recipe's data.root).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory (checkpoints, metrics.jsonl, TensorBoard events, plots).
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Overrides the recipe's epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stops after this many optimizer steps in total (the schedule still spans all epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Overrides the recipe's batch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed of initialisation, shuffling and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Continue from `<out>/checkpoint-last.safetensors`.
    #[arg(long)]
    pub resume: bool,
    /// Log a metrics line every this many steps.
    #[arg(long, default_value_t = 20)]
    pub log_every: usize,
    /// Evaluate on at most this many test samples at each epoch end (default: all).
    #[arg(long)]
    pub eval_limit: Option<usize>,
}

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps taken in total.
    pub steps: usize,
    /// Last evaluation, if one ran.
    pub last_eval: Option<EvalResult>,
    /// Loss of the last step.
    pub last_loss: f64,
}

/// Writes a resumable checkpoint: weights, config, optimizer and where the run stood.
fn save_checkpoint(
    path: &Path,
    model: &Mdeq,
    cfg: &ExperimentConfig,
    opt: &Optimizer,
    step: usize,
    best_score: f64,
) -> Result<()> {
    let training = TrainingCheckpoint {
        state: TrainingState {
            step,
            optimizer_steps: opt.steps(),
            best_score,
        },
        optimizer: opt.state(),
    };
    format::save(path, model, cfg, Some(&training))?;
    Ok(())
}

/// Trains `cfg` as `opts` says, on `compute`'s device, float type and kernels.
pub fn train(
    cfg: &ExperimentConfig,
    opts: &TrainOptions,
    compute: &Compute,
) -> Result<TrainSummary> {
    compute.run(|| train_on(cfg, opts, compute))
}

fn train_on(
    cfg: &ExperimentConfig,
    opts: &TrainOptions,
    compute: &Compute,
) -> Result<TrainSummary> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let data = opts
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cfg.data.root));
    let train_set = RecipeSplit::open(cfg, &data, Split::Train)?;
    let test_set = RecipeSplit::open(cfg, &data, Split::Test)?;
    let task = cfg.model.task;
    let class_weights = train_set
        .kind
        .class_weights()
        .map(|w| Tensor::new(w, &compute.device)?.to_dtype(compute.dtype))
        .transpose()?;
    let model = Mdeq::new(&cfg.model, compute.dtype, &compute.device, opts.seed)?;
    let params: Vec<Var> = model.store().parameters().map(|e| e.var.clone()).collect();
    let mut opt = Optimizer::new(&cfg.train, params.len());
    let batch_size = opts.batch_size.unwrap_or(cfg.train.batch_size);
    let epochs = opts.epochs.unwrap_or(cfg.train.epochs);
    if batch_size == 0 || epochs == 0 || opts.log_every == 0 {
        bail!(
            "--batch-size ({batch_size}), --epochs ({epochs}) and --log-every ({}) must be positive",
            opts.log_every
        );
    }
    let per_epoch = train_set.dataset.len().div_ceil(batch_size);
    let total = per_epoch * epochs;
    let last_path = opts.out.join("checkpoint-last.safetensors");
    let best_path = opts.out.join("checkpoint-best.safetensors");
    let (mut step, mut best) = (0usize, 0f64);
    if opts.resume && last_path.exists() {
        let resumed = format::load_training(&last_path, &model, cfg)?;
        let optimizer: HashMap<String, Tensor> = resumed.optimizer.into_iter().collect();
        opt.restore(resumed.state.optimizer_steps, &optimizer, &params)?;
        (step, best) = (resumed.state.step, resumed.state.best_score);
        eprintln!("resumed from {} at step {step}", last_path.display());
    }
    let plan = StepPlan {
        cfg,
        runtime: cfg.deq.runtime(),
        total_steps: total,
        seed: opts.seed,
        class_weights,
    };
    let stop = opts.max_steps.map_or(total, |m| m.min(total));
    let mut log = RunLog::open(&opts.out)?;
    let mut summary = TrainSummary {
        steps: step,
        last_eval: None,
        last_loss: f64::NAN,
    };
    let started = Instant::now();
    let mut images_seen = 0usize;
    // Drawn only on a terminal; the log lines below go to stderr either way.
    let bar = indicatif::ProgressBar::new(stop as u64).with_position(step as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let score_name = match task {
        Task::Classification => "acc",
        Task::Segmentation => "mIoU",
    };
    let test_loader = test_set.loader(cfg, batch_size, 0, 0);
    while step < stop {
        let epoch = step / per_epoch;
        let loader = train_set.loader(cfg, batch_size, opts.seed, epoch as u64);
        let first = step % per_epoch;
        let last = per_epoch.min(first + (stop - step));
        for batch in loader.prefetch(first..last, 3, &compute.device) {
            let batch = batch?;
            let outcome = train_step(&plan, &model, &params, &mut opt, &batch, step, epoch)
                .with_context(|| format!("last checkpoint: {}", last_path.display()))?;
            let (g, loss, lr, phase) =
                (&outcome.gradients, outcome.loss, outcome.lr, outcome.phase);
            step += 1;
            bar.set_position(step as u64);
            images_seen += batch.images.dim(0)?;
            summary.last_loss = loss;
            if step % opts.log_every.max(1) == 0 || step == stop {
                let f = g.forward_stats.as_ref();
                let b = g.backward_stats.as_ref();
                let record = StepRecord {
                    step,
                    epoch,
                    loss,
                    batch_score: batch_score(task, &g.logits, &batch.labels)?,
                    lr,
                    phase: if matches!(phase, Phase::Deq) {
                        "deq"
                    } else {
                        "unrolled"
                    },
                    forward_steps: f.map(|s| s.steps),
                    forward_residual: f.map(|s| s.worst_lowest()),
                    backward_steps: b.map(|s| s.steps),
                    backward_residual: b.map(|s| s.worst_lowest()),
                    jacobian_penalty: g.jacobian_penalty,
                    forward_trace: f.map(|s| s.mean_rel_trace()).unwrap_or_default(),
                    backward_trace: b.map(|s| s.mean_rel_trace()).unwrap_or_default(),
                    images_per_s: images_seen as f64 / started.elapsed().as_secs_f64(),
                };
                log.step(&record)?;
                let line = record.progress_line(score_name, stop);
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.set_message(line);
                }
            }
            let epoch_done = step % per_epoch == 0;
            if epoch_done || step == stop {
                // While pretraining the weights are not yet an equilibrium model: validate
                // unrolled, as the official code does.
                let mode = Forward::trained(cfg, Some(step)).mode(cfg, &plan.runtime);
                let result = evaluate(&model, &test_loader, mode, opts.eval_limit)?;
                log.eval(step, epoch, &result)?;
                eprintln!("eval after step {step}: {}", result.summary());
                if result.score() > best {
                    best = result.score();
                    save_checkpoint(&best_path, &model, cfg, &opt, step, best)?;
                }
                save_checkpoint(&last_path, &model, cfg, &opt, step, best)?;
                summary.last_eval = Some(result);
            }
        }
    }
    bar.finish_and_clear();
    log.finish()?;
    summary.steps = step;
    Ok(summary)
}
