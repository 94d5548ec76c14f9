//! The training loop: unrolled pretraining, then DEQ mode with the configured backward; metrics
//! as JSON lines; atomic checkpoints holding model, optimizer and step, so that `resume`
//! continues exactly where a run stopped (batches and dropout masks are functions of the seed
//! and the step).

use crate::data::RecipeSplit;
use crate::evaluate::{batch_score, evaluate, EvalMode, EvalResult};
use crate::loss::{classification_loss, segmentation_loss};
use crate::optimizer::Optimizer;
use crate::run_log::{RunLog, StepRecord};
use crate::schedule::{cosine, poly};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use mdeq_checkpoint::format::{write_atomic, CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION};
use mdeq_data::Split;
use mdeq_model::config::LrSchedule;
use mdeq_model::equilibrium::{train_gradients, DeqRuntime, JacobianPenalty, Phase};
use mdeq_model::{ExperimentConfig, Mdeq, Task};
use rand::SeedableRng;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of one training run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Dataset directory.
    pub data: PathBuf,
    /// Output directory (checkpoints, metrics.jsonl).
    pub out: PathBuf,
    /// Overrides the recipe's epochs.
    pub epochs: Option<usize>,
    /// Stops after this many optimizer steps in total (the schedule still spans all epochs).
    pub max_steps: Option<usize>,
    /// Overrides the recipe's batch size.
    pub batch_size: Option<usize>,
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Continue from `<out>/checkpoint-last.safetensors`.
    pub resume: bool,
    /// Log a metrics line every this many steps.
    pub log_every: usize,
    /// Evaluate on at most this many test samples at each epoch end (None: all).
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

const STATE_KEY: &str = "mdeq.train_state";

fn save_checkpoint(
    path: &Path,
    model: &Mdeq,
    cfg: &ExperimentConfig,
    opt: &Optimizer,
    step: usize,
    best: f64,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = model
        .store()
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.var.as_tensor().clone()))
        .collect();
    tensors.extend(opt.state());
    let mut meta = HashMap::new();
    meta.insert(CONFIG_KEY.to_string(), cfg.to_toml_string());
    meta.insert(FORMAT_KEY.to_string(), FORMAT_VERSION.to_string());
    meta.insert(
        STATE_KEY.to_string(),
        json!({ "step": step, "optimizer_steps": opt.steps(), "best_score": best }).to_string(),
    );
    let bytes = safetensors::tensor::serialize(tensors, Some(meta))?;
    write_atomic(path, &bytes)?;
    Ok(())
}

fn load_checkpoint(path: &Path, model: &Mdeq, opt: &mut Optimizer) -> Result<(usize, f64)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let state: serde_json::Value = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .map(|s| serde_json::from_str(s))
        .transpose()?
        .with_context(|| {
            format!(
                "{}: no training state (not written by mdeq train)",
                path.display()
            )
        })?;
    let all = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let (optim, weights): (HashMap<String, Tensor>, HashMap<String, Tensor>) = all
        .into_iter()
        .partition(|(k, _)| k.starts_with(mdeq_checkpoint::format::OPTIMIZER_PREFIX));
    let entries: Vec<(String, Tensor)> = weights.into_iter().collect();
    mdeq_checkpoint::import::load_into(model, entries, &path.display().to_string())?;
    opt.restore(state["optimizer_steps"].as_u64().unwrap_or(0), &optim);
    Ok((
        state["step"].as_u64().unwrap_or(0) as usize,
        state["best_score"].as_f64().unwrap_or(0.0),
    ))
}

/// The official Jacobian-loss schedule (spec §4.5): the pretraining weight while pretraining,
/// then JAC_LOSS_WEIGHT + 0.1 per JAC_INCREMENTAL steps until JAC_STOP_EPOCH, applied on a
/// random JAC_LOSS_FREQ fraction of steps (drawn from the seed and the step, so resuming
/// reproduces it).
pub fn jacobian_penalty(
    cfg: &ExperimentConfig,
    step: usize,
    epoch: usize,
    seed: u64,
) -> Option<JacobianPenalty> {
    let t = &cfg.train;
    let pretrain = cfg.deq.pretrain_steps;
    let factor = if step < pretrain {
        t.pretrain_jac_loss_weight
    } else if epoch as u64 >= t.jac_stop_epoch {
        0.0
    } else {
        t.jac_loss_weight + 0.1 * ((step - pretrain) as u64 / t.jac_incremental.max(1)) as f64
    };
    let draw_seed = seed ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut rng = rand::rngs::StdRng::seed_from_u64(draw_seed);
    let draw: f64 = rand::Rng::gen(&mut rng);
    (factor > 0.0 && draw < t.jac_loss_freq).then_some(JacobianPenalty {
        factor,
        probes: 2,
        step_size: t.jac_fd_step,
        seed: draw_seed.rotate_left(17),
    })
}

/// Trains `cfg` as `opts` says.
pub fn train(cfg: &ExperimentConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let train_set = RecipeSplit::open(cfg, &opts.data, Split::Train)?;
    let test_set = RecipeSplit::open(cfg, &opts.data, Split::Test)?;
    let task = cfg.model.task;
    let class_weights = train_set
        .kind
        .class_weights()
        .map(|w| Tensor::new(w, &Device::Cpu))
        .transpose()?;
    let model = Mdeq::new(&cfg.model, DType::F32, &Device::Cpu, opts.seed)?;
    let params: Vec<Var> = model.store().parameters().map(|e| e.var.clone()).collect();
    let mut opt = Optimizer::new(&cfg.train, params.len());
    let batch_size = opts.batch_size.unwrap_or(cfg.train.batch_size);
    let epochs = opts.epochs.unwrap_or(cfg.train.epochs);
    let per_epoch = train_set.dataset.len().div_ceil(batch_size);
    let total = per_epoch * epochs;
    let last_path = opts.out.join("checkpoint-last.safetensors");
    let best_path = opts.out.join("checkpoint-best.safetensors");
    let (mut step, mut best) = (0usize, 0f64);
    if opts.resume && last_path.exists() {
        (step, best) = load_checkpoint(&last_path, &model, &mut opt)?;
        eprintln!("resumed from {} at step {step}", last_path.display());
    }
    let rt = DeqRuntime::from_config(&cfg.deq)?;
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
        for batch in loader.prefetch(first..last, 3) {
            let batch = batch?;
            let mut mask_rng = rand::rngs::StdRng::seed_from_u64(
                opts.seed.wrapping_mul(31).wrapping_add(step as u64),
            );
            let masks = model.dropout_masks(batch.images.dim(0)?, true, &mut mask_rng)?;
            let phase = if step < cfg.deq.pretrain_steps {
                Phase::Unrolled(cfg.model.num_layers)
            } else {
                Phase::Deq
            };
            let labels = &batch.labels;
            let loss_fn = |logits: &Tensor| match task {
                Task::Classification => classification_loss(logits, labels),
                Task::Segmentation => segmentation_loss(logits, labels, class_weights.as_ref()),
            };
            let penalty = jacobian_penalty(cfg, step, epoch, opts.seed);
            let g = train_gradients(&model, &batch.images, &masks, &loss_fn, &rt, phase, penalty)?;
            let loss = g.loss.to_scalar::<f32>()? as f64;
            if !loss.is_finite() {
                bail!("step {step}: the loss is {loss}; stopping before it reaches the weights (last checkpoint: {})", last_path.display());
            }
            let grads: Vec<Option<Tensor>> = g.grads.iter().map(|(_, t)| t.clone()).collect();
            let lr = match cfg.train.lr_schedule {
                LrSchedule::Cosine => cosine(cfg.train.lr, step, total),
                LrSchedule::Poly => poly(cfg.train.lr, step, total),
            };
            opt.step(&params, &grads, lr)?;
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
                let mode = if step <= cfg.deq.pretrain_steps {
                    EvalMode::Unrolled(cfg.model.num_layers)
                } else {
                    EvalMode::Deq(&rt)
                };
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
