//! GroupNorm (optionally affine) as one fused pass forward and one fused pass backward, with
//! float64 accumulation of the statistics.
//!
//! Composed from candle ops, one GroupNorm costs about ten full passes over the tensor forward
//! and twice that backward; inside f it ran after every convolution, so it dominated the VJPs of
//! the implicit backward. The statistics are accumulated in float64 so that float32 results
//! track float64 ones closely (candle reduces float32 sequentially).

use crate::element::{fast_path, with_cpu_slices, Element};
use crate::norm_common::{grad_sums, Forward, FusedNorm};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use crate::reduce::sum_by;
use candle_core::{DType, Device, Layout, Result, Tensor, D};
use multiversion::multiversion;

/// GroupNorm over (C/G, H, W) per sample, biased variance; `affine` is (γ, β) of shape (C).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    group_norm_then(x, groups, affine, eps, false)
}

/// ReLU(GroupNorm(x)) in the same single pass (ReLU's derivative at 0 is 0, as PyTorch's).
pub fn group_norm_relu(
    x: &Tensor,
    groups: usize,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    group_norm_then(x, groups, affine, eps, true)
}

fn group_norm_then(
    x: &Tensor,
    groups: usize,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    if !fast_path(x) {
        let y = composed(x, groups, affine, eps)?;
        return if relu { crate::relu::relu(&y) } else { Ok(y) };
    }
    let op = Forward(GroupNormOp { groups, eps, relu });
    let x = x.contiguous()?;
    match affine {
        None => x.apply_op1(op),
        Some((g, b)) => x.apply_op3(
            &g.to_dtype(x.dtype())?.contiguous()?,
            &b.to_dtype(x.dtype())?.contiguous()?,
            op,
        ),
    }
}

/// dL/dx of [`group_norm`] given dL/dy, without the gradients of γ and β (the unit of work of a
/// VJP with respect to the state). Other devices and dtypes go through candle's autograd.
pub fn group_norm_input_grad(
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    eps: f64,
    dy: &Tensor,
) -> Result<Tensor> {
    group_norm_input_grad_with_relus(x, groups, gamma, eps, dy, AdjacentRelus::default())
}

/// ReLUs beside a GroupNorm whose input gradient is taken, folded into that one pass: in the
/// VJPs of the cell every GroupNorm but one has a ReLU on one side, and as separate passes their
/// masks cost two more trips through memory per GroupNorm, and a tensor each.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdjacentRelus<'a> {
    /// The GroupNorm's input x is a ReLU's output: the gradient returned is the one with
    /// respect to that ReLU's input, zero where x is not positive.
    pub before: bool,
    /// The output of a ReLU applied to the GroupNorm's output (as [`group_norm_relu`]'s):
    /// dL/dy arrives at it and passes only where it is positive.
    pub after: Option<&'a Tensor>,
}

/// [`group_norm_input_grad`] with the masks of the ReLUs beside it applied in the same pass:
/// relu′(x) ⊙ GN′(x)ᵀ (dy ⊙ [after > 0]), each mask only where `relus` asks for it. Equal, value
/// for value, to the separate passes.
pub fn group_norm_input_grad_with_relus(
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    eps: f64,
    dy: &Tensor,
    relus: AdjacentRelus,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    if x.dims() != dy.dims() {
        candle_core::bail!(
            "group_norm_input_grad: x {:?} and dy {:?} differ",
            x.dims(),
            dy.dims()
        );
    }
    if let Some(after) = relus.after {
        if after.dims() != dy.dims() {
            candle_core::bail!(
                "group_norm_input_grad: the following ReLU's output {:?} and dy {:?} differ",
                after.dims(),
                dy.dims()
            );
        }
    }
    let op = GroupNormOp {
        groups,
        eps,
        relu: false,
    };
    let same_kind = |t: &Tensor| fast_path(t) && t.dtype() == x.dtype();
    if fast_path(x) && same_kind(dy) && relus.after.is_none_or(same_kind) {
        return op.input_grad_with_relus(x, gamma, dy, relus);
    }
    let dy = match relus.after {
        Some(after) => crate::relu::relu_grad(after, dy)?,
        None => dy.clone(),
    };
    let dx = op.composed_input_grad(x, gamma, &dy)?;
    if relus.before {
        crate::relu::relu_grad(x, &dx)
    } else {
        Ok(dx)
    }
}

/// The same computation from candle ops (other devices and dtypes).
pub fn composed(
    x: &Tensor,
    groups: usize,
    affine: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let g = x.reshape((b, groups, (c / groups) * h * w))?;
    let centered = g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((b, c, h, w))?;
    match affine {
        None => Ok(normed),
        Some((gamma, beta)) => normed
            .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
            .broadcast_add(&beta.reshape((1, c, 1, 1))?),
    }
}

#[derive(Clone, Copy)]
struct GroupNormOp {
    groups: usize,
    eps: f64,
    /// The forward ends in a ReLU.
    relu: bool,
}

/// (mean, 1/σ) of one group.
#[inline(always)]
fn stats<T: Element>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = sum_by(x, |v| v) / n;
    let var = sum_by(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl GroupNormOp {
    /// (B, C, H·W, channels per group); the shape was checked when the op was built.
    fn dims(&self, l: &Layout) -> (usize, usize, usize, usize) {
        let d = l.dims();
        (d[0], d[1], d[2] * d[3], d[1] / self.groups)
    }

    /// dL/dx of [`composed`] through candle's autograd (other devices and dtypes).
    fn composed_input_grad(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let xv = candle_core::Var::from_tensor(&x.detach())?;
        let beta = gamma.map(|g| g.zeros_like()).transpose()?;
        let affine = gamma.zip(beta.as_ref());
        let y = composed(xv.as_tensor(), self.groups, affine, self.eps)?;
        let grads = (y * dy)?.sum_all()?.backward()?;
        match grads.get(xv.as_tensor()) {
            Some(dx) => Ok(dx.clone()),
            None => x.zeros_like(),
        }
    }

    /// The native [`group_norm_input_grad_with_relus`]: CPU tensors of one float dtype.
    fn input_grad_with_relus(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        dy: &Tensor,
        relus: AdjacentRelus,
    ) -> Result<Tensor> {
        let x = x.contiguous()?;
        let mut operands = vec![x.clone(), dy.contiguous()?];
        if let Some(g) = gamma {
            operands.push(g.to_dtype(x.dtype())?.contiguous()?);
        }
        if let Some(a) = relus.after {
            operands.push(a.contiguous()?);
        }
        let refs: Vec<&Tensor> = operands.iter().collect();
        let (dims, has_gamma) = (self.dims(x.layout()), gamma.is_some());
        fn typed<T: Element + candle_core::WithDType>(
            op: &GroupNormOp,
            refs: &[&Tensor],
            (dims, has_gamma, relus): ((usize, usize, usize, usize), bool, AdjacentRelus),
        ) -> Result<Tensor> {
            let dx = with_cpu_slices::<T, _>(refs, |s| {
                let gamma = has_gamma.then(|| s[2]);
                let after = relus.after.map(|_| s[s.len() - 1]);
                op.gated_input_grad(s[0], s[1], gamma, after, relus.before, dims)
            })?;
            Tensor::from_vec(dx, refs[0].shape(), &Device::Cpu)
        }
        match x.dtype() {
            DType::F32 => typed::<f32>(self, &refs, (dims, has_gamma, relus)),
            _ => typed::<f64>(self, &refs, (dims, has_gamma, relus)),
        }
    }

    /// dx group by group: dy gated by `after` into a group-sized scratch (still in L1 when the
    /// backward reads it), the group's backward, then dx gated by x when `before`.
    fn gated_input_grad<T: Element>(
        &self,
        x: &[T],
        dy: &[T],
        gamma: Option<&[T]>,
        after: Option<&[T]>,
        before: bool,
        (b, c, hw, cpg): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let group_len = cpg * hw;
        // Every group writes all of its elements.
        let mut dx = uninit_vec::<T>(b * c * hw);
        let out = Shared(dx.as_mut_ptr());
        for_each_chunk(b * self.groups, |range| {
            // The channel sums of dγ and dβ, unused here; the gated dy of one group.
            let mut parts = vec![0f64; 2 * cpg];
            let mut gated = after.map(|_| uninit_vec::<T>(group_len));
            for bg in range {
                let first_ch = (bg % self.groups) * cpg;
                let span = bg * group_len..(bg + 1) * group_len;
                // SAFETY: group bg owns dx[span].
                let dxs = unsafe { out.slice(span.start, group_len) };
                let xs = &x[span.clone()];
                let dys = match (after, gated.as_mut()) {
                    (Some(a), Some(buf)) => {
                        relu_gate(&a[span.clone()], &dy[span], buf);
                        &buf[..]
                    }
                    _ => &dy[span],
                };
                backward_group(xs, dys, dxs, &mut parts, gamma, first_ch, hw, self.eps);
                if before {
                    relu_gate_in_place(xs, dxs);
                }
            }
        });
        dx
    }
}

/// out = dy where `gate` > 0, else 0: the ReLU backward of [`crate::relu::relu_grad`], value for
/// value.
#[multiversion(targets = "simd")]
fn relu_gate<T: Element>(gate: &[T], dy: &[T], out: &mut [T]) {
    for ((o, g), d) in out.iter_mut().zip(gate).zip(dy) {
        *o = if g.to_f64() > 0.0 { *d } else { T::ZERO };
    }
}

/// [`relu_gate`] of `d` by `gate`, in place.
#[multiversion(targets = "simd")]
fn relu_gate_in_place<T: Element>(gate: &[T], d: &mut [T]) {
    for (o, g) in d.iter_mut().zip(gate) {
        if g.to_f64() <= 0.0 || g.to_f64().is_nan() {
            *o = T::ZERO;
        }
    }
}

impl FusedNorm for GroupNormOp {
    const NAME: &'static str = "mdeq-group-norm";

    fn forward<T: Element>(&self, x: &[T], affine: Option<(&[T], &[T])>, l: &Layout) -> Vec<T> {
        let (b, c, hw, cpg) = self.dims(l);
        let group_len = cpg * hw;
        // Every group writes all of its elements.
        let mut y = uninit_vec::<T>(b * c * hw);
        let out = Shared(y.as_mut_ptr());
        for_each_chunk(b * self.groups, |range| {
            for bg in range {
                // SAFETY: group bg owns y[bg·len..(bg+1)·len].
                let ys = unsafe { out.slice(bg * group_len, group_len) };
                let xs = &x[bg * group_len..(bg + 1) * group_len];
                let first_ch = (bg % self.groups) * cpg;
                forward_group(xs, ys, affine, first_ch, hw, self.eps, self.relu);
            }
        });
        y
    }

    fn backward<T: Element>(&self, x: &[T], gamma: Option<&[T]>, dy: &[T], l: &Layout) -> Vec<T> {
        let (b, c, hw, cpg) = self.dims(l);
        let group_len = cpg * hw;
        // dx is written in full by the groups, the 2·C tail after the loop.
        let mut out = uninit_vec::<T>(b * c * hw + 2 * c);
        // Per-sample channel sums for dγ, dβ, reduced over the batch afterwards (deterministic).
        let mut partial = vec![0f64; b * c * 2];
        let (dx_ptr, part_ptr) = (Shared(out.as_mut_ptr()), Shared(partial.as_mut_ptr()));
        for_each_chunk(b * self.groups, |range| {
            for bg in range {
                let (sample, first_ch) = (bg / self.groups, (bg % self.groups) * cpg);
                // SAFETY: group bg owns its slice of dx and its channels' partial sums.
                let dxs = unsafe { dx_ptr.slice(bg * group_len, group_len) };
                let parts = unsafe { part_ptr.slice((sample * c + first_ch) * 2, cpg * 2) };
                let span = bg * group_len..(bg + 1) * group_len;
                let (xs, dys) = (&x[span.clone()], &dy[span]);
                backward_group(xs, dys, dxs, parts, gamma, first_ch, hw, self.eps);
            }
        });
        let tail = &mut out[b * c * hw..];
        for ch in 0..c {
            let (mut dg, mut db) = (0f64, 0f64);
            for s in 0..b {
                dg += partial[(s * c + ch) * 2];
                db += partial[(s * c + ch) * 2 + 1];
            }
            tail[ch] = T::from_f64(dg);
            tail[c + ch] = T::from_f64(db);
        }
        out
    }

    fn ends_in_relu(&self) -> bool {
        self.relu
    }
}

#[multiversion(targets = "simd")]
fn forward_group<T: Element>(
    xs: &[T],
    ys: &mut [T],
    affine: Option<(&[T], &[T])>,
    first_ch: usize,
    hw: usize,
    eps: f64,
    relu: bool,
) {
    let (mean, rstd) = stats(xs, eps);
    for (k, (yc, xc)) in ys.chunks_exact_mut(hw).zip(xs.chunks_exact(hw)).enumerate() {
        let ch = first_ch + k;
        let (scale, shift) = match affine {
            Some((g, bt)) => (
                g[ch].to_f64() * rstd,
                bt[ch].to_f64() - mean * rstd * g[ch].to_f64(),
            ),
            None => (rstd, -mean * rstd),
        };
        if relu {
            for (o, v) in yc.iter_mut().zip(xc) {
                let pre = v.to_f64() * scale + shift;
                // NaN passes through, as in PyTorch (f64::max would turn it into 0).
                *o = T::from_f64(if pre <= 0.0 { 0.0 } else { pre });
            }
        } else {
            for (o, v) in yc.iter_mut().zip(xc) {
                *o = T::from_f64(v.to_f64() * scale + shift);
            }
        }
    }
}

/// dx of one group, and per channel (Σ dy·x̂, Σ dy) into `parts`.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets = "simd")]
fn backward_group<T: Element>(
    xs: &[T],
    dys: &[T],
    dxs: &mut [T],
    parts: &mut [f64],
    gamma: Option<&[T]>,
    first_ch: usize,
    hw: usize,
    eps: f64,
) {
    let (mean, rstd) = stats(xs, eps);
    // Σ dx̂ and Σ dx̂·x̂ over the group, where dx̂ = dy·γ.
    let (mut s1, mut s2) = (0f64, 0f64);
    for (k, (dc, xc)) in dys.chunks_exact(hw).zip(xs.chunks_exact(hw)).enumerate() {
        let gk = gamma.map_or(1.0, |g| g[first_ch + k].to_f64());
        let (sdy, sdyx) = grad_sums(dc, xc, mean, rstd);
        parts[2 * k] = sdyx;
        parts[2 * k + 1] = sdy;
        s1 += sdy * gk;
        s2 += sdyx * gk;
    }
    let n = xs.len() as f64;
    let (m1, m2) = (s1 / n, s2 / n);
    // dx = rstd·(dy·γ − m1 − x̂·m2), expanded to dy·a + x·c + e per channel.
    let (c, e) = (-rstd * rstd * m2, rstd * (mean * rstd * m2 - m1));
    for (k, ((oc, dc), xc)) in dxs
        .chunks_exact_mut(hw)
        .zip(dys.chunks_exact(hw))
        .zip(xs.chunks_exact(hw))
        .enumerate()
    {
        let a = rstd * gamma.map_or(1.0, |g| g[first_ch + k].to_f64());
        for ((o, d), v) in oc.iter_mut().zip(dc).zip(xc) {
            *o = T::from_f64(d.to_f64() * a + v.to_f64() * c + e);
        }
    }
}
