//! GroupNorm with optional affine parameters (candle_nn's is always affine, which would add keys
//! the official non-affine layers do not have).

use super::{affine_parameters, maybe_detach};
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};
use mdeq_kernels::AdjacentRelus;

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
        let affine = affine_parameters(pb, channels, affine)?;
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

    /// Normalises `x` of shape (B, C, H, W) (fused kernel on the CPU).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        mdeq_kernels::group_norm(
            x,
            self.groups,
            self.affine.as_ref().map(|(g, b)| (g, b)),
            self.eps,
        )
    }

    /// ReLU(GroupNorm(x)) in one pass (ReLU's derivative at 0 is 0, as PyTorch's).
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        mdeq_kernels::group_norm_relu(
            x,
            self.groups,
            self.affine.as_ref().map(|(g, b)| (g, b)),
            self.eps,
        )
    }

    /// dL/dx at input `x` given dL/dy, with γ and β held fixed.
    pub fn input_grad(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        mdeq_kernels::group_norm_input_grad(
            x,
            self.groups,
            self.affine.as_ref().map(|(g, _)| g),
            self.eps,
            dy,
        )
    }

    /// dL/ds at s = the ReLU's input, for this layer applied to r = ReLU(s): [`Self::input_grad`]
    /// at `r` and the ReLU's mask in one pass.
    pub fn input_grad_after_relu(&self, r: &Tensor, dy: &Tensor) -> Result<Tensor> {
        self.input_grad_with_relus(
            r,
            dy,
            AdjacentRelus {
                before: true,
                after: None,
            },
        )
    }

    /// dL/dx for [`Self::forward_relu`] at input `x`, given dL/dr at its output `r`: the ReLU's
    /// mask and [`Self::input_grad`] in one pass.
    pub fn input_grad_relu(&self, x: &Tensor, r: &Tensor, dr: &Tensor) -> Result<Tensor> {
        let relus = AdjacentRelus {
            before: false,
            after: Some(r),
        };
        self.input_grad_with_relus(x, dr, relus)
    }

    fn input_grad_with_relus(
        &self,
        x: &Tensor,
        dy: &Tensor,
        relus: AdjacentRelus,
    ) -> Result<Tensor> {
        mdeq_kernels::group_norm_input_grad_with_relus(
            x,
            self.groups,
            self.affine.as_ref().map(|(g, _)| g),
            self.eps,
            dy,
            relus,
        )
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
