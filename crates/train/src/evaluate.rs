//! Scores a model over a dataset: top-1/top-5 for classification, mIoU with per-class IoU for
//! segmentation, together with forward-solver statistics.

use crate::distribution::Distribution;
use crate::loss::predict_pixels;
use crate::metrics::{correct, ConfusionMatrix};
use anyhow::Result;
use candle_core::Tensor;
use mdeq_data::BatchLoader;
use mdeq_deq::{SampleStatus, StopMode};
use mdeq_distributed::{Reduce, World};
use mdeq_model::equilibrium::{eval_forward, spectral_radius_at, unrolled_forward, DeqRuntime};
use mdeq_model::{Mdeq, Task};
use serde::Serialize;

/// Scores and solver statistics of one evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    /// Top-1 accuracy in [0, 1] (classification).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1: Option<f64>,
    /// Top-5 accuracy in [0, 1] (classification).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top5: Option<f64>,
    /// Mean intersection over union (segmentation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miou: Option<f64>,
    /// Fraction of labelled pixels predicted right (segmentation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pixel_accuracy: Option<f64>,
    /// IoU of each class (segmentation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_iou: Option<Vec<f64>>,
    /// Images seen.
    pub n: usize,
    /// Mean forward solver steps per batch.
    pub mean_steps: f64,
    /// Worst lowest residual over all batches.
    pub worst_residual: f64,
    /// Mean evaluations of f per image, each image counting its own (a converged image leaves
    /// the batch): the compute an early exit saves shows here (DEQ mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_evaluations: Option<f64>,
    /// Mean over images of the relative residual ‖f(z) − z‖ / ‖f(z)‖ of the returned iterate
    /// (DEQ mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_residual: Option<f64>,
    /// Fraction of images whose solve reached the tolerance (DEQ mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub converged: Option<f64>,
    /// Wall time per image, in seconds, of the whole evaluation (batches prefetched), the
    /// diagnostics' own time left out.
    pub seconds_per_image: f64,
    /// Distributions over the images, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<Diagnostics>,
}

/// What `mdeq eval --diagnose` reports about the equilibria it found.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnostics {
    /// The final relative residual of each image's solve.
    pub residual: Distribution,
    /// The spectral radius of J = ∂f/∂z at each image's z*, by power iteration.
    pub spectral_radius: Distribution,
    /// Power iterations each estimate took.
    pub power_iterations: usize,
}

impl EvalResult {
    /// The score checkpoints are ranked by: top-1, or mIoU for segmentation.
    pub fn score(&self) -> f64 {
        self.top1.or(self.miou).unwrap_or(0.0)
    }

    /// One line for humans.
    pub fn summary(&self) -> String {
        match (self.top1, self.top5, self.miou) {
            (Some(t1), Some(t5), _) => format!(
                "top-1 {:.2}% top-5 {:.2}% on {} images",
                100.0 * t1,
                100.0 * t5,
                self.n
            ),
            (_, _, Some(m)) => format!(
                "mIoU {:.2}% pixel accuracy {:.2}% on {} images",
                100.0 * m,
                100.0 * self.pixel_accuracy.unwrap_or(0.0),
                self.n
            ),
            _ => format!("{} images", self.n),
        }
    }
}

/// How the model is run for evaluation.
#[derive(Debug, Clone, Copy)]
pub enum EvalMode<'a> {
    /// Equilibrium solve (reference §4.3).
    Deq(&'a DeqRuntime),
    /// `layers` unrolled applications (pretraining phase).
    Unrolled(usize),
}

/// The forward a model is evaluated with: the DEQ solve, or the unrolled stack of pretraining.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// Solve for the equilibrium (the trained DEQ).
    Deq,
    /// `num_layers` unrolled applications of f (the pretraining phase).
    Unrolled,
}

impl Forward {
    /// The forward a model was trained with after `steps_done` optimizer steps of `cfg`: unrolled
    /// until the last pretraining step, as the official code validates; None (an imported
    /// checkpoint) is a DEQ.
    pub fn trained(cfg: &mdeq_recipe::ExperimentConfig, steps_done: Option<usize>) -> Self {
        match steps_done {
            Some(s) if s <= cfg.deq.pretrain_steps => Self::Unrolled,
            _ => Self::Deq,
        }
    }

    /// The evaluation mode for this forward.
    pub fn mode<'a>(self, cfg: &mdeq_recipe::ExperimentConfig, rt: &'a DeqRuntime) -> EvalMode<'a> {
        match self {
            Self::Deq => EvalMode::Deq(rt),
            Self::Unrolled => EvalMode::Unrolled(cfg.model.num_layers),
        }
    }
}

/// Evaluates `model` on the batches of `loader` — the first batches that hold `limit` images,
/// or all — shared among the ranks of `world` batch by batch, with the scores of all. With
/// `power_iterations` (DEQ mode, one process) it also estimates the spectral radius of J at
/// every image's equilibrium and reports the distributions ([`Diagnostics`]).
pub fn evaluate(
    model: &Mdeq,
    loader: &BatchLoader,
    mode: EvalMode,
    limit: Option<usize>,
    power_iterations: Option<usize>,
    world: &World,
) -> Result<EvalResult> {
    if power_iterations.is_some()
        && (world.is_distributed() || matches!(mode, EvalMode::Unrolled(_)))
    {
        anyhow::bail!(
            "diagnostics need the DEQ solve in one process (the equilibria are what they describe)"
        );
    }
    let started = std::time::Instant::now();
    let task = model.config().task;
    let mut confusion = ConfusionMatrix::new(model.config().num_classes);
    let (mut top1, mut top5, mut n, mut steps, mut batches, mut worst) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0f64);
    let (mut evaluations, mut residual_sum, mut converged) = (0usize, 0f64, 0usize);
    let (mut residuals, mut radii, mut diagnosis_seconds) = (Vec::new(), Vec::new(), 0.0);
    let (mut count, mut images) = (0, 0);
    while count < loader.len() && limit.is_none_or(|l| images < l) {
        images += loader.global_rows(count);
        count += 1;
    }
    let mine = (world.rank()..count).step_by(world.size());
    for batch in loader.prefetch(mine, 2, model.device()) {
        let batch = batch?;
        let images = batch.images.to_dtype(model.dtype())?;
        let logits = match mode {
            EvalMode::Deq(rt) => {
                let (logits, z, stats) = eval_forward(model, &images, rt)?;
                steps += stats.steps;
                worst = worst.max(stats.worst_lowest());
                evaluations += stats.sample_evaluations;
                converged += stats
                    .status
                    .iter()
                    .filter(|s| **s == SampleStatus::Converged)
                    .count();
                let rel = stats.final_rel_residual();
                residual_sum += rel.iter().sum::<f64>();
                if let Some(iterations) = power_iterations {
                    let diagnosing = std::time::Instant::now();
                    radii.extend(spectral_radius_at(
                        model,
                        &images,
                        &z,
                        iterations,
                        batches as u64,
                    )?);
                    residuals.extend(rel);
                    diagnosis_seconds += diagnosing.elapsed().as_secs_f64();
                }
                logits
            }
            EvalMode::Unrolled(layers) => unrolled_forward(model, &images, layers)?,
        };
        match task {
            Task::Classification => {
                let (c1, c5) = correct(&logits, &batch.labels)?;
                top1 += c1;
                top5 += c5;
            }
            Task::Segmentation => {
                let (_, h, w) = batch.labels.dims3()?;
                confusion.add(&batch.labels, &predict_pixels(&logits, h, w)?)?;
            }
        }
        n += batch.images.dim(0)?;
        batches += 1;
    }
    let sums = world.all_reduce_host(
        &[top1, top5, n, steps, batches, evaluations, converged].map(|v| v as f64),
        Reduce::Sum,
    )?;
    let [top1, top5, n, steps, batches, evaluations, converged] =
        [0, 1, 2, 3, 4, 5, 6].map(|i| sums[i] as usize);
    let residual_sum = world.all_reduce_host(&[residual_sum], Reduce::Sum)?[0];
    let [worst, elapsed] = world.all_reduce_host(
        &[worst, started.elapsed().as_secs_f64() - diagnosis_seconds],
        Reduce::Max,
    )?[..] else {
        anyhow::bail!("all-reduce of two values returned another count")
    };
    confusion.all_reduce(world)?;
    let frac = |k: usize| Some(k as f64 / n.max(1) as f64);
    let seg = task == Task::Segmentation;
    let deq = matches!(mode, EvalMode::Deq(_));
    let per_image = |total: f64| deq.then(|| total / n.max(1) as f64);
    let diagnostics = match (power_iterations, mode) {
        (Some(power_iterations), EvalMode::Deq(rt)) => Some(Diagnostics {
            // The tolerance where it bounds this residual, else the 1e-2 of a converged solve.
            residual: Distribution::of(
                &residuals,
                match rt.forward.stop_mode {
                    StopMode::Rel => rt.forward.eps,
                    StopMode::Abs => 1e-2,
                },
            ),
            spectral_radius: Distribution::of(&radii, 1.0),
            power_iterations,
        }),
        _ => None,
    };
    Ok(EvalResult {
        top1: if seg { None } else { frac(top1) },
        top5: if seg { None } else { frac(top5) },
        miou: seg.then(|| confusion.mean_iou()),
        pixel_accuracy: seg.then(|| confusion.pixel_accuracy()),
        class_iou: seg.then(|| confusion.iou()),
        n,
        mean_steps: steps as f64 / batches.max(1) as f64,
        worst_residual: worst,
        mean_evaluations: per_image(evaluations as f64),
        mean_residual: per_image(residual_sum),
        converged: per_image(converged as f64),
        seconds_per_image: elapsed / n.max(1) as f64,
        diagnostics,
    })
}

/// Score of a batch for the progress line: top-1 for classes, mIoU over the classes present for
/// label maps.
pub fn batch_score(task: Task, logits: &Tensor, labels: &Tensor) -> Result<f64> {
    Ok(match task {
        Task::Classification => correct(logits, labels)?.0 as f64 / labels.dim(0)? as f64,
        Task::Segmentation => {
            let (_, h, w) = labels.dims3()?;
            let mut m = ConfusionMatrix::new(logits.dim(1)?);
            m.add(labels, &predict_pixels(logits, h, w)?)?;
            m.mean_iou_present()
        }
    })
}
