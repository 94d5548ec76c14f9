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
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use std::sync::Arc;

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
    apply_normalisation(&x.contiguous()?, affine, Forward(BatchNormOp { eps }))
}

/// `op` on contiguous x alone, or on x with (γ, β) of one entry per channel in x's float type.
fn apply_normalisation<O>(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, op: O) -> Result<Tensor>
where
    O: candle_core::CustomOp1 + candle_core::CustomOp3 + Send + Sync + 'static,
{
    let c = x.dim(1)?;
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
                let stats = channel_stats(x, b, c, hw, ch, self.eps);
                // SAFETY: channel ch owns its elements of y.
                unsafe { normalise_channel(x, &out, (b, c, hw), ch, affine, stats) };
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
                let g = gamma.map_or(1.0, |g| g[ch].to_f64());
                let sums = ChannelSums {
                    mean,
                    rstd,
                    sdy,
                    sdyx,
                    count: (b * hw) as f64,
                };
                // SAFETY: channel ch owns its elements of dx.
                unsafe { channel_dx(x, dy, &dx_ptr, (b, c, hw), ch, g, sums) };
            }
        });
        for ch in 0..c {
            out[n + ch] = T::from_f64(sums[2 * ch]);
            out[n + c + ch] = T::from_f64(sums[2 * ch + 1]);
        }
        out
    }
}

/// Writes channel `ch` of y = (x − mean)·rstd [· γ + β].
///
/// # Safety
/// The caller owns channel `ch` of `out` (no other thread writes its elements).
unsafe fn normalise_channel<T: Element>(
    x: &[T],
    out: &Shared<T>,
    (b, c, hw): (usize, usize, usize),
    ch: usize,
    affine: Option<(&[T], &[T])>,
    (mean, rstd): (f64, f64),
) {
    let (scale, shift) = match affine {
        Some((g, bt)) => {
            let g = g[ch].to_f64();
            (g * rstd, bt[ch].to_f64() - mean * rstd * g)
        }
        None => (rstd, -mean * rstd),
    };
    for s in 0..b {
        let off = (s * c + ch) * hw;
        // SAFETY: the caller owns channel ch, the hw elements of every sample at offset off.
        let ys = unsafe { out.slice(off, hw) };
        scale_shift(&x[off..off + hw], ys, scale, shift);
    }
}

/// One channel's statistics and gradient sums over the batch they normalise.
#[derive(Clone, Copy)]
struct ChannelSums {
    mean: f64,
    rstd: f64,
    /// Σ dy.
    sdy: f64,
    /// Σ dy·x̂.
    sdyx: f64,
    /// Values the statistics were taken over.
    count: f64,
}

/// Writes channel `ch` of dx = γ·rstd·(dy − Σdy/n − x̂·Σdy·x̂/n) = dy·a + x·k + e.
///
/// # Safety
/// The caller owns channel `ch` of `dx`.
unsafe fn channel_dx<T: Element>(
    x: &[T],
    dy: &[T],
    dx: &Shared<T>,
    (b, c, hw): (usize, usize, usize),
    ch: usize,
    gamma: f64,
    s: ChannelSums,
) {
    let a = gamma * s.rstd;
    let k = -gamma * s.rstd * s.rstd * s.sdyx / s.count;
    let e = gamma * s.rstd * (s.mean * s.rstd * s.sdyx / s.count - s.sdy / s.count);
    for smp in 0..b {
        let off = (smp * c + ch) * hw;
        // SAFETY: the caller owns channel ch.
        let dxs = unsafe { dx.slice(off, hw) };
        affine3(&dy[off..off + hw], &x[off..off + hw], dxs, a, k, e);
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

/// Sums per-channel float64 values over the ranks of a data-parallel job, in place (every
/// rank calls it alike).
pub type ChannelAllReduce = Arc<dyn Fn(&mut [f64]) -> Result<()> + Send + Sync>;

/// What [`batch_norm_train_synchronised`] normalised with: the statistics of every rank's
/// batch together, for the running statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalMoments {
    /// Mean of each channel.
    pub mean: Vec<f64>,
    /// Biased variance of each channel.
    pub var: Vec<f64>,
    /// Values per channel over all ranks (B·H·W summed).
    pub count: f64,
}

/// [`batch_norm_train`] with the statistics of the batch of every rank together (synchronised
/// BatchNorm): per-channel sums, then sums of squared deviations, are combined by `reduce`
/// before normalising, and the backward combines Σdy and Σdy·x̂ the same way, so that values
/// and input gradients are those of one BatchNorm over the global batch. The γ and β
/// gradients stay this rank's own (the gradient all-reduce averages them with the rest).
pub fn batch_norm_train_synchronised(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
    reduce: &ChannelAllReduce,
) -> Result<(Tensor, GlobalMoments)> {
    if !fast_path(x) {
        candle_core::bail!(
            "batch_norm_train_synchronised: CPU f32/f64 only, got {:?}",
            x.dtype()
        );
    }
    let (b, c, h, w) = x.dims4()?;
    let x = x.contiguous()?;
    let dims = (b, c, h * w);
    let mut sums = match x.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&[&x], |s| channel_sums(s[0], dims, None))?,
        _ => with_cpu_slices::<f64, _>(&[&x], |s| channel_sums(s[0], dims, None))?,
    };
    sums.push((b * h * w) as f64);
    reduce(&mut sums)?;
    let count = sums[c];
    let mean: Vec<f64> = sums[..c].iter().map(|s| s / count).collect();
    let mut squares = match x.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&[&x], |s| channel_sums(s[0], dims, Some(&mean)))?,
        _ => with_cpu_slices::<f64, _>(&[&x], |s| channel_sums(s[0], dims, Some(&mean)))?,
    };
    reduce(&mut squares)?;
    let var: Vec<f64> = squares.iter().map(|s| s / count).collect();
    let op = SyncBatchNormOp {
        stats: mean
            .iter()
            .zip(&var)
            .map(|(&m, &v)| (m, 1.0 / (v + eps).sqrt()))
            .collect::<Vec<_>>()
            .into(),
        count,
        reduce: reduce.clone(),
    };
    let y = apply_normalisation(&x, affine, op)?;
    Ok((y, GlobalMoments { mean, var, count }))
}

/// Σ x per channel, or with `mean` Σ (x − mean)², in float64.
fn channel_sums<T: Element>(
    x: &[T],
    (b, c, hw): (usize, usize, usize),
    mean: Option<&[f64]>,
) -> Vec<f64> {
    let mut out = vec![0f64; c];
    let ptr = Shared(out.as_mut_ptr());
    for_each_chunk(c, |range| {
        for ch in range {
            let total = match mean {
                None => channel(x, b, c, hw, ch).map(|s| sum_by(s, |v| v)).sum(),
                Some(m) => {
                    let m = m[ch];
                    channel(x, b, c, hw, ch)
                        .map(|s| sum_by(s, |v| (v - m) * (v - m)))
                        .sum()
                }
            };
            // SAFETY: channel ch owns out[ch].
            unsafe { ptr.slice(ch, 1)[0] = total };
        }
    });
    out
}

struct SyncBatchNormOp {
    /// (mean, 1/sqrt(var + eps)) of every channel over the global batch.
    stats: Arc<[(f64, f64)]>,
    count: f64,
    reduce: ChannelAllReduce,
}

impl SyncBatchNormOp {
    fn forward<T: Element>(&self, x: &[T], affine: Option<(&[T], &[T])>, l: &Layout) -> Vec<T> {
        let dims = dims(l);
        let mut y = uninit_vec::<T>(x.len()); // every channel writes all of its elements
        let out = Shared(y.as_mut_ptr());
        for_each_chunk(dims.1, |range| {
            for ch in range {
                // SAFETY: channel ch owns its elements of y.
                unsafe { normalise_channel(x, &out, dims, ch, affine, self.stats[ch]) };
            }
        });
        y
    }

    /// (dx, this rank's Σdy·x̂ (dγ), this rank's Σdy (dβ)).
    fn backward(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dy = dy.contiguous()?;
        let (b, c, h, w) = x.dims4()?;
        let dims = (b, c, h * w);
        let gamma_values = gamma
            .map(|g| g.to_dtype(DType::F64)?.to_vec1::<f64>())
            .transpose()?;
        let local = match x.dtype() {
            DType::F32 => {
                with_cpu_slices::<f32, _>(&[x, &dy], |s| self.grad_sums(s[0], s[1], dims))?
            }
            _ => with_cpu_slices::<f64, _>(&[x, &dy], |s| self.grad_sums(s[0], s[1], dims))?,
        };
        let mut global = local.clone();
        (self.reduce)(&mut global)?;
        let gamma_at = |ch: usize| gamma_values.as_ref().map_or(1.0, |g| g[ch]);
        let dx = match x.dtype() {
            DType::F32 => with_cpu_slices::<f32, _>(&[x, &dy], |s| {
                Tensor::from_vec(
                    self.dx(s[0], s[1], dims, &global, gamma_at),
                    x.shape(),
                    x.device(),
                )
            })??,
            _ => with_cpu_slices::<f64, _>(&[x, &dy], |s| {
                Tensor::from_vec(
                    self.dx(s[0], s[1], dims, &global, gamma_at),
                    x.shape(),
                    x.device(),
                )
            })??,
        };
        let part = |offset: usize| -> Result<Tensor> {
            Tensor::from_vec(local[offset..offset + c].to_vec(), c, x.device())?.to_dtype(x.dtype())
        };
        Ok((dx, part(c)?, part(0)?))
    }

    /// This rank's Σdy per channel, then its Σdy·x̂ per channel.
    fn grad_sums<T: Element>(&self, x: &[T], dy: &[T], dims: (usize, usize, usize)) -> Vec<f64> {
        let c = dims.1;
        let mut out = vec![0f64; 2 * c];
        let ptr = Shared(out.as_mut_ptr());
        for_each_chunk(c, |range| {
            for ch in range {
                let (mean, rstd) = self.stats[ch];
                let (sdy, sdyx) = channel_grad_sums(x, dy, dims, ch, mean, rstd);
                // SAFETY: channel ch owns out[ch] and out[c + ch].
                unsafe {
                    ptr.slice(ch, 1)[0] = sdy;
                    ptr.slice(c + ch, 1)[0] = sdyx;
                }
            }
        });
        out
    }

    fn dx<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        dims: (usize, usize, usize),
        global: &[f64],
        gamma: impl Fn(usize) -> f64 + Sync,
    ) -> Vec<T> {
        let c = dims.1;
        let mut dx = uninit_vec::<T>(x.len()); // every channel writes all of its elements
        let out = Shared(dx.as_mut_ptr());
        for_each_chunk(c, |range| {
            for ch in range {
                let (mean, rstd) = self.stats[ch];
                let sums = ChannelSums {
                    mean,
                    rstd,
                    sdy: global[ch],
                    sdyx: global[c + ch],
                    count: self.count,
                };
                // SAFETY: channel ch owns its elements of dx.
                unsafe { channel_dx(x, dy, &out, dims, ch, gamma(ch), sums) };
            }
        });
        dx
    }
}

impl candle_core::CustomOp1 for SyncBatchNormOp {
    fn name(&self) -> &'static str {
        "mdeq-sync-batch-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => f32::storage(self.forward(f32::slice(s, l)?, None, l)),
            CpuStorage::F64(_) => f64::storage(self.forward(f64::slice(s, l)?, None, l)),
            _ => candle_core::bail!("mdeq-sync-batch-norm: f32 and f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, None, dy)?.0))
    }
}

impl candle_core::CustomOp3 for SyncBatchNormOp {
    fn name(&self) -> &'static str {
        "mdeq-sync-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => {
                let affine = Some((f32::slice(s2, l2)?, f32::slice(s3, l3)?));
                f32::storage(self.forward(f32::slice(s1, l1)?, affine, l1))
            }
            CpuStorage::F64(_) => {
                let affine = Some((f64::slice(s2, l2)?, f64::slice(s3, l3)?));
                f64::storage(self.forward(f64::slice(s1, l1)?, affine, l1))
            }
            _ => candle_core::bail!("mdeq-sync-batch-norm: f32 and f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma, dbeta) = self.backward(x, Some(gamma), dy)?;
        Ok((
            Some(dx),
            gamma.track_op().then_some(dgamma.reshape(gamma.shape())?),
            beta.track_op().then_some(dbeta.reshape(beta.shape())?),
        ))
    }
}
