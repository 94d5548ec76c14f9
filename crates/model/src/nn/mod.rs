//! Layers MDEQ is built from, each written for what candle 0.11 gets wrong or lacks.

pub mod batch_norm;
pub mod conv;
pub mod dropout;
pub mod group_norm;
pub mod upsample;
pub mod weight_norm;

pub use batch_norm::BatchNorm2d;
pub use conv::Conv2d;
pub use dropout::variational_dropout_mask;
pub use group_norm::GroupNorm;
pub use upsample::{bilinear_resize, nearest_upsample};
pub use weight_norm::CellConv;

use candle_core::Tensor;

/// Optionally detaches a tensor from the autodiff graph.
pub(crate) fn maybe_detach(t: &Tensor, detach: bool) -> Tensor {
    if detach {
        t.detach()
    } else {
        t.clone()
    }
}
