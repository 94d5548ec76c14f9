//! What a training run records: one JSON line per logged step and per evaluation in
//! `metrics.jsonl`, the same scalars as TensorBoard events, and at the end PNG plots.

use crate::evaluate::{batch_score, EvalResult};
use crate::metrics::correct;
use crate::plots;
use crate::step::{Phase, StepOutcome};
use crate::tensorboard::EventWriter;
use anyhow::{Context, Result};
use candle_core::Tensor;
use mdeq_deq::SolverStats;
use mdeq_distributed::{Reduce, World};
use mdeq_model::Task;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One logged training step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Optimizer steps taken.
    pub step: usize,
    /// Epoch of the step.
    pub epoch: usize,
    /// Training loss.
    pub loss: f64,
    /// Batch top-1 (classification) or mIoU over the classes present (segmentation).
    pub batch_score: f64,
    /// Learning rate used.
    pub lr: f64,
    /// `unrolled` or `deq`.
    pub phase: &'static str,
    /// Forward solver steps (DEQ phase).
    pub forward_steps: Option<usize>,
    /// Forward solver: worst lowest residual over the batch.
    pub forward_residual: Option<f64>,
    /// Backward solver steps (DEQ phase).
    pub backward_steps: Option<usize>,
    /// Backward solver: worst lowest residual over the batch.
    pub backward_residual: Option<f64>,
    /// ‖J‖²_F/(B·D) when the Jacobian loss was applied this step.
    pub jacobian_penalty: Option<f64>,
    /// Forward relative residual per solver step, averaged over the batch.
    pub forward_trace: Vec<f64>,
    /// Backward relative residual per solver step, averaged over the batch.
    pub backward_trace: Vec<f64>,
    /// Training throughput since the run (re)started, over all ranks.
    pub images_per_s: f64,
    /// Seconds of this step's gradient all-reduce (data-parallel runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_s: Option<f64>,
}

impl StepRecord {
    /// The record of a step on every rank: scores, solver statistics and penalties combined
    /// over the ranks' rows and micro-batches (a collective call: every rank makes it).
    /// `images_per_s` is this rank's rate, multiplied by the ranks.
    pub fn gather(
        world: &World,
        task: Task,
        outcome: &StepOutcome,
        labels: &Tensor,
        (step, epoch): (usize, usize),
        images_per_s: f64,
    ) -> Result<Self> {
        // Classification scores exactly (correct over rows); a segmentation batch's mIoU over
        // the classes present is averaged over the ranks.
        let (score, weight) = match task {
            Task::Classification => (
                correct(&outcome.logits, labels)?.0 as f64,
                labels.dim(0)? as f64,
            ),
            Task::Segmentation => (batch_score(task, &outcome.logits, labels)?, 1.0),
        };
        let (f, b) = (&outcome.forward_stats, &outcome.backward_stats);
        let worst = |stats: &[SolverStats], of: fn(&SolverStats) -> f64| {
            stats.iter().map(of).fold(f64::NEG_INFINITY, f64::max)
        };
        let maxima = world.all_reduce_host(
            &[
                worst(f, |s| s.steps as f64),
                worst(f, SolverStats::worst_lowest),
                worst(b, |s| s.steps as f64),
                worst(b, SolverStats::worst_lowest),
                worst(f, |s| s.rel_trace.len() as f64),
                worst(b, |s| s.rel_trace.len() as f64),
            ],
            Reduce::Max,
        )?;
        let (f_len, b_len) = (maxima[4].max(0.0) as usize, maxima[5].max(0.0) as usize);
        let mut sums = vec![
            score,
            weight,
            outcome.jacobian_penalty.iter().sum(),
            outcome.jacobian_penalty.len() as f64,
            images_per_s,
        ];
        sums.extend(mean_trace(f, f_len));
        sums.extend(mean_trace(b, b_len));
        let sums = world.all_reduce_host(&sums, Reduce::Sum)?;
        let ranks = world.size() as f64;
        let known = |v: f64| v.is_finite().then_some(v);
        let trace = |from: usize, len: usize| -> Vec<f64> {
            sums[from..from + len].iter().map(|v| v / ranks).collect()
        };
        Ok(Self {
            step,
            epoch,
            loss: outcome.loss,
            batch_score: sums[0] / sums[1].max(1.0),
            lr: outcome.lr,
            phase: if matches!(outcome.phase, Phase::Deq) {
                "deq"
            } else {
                "unrolled"
            },
            forward_steps: known(maxima[0]).map(|v| v as usize),
            forward_residual: known(maxima[1]),
            backward_steps: known(maxima[2]).map(|v| v as usize),
            backward_residual: known(maxima[3]),
            jacobian_penalty: (sums[3] > 0.0).then(|| sums[2] / sums[3]),
            forward_trace: trace(5, f_len),
            backward_trace: trace(5 + f_len, b_len),
            images_per_s: sums[4],
            allreduce_s: world.is_distributed().then_some(outcome.all_reduce.seconds),
        })
    }
}

/// The micro-batches' mean relative residual per solver step, `len` steps long: a solve that
/// stopped early keeps its last value, so that ranks whose solves took different numbers of
/// steps still add vectors of one length.
fn mean_trace(stats: &[SolverStats], len: usize) -> Vec<f64> {
    let traces: Vec<Vec<f64>> = stats.iter().map(SolverStats::mean_rel_trace).collect();
    (0..len)
        .map(|i| {
            let at = |t: &Vec<f64>| t.get(i).or(t.last()).copied().unwrap_or(0.0);
            traces.iter().map(at).sum::<f64>() / traces.len().max(1) as f64
        })
        .collect()
}

impl StepRecord {
    /// The live progress line.
    pub fn progress_line(&self, score_name: &str, stop: usize) -> String {
        let solver = |n: Option<usize>, r: Option<f64>| match (n, r) {
            (Some(n), Some(r)) => format!("{n} steps {r:.1e}"),
            _ => "-".to_string(),
        };
        format!(
            "epoch {} step {}/{stop} loss {:.4} {score_name} {:.1}% lr {:.2e} {} fwd {} bwd {} {:.1} img/s",
            self.epoch,
            self.step,
            self.loss,
            100.0 * self.batch_score,
            self.lr,
            self.phase,
            solver(self.forward_steps, self.forward_residual),
            solver(self.backward_steps, self.backward_residual),
            self.images_per_s
        )
    }
}

/// The metrics file, the event file and what the plots need.
pub struct RunLog {
    dir: PathBuf,
    metrics: std::fs::File,
    events: Option<EventWriter>,
}

impl RunLog {
    /// Opens (appending) `<dir>/metrics.jsonl` and a new TensorBoard event file in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let events = match EventWriter::create(dir) {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("warning: no TensorBoard events ({}: {e})", dir.display());
                None
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            metrics,
            events,
        })
    }

    fn scalars(&mut self, step: usize, values: &[(&str, Option<f64>)]) -> Result<()> {
        if let Some(w) = self.events.as_mut() {
            for (tag, v) in values {
                if let Some(v) = v {
                    w.scalar(tag, step, *v)?;
                }
            }
            w.flush()?;
        }
        Ok(())
    }

    /// Records a training step.
    pub fn step(&mut self, r: &StepRecord) -> Result<()> {
        let mut json = serde_json::to_value(r)?;
        json["kind"] = "step".into();
        writeln!(self.metrics, "{json}")?;
        self.scalars(
            r.step,
            &[
                ("train/loss", Some(r.loss)),
                ("train/batch_score", Some(r.batch_score)),
                ("train/lr", Some(r.lr)),
                ("train/images_per_s", Some(r.images_per_s)),
                ("solver/forward_steps", r.forward_steps.map(|n| n as f64)),
                ("solver/forward_residual", r.forward_residual),
                ("solver/backward_steps", r.backward_steps.map(|n| n as f64)),
                ("solver/backward_residual", r.backward_residual),
                ("train/jacobian_penalty", r.jacobian_penalty),
            ],
        )
    }

    /// Records an evaluation on `split` ("validation" or "test").
    pub fn eval(&mut self, step: usize, epoch: usize, split: &str, r: &EvalResult) -> Result<()> {
        let mut json = serde_json::to_value(r)?;
        json["kind"] = "eval".into();
        json["split"] = split.into();
        json["step"] = step.into();
        json["epoch"] = epoch.into();
        writeln!(self.metrics, "{json}")?;
        self.scalars(
            step,
            &[
                ("eval/top1", r.top1),
                ("eval/top5", r.top5),
                ("eval/miou", r.miou),
                ("eval/pixel_accuracy", r.pixel_accuracy),
                ("eval/mean_forward_steps", Some(r.mean_steps)),
            ],
        )
    }

    /// Flushes the logs and draws the plots from the whole `metrics.jsonl` (a resumed run's
    /// plots cover every part of it).
    pub fn finish(mut self) -> Result<()> {
        self.metrics.flush()?;
        if let Some(w) = self.events.as_mut() {
            w.flush()?;
        }
        if let Err(e) = plots::training_plots(&self.dir) {
            eprintln!("warning: plots not drawn: {e:#}");
        }
        Ok(())
    }
}
