//! 2-D convolution (square kernel, zero padding, no dilation, one group) as three candle custom
//! ops: forward, input gradient and weight gradient, each im2col + gemm over the batch.

use crate::element::{fast_path, with_cpu_slices, Element};
use crate::gemm_ops::{matmul, Op};
use crate::im2col::{col2im, im2col, Geometry};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

/// y = conv2d(x, w) with stride `stride` and padding `padding`; uses the fast kernels for f32/f64
/// on the CPU and candle's convolution elsewhere.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, c_in, h, wd) = x.dims4()?;
    let (_, c_in_w, k, kw) = w.dims4()?;
    if c_in != c_in_w || k != kw {
        candle_core::bail!(
            "conv2d: input has {c_in} channels, kernel {:?} (square kernels only)",
            w.dims()
        );
    }
    geometry(x.dims(), k, stride, padding)?;
    if !(fast_path(x) && x.dtype() == w.dtype()) {
        // candle's conv2d backward takes the output padding of its transposed convolution from
        // the height alone and applies it to both axes, so its input gradient has the wrong width
        // when (size + 2p − k) mod stride differs between the axes (a 9×12 input at stride 2).
        // Zero rows or columns appended to the axis with the smaller remainder make the two
        // agree without changing the output: they fall in the zero padding's place, or in no
        // window at all, and the remainder stays below the stride.
        let rem = |n: usize| (n + 2 * padding - k) % stride;
        let (rh, rw) = (rem(h), rem(wd));
        let x = match rh.cmp(&rw) {
            std::cmp::Ordering::Less => x.pad_with_zeros(2, 0, rw - rh)?,
            std::cmp::Ordering::Greater => x.pad_with_zeros(3, 0, rh - rw)?,
            std::cmp::Ordering::Equal => x.clone(),
        };
        return x.conv2d(w, padding, stride, 1, 1);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dForward { stride, padding })
}

/// dL/dx of [`conv2d`] for an input of `x_dims`, given dL/dy, without the weight gradient (the
/// unit of work of a VJP with respect to the state). Other devices and dtypes go through
/// candle's autograd.
pub fn conv2d_input_grad(
    dy: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    x_dims: &[usize],
) -> Result<Tensor> {
    conv2d_input_grad_plus(dy, w, stride, padding, x_dims, None)
}

/// [`conv2d_input_grad`] + `plus` (shaped like the input), summed while the gradient is
/// written: a residual connection's two gradients in one pass.
pub fn conv2d_input_grad_plus(
    dy: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    x_dims: &[usize],
    plus: Option<&Tensor>,
) -> Result<Tensor> {
    if let Some(p) = plus {
        if p.dims() != x_dims {
            candle_core::bail!(
                "conv2d_input_grad: the addend {:?} is not shaped like the input {x_dims:?}",
                p.dims()
            );
        }
    }
    let fast = fast_path(dy)
        && dy.dtype() == w.dtype()
        && plus.is_none_or(|p| fast_path(p) && p.dtype() == dy.dtype());
    let (c_out, _, k, _) = w.dims4()?;
    let (_, g) = geometry(x_dims, k, stride, padding)?;
    if (dy.dim(1)?, dy.dim(2)?, dy.dim(3)?) != (c_out, g.h_out(), g.w_out()) {
        candle_core::bail!(
            "conv2d_input_grad: dy {:?} does not match kernel {:?} on input {x_dims:?}",
            dy.dims(),
            w.dims()
        );
    }
    if !fast {
        // The transposed convolution, with the output padding that restores the input size
        // (candle takes one for both axes: the larger, then the extra row or column is cut).
        let extra =
            |size: usize, out: usize| size.saturating_sub((out - 1) * stride + k - 2 * padding);
        let (eh, ew) = (extra(g.h, g.h_out()), extra(g.w, g.w_out()));
        let dx = dy.conv_transpose2d(&w.detach(), padding, eh.max(ew), stride, 1)?;
        let dx = dx.narrow(2, 0, g.h)?.narrow(3, 0, g.w)?.contiguous()?;
        return match plus {
            Some(p) => dx + p,
            None => Ok(dx),
        };
    }
    let grad = Grad {
        g,
        of: GradOf::Input,
    };
    let (dy, w) = (dy.contiguous()?, w.contiguous()?);
    let Some(plus) = plus else {
        return dy.apply_op2_no_bwd(&w, &grad);
    };
    // No backward: the slices are read directly, without a custom op.
    let plus = plus.contiguous()?;
    let operands = [&dy, &w, &plus];
    let (b, c_out) = (dy.dim(0)?, dy.dim(1)?);
    let dx = match dy.dtype() {
        DType::F32 => Tensor::new(
            with_cpu_slices::<f32, _>(&operands, |s| {
                input_grad_plus(s[0], s[1], b, c_out, g, Some(s[2]))
            })?,
            &Device::Cpu,
        )?,
        _ => Tensor::new(
            with_cpu_slices::<f64, _>(&operands, |s| {
                input_grad_plus(s[0], s[1], b, c_out, g, Some(s[2]))
            })?,
            &Device::Cpu,
        )?,
    };
    dx.reshape(x_dims)
}

fn geometry(
    x_dims: &[usize],
    k: usize,
    stride: usize,
    padding: usize,
) -> Result<(usize, Geometry)> {
    let [b, c_in, h, w] = x_dims else {
        candle_core::bail!("conv2d: expected a 4-D input, got {x_dims:?}")
    };
    if h + 2 * padding < k || w + 2 * padding < k || stride == 0 {
        candle_core::bail!("conv2d: kernel {k} does not fit input {h}x{w} with padding {padding}");
    }
    Ok((
        *b,
        Geometry {
            c_in: *c_in,
            h: *h,
            w: *w,
            k,
            stride,
            padding,
        },
    ))
}

/// Splits work over the batch when there are enough samples, otherwise inside gemm.
fn plan(batch: usize) -> (bool, Parallelism) {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 && batch >= threads {
        (true, Parallelism::None)
    } else if threads > 1 {
        (false, Parallelism::Rayon(threads))
    } else {
        (false, Parallelism::None)
    }
}

/// Calls `f(sample, out_chunk, scratch)` for every sample, over candle's CPU thread pool (the
/// pool candle's own ops use, so the two never compete for the cores) when `parallel`.
fn per_sample<T: Element>(
    out: &mut [T],
    chunk: usize,
    scratch_len: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T], &mut Vec<T>) + Sync,
) {
    let n = out.len() / chunk.max(1);
    if !parallel {
        let mut scratch = uninit_vec::<T>(scratch_len); // im2col or gemm writes it in full
        for (s, o) in out.chunks_mut(chunk).enumerate() {
            f(s, o, &mut scratch);
        }
        return;
    }
    let ptr = Shared(out.as_mut_ptr());
    for_each_chunk(n, |range| {
        let mut scratch = uninit_vec::<T>(scratch_len); // im2col or gemm writes it in full
        for s in range {
            // SAFETY: sample s owns out[s·chunk..(s+1)·chunk], and ranges are disjoint.
            let o = unsafe { ptr.slice(s * chunk, chunk) };
            f(s, o, &mut scratch);
        }
    });
}

fn forward<T: Element>(x: &[T], w: &[T], b: usize, c_out: usize, g: Geometry) -> Vec<T> {
    let (rows, cols) = (g.rows(), g.cols());
    let in_len = g.c_in * g.h * g.w;
    // gemm without read_dst writes every output element.
    let mut y = uninit_vec::<T>(b * c_out * cols);
    let (over_batch, par) = plan(b);
    let col_len = if g.is_pointwise() { 0 } else { rows * cols };
    per_sample(&mut y, c_out * cols, col_len, over_batch, |s, out, col| {
        let xs = &x[s * in_len..(s + 1) * in_len];
        let src = if g.is_pointwise() {
            xs
        } else {
            im2col(xs, &g, col);
            col.as_slice()
        };
        matmul(out, w, Op::N, src, Op::N, (c_out, cols, rows), false, par);
    });
    y
}

fn input_grad<T: Element>(dy: &[T], w: &[T], b: usize, c_out: usize, g: Geometry) -> Vec<T> {
    input_grad_plus(dy, w, b, c_out, g, None)
}

/// dx, plus `plus` (same shape) when given: the scatter then starts from `plus` instead of zeros,
/// and a pointwise gemm accumulates onto it, so the sum costs no pass of its own.
fn input_grad_plus<T: Element>(
    dy: &[T],
    w: &[T],
    b: usize,
    c_out: usize,
    g: Geometry,
    plus: Option<&[T]>,
) -> Vec<T> {
    // A stride-1 "same" convolution's input gradient is itself a forward convolution of dy with
    // the flipped, transposed kernel. When dy has fewer channels than x, unfolding dy is cheaper
    // than scattering the larger column matrix back with col2im.
    if g.stride == 1 && 2 * g.padding + 1 == g.k && c_out < g.c_in && !g.is_pointwise() {
        let k2 = g.k * g.k;
        let mut flipped = uninit_vec::<T>(w.len()); // every element is assigned below
        for co in 0..c_out {
            for ci in 0..g.c_in {
                for t in 0..k2 {
                    flipped[(ci * c_out + co) * k2 + (k2 - 1 - t)] = w[(co * g.c_in + ci) * k2 + t];
                }
            }
        }
        let gt = Geometry { c_in: c_out, ..g };
        let mut dx = forward(dy, &flipped, b, g.c_in, gt);
        if let Some(plus) = plus {
            let ptr = Shared(dx.as_mut_ptr());
            let block = g.c_in * g.h * g.w;
            for_each_chunk(b, |range| {
                // SAFETY: sample s owns dx[s·block..(s+1)·block].
                let out = unsafe { ptr.slice(range.start * block, range.len() * block) };
                let add = &plus[range.start * block..range.end * block];
                out.iter_mut().zip(add).for_each(|(o, a)| *o += *a);
            });
        }
        return dx;
    }
    let (rows, cols) = (g.rows(), g.cols());
    let in_len = g.c_in * g.h * g.w;
    // Each sample's chunk is written by gemm (pointwise) or zeroed before col2im.
    let mut dx = uninit_vec::<T>(b * in_len);
    let (over_batch, par) = plan(b);
    let col_len = if g.is_pointwise() { 0 } else { rows * cols };
    per_sample(&mut dx, in_len, col_len, over_batch, |s, out, col| {
        let dys = &dy[s * c_out * cols..(s + 1) * c_out * cols];
        let start = |out: &mut [T]| match plus {
            Some(p) => out.copy_from_slice(&p[s * in_len..(s + 1) * in_len]),
            None => out.fill(T::ZERO),
        };
        if g.is_pointwise() {
            let shape = (rows, cols, c_out);
            if plus.is_some() {
                start(out);
            }
            matmul(out, w, Op::T, dys, Op::N, shape, plus.is_some(), par);
        } else {
            matmul(col, w, Op::T, dys, Op::N, (rows, cols, c_out), false, par);
            start(out);
            col2im(col, &g, out);
        }
    });
    dx
}

fn weight_grad<T: Element>(dy: &[T], x: &[T], b: usize, c_out: usize, g: Geometry) -> Vec<T> {
    let (rows, cols) = (g.rows(), g.cols());
    let in_len = g.c_in * g.h * g.w;
    let (over_batch, par) = plan(b);
    let col_len = if g.is_pointwise() { 0 } else { rows * cols };
    let accumulate = |acc: &mut [T], col: &mut Vec<T>, s: usize| {
        let dys = &dy[s * c_out * cols..(s + 1) * c_out * cols];
        let xs = &x[s * in_len..(s + 1) * in_len];
        let src = if g.is_pointwise() {
            xs
        } else {
            im2col(xs, &g, col);
            col.as_slice()
        };
        // Accumulates dWᵀ (rows × c_out) = col · dyᵀ: gemm packs the long K = H·W axis of
        // both operands contiguously this way round.
        matmul(acc, src, Op::N, dys, Op::T, (rows, c_out, cols), true, par);
    };
    let mut total = vec![T::ZERO; c_out * rows];
    if over_batch {
        // Partial sums are added in the order of their sample ranges, not of thread completion,
        // so results are bit-for-bit reproducible run to run.
        let partials = std::sync::Mutex::new(Vec::new());
        for_each_chunk(b, |range| {
            let start = range.start;
            let mut acc = vec![T::ZERO; c_out * rows];
            let mut col = uninit_vec::<T>(col_len); // im2col writes it in full
            for s in range {
                accumulate(&mut acc, &mut col, s);
            }
            partials
                .lock()
                .expect("no panics while holding the lock")
                .push((start, acc));
        });
        let mut partials = partials.into_inner().expect("unpoisoned");
        partials.sort_by_key(|(start, _)| *start);
        for (_, acc) in partials {
            total.iter_mut().zip(acc).for_each(|(a, v)| *a += v);
        }
    } else {
        let mut col = uninit_vec::<T>(col_len); // im2col writes it in full
        (0..b).for_each(|s| accumulate(&mut total, &mut col, s));
    }
    // dWᵀ → dW (c_out × rows).
    let mut dw = uninit_vec::<T>(c_out * rows); // every element is assigned below
    for r in 0..rows {
        for co in 0..c_out {
            dw[co * rows + r] = total[r * c_out + co];
        }
    }
    dw
}

macro_rules! dispatch {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $f:ident, $($arg:expr),*) => {
        match $s1 {
            CpuStorage::F32(_) => f32::storage($f(f32::slice($s1, $l1)?, f32::slice($s2, $l2)?, $($arg),*)),
            CpuStorage::F64(_) => f64::storage($f(f64::slice($s1, $l1)?, f64::slice($s2, $l2)?, $($arg),*)),
            _ => candle_core::bail!("mdeq-kernels: conv2d supports f32 and f64"),
        }
    };
}

/// Forward op: (x, w) → y.
struct Conv2dForward {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for Conv2dForward {
    fn name(&self) -> &'static str {
        "mdeq-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (c_out, _, k, _) = l2.shape().dims4()?;
        let (b, g) = geometry(l1.dims(), k, self.stride, self.padding)?;
        let out = dispatch!(s1, l1, s2, l2, forward, b, c_out, g);
        Ok((out, Shape::from((b, c_out, g.h_out(), g.w_out()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, k, _) = w.dims4()?;
        let (_, g) = geometry(x.dims(), k, self.stride, self.padding)?;
        let dy = dy.contiguous()?;
        // Only what the graph needs: a VJP w.r.t. the state must not pay for weight gradients.
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(
                w,
                &Grad {
                    g,
                    of: GradOf::Input,
                },
            )?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(dy.apply_op2_no_bwd(
                x,
                &Grad {
                    g,
                    of: GradOf::Weight,
                },
            )?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// Which gradient a [`Grad`] op computes from dy and its second operand.
#[derive(Debug, Clone, Copy)]
enum GradOf {
    /// (dy, w) → dx.
    Input,
    /// (dy, x) → dw.
    Weight,
}

/// One of the convolution's gradients as a custom op.
struct Grad {
    g: Geometry,
    of: GradOf,
}

impl CustomOp2 for Grad {
    fn name(&self) -> &'static str {
        match self.of {
            GradOf::Input => "mdeq-conv2d-input-grad",
            GradOf::Weight => "mdeq-conv2d-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c_out, _, _) = l1.shape().dims4()?;
        let g = self.g;
        Ok(match self.of {
            GradOf::Input => (
                dispatch!(s1, l1, s2, l2, input_grad, b, c_out, g),
                Shape::from((b, g.c_in, g.h, g.w)),
            ),
            GradOf::Weight => (
                dispatch!(s1, l1, s2, l2, weight_grad, b, c_out, g),
                Shape::from((c_out, g.c_in, g.k, g.k)),
            ),
        })
    }
}
