//! Fast CPU kernels for the shapes MDEQ uses, as candle custom ops with their own backward.
//!
//! candle 0.11's CPU convolution reaches about a quarter of what two cores can do, and its input
//! gradient (a direct transposed convolution) is 3–4× slower again; the implicit backward runs
//! that input gradient once per solver step. [`conv2d()`] runs forward, input gradient and weight
//! gradient as im2col + gemm, multi-threaded over the batch. [`group_norm()`] and
//! [`batch_norm::batch_norm_train`] are one fused pass each way with float64 statistics; the
//! `*_input_grad` / [`relu_grad`] entry points serve hand-written VJPs; [`low_rank_apply`] and
//! [`row_sq_norms`] are the solvers' vector algebra. Hot loops are compiled for the CPU's best
//! SIMD level at run time (`multiversion`). On other devices and dtypes, and everywhere under
//! [`KernelChoice::Portable`], each entry point defers to candle's stock ops: the GPU code path.

mod choice;
mod element;
mod gemm_ops;
mod im2col;
mod parallel;
mod reduce;

pub mod batch_norm;
pub mod broyden;
pub mod conv2d;
pub mod group_norm;
pub mod low_rank;
pub mod mixing;
mod norm_common;
pub mod relu;
pub mod row_norms;
pub mod upsample;

pub use broyden::{BroydenHistory, BroydenStep};
pub use choice::{active_kernels, with_kernels, KernelChoice, KERNELS_ENV};
pub use conv2d::{conv2d, conv2d_input_grad, conv2d_input_grad_plus};
pub use element::fast_path;
pub use group_norm::{
    group_norm, group_norm_input_grad, group_norm_input_grad_with_relus, group_norm_relu,
    AdjacentRelus,
};
pub use low_rank::{low_rank_apply, low_rank_apply_many};
pub use mixing::{mix_rows, row_dots};
pub use relu::{relu, relu_grad};
pub use row_norms::{residual_with_norms, row_sq_norms};
pub use upsample::{nearest_upsample, nearest_upsample_grad};
