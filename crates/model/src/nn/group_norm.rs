//! GroupNorm with optional affine parameters (candle_nn's is always affine, which would add keys
//! the official non-affine layers do not have).

use super::maybe_detach;
use crate::params::{Init, ParamBuilder};
use candle_core::{Result, Tensor, D};

/// GroupNorm over (C/G, H, W) per sample, biased variance, eps 1e-5.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    groups: usize,
    affine: Option<(Tensor, Tensor)>,
    eps: f64,
}

impl GroupNorm {
    /// Registers `weight`/`bias` (ones/zeros) only when `affine`.
    pub fn new(
        pb: &mut ParamBuilder,
        groups: usize,
        channels: usize,
        affine: bool,
    ) -> Result<Self> {
        let affine = if affine {
            Some((
                pb.param("weight", channels, Init::Const(1.0))?,
                pb.param("bias", channels, Init::Const(0.0))?,
            ))
        } else {
            None
        };
        Ok(Self {
            groups,
            affine,
            eps: 1e-5,
        })
    }

    /// A GroupNorm from explicit tensors (tests).
    pub fn from_tensors(groups: usize, affine: Option<(Tensor, Tensor)>) -> Self {
        Self {
            groups,
            affine,
            eps: 1e-5,
        }
    }

    /// Normalises `x` of shape (B, C, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let g = x.reshape((b, self.groups, (c / self.groups) * h * w))?;
        let centered = g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .reshape((b, c, h, w))?;
        match &self.affine {
            None => Ok(normed),
            Some((gamma, beta)) => normed
                .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
                .broadcast_add(&beta.reshape((1, c, 1, 1))?),
        }
    }

    /// The same layer, optionally cut from the autodiff graph.
    pub fn prepared(&self, detach: bool) -> Self {
        Self {
            groups: self.groups,
            affine: self
                .affine
                .as_ref()
                .map(|(g, b)| (maybe_detach(g, detach), maybe_detach(b, detach))),
            eps: self.eps,
        }
    }
}
