//! The training loop: unrolled pretraining, then DEQ mode with the configured backward; metrics
//! as JSON lines; atomic checkpoints holding model, optimizer and step, so that `resume`
//! continues exactly where a run stopped (batches and dropout masks are functions of the seed
//! and the step).

use crate::data::TrainingData;
use crate::evaluate::{evaluate, EvalResult, Forward};
use crate::optimizer::Optimizer;
use crate::run_log::{RunLog, StepRecord};
use crate::step::{train_step, StepPlan};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use mdeq_checkpoint::format::{self, TrainingCheckpoint, TrainingState};
use mdeq_distributed::{Shard, World};
use mdeq_model::{Compute, Mdeq, Task};
use mdeq_recipe::{BatchNormStatistics, ExperimentConfig};
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
    /// Overrides the recipe's (global) batch size: in a data-parallel job each rank trains on
    /// its 1/N of every batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Overrides the recipe's train.micro_batches (gradient accumulation).
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// Seed of initialisation, shuffling and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Continue from `<out>/checkpoint-last.safetensors`.
    #[arg(long)]
    pub resume: bool,
    /// Log a metrics line every this many steps.
    #[arg(long, default_value_t = 20)]
    pub log_every: usize,
    /// Evaluate on at most this many samples at each epoch end (default: all of the recipe's
    /// validation split, else of the test split).
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

/// Trains `cfg` as `opts` says, on `compute`'s device, float type and kernels, as one rank of
/// `world` ([`World::single`] for one process): each rank trains on its rows of every global
/// batch, and rank 0 alone writes checkpoints, logs and plots.
pub fn train(
    cfg: &ExperimentConfig,
    opts: &TrainOptions,
    compute: &Compute,
    world: &World,
) -> Result<TrainSummary> {
    compute.run(|| train_on(cfg, opts, compute, world))
}

/// Checks that every global batch of an epoch of `samples` splits evenly over the ranks and,
/// on each rank, into the recipe's micro-batches.
fn check_split(samples: usize, batch_size: usize, parts: usize, world: &World) -> Result<()> {
    let last = match samples % batch_size {
        0 => batch_size,
        r => r,
    };
    for (what, rows) in [
        ("--batch-size", batch_size),
        ("the epoch's last batch", last),
    ] {
        let shard = Shard::new(world.rank(), world.size());
        let local = shard.rows(rows).map_err(|e| {
            anyhow::anyhow!(
                "{what}: {e}; choose a batch size that {} ranks divide",
                world.size()
            )
        })?;
        if !local.len().is_multiple_of(parts) {
            bail!(
                "{what}: {} rows per rank do not split into train.micro_batches = {parts} equal parts",
                local.len()
            );
        }
    }
    Ok(())
}

/// Makes every rank hold rank 0's parameters and buffers (bitwise), so that the ranks start,
/// and stay, in step.
fn synchronise_weights(model: &Mdeq, world: &World) -> Result<()> {
    if !world.is_distributed() {
        return Ok(());
    }
    for entry in model.store().entries() {
        let t = entry.var.as_tensor();
        let dtype = t.dtype();
        // Counters are integers; every collective carries floats.
        let carried = if dtype.is_float() {
            t.clone()
        } else {
            t.to_dtype(DType::F64)?
        };
        entry
            .var
            .set(&world.broadcast(&carried)?.to_dtype(dtype)?)?;
    }
    Ok(())
}

fn train_on(
    cfg: &ExperimentConfig,
    opts: &TrainOptions,
    compute: &Compute,
    world: &World,
) -> Result<TrainSummary> {
    let leader = world.is_leader();
    if leader {
        std::fs::create_dir_all(&opts.out)
            .with_context(|| format!("creating {}", opts.out.display()))?;
    }
    let data = opts
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cfg.data.root));
    let TrainingData {
        train: train_set,
        eval: eval_set,
        eval_name,
    } = TrainingData::open(cfg, &data)?;
    let task = cfg.model.task;
    let class_weights = train_set
        .kind
        .class_weights()
        .map(|w| Tensor::new(w, &compute.device)?.to_dtype(compute.dtype))
        .transpose()?;
    let model = Mdeq::new(&cfg.model, compute.dtype, &compute.device, opts.seed)?;
    if cfg.train.batch_norm == BatchNormStatistics::Global {
        model.synchronise_batch_norm(Some(world.clone()));
    }
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
    check_split(
        train_set.dataset.len(),
        batch_size,
        cfg.train.micro_batches,
        world,
    )?;
    let per_epoch = train_set.dataset.len().div_ceil(batch_size);
    let total = per_epoch * epochs;
    let last_path = opts.out.join("checkpoint-last.safetensors");
    let best_path = opts.out.join("checkpoint-best.safetensors");
    let (mut step, mut best) = (0usize, 0f64);
    // Rank 0 decides whether there is a run to resume; every rank then reads the same file
    // (the output directory is on a filesystem the ranks share).
    let resume = world.broadcast_host(&[(opts.resume && last_path.exists()) as u8 as f64])?[0];
    if resume > 0.0 {
        let resumed = format::load_training(&last_path, &model, cfg).with_context(|| {
            format!(
                "{} resuming from {} (every rank reads the checkpoint rank 0 wrote)",
                world.describe(),
                last_path.display()
            )
        })?;
        let optimizer: HashMap<String, Tensor> = resumed.optimizer.into_iter().collect();
        opt.restore(resumed.state.optimizer_steps, &optimizer, &params)?;
        (step, best) = (resumed.state.step, resumed.state.best_score);
        if leader {
            eprintln!("resumed from {} at step {step}", last_path.display());
        }
    }
    synchronise_weights(&model, world)?;
    let plan = StepPlan {
        cfg,
        runtime: cfg.deq.runtime(),
        total_steps: total,
        seed: opts.seed,
        class_weights,
        world,
    };
    let stop = opts.max_steps.map_or(total, |m| m.min(total));
    let mut log = if leader {
        Some(RunLog::open(&opts.out)?)
    } else {
        None
    };
    let mut summary = TrainSummary {
        steps: step,
        last_eval: None,
        last_loss: f64::NAN,
    };
    let started = Instant::now();
    let mut images_seen = 0usize;
    // Drawn only on a terminal, and only by rank 0; the log lines below go to stderr either way.
    let bar = if leader {
        indicatif::ProgressBar::new(stop as u64).with_position(step as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
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
    let shard = Shard::new(world.rank(), world.size());
    let eval_loader = eval_set.loader(cfg, batch_size, 0, 0);
    while step < stop {
        let epoch = step / per_epoch;
        let loader = train_set
            .loader(cfg, batch_size, opts.seed, epoch as u64)
            .sharded(shard);
        let first = step % per_epoch;
        let last = per_epoch.min(first + (stop - step));
        for batch in loader.prefetch(first..last, 3, &compute.device) {
            let batch = batch.with_context(|| world.describe())?;
            let outcome = train_step(&plan, &model, &params, &mut opt, &batch, step, epoch)
                .with_context(|| format!("last checkpoint: {}", last_path.display()))?;
            step += 1;
            bar.set_position(step as u64);
            images_seen += batch.images.dim(0)?;
            summary.last_loss = outcome.loss;
            if step % opts.log_every.max(1) == 0 || step == stop {
                let rate = images_seen as f64 / started.elapsed().as_secs_f64();
                let record =
                    StepRecord::gather(world, task, &outcome, &batch.labels, (step, epoch), rate)?;
                if let Some(log) = log.as_mut() {
                    log.step(&record)?;
                    let line = record.progress_line(score_name, stop);
                    if bar.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        bar.set_message(line);
                    }
                }
            }
            let epoch_done = step % per_epoch == 0;
            if epoch_done || step == stop {
                // Per-replica BatchNorm leaves each rank its own running statistics: evaluate
                // and save rank 0's, as DistributedDataParallel broadcasts its buffers.
                synchronise_weights(&model, world)?;
                // While pretraining the weights are not yet an equilibrium model: validate
                // unrolled, as the official code does.
                let mode = Forward::trained(cfg, Some(step)).mode(cfg, &plan.runtime);
                let result = evaluate(&model, &eval_loader, mode, opts.eval_limit, None, world)?;
                if let Some(log) = log.as_mut() {
                    log.eval(step, epoch, eval_name, &result)?;
                    eprintln!("{eval_name} after step {step}: {}", result.summary());
                    if result.score() > best {
                        best = result.score();
                        save_checkpoint(&best_path, &model, cfg, &opt, step, best)?;
                    }
                    save_checkpoint(&last_path, &model, cfg, &opt, step, best)?;
                }
                summary.last_eval = Some(result);
            }
        }
    }
    bar.finish_and_clear();
    if let Some(log) = log {
        log.finish()?;
    }
    summary.steps = step;
    Ok(summary)
}
