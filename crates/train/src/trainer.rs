//! The training loop: unrolled pretraining, then DEQ mode with the configured backward; metrics
//! as JSON lines; atomic checkpoints holding model, optimizer and step, so that `resume`
//! continues exactly where a run stopped (batches and dropout masks are functions of the seed
//! and the step).

use crate::evaluate::{correct, evaluate, EvalMode, EvalResult};
use crate::optimizer::Optimizer;
use crate::schedule::cosine;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use mdeq_checkpoint::format::{write_atomic, CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION};
use mdeq_data::{idx, BatchLoader, Dataset, IdxDataset, Split};
use mdeq_model::equilibrium::{train_gradients, DeqRuntime, Phase};
use mdeq_model::{ExperimentConfig, Mdeq};
use rand::SeedableRng;
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
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

/// Opens the train and test splits named by the recipe.
pub fn open_datasets(
    cfg: &ExperimentConfig,
    dir: &Path,
) -> Result<(Box<dyn Dataset>, Box<dyn Dataset>)> {
    let mean_std = match cfg.data.dataset.as_str() {
        "fashion_mnist" => idx::FASHION_MNIST_MEAN_STD,
        "mnist" => idx::MNIST_MEAN_STD,
        other => bail!("dataset '{other}' has no loader yet (supported: fashion_mnist, mnist)"),
    };
    Ok((
        Box::new(IdxDataset::open(dir, Split::Train, mean_std)?),
        Box::new(IdxDataset::open(dir, Split::Test, mean_std)?),
    ))
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
        json!({ "step": step, "optimizer_steps": opt.steps(), "best_top1": best }).to_string(),
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
        state["best_top1"].as_f64().unwrap_or(0.0),
    ))
}

/// Trains `cfg` as `opts` says.
pub fn train(cfg: &ExperimentConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let (train_set, test_set) = open_datasets(cfg, &opts.data)?;
    let (c, h, w) = train_set.image_shape();
    if c != cfg.model.in_channels {
        bail!(
            "{}: images have {c} channels, the config expects in_channels = {}",
            opts.data.display(),
            cfg.model.in_channels
        );
    }
    cfg.model.check_input_size(h, w)?;
    let model = Mdeq::new(&cfg.model, DType::F32, &Device::Cpu, opts.seed)?;
    let params: Vec<Var> = model.store().parameters().map(|e| e.var.clone()).collect();
    let mut opt = Optimizer::new(&cfg.train, params.len());
    let batch_size = opts.batch_size.unwrap_or(cfg.train.batch_size);
    let epochs = opts.epochs.unwrap_or(cfg.train.epochs);
    let per_epoch = train_set.len().div_ceil(batch_size);
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
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.out.join("metrics.jsonl"))
        .with_context(|| format!("opening {}/metrics.jsonl", opts.out.display()))?;
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
    // The epoch's shuffled order, rebuilt only when the epoch changes.
    let mut loader: Option<(usize, BatchLoader)> = None;
    while step < stop {
        let epoch = step / per_epoch;
        if loader.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let l = BatchLoader::new(
                train_set.as_ref(),
                batch_size,
                true,
                opts.seed,
                epoch as u64,
            );
            loader = Some((epoch, l));
        }
        let loader = &loader.as_ref().expect("set above").1;
        let batch = loader.batch(step % per_epoch, &Device::Cpu)?;
        let mut mask_rng =
            rand::rngs::StdRng::seed_from_u64(opts.seed.wrapping_mul(31).wrapping_add(step as u64));
        let masks = model.dropout_masks(batch.labels.dim(0)?, true, &mut mask_rng)?;
        let phase = if step < cfg.deq.pretrain_steps {
            Phase::Unrolled(cfg.model.num_layers)
        } else {
            Phase::Deq
        };
        let labels = batch.labels.clone();
        let loss_fn = |logits: &Tensor| candle_nn::loss::cross_entropy(logits, &labels);
        let g = train_gradients(&model, &batch.images, &masks, &loss_fn, &rt, phase)?;
        let loss = g.loss.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            bail!("step {step}: the loss is {loss}; stopping before it reaches the weights (last checkpoint: {})", last_path.display());
        }
        let grads: Vec<Option<Tensor>> = g.grads.iter().map(|(_, t)| t.clone()).collect();
        let lr = cosine(cfg.train.lr, step, total);
        opt.step(&params, &grads, lr)?;
        step += 1;
        bar.set_position(step as u64);
        images_seen += batch.labels.dim(0)?;
        summary.last_loss = loss;
        if step % opts.log_every.max(1) == 0 || step == stop {
            let (c1, _) = correct(&g.logits, &batch.labels)?;
            let f = g.forward_stats.as_ref();
            let b = g.backward_stats.as_ref();
            let record = json!({
                "kind": "step", "step": step, "epoch": epoch, "loss": loss,
                "batch_top1": c1 as f64 / batch.labels.dim(0)? as f64, "lr": lr,
                "phase": if matches!(phase, Phase::Deq) { "deq" } else { "unrolled" },
                "forward_steps": f.map(|s| s.steps), "forward_residual": f.map(|s| s.worst_lowest()),
                "backward_steps": b.map(|s| s.steps), "backward_residual": b.map(|s| s.worst_lowest()),
                "images_per_s": images_seen as f64 / started.elapsed().as_secs_f64(),
            });
            writeln!(metrics, "{record}")?;
            let solver = |s: Option<&mdeq_deq::SolverStats>| {
                s.map_or("-".to_string(), |s| {
                    format!("{} steps {:.1e}", s.steps, s.worst_lowest())
                })
            };
            let line = format!(
                "epoch {epoch} step {step}/{stop} loss {loss:.4} acc {:.1}% lr {lr:.2e} {} fwd {} bwd {} {:.1} img/s",
                100.0 * record["batch_top1"].as_f64().unwrap_or(0.0),
                record["phase"].as_str().unwrap_or(""),
                solver(f),
                solver(b),
                record["images_per_s"].as_f64().unwrap_or(0.0)
            );
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.set_message(line);
            }
        }
        let epoch_done = step % per_epoch == 0;
        if epoch_done || step == stop {
            // While pretraining the weights are not yet an equilibrium model: validate unrolled,
            // as the official code does.
            let mode = if step <= cfg.deq.pretrain_steps {
                EvalMode::Unrolled(cfg.model.num_layers)
            } else {
                EvalMode::Deq(&rt)
            };
            let result = evaluate(&model, test_set.as_ref(), mode, batch_size, opts.eval_limit)?;
            writeln!(
                metrics,
                "{}",
                json!({ "kind": "eval", "step": step, "epoch": epoch, "top1": result.top1, "top5": result.top5, "n": result.n, "mean_forward_steps": result.mean_steps })
            )?;
            eprintln!(
                "eval after step {step}: top-1 {:.2}% top-5 {:.2}% on {} images",
                100.0 * result.top1,
                100.0 * result.top5,
                result.n
            );
            if result.top1 > best {
                best = result.top1;
                save_checkpoint(&best_path, &model, cfg, &opt, step, best)?;
            }
            save_checkpoint(&last_path, &model, cfg, &opt, step, best)?;
            summary.last_eval = Some(result);
        }
    }
    bar.finish_and_clear();
    summary.steps = step;
    Ok(summary)
}
