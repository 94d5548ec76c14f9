//! One training step, in the order the data flows: the batch's dropout masks and phase → stem
//! and injection → the equilibrium solve (or the unrolled cell while pretraining) → head → loss
//! (plus the Jacobian penalty on the steps that draw it) → the implicit backward → the
//! optimizer. `trainer.rs` only loops this over the batches and writes what it reports.

use crate::loss::{classification_loss, segmentation_loss};
use crate::optimizer::Optimizer;
use crate::schedule::{cosine, poly};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use mdeq_data::Batch;
use mdeq_deq::jacobian::{frobenius_sq_finite_difference, gaussian_probes};
use mdeq_deq::{adjoint, SolverStats};
use mdeq_distributed::buckets::{AllReduceStats, BUCKET_BYTES};
use mdeq_distributed::{average_gradients, Reduce, World};
use mdeq_model::cell::solver_map::{CellMap, CellVjp};
use mdeq_model::equilibrium::{solve_equilibrium, unroll, DeqRuntime};
use mdeq_model::{Mdeq, Task};
use mdeq_recipe::{ExperimentConfig, LrSchedule};
use rand::{Rng, SeedableRng};

/// What stays fixed across the steps of a run.
pub struct StepPlan<'a> {
    /// The recipe.
    pub cfg: &'a ExperimentConfig,
    /// The solvers as the recipe configures them.
    pub runtime: DeqRuntime,
    /// Optimizer steps the schedule spans (all epochs).
    pub total_steps: usize,
    /// Seed of dropout masks, penalty draws and threshold jitter.
    pub seed: u64,
    /// Per-class loss weights (Cityscapes).
    pub class_weights: Option<Tensor>,
    /// The job the step is part of: losses and gradients are averaged over its ranks.
    pub world: &'a World,
}

/// What one optimizer step did, on this rank.
pub struct StepOutcome {
    /// The loss, averaged over every rank's rows.
    pub loss: f64,
    /// The learning rate the step used.
    pub lr: f64,
    /// The phase the step ran in.
    pub phase: Phase,
    /// Logits of this rank's rows (train mode, every micro-batch in order).
    pub logits: Tensor,
    /// Forward solver statistics of each micro-batch (DEQ phase).
    pub forward_stats: Vec<SolverStats>,
    /// Backward solver statistics of each micro-batch (IFT).
    pub backward_stats: Vec<SolverStats>,
    /// ‖J‖²_F/(B·D) of each micro-batch when the Jacobian loss was applied.
    pub jacobian_penalty: Vec<f64>,
    /// What the gradient all-reduce moved.
    pub all_reduce: AllReduceStats,
}

/// Trains `model` for one optimizer step (`step` optimizer steps already taken, in `epoch`) on
/// `batch`, this rank's rows of the global batch, in the recipe's micro-batches. Dropout masks
/// and Jacobian probes are drawn for the global batch and each part takes its rows, so that any
/// split of the batch computes what one process computes; the parts' gradients are averaged
/// over the micro-batches and the ranks before the optimizer. A non-finite loss on any rank is
/// an error on every rank, raised before anything reaches the weights.
pub fn train_step(
    plan: &StepPlan,
    model: &Mdeq,
    params: &[Var],
    opt: &mut Optimizer,
    batch: &Batch,
    step: usize,
    epoch: usize,
) -> Result<StepOutcome> {
    let (cfg, world) = (plan.cfg, plan.world);
    let local = batch.images.dim(0)?;
    let parts = cfg.train.micro_batches.max(1);
    if !local.is_multiple_of(parts) {
        bail!(
            "step {step}: {local} rows on {} do not split into train.micro_batches = {parts} equal parts",
            world.describe()
        );
    }
    let (global, first_row, each) = (local * world.size(), world.rank() * local, local / parts);
    let mut mask_rng =
        rand::rngs::StdRng::seed_from_u64(plan.seed.wrapping_mul(31).wrapping_add(step as u64));
    let masks = model.dropout_masks(global, true, &mut mask_rng)?;
    let phase = if step < cfg.deq.pretrain_steps {
        Phase::Unrolled(cfg.model.num_layers)
    } else {
        Phase::Deq
    };
    let penalty = jacobian_penalty(cfg, step, epoch, plan.seed);
    let mut runtime = plan.runtime.clone();
    if penalty.is_some() {
        runtime.forward.threshold = jittered_threshold(cfg, step, plan.seed);
    }
    let (_, _, h, w) = batch.images.dims4()?;
    let probes = match penalty {
        Some(p) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
            let d = model.layout(h, w).size();
            gaussian_probes(&mut rng, p.probes, (global, d), model.device())?
        }
        None => Vec::new(),
    };
    let images = batch.images.to_dtype(model.dtype())?;
    let mut summed: Vec<Option<Tensor>> = vec![None; params.len()];
    let mut outcome = StepOutcome {
        loss: 0.0,
        lr: 0.0,
        phase,
        logits: Tensor::zeros(0, model.dtype(), model.device())?,
        forward_stats: Vec::new(),
        backward_stats: Vec::new(),
        jacobian_penalty: Vec::new(),
        all_reduce: AllReduceStats::default(),
    };
    let mut logits = Vec::with_capacity(parts);
    let smoothing = cfg.train.label_smoothing;
    for part in 0..parts {
        let (rows, global_rows) = (part * each, first_row + part * each);
        let labels = batch.labels.narrow(0, rows, each)?;
        let loss_fn = |logits: &Tensor| match cfg.model.task {
            Task::Classification => classification_loss(logits, &labels, smoothing),
            Task::Segmentation => {
                segmentation_loss(logits, &labels, plan.class_weights.as_ref(), smoothing)
            }
        };
        let part_masks = masks
            .iter()
            .map(|m| {
                m.as_ref()
                    .map(|m| m.narrow(0, global_rows, each))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let part_probes = probes
            .iter()
            .map(|p| p.narrow(0, global_rows, each))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let part_penalty = penalty.map(|p| AppliedPenalty {
            factor: p.factor,
            step_size: p.step_size,
            probes: &part_probes,
        });
        let g = train_gradients(
            model,
            &images.narrow(0, rows, each)?,
            &part_masks,
            &loss_fn,
            &runtime,
            phase,
            part_penalty,
        )?;
        outcome.loss += g.loss.to_dtype(DType::F64)?.to_scalar::<f64>()? / parts as f64;
        for (slot, (_, grad)) in summed.iter_mut().zip(g.grads) {
            *slot = match (slot.take(), grad) {
                (Some(acc), Some(grad)) => Some((acc + grad)?),
                (acc, grad) => acc.or(grad),
            };
        }
        logits.push(g.logits);
        outcome.forward_stats.extend(g.forward_stats);
        outcome.backward_stats.extend(g.backward_stats);
        outcome.jacobian_penalty.extend(g.jacobian_penalty);
    }
    outcome.logits = Tensor::cat(&logits, 0)?;
    // Every rank takes the same decision from the same number.
    outcome.loss = world.all_reduce_host(&[outcome.loss], Reduce::Sum)?[0] / world.size() as f64;
    let loss = outcome.loss;
    if !loss.is_finite() {
        bail!("step {step}: the loss is {loss}; stopping before it reaches the weights");
    }
    if parts > 1 {
        for g in summed.iter_mut().flatten() {
            *g = (&*g / parts as f64)?;
        }
    }
    outcome.all_reduce = average_gradients(world, &mut summed, BUCKET_BYTES)?;
    outcome.lr = match cfg.train.lr_schedule {
        LrSchedule::Cosine => cosine(cfg.train.lr, step, plan.total_steps),
        LrSchedule::Poly => poly(cfg.train.lr, step, plan.total_steps),
    };
    let lr = outcome.lr;
    opt.step(params, &summed, lr)?;
    if let Some(name) = model.store().first_non_finite()? {
        bail!(
            "step {step}: the update made {name} non-finite (NaN or ±inf) at learning rate {lr:e}; \
             stopping before any checkpoint holds it"
        );
    }
    Ok(outcome)
}

/// The seed of step `step`'s random draws (penalty, jitter), so a resumed run draws the same.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// The official Jacobian-loss schedule (reference §4.5): the pretraining weight while
/// pretraining, then JAC_LOSS_WEIGHT + 0.1 per JAC_INCREMENTAL steps until JAC_STOP_EPOCH,
/// applied on a random JAC_LOSS_FREQ fraction of steps.
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
    let draw_seed = step_seed(seed, step);
    let mut rng = rand::rngs::StdRng::seed_from_u64(draw_seed);
    let draw: f64 = rng.gen();
    (factor > 0.0 && draw < t.jac_loss_freq).then_some(JacobianPenalty {
        factor,
        probes: 2,
        step_size: t.jac_fd_step,
        seed: draw_seed.rotate_left(17),
    })
}

/// The forward limit of a step that computes the Jacobian loss: F_THRES + δ, δ uniform in
/// [−d, d − 1] for d = RAND_F_THRES_DELTA (numpy's `randint(−d, d)`, reference §4.3).
pub fn jittered_threshold(cfg: &ExperimentConfig, step: usize, seed: u64) -> usize {
    let (base, d) = (cfg.deq.f_thres, cfg.deq.rand_f_thres_delta);
    if d == 0 {
        return base;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(step_seed(seed, step).rotate_left(31));
    let delta = rng.gen_range(-(d as i64)..d as i64);
    // Validation keeps d below F_THRES, so the limit stays at least 1.
    (base as i64 + delta) as usize
}

/// Everything one training step's gradient computation produced.
pub struct TrainGradients {
    /// Gradient per parameter name (None: the parameter got none).
    pub grads: Vec<(String, Option<Tensor>)>,
    /// The loss value.
    pub loss: Tensor,
    /// Logits of the head in train mode on f(z*).
    pub logits: Tensor,
    /// Injection as computed in train mode.
    pub injection: Vec<Tensor>,
    /// z* per branch.
    pub zstar: Vec<Tensor>,
    /// Forward solver statistics (None in unrolled mode).
    pub forward_stats: Option<SolverStats>,
    /// Backward solver statistics (IFT only).
    pub backward_stats: Option<SolverStats>,
    /// The gradient fed through the one recorded application of f (y of y = yJ + gbar for IFT;
    /// None in unrolled mode).
    pub adjoint: Option<Tensor>,
    /// Tensors in the recorded graph of the training output (memory proxy: independent of the
    /// number of solver steps).
    pub graph_size: usize,
    /// ‖J‖²_F/(B·D) estimate when a Jacobian penalty was applied.
    pub jacobian_penalty: Option<f64>,
}

/// Which phase a training step is in (reference §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// NUM_LAYERS weight-tied applications with ordinary backprop.
    Unrolled(usize),
    /// Solver + the configured backward mode.
    Deq,
}

/// Jacobian regularisation of one training step (reference §4.5): `factor`·‖J‖²_F/(B·D) at the
/// equilibrium (or the last unrolled state) joins the loss, estimated with `probes` Gaussian
/// probes by finite-difference Jacobian-vector products of step `step_size`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JacobianPenalty {
    /// Weight of the penalty in the loss.
    pub factor: f64,
    /// Gaussian probes (the official code uses 2).
    pub probes: usize,
    /// Finite-difference step along each probe.
    pub step_size: f64,
    /// Seed of the probes.
    pub seed: u64,
}

/// A Jacobian penalty as one gradient computation applies it: the weight and finite-difference
/// step the schedule chose, and the Gaussian probes of the batch's rows.
#[derive(Debug, Clone, Copy)]
pub struct AppliedPenalty<'a> {
    /// Weight of the penalty in the loss.
    pub factor: f64,
    /// Finite-difference step along each probe.
    pub step_size: f64,
    /// One (B, D) probe per Hutchinson sample.
    pub probes: &'a [Tensor],
}

/// Computes the loss and every parameter gradient for one batch (BatchNorm in train mode), with
/// an optional Jacobian penalty whose gradient joins the parameters' (its value is in
/// [`TrainGradients::jacobian_penalty`]).
pub fn train_gradients(
    model: &Mdeq,
    image: &Tensor,
    masks: &[Option<Tensor>],
    loss_fn: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    rt: &DeqRuntime,
    phase: Phase,
    penalty: Option<AppliedPenalty>,
) -> candle_core::Result<TrainGradients> {
    let (_, _, h, w) = image.dims4()?;
    let layout = model.layout(h, w);
    let injection = model.injection(image, true)?;
    let cell = model.cell().prepared(false)?;
    let store = model.store();
    let collect = |g: &candle_core::backprop::GradStore,
                   into: &mut Vec<(String, Option<Tensor>)>|
     -> candle_core::Result<()> {
        for (e, slot) in store.parameters().zip(into.iter_mut()) {
            if let Some(gr) = g.get(e.var.as_tensor()) {
                slot.1 = Some(match slot.1.take() {
                    None => gr.clone(),
                    Some(acc) => (acc + gr)?,
                });
            }
        }
        Ok(())
    };
    let mut grads: Vec<(String, Option<Tensor>)> =
        store.parameters().map(|e| (e.name.clone(), None)).collect();
    // The penalty at a detached state z, through f with live parameters and injection.
    let mut jacobian_penalty = None;
    let mut add_penalty =
        |z: &Tensor, grads: &mut Vec<(String, Option<Tensor>)>| -> candle_core::Result<()> {
            let Some(p) = penalty.filter(|p| p.factor > 0.0) else {
                return Ok(());
            };
            let mut f = CellMap {
                cell: &cell,
                injection: &injection,
                masks,
                layout: &layout,
            };
            let jac = frobenius_sq_finite_difference(&mut f, z, p.probes, p.step_size)?;
            jacobian_penalty = Some(jac.to_dtype(DType::F64)?.to_scalar::<f64>()?);
            collect(&(jac * p.factor)?.backward()?, grads)
        };

    if let Phase::Unrolled(layers) = phase {
        let z = unroll(&cell, &injection, masks, &layout, image.dim(0)?, layers)?;
        let logits = model.head(&z, true)?;
        let loss = loss_fn(&logits)?;
        let g = loss.backward()?;
        collect(&g, &mut grads)?;
        add_penalty(&layout.flatten(&z)?.detach(), &mut grads)?;
        return Ok(TrainGradients {
            jacobian_penalty,
            grads,
            loss,
            logits,
            injection,
            zstar: z,
            forward_stats: None,
            backward_stats: None,
            adjoint: None,
            graph_size: g.get_ids().count(),
        });
    }

    let detached = model.cell().prepared(true)?;
    let (zstar, fstats) = solve_equilibrium(&detached, &injection, masks, &layout, rt, None)?;

    // out = f(z*) with the graph to the parameters and the injection; z* is a leaf.
    let z_leaf = Var::from_tensor(&zstar)?;
    let out = layout.flatten(&cell.forward(
        &layout.unflatten(z_leaf.as_tensor())?,
        &injection,
        masks,
    )?)?;

    // Head and loss on a detached copy of out give gbar = dL/d(out) and the head's gradients.
    let out_leaf = Var::from_tensor(&out.detach())?;
    let logits = model.head(&layout.unflatten(out_leaf.as_tensor())?, true)?;
    let loss = loss_fn(&logits)?;
    let head_grads = loss.backward()?;
    collect(&head_grads, &mut grads)?;
    let gbar = head_grads
        .get(out_leaf.as_tensor())
        .cloned()
        .unwrap_or(out.zeros_like()?);

    // y = y J + gbar with VJPs through ONE recording of f at z* with detached parameters, so the
    // solve computes no parameter gradients.
    let mut recorded = CellVjp::record(
        &CellMap {
            cell: &detached,
            injection: &injection,
            masks,
            layout: &layout,
        },
        &zstar,
    )?;
    let mut vjp = |y: &Tensor| recorded.vjp(y);
    let (y, bsol) = adjoint(&rt.mode, &mut vjp, &gbar, &rt.backward_solver, &rt.backward)?;

    let cell_grads = (&out * y.detach())?.sum_all()?.backward()?;
    collect(&cell_grads, &mut grads)?;
    add_penalty(&zstar, &mut grads)?;
    Ok(TrainGradients {
        jacobian_penalty,
        grads,
        loss,
        logits,
        injection,
        zstar: layout.unflatten(&zstar)?,
        forward_stats: Some(fstats),
        backward_stats: bsol.map(|s| s.stats),
        adjoint: Some(y),
        graph_size: cell_grads.get_ids().count(),
    })
}
