//! Resizing with correct gradients in every graph.
//!
//! candle 0.11's `upsample_nearest2d` backward overwrites the gradient already accumulated for
//! its input, and `upsample_bilinear2d` has no backward at all. Here nearest upsampling is the
//! kernel crate's one-pass op (whose backward is a block sum), and bilinear resizing is two
//! matmuls with interpolation matrices (whose backward is the transposed matmuls).

use candle_core::{DType, Device, Result, Tensor};
pub use mdeq_kernels::{nearest_upsample, nearest_upsample_grad};

/// The (out, in) matrix of 1-D linear interpolation weights, PyTorch's convention.
pub fn interpolation_matrix(n_in: usize, n_out: usize, align_corners: bool) -> Vec<f64> {
    let mut m = vec![0.0; n_out * n_in];
    for i in 0..n_out {
        let src = if align_corners {
            if n_out > 1 {
                i as f64 * (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
            } else {
                0.0
            }
        } else {
            ((i as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0)
        };
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let lambda = src - i0 as f64;
        m[i * n_in + i0] += 1.0 - lambda;
        m[i * n_in + i1] += lambda;
    }
    m
}

fn matrix(
    n_in: usize,
    n_out: usize,
    align_corners: bool,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_vec(
        interpolation_matrix(n_in, n_out, align_corners),
        (n_out, n_in),
        device,
    )?
    .to_dtype(dtype)
}

/// Bilinear resize of (B, C, H, W) to (B, C, out_h, out_w).
pub fn bilinear_resize(
    x: &Tensor,
    out_h: usize,
    out_w: usize,
    align_corners: bool,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let ah = matrix(h, out_h, align_corners, x.dtype(), x.device())?;
    let aw_t = matrix(w, out_w, align_corners, x.dtype(), x.device())?
        .t()?
        .contiguous()?;
    // Rows: (B·C·H, W) · (W, out_w); then columns: (out_h, H) · (B·C, H, out_w).
    let rows = x
        .reshape((b * c * h, w))?
        .matmul(&aw_t)?
        .reshape((b * c, h, out_w))?;
    let ah = ah
        .unsqueeze(0)?
        .broadcast_as((b * c, out_h, h))?
        .contiguous()?;
    ah.matmul(&rows)?.reshape((b, c, out_h, out_w))
}
