//! Bench figures of whole training steps and of inference with the real solvers, as `mdeq train`
//! and `mdeq eval` run them: stem, forward solve, head and loss, backward in each mode, and the
//! optimizer step.
//!
//! The optimizer runs with learning rate 0 (all its work, no change to the weights), so every
//! repeat solves the same problem and the figures compare like with like.

use super::{randn, time_it, BenchOptions, Timing};
use anyhow::Result;
use candle_core::{Device, Tensor};
use mdeq_deq::{BackwardMode, SolverOptions, SolverStats};
use mdeq_model::equilibrium::{eval_forward, solve_equilibrium, DeqRuntime};
use mdeq_model::Compute;
use mdeq_model::{Mdeq, Task};
use mdeq_recipe::ExperimentConfig;
use mdeq_train::loss::{classification_loss, segmentation_loss};
use mdeq_train::optimizer::Optimizer;
use mdeq_train::step::{train_gradients, Phase};
use rand::SeedableRng;

/// Phantom gradient settings of the `train_step_phantom` figure (Geng et al. 2021's k and τ).
const PHANTOM: BackwardMode = BackwardMode::Phantom { k: 5, tau: 0.5 };

/// Deterministic labels in 0..classes: (B) classes or (B, H, W) label maps.
fn labels(
    task: Task,
    batch: usize,
    classes: usize,
    hw: (usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let n = match task {
        Task::Classification => batch,
        Task::Segmentation => batch * hw.0 * hw.1,
    };
    let v: Vec<i64> = (0..n).map(|i| ((i * 7919 + 13) % classes) as i64).collect();
    let t = Tensor::from_vec(v, n, device)?;
    Ok(match task {
        Task::Classification => t,
        Task::Segmentation => t.reshape((batch, hw.0, hw.1))?,
    })
}

/// What one solve of a figure did: steps, converged samples, the share of the whole-batch
/// work compaction left, and where its time went — the map (f, or the VJP) against the solver's
/// own algebra and bookkeeping.
fn describe(
    name: &str,
    direction: &str,
    stats: &SolverStats,
    batch: usize,
    state_bytes: usize,
) -> String {
    let share = stats.sample_evaluations as f64 / (stats.evaluations * batch).max(1) as f64;
    let ms = |s: f64| 1e3 * s;
    let algebra = stats.seconds - stats.map_seconds;
    let bound = traffic_bound_seconds(stats.steps, state_bytes);
    format!(
        "{name}: {direction} solve {} steps, {} of {} samples converged, map evaluated on {:.0}% \
         of the whole-batch sample count; {:.0} ms = map {:.0} ms + solver algebra {:.0} ms \
         ({:.0}%, {:.1} ms per step; memory-traffic bound {:.0} ms, {:.1}x it)",
        stats.steps,
        stats
            .status
            .iter()
            .filter(|s| **s == mdeq_deq::SampleStatus::Converged)
            .count(),
        batch,
        100.0 * share,
        ms(stats.seconds),
        ms(stats.map_seconds),
        ms(algebra),
        100.0 * algebra / stats.seconds.max(1e-12),
        ms(algebra) / stats.steps.max(1) as f64,
        ms(bound),
        algebra / bound.max(1e-12),
    )
}

/// The least time the solver's own algebra can take over `steps` Broyden steps on a state of
/// `state_bytes`: the bytes it must move ÷ this machine's memory bandwidth. Step j (0-based) holds
/// k = j pairs; its update reads x, x_new, g, g_new and the 2k history vectors and writes u, vᵀ
/// and the next iterate (7 + 2k states), and forming the residual with both its norms reads f and
/// x and writes g (3). Keeping the best iterate is counted as free (it need copy only the rows
/// that improved), so the bound is one the implementation could only approach.
fn traffic_bound_seconds(steps: usize, state_bytes: usize) -> f64 {
    let states: usize = (0..steps).map(|k| 10 + 2 * k).sum();
    (states * state_bytes) as f64 / super::copy_bandwidth()
}

/// The solves of one run of a figure, labelled "forward" / "backward".
pub(super) type Solves = Vec<(&'static str, SolverStats)>;

/// Times a figure that runs solvers (fewer repeats: each takes a second or so) and prints what
/// the solves of its last run did.
pub(super) fn time_solver_figure(
    name: &str,
    opts: &BenchOptions,
    device: &Device,
    state_bytes: usize,
    mut run: impl FnMut() -> Result<Solves>,
) -> Result<Timing> {
    let mut last = Solves::new();
    let timing = time_it(device, opts.warmup.min(1), opts.repeats.min(5), || {
        last = run()?;
        Ok(())
    })?;
    for (direction, s) in &last {
        eprintln!("{}", describe(name, direction, s, opts.batch, state_bytes));
    }
    Ok(timing)
}

/// Times the training-step and inference figures the options ask for.
pub fn figures(
    model: &Mdeq,
    cfg: &ExperimentConfig,
    opts: &BenchOptions,
    compute: &Compute,
    hw: (usize, usize),
) -> Result<Vec<(&'static str, Timing)>> {
    let b = opts.batch;
    let device = &compute.device;
    let image = randn((b, cfg.model.in_channels, hw.0, hw.1), 40, compute)?;
    let state_bytes = b * model.layout(hw.0, hw.1).size() * compute.dtype.size_in_bytes();
    let task = cfg.model.task;
    let target = labels(task, b, cfg.model.num_classes, hw, device)?;
    let smoothing = cfg.train.label_smoothing;
    let loss_fn = |logits: &Tensor| match task {
        Task::Classification => classification_loss(logits, &target, smoothing),
        Task::Segmentation => segmentation_loss(logits, &target, None, smoothing),
    };
    let base = cfg.deq.runtime();
    let whole_batch = DeqRuntime {
        forward: SolverOptions {
            compact_batch: false,
            ..base.forward
        },
        ..base.clone()
    };
    let phantom = DeqRuntime {
        mode: PHANTOM,
        ..base.clone()
    };
    let jfb = DeqRuntime {
        mode: BackwardMode::Jfb,
        ..base.clone()
    };
    let steps: [(&'static str, &DeqRuntime, Phase); 5] = [
        ("train_step_ift", &base, Phase::Deq),
        ("train_step_ift_whole_batch", &whole_batch, Phase::Deq),
        ("train_step_phantom", &phantom, Phase::Deq),
        ("train_step_jfb", &jfb, Phase::Deq),
        (
            "train_step_unrolled",
            &base,
            Phase::Unrolled(cfg.model.num_layers),
        ),
    ];
    let params: Vec<_> = model.store().parameters().map(|e| e.var.clone()).collect();
    let masks = model.dropout_masks(b, true, &mut rand::rngs::StdRng::seed_from_u64(0))?;
    let mut out = Vec::new();
    for (name, rt, phase) in steps {
        if !opts.wants(name) {
            continue;
        }
        let mut opt = Optimizer::new(&cfg.train, params.len());
        let timing = time_solver_figure(name, opts, device, state_bytes, || {
            let g = train_gradients(model, &image, &masks, &loss_fn, rt, phase, None)?;
            let grads: Vec<Option<Tensor>> = g.grads.into_iter().map(|(_, t)| t).collect();
            opt.step(&params, &grads, 0.0)?;
            Ok(
                [("forward", g.forward_stats), ("backward", g.backward_stats)]
                    .into_iter()
                    .filter_map(|(d, s)| Some((d, s?)))
                    .collect(),
            )
        })?;
        out.push((name, timing));
    }
    if opts.wants("forward_solve") {
        // The solve alone, as training runs it: detached cell, injection computed beforehand.
        let injection = model.injection(&image, true)?;
        let layout = model.layout(hw.0, hw.1);
        let cell = model.cell().prepared(true)?;
        let t = time_solver_figure("forward_solve", opts, device, state_bytes, || {
            let (_, stats) = solve_equilibrium(&cell, &injection, &masks, &layout, &base, None)?;
            Ok(vec![("forward", stats)])
        })?;
        out.push(("forward_solve", t));
    }
    if opts.wants("inference_per_image") {
        let t = time_solver_figure("inference_per_image", opts, device, state_bytes, || {
            let (_, _, stats) = eval_forward(model, &image, &base)?;
            Ok(vec![("forward", stats)])
        })?;
        let per = |ms: f64| ms / b as f64;
        out.push((
            "inference_per_image",
            Timing {
                median_ms: per(t.median_ms),
                min_ms: per(t.min_ms),
            },
        ));
    }
    Ok(out)
}
