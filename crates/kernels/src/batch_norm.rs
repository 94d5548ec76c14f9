//! Train-mode BatchNorm (statistics of the batch, per channel over (B, H, W)) as one fused pass
//! forward and one backward, with float64 accumulation, like [`crate::group_norm()`].
//!
//! Composed from candle ops (in float64, to match PyTorch's float32 statistics) it cost a float64
//! copy of the input and a dozen strided reductions each way; in the stem and head it took a
//! quarter of a training step.

use crate::element::{fast_path, with_cpu_slices, Element};
use crate::norm_common::{grad_sums, Forward, FusedNorm};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use crate::reduce::sum_by;
use candle_core::{DType, Layout, Result, Tensor};
use multiversion::multiversion;

/// (x − mean_c) / sqrt(var_c + eps) [· γ_c + β_c] with the biased mean and variance of each
/// channel over (B, H, W); differentiable in x, γ and β. CPU f32/f64 only (see
/// [`crate::fast_path`]).
pub fn batch_norm_train(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    if !fast_path(x) {
        candle_core::bail!("batch_norm_train: CPU f32/f64 only, got {:?}", x.dtype());
    }
    let c = x.dim(1)?;
    let op = Forward(BatchNormOp { eps });
    let x = x.contiguous()?;
    match affine {
        None => x.apply_op1(op),
        Some((g, b)) => {
            if g.elem_count() != c || b.elem_count() != c {
                candle_core::bail!("batch_norm_train: affine parameters must have {c} entries");
            }
            x.apply_op3(
                &g.to_dtype(x.dtype())?.contiguous()?,
                &b.to_dtype(x.dtype())?.contiguous()?,
                op,
            )
        }
    }
}

/// Per-channel mean and biased variance over (B, H, W), accumulated in float64 (for the running
/// statistics). CPU f32/f64 only.
pub fn channel_moments(x: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let (b, c, h, w) = x.dims4()?;
    if !fast_path(x) {
        candle_core::bail!("channel_moments: CPU f32/f64 only, got {:?}", x.dtype());
    }
    let x = x.contiguous()?;
    let dims = (b, c, h * w);
    match x.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&[&x], |s| all_moments(s[0], dims)),
        _ => with_cpu_slices::<f64, _>(&[&x], |s| all_moments(s[0], dims)),
    }
}

/// (means, variances) of every channel.
fn all_moments<T: Element>(x: &[T], (b, c, hw): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![(0f64, 0f64); c];
    let ptr = Shared(out.as_mut_ptr());
    for_each_chunk(c, |range| {
        for ch in range {
            // SAFETY: channel ch owns out[ch].
            unsafe { ptr.slice(ch, 1)[0] = moments(x, b, c, hw, ch) };
        }
    });
    out.into_iter().unzip()
}

/// The `hw`-long slices of channel `ch`, one per sample.
fn channel<T>(x: &[T], b: usize, c: usize, hw: usize, ch: usize) -> impl Iterator<Item = &[T]> {
    (0..b).map(move |s| &x[(s * c + ch) * hw..(s * c + ch + 1) * hw])
}

/// (mean, biased variance) of channel `ch` over the batch.
#[multiversion(targets = "simd")]
fn moments<T: Element>(x: &[T], b: usize, c: usize, hw: usize, ch: usize) -> (f64, f64) {
    let n = (b * hw) as f64;
    let mean = channel(x, b, c, hw, ch)
        .map(|s| sum_by(s, |v| v))
        .sum::<f64>()
        / n;
    let var = channel(x, b, c, hw, ch)
        .map(|s| sum_by(s, |v| (v - mean) * (v - mean)))
        .sum::<f64>()
        / n;
    (mean, var)
}

/// (mean, 1/sqrt(var + eps)) of channel `ch` over the batch.
fn channel_stats<T: Element>(
    x: &[T],
    b: usize,
    c: usize,
    hw: usize,
    ch: usize,
    eps: f64,
) -> (f64, f64) {
    let (mean, var) = moments(x, b, c, hw, ch);
    (mean, 1.0 / (var + eps).sqrt())
}

#[derive(Clone, Copy)]
struct BatchNormOp {
    eps: f64,
}

/// (B, C, H·W) of a 4-D layout (checked when the op was applied).
fn dims(l: &Layout) -> (usize, usize, usize) {
    let d = l.dims();
    (d[0], d[1], d[2] * d[3])
}

impl FusedNorm for BatchNormOp {
    const NAME: &'static str = "mdeq-batch-norm";

    fn forward<T: Element>(&self, x: &[T], affine: Option<(&[T], &[T])>, l: &Layout) -> Vec<T> {
        let (b, c, hw) = dims(l);
        let mut y = uninit_vec::<T>(x.len()); // every channel writes all of its elements
        let out = Shared(y.as_mut_ptr());
        for_each_chunk(c, |range| {
            for ch in range {
                let (mean, rstd) = channel_stats(x, b, c, hw, ch, self.eps);
                let (scale, shift) = match affine {
                    Some((g, bt)) => {
                        let g = g[ch].to_f64();
                        (g * rstd, bt[ch].to_f64() - mean * rstd * g)
                    }
                    None => (rstd, -mean * rstd),
                };
                for s in 0..b {
                    let off = (s * c + ch) * hw;
                    // SAFETY: channel ch owns the hw elements of every sample at offset off.
                    let ys = unsafe { out.slice(off, hw) };
                    scale_shift(&x[off..off + hw], ys, scale, shift);
                }
            }
        });
        y
    }

    fn backward<T: Element>(&self, x: &[T], gamma: Option<&[T]>, dy: &[T], l: &Layout) -> Vec<T> {
        let (b, c, hw) = dims(l);
        let n = x.len();
        let mut out = uninit_vec::<T>(n + 2 * c); // dx by the channels, the tail below
        let mut sums = vec![0f64; 2 * c];
        let (dx_ptr, sum_ptr) = (Shared(out.as_mut_ptr()), Shared(sums.as_mut_ptr()));
        for_each_chunk(c, |range| {
            for ch in range {
                let (mean, rstd) = channel_stats(x, b, c, hw, ch, self.eps);
                let (sdy, sdyx) = channel_grad_sums(x, dy, (b, c, hw), ch, mean, rstd);
                // SAFETY: channel ch owns sums[2ch..2ch+2] and its elements of dx.
                let s = unsafe { sum_ptr.slice(2 * ch, 2) };
                (s[0], s[1]) = (sdyx, sdy);
                let count = (b * hw) as f64;
                let g = gamma.map_or(1.0, |g| g[ch].to_f64());
                // dx = γ·rstd·(dy − Σdy/n − x̂·Σdy·x̂/n) = dy·a + x·k + e.
                let a = g * rstd;
                let k = -g * rstd * rstd * sdyx / count;
                let e = g * rstd * (mean * rstd * sdyx / count - sdy / count);
                for s in 0..b {
                    let off = (s * c + ch) * hw;
                    let dxs = unsafe { dx_ptr.slice(off, hw) };
                    affine3(&dy[off..off + hw], &x[off..off + hw], dxs, a, k, e);
                }
            }
        });
        for ch in 0..c {
            out[n + ch] = T::from_f64(sums[2 * ch]);
            out[n + c + ch] = T::from_f64(sums[2 * ch + 1]);
        }
        out
    }
}

/// (Σ dy, Σ dy·x̂) over channel `ch` of every sample.
#[multiversion(targets = "simd")]
fn channel_grad_sums<T: Element>(
    x: &[T],
    dy: &[T],
    (b, c, hw): (usize, usize, usize),
    ch: usize,
    mean: f64,
    rstd: f64,
) -> (f64, f64) {
    channel(x, b, c, hw, ch)
        .zip(channel(dy, b, c, hw, ch))
        .map(|(xs, ds)| grad_sums(ds, xs, mean, rstd))
        .fold((0.0, 0.0), |(a, b), (p, q)| (a + p, b + q))
}

/// y = x·scale + shift.
#[multiversion(targets = "simd")]
fn scale_shift<T: Element>(x: &[T], y: &mut [T], scale: f64, shift: f64) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = T::from_f64(v.to_f64() * scale + shift);
    }
}

/// out = dy·a + x·k + e.
#[multiversion(targets = "simd")]
fn affine3<T: Element>(dy: &[T], x: &[T], out: &mut [T], a: f64, k: f64, e: f64) {
    for ((o, d), v) in out.iter_mut().zip(dy).zip(x) {
        *o = T::from_f64(d.to_f64() * a + v.to_f64() * k + e);
    }
}
