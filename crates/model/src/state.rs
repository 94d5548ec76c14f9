//! The flattened multiscale state: branches concatenated, each (C, H, W) row-major per sample
//! (reference §3.1), so the image-agnostic solvers see one (B, D) tensor.

use candle_core::{Result, Tensor};

/// Shapes (C_i, H_i, W_i) of every branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    /// Per-branch (channels, height, width).
    pub branches: Vec<(usize, usize, usize)>,
}

impl StateLayout {
    /// Elements per sample, D.
    pub fn size(&self) -> usize {
        self.branches.iter().map(|(c, h, w)| c * h * w).sum()
    }

    /// (B, D) from per-branch (B, C_i, H_i, W_i).
    pub fn flatten(&self, z: &[Tensor]) -> Result<Tensor> {
        let parts = z
            .iter()
            .map(|t| t.flatten_from(1))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }

    /// Per-branch tensors from (B, D).
    pub fn unflatten(&self, z: &Tensor) -> Result<Vec<Tensor>> {
        let b = z.dim(0)?;
        let mut offset = 0;
        let mut out = Vec::with_capacity(self.branches.len());
        for &(c, h, w) in &self.branches {
            let n = c * h * w;
            out.push(z.narrow(1, offset, n)?.reshape((b, c, h, w))?);
            offset += n;
        }
        Ok(out)
    }
}
