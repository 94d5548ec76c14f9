//! The MDEQ forward and backward through the DEQ engine (spec §4): solve for z* without a graph,
//! then (training) one differentiable application out = f(z*) and the implicit backward.

use crate::cell::solver_map::{CellMap, CellVjp};
use crate::cell::MultiscaleCell;
use crate::config::DeqConfig;
use crate::mdeq::Mdeq;
use crate::state::StateLayout;
use candle_core::{DType, Result, Tensor, Var};
use mdeq_deq::jacobian::frobenius_sq_finite_difference;
use mdeq_deq::solver::solve_with_fallback;
use mdeq_deq::{adjoint, BackwardMode, SolverKind, SolverOptions, SolverStats};
use rand::SeedableRng;

/// Solver settings resolved from a [`DeqConfig`].
#[derive(Debug, Clone)]
pub struct DeqRuntime {
    /// Forward solver followed by its fallbacks.
    pub forward_chain: Vec<SolverKind>,
    /// Backward solver.
    pub backward_solver: SolverKind,
    /// Forward options.
    pub forward: SolverOptions,
    /// Backward options.
    pub backward: SolverOptions,
    /// Backward mode.
    pub mode: BackwardMode,
}

fn kind(name: &str, max_pairs: Option<usize>) -> Result<SolverKind> {
    match SolverKind::from_name(name) {
        Some(SolverKind::Broyden { .. }) => Ok(SolverKind::Broyden {
            max_pairs,
            max_history_bytes: None,
        }),
        Some(k) => Ok(k),
        None => Err(candle_core::Error::Msg(format!("unknown solver '{name}'"))),
    }
}

impl DeqRuntime {
    /// Resolves the config's solver names and thresholds.
    pub fn from_config(c: &DeqConfig) -> Result<Self> {
        let mut forward_chain = vec![kind(&c.f_solver, c.max_history_pairs)?];
        for f in &c.fallback {
            forward_chain.push(kind(f, c.max_history_pairs)?);
        }
        Ok(Self {
            forward_chain,
            backward_solver: kind(&c.b_solver, c.max_history_pairs)?,
            forward: SolverOptions {
                threshold: c.f_thres,
                eps: c.eps,
                stop_mode: c.stop_mode,
                coupling: c.coupling,
                compact_batch: c.compact_batch,
            },
            backward: SolverOptions {
                threshold: c.b_thres,
                eps: c.eps,
                stop_mode: c.stop_mode,
                coupling: c.coupling,
                compact_batch: c.compact_batch,
            },
            mode: c.backward.clone(),
        })
    }
}

/// Solves z* = f(z*; x) from zeros (or `z0`) with a detached cell; returns the flat (B, D) z*.
pub fn solve_equilibrium(
    cell: &MultiscaleCell,
    injection: &[Tensor],
    masks: &[Option<Tensor>],
    layout: &StateLayout,
    rt: &DeqRuntime,
    z0: Option<&Tensor>,
) -> Result<(Tensor, SolverStats)> {
    let inj: Vec<Tensor> = injection.iter().map(Tensor::detach).collect();
    let b = inj[0].dim(0)?;
    let start = match z0 {
        Some(z) => z.detach(),
        None => Tensor::zeros((b, layout.size()), inj[0].dtype(), inj[0].device())?,
    };
    let mut map = CellMap {
        cell,
        injection: &inj,
        masks,
        layout,
    };
    let sol = solve_with_fallback(&rt.forward_chain, &mut map, &start, &rt.forward)?;
    Ok((sol.z, sol.stats))
}

/// Evaluation forward: head(z*) with the head in eval mode.
pub fn eval_forward(
    model: &Mdeq,
    image: &Tensor,
    rt: &DeqRuntime,
) -> Result<(Tensor, Vec<Tensor>, SolverStats)> {
    let injection = model.injection(image, false)?;
    let (_, _, h, w) = image.dims4()?;
    let layout = model.layout(h, w);
    let cell = model.cell().prepared(true)?;
    let masks = vec![None; layout.branches.len()];
    let (z, stats) = solve_equilibrium(&cell, &injection, &masks, &layout, rt, None)?;
    let z = layout.unflatten(&z)?;
    Ok((model.head(&z, false)?, z, stats))
}

/// Pretraining-phase evaluation: `layers` weight-tied applications of f from zero, head in eval
/// mode (spec §4.2; the official code validates this way while pretraining).
pub fn unrolled_forward(model: &Mdeq, image: &Tensor, layers: usize) -> Result<Tensor> {
    let injection = model.injection(image, false)?;
    let (_, _, h, w) = image.dims4()?;
    let layout = model.layout(h, w);
    let cell = model.cell().prepared(true)?;
    let masks = vec![None; layout.branches.len()];
    let z = unroll(&cell, &injection, &masks, &layout, image.dim(0)?, layers)?;
    model.head(&z, false)
}

/// `layers` weight-tied applications of the cell from z = 0, per branch.
fn unroll(
    cell: &MultiscaleCell,
    injection: &[Tensor],
    masks: &[Option<Tensor>],
    layout: &StateLayout,
    batch: usize,
    layers: usize,
) -> Result<Vec<Tensor>> {
    let zeros = Tensor::zeros(
        (batch, layout.size()),
        injection[0].dtype(),
        injection[0].device(),
    )?;
    let mut z = layout.unflatten(&zeros)?;
    for _ in 0..layers {
        z = cell.forward(&z, injection, masks)?;
    }
    Ok(z)
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

/// Which phase a training step is in (spec §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// NUM_LAYERS weight-tied applications with ordinary backprop.
    Unrolled(usize),
    /// Solver + the configured backward mode.
    Deq,
}

/// Jacobian regularisation of one training step (spec §4.5): `factor`·‖J‖²_F/(B·D) at the
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

/// Computes the loss and every parameter gradient for one batch (BatchNorm in train mode), with
/// an optional Jacobian penalty whose gradient joins the parameters' (its value is in
/// [`TrainGradients::jacobian_penalty`]).
pub fn train_gradients(
    model: &Mdeq,
    image: &Tensor,
    masks: &[Option<Tensor>],
    loss_fn: &dyn Fn(&Tensor) -> Result<Tensor>,
    rt: &DeqRuntime,
    phase: Phase,
    penalty: Option<JacobianPenalty>,
) -> Result<TrainGradients> {
    let (_, _, h, w) = image.dims4()?;
    let layout = model.layout(h, w);
    let injection = model.injection(image, true)?;
    let cell = model.cell().prepared(false)?;
    let store = model.store();
    let collect = |g: &candle_core::backprop::GradStore,
                   into: &mut Vec<(String, Option<Tensor>)>|
     -> Result<()> {
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
    let mut add_penalty = |z: &Tensor, grads: &mut Vec<(String, Option<Tensor>)>| -> Result<()> {
        let Some(p) = penalty.filter(|p| p.factor > 0.0) else {
            return Ok(());
        };
        let mut f = CellMap {
            cell: &cell,
            injection: &injection,
            masks,
            layout: &layout,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
        let jac = frobenius_sq_finite_difference(&mut f, z, p.probes, p.step_size, &mut rng)?;
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
