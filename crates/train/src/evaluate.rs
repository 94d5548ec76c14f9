//! Classification accuracy of a model in DEQ mode over a dataset.

use anyhow::Result;
use candle_core::{Device, Tensor};
use mdeq_data::{BatchLoader, Dataset};
use mdeq_model::equilibrium::{eval_forward, unrolled_forward, DeqRuntime};
use mdeq_model::Mdeq;
use serde::Serialize;

/// Accuracy and solver statistics of one evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    /// Top-1 accuracy in [0, 1].
    pub top1: f64,
    /// Top-5 accuracy in [0, 1].
    pub top5: f64,
    /// Samples seen.
    pub n: usize,
    /// Mean forward solver steps per batch.
    pub mean_steps: f64,
    /// Worst lowest residual over all batches.
    pub worst_residual: f64,
}

/// How the model is run for evaluation.
#[derive(Debug, Clone, Copy)]
pub enum EvalMode<'a> {
    /// Equilibrium solve (spec §4.3).
    Deq(&'a DeqRuntime),
    /// `layers` unrolled applications (pretraining phase).
    Unrolled(usize),
}

/// Evaluates `model` on up to `limit` samples of `data`.
pub fn evaluate(
    model: &Mdeq,
    data: &dyn Dataset,
    mode: EvalMode,
    batch_size: usize,
    limit: Option<usize>,
) -> Result<EvalResult> {
    let loader = BatchLoader::new(data, batch_size, false, 0, 0);
    let (mut top1, mut top5, mut n, mut steps, mut batches, mut worst) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0f64);
    for i in 0..loader.len() {
        if limit.is_some_and(|l| n >= l) {
            break;
        }
        let batch = loader.batch(i, &Device::Cpu)?;
        let images = batch.images.to_dtype(model.dtype())?;
        let logits = match mode {
            EvalMode::Deq(rt) => {
                let (logits, _, stats) = eval_forward(model, &images, rt)?;
                steps += stats.steps;
                worst = worst.max(stats.worst_lowest());
                logits
            }
            EvalMode::Unrolled(layers) => unrolled_forward(model, &images, layers)?,
        };
        let (c1, c5) = correct(&logits, &batch.labels)?;
        top1 += c1;
        top5 += c5;
        n += batch.labels.dim(0)?;
        batches += 1;
    }
    Ok(EvalResult {
        top1: top1 as f64 / n.max(1) as f64,
        top5: top5 as f64 / n.max(1) as f64,
        n,
        mean_steps: steps as f64 / batches.max(1) as f64,
        worst_residual: worst,
    })
}

/// (top-1 correct, top-5 correct) in a batch.
pub fn correct(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let labels = labels.to_vec1::<i64>()?;
    let (mut c1, mut c5) = (0, 0);
    for (row, &label) in rows.iter().zip(&labels) {
        let target = row[label as usize];
        let better = row.iter().filter(|&&v| v > target).count();
        c1 += (better == 0) as usize;
        c5 += (better < 5) as usize;
    }
    Ok((c1, c5))
}
