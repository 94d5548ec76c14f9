//! The MDEQ forward through the DEQ engine (reference §4): solve for z* without a graph (DEQ
//! mode) or apply the cell a fixed number of times (pretraining). The training step built on
//! these is `mdeq_train::step`.

use crate::cell::solver_map::{CellMap, CellVjp};
use crate::cell::MultiscaleCell;
use crate::mdeq::Mdeq;
use crate::state::StateLayout;
use candle_core::{Result, Tensor};
use mdeq_deq::jacobian::{gaussian_probes, spectral_radius};
use mdeq_deq::solver::solve_with_fallback;
use mdeq_deq::{BackwardMode, SolverKind, SolverOptions, SolverStats};

/// The solver settings a forward and backward run with (built from a recipe's `[deq]` section).
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

/// What every evaluation-mode use of the cell on `image` starts from: the injection, the state
/// layout, the detached eval-mode cell and no dropout masks.
struct EvalCell {
    injection: Vec<Tensor>,
    layout: StateLayout,
    cell: MultiscaleCell,
    masks: Vec<Option<Tensor>>,
}

impl EvalCell {
    fn new(model: &Mdeq, image: &Tensor) -> Result<Self> {
        let (_, _, h, w) = image.dims4()?;
        let layout = model.layout(h, w);
        Ok(Self {
            injection: model.injection(image, false)?,
            masks: vec![None; layout.branches.len()],
            cell: model.cell().prepared(true)?,
            layout,
        })
    }
}

/// Evaluation forward: head(z*) with the head in eval mode.
pub fn eval_forward(
    model: &Mdeq,
    image: &Tensor,
    rt: &DeqRuntime,
) -> Result<(Tensor, Vec<Tensor>, SolverStats)> {
    let e = EvalCell::new(model, image)?;
    let (z, stats) = solve_equilibrium(&e.cell, &e.injection, &e.masks, &e.layout, rt, None)?;
    let z = e.layout.unflatten(&z)?;
    Ok((model.head(&z, false)?, z, stats))
}

/// The spectral radius of J = ∂f/∂z at each sample's equilibrium `z` (per branch, as
/// [`eval_forward`] returns it) of `image`: `iterations` steps of power iteration with VJPs
/// through one taped evaluation of the eval-mode cell, from a Gaussian start seeded by `seed`.
/// Below 1, f is locally contractive at z*: the fixed point is attracting, and the implicit
/// backward's linear system is well posed (reference §4.5).
pub fn spectral_radius_at(
    model: &Mdeq,
    image: &Tensor,
    z: &[Tensor],
    iterations: usize,
    seed: u64,
) -> Result<Vec<f64>> {
    use rand::SeedableRng;
    let e = EvalCell::new(model, image)?;
    let b = image.dim(0)?;
    let map = CellMap {
        cell: &e.cell,
        injection: &e.injection,
        masks: &e.masks,
        layout: &e.layout,
    };
    let mut recorded = CellVjp::record(&map, &e.layout.flatten(z)?)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start = gaussian_probes(&mut rng, 1, (b, e.layout.size()), image.device())?.remove(0);
    let start = start.to_dtype(image.dtype())?;
    spectral_radius(&mut |v: &Tensor| recorded.vjp(v), &start, iterations)
}

/// Pretraining-phase evaluation: `layers` weight-tied applications of f from zero, head in eval
/// mode (reference §4.2; the official code validates this way while pretraining).
pub fn unrolled_forward(model: &Mdeq, image: &Tensor, layers: usize) -> Result<Tensor> {
    let e = EvalCell::new(model, image)?;
    let z = unroll(
        &e.cell,
        &e.injection,
        &e.masks,
        &e.layout,
        image.dim(0)?,
        layers,
    )?;
    model.head(&z, false)
}

/// `layers` weight-tied applications of the cell from z = 0, per branch (the pretraining
/// forward, reference §4.2).
pub fn unroll(
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
