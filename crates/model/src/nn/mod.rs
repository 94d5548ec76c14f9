//! Layers MDEQ is built from, each written for what candle 0.11 gets wrong or lacks.

pub mod batch_norm;
pub mod conv;
pub mod dropout;
pub mod group_norm;
pub mod upsample;
pub mod weight_norm;

pub use batch_norm::{BatchNorm2d, BatchNormGroup};
pub use conv::Conv2d;
pub use dropout::variational_dropout_mask;
pub use group_norm::GroupNorm;
pub use upsample::{bilinear_resize, nearest_upsample, nearest_upsample_grad};
pub use weight_norm::CellConv;

use crate::params::{Init, ParamBuilder};
use candle_core::{Result, Tensor};

/// A norm layer's per-channel `weight` (ones) and `bias` (zeros), registered only when `affine`.
pub(crate) fn affine_parameters(
    pb: &mut ParamBuilder,
    channels: usize,
    affine: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    if !affine {
        return Ok(None);
    }
    Ok(Some((
        pb.param("weight", channels, Init::Const(1.0))?,
        pb.param("bias", channels, Init::Const(0.0))?,
    )))
}

/// Optionally detaches a tensor from the autodiff graph.
pub(crate) fn maybe_detach(t: &Tensor, detach: bool) -> Tensor {
    if detach {
        t.detach()
    } else {
        t.clone()
    }
}

/// ReLU with PyTorch's derivative at 0 (zero). candle's `relu` back-propagates 1 at exactly 0,
/// which changes gradients wherever a ReLU sees exact zeros (e.g. a train-mode BatchNorm channel
/// whose batch values are all equal).
pub trait Relu0 {
    /// max(x, 0) with d/dx = 1 for x > 0 and 0 otherwise.
    fn relu0(&self) -> candle_core::Result<Tensor>;
}

impl Relu0 for Tensor {
    fn relu0(&self) -> candle_core::Result<Tensor> {
        mdeq_kernels::relu(self)
    }
}
