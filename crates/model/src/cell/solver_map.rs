//! The cell as the solvers see it: the map z ↦ f(z; x) over the flat (B, D) state, and its
//! vector–Jacobian product at a recorded point for the implicit backward.
//!
//! Every operation of the cell acts on each sample separately (convolutions, GroupNorm, per-sample
//! dropout masks, the injection), so f can be evaluated on a subset of the batch: the solvers use
//! this to stop paying for samples that have converged.

use super::{CellTape, MultiscaleCell};
use crate::state::StateLayout;
use candle_core::{Result, Tensor};
use mdeq_deq::FixedPointMap;

/// f(·; x) for one batch: the cell with its injection and dropout masks.
pub struct CellMap<'a> {
    /// The (prepared) cell.
    pub cell: &'a MultiscaleCell,
    /// Injection per branch, (B, C_i, H_i, W_i).
    pub injection: &'a [Tensor],
    /// Variational dropout mask per branch, (B, C_i, 1, 1), or None.
    pub masks: &'a [Option<Tensor>],
    /// Shapes of the branches in the flat state.
    pub layout: &'a StateLayout,
}

impl CellMap<'_> {
    fn forward(
        &self,
        z: &Tensor,
        injection: &[Tensor],
        masks: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let z = self.layout.unflatten(z)?;
        self.layout
            .flatten(&self.cell.forward(&z, injection, masks)?)
    }
}

impl FixedPointMap for CellMap<'_> {
    fn apply(&mut self, z: &Tensor) -> Result<Tensor> {
        self.forward(z, self.injection, self.masks)
    }

    fn apply_rows(&mut self, z_rows: &Tensor, rows: &Tensor) -> Result<Option<Tensor>> {
        let injection = self
            .injection
            .iter()
            .map(|x| x.index_select(rows, 0))
            .collect::<Result<Vec<_>>>()?;
        let masks = self
            .masks
            .iter()
            .map(|m| m.as_ref().map(|m| m.index_select(rows, 0)).transpose())
            .collect::<Result<Vec<_>>>()?;
        self.forward(z_rows, &injection, &masks).map(Some)
    }
}

/// y ↦ y·∂f/∂z at one point z*, recorded once: every product of the backward solve reads the
/// same tape (weights, injection and dropout masks held fixed, so no parameter gradient is
/// computed inside the solve).
pub struct CellVjp<'a> {
    cell: &'a MultiscaleCell,
    layout: &'a StateLayout,
    tape: CellTape,
    /// Products taken so far.
    pub calls: usize,
}

impl<'a> CellVjp<'a> {
    /// Records f at the flat state `z` (the cell should be prepared with detached weights).
    pub fn record(map: &CellMap<'a>, z: &Tensor) -> Result<Self> {
        let z = map.layout.unflatten(&z.detach())?;
        let injection: Vec<Tensor> = map.injection.iter().map(Tensor::detach).collect();
        let (_, tape) = map.cell.forward_taped(&z, &injection, map.masks)?;
        Ok(Self {
            cell: map.cell,
            layout: map.layout,
            tape,
            calls: 0,
        })
    }

    /// y·J for a flat (B, D) `y`.
    pub fn vjp(&mut self, y: &Tensor) -> Result<Tensor> {
        self.calls += 1;
        let d_out = self.layout.unflatten(&y.contiguous()?)?;
        self.layout.flatten(&self.cell.vjp(&self.tape, &d_out)?)
    }
}
