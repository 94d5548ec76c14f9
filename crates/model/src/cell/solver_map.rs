//! The cell as the solvers' map z ↦ f(z; x) over the flat (B, D) state.
//!
//! Every operation of the cell acts on each sample separately (convolutions, GroupNorm, per-sample
//! dropout masks, the injection), so f can be evaluated on a subset of the batch: the solvers use
//! this to stop paying for samples that have converged.

use super::MultiscaleCell;
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
