//! 2-D convolution (square kernel, zero padding, no dilation, one group) as three candle custom
//! ops: forward, input gradient and weight gradient, each im2col + gemm over the batch.

use crate::element::Element;
use crate::gemm_ops::{matmul, Op};
use crate::im2col::{col2im, im2col, Geometry};
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// y = conv2d(x, w) with stride `stride` and padding `padding`; uses the fast kernels for f32/f64
/// on the CPU and candle's convolution elsewhere.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let fast = matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == w.dtype();
    if !fast {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let (_, c_in, _, _) = x.dims4()?;
    let (_, c_in_w, kh, kw) = w.dims4()?;
    if c_in != c_in_w || kh != kw {
        candle_core::bail!("conv2d: input has {c_in} channels, kernel {:?} (square kernels only)", w.dims());
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2dForward { stride, padding })
}

/// Splits work over the batch when there are enough samples, otherwise inside gemm.
fn plan(batch: usize) -> (bool, Parallelism) {
    let threads = rayon::current_num_threads();
    if threads > 1 && batch >= threads {
        (true, Parallelism::None)
    } else if threads > 1 {
        (false, Parallelism::Rayon(threads))
    } else {
        (false, Parallelism::None)
    }
}

fn geometry(x_dims: &[usize], k: usize, stride: usize, padding: usize) -> Result<(usize, Geometry)> {
    let [b, c_in, h, w] = x_dims else { candle_core::bail!("conv2d: expected a 4-D input, got {x_dims:?}") };
    if h + 2 * padding < k || w + 2 * padding < k || stride == 0 {
        candle_core::bail!("conv2d: kernel {k} does not fit input {h}x{w} with padding {padding}");
    }
    Ok((*b, Geometry { c_in: *c_in, h: *h, w: *w, k, stride, padding }))
}

fn forward<T: Element>(x: &[T], w: &[T], b: usize, c_out: usize, g: Geometry) -> Vec<T> {
    let (rows, cols) = (g.rows(), g.cols());
    let in_len = g.c_in * g.h * g.w;
    let mut y = vec![T::ZERO; b * c_out * cols];
    let (over_batch, par) = plan(b);
    let one = |col: &mut Vec<T>, (s, out): (usize, &mut [T])| {
        let xs = &x[s * in_len..(s + 1) * in_len];
        let src = if g.is_pointwise() {
            xs
        } else {
            im2col(xs, &g, col);
            col.as_slice()
        };
        matmul(out, w, Op::N, src, Op::N, (c_out, cols, rows), false, par);
    };
    let col_len = if g.is_pointwise() { 0 } else { rows * cols };
    if over_batch {
        y.par_chunks_mut(c_out * cols).enumerate().for_each_init(|| vec![T::ZERO; col_len], one);
    } else {
        let mut col = vec![T::ZERO; col_len];
        y.chunks_mut(c_out * cols).enumerate().for_each(|item| one(&mut col, item));
    }
    y
}

fn input_grad<T: Element>(dy: &[T], w: &[T], b: usize, c_out: usize, g: Geometry) -> Vec<T> {
    let (rows, cols) = (g.rows(), g.cols());
    let in_len = g.c_in * g.h * g.w;
    let mut dx = vec![T::ZERO; b * in_len];
    let (over_batch, par) = plan(b);
    let one = |col: &mut Vec<T>, (s, out): (usize, &mut [T])| {
        let dys = &dy[s * c_out * cols..(s + 1) * c_out * cols];
        if g.is_pointwise() {
            matmul(out, w, Op::T, dys, Op::N, (rows, cols, c_out), false, par);
        } else {
            matmul(col, w, Op::T, dys, Op::N, (rows, cols, c_out), false, par);
            col2im(col, &g, out);
        }
    };
    let col_len = if g.is_pointwise() { 0 } else { rows * cols };
    if over_batch {
        dx.par_chunks_mut(in_len).enumerate().for_each_init(|| vec![T::ZERO; col_len], one);
    } else {
        let mut col = vec![T::ZERO; col_len];
        dx.chunks_mut(in_len).enumerate().for_each(|item| one(&mut col, item));
    }
    dx
}

fn weight_grad<T: Element>(dy: &[T], x: &[T], b: usize, c_out: usize, g: Geometry) -> Vec<T> {
    let (rows, cols) = (g.rows(), g.cols());
    let in_len = g.c_in * g.h * g.w;
    let (over_batch, par) = plan(b);
    let accumulate = |acc: &mut Vec<T>, col: &mut Vec<T>, s: usize| {
        let dys = &dy[s * c_out * cols..(s + 1) * c_out * cols];
        let xs = &x[s * in_len..(s + 1) * in_len];
        let src = if g.is_pointwise() {
            xs
        } else {
            im2col(xs, &g, col);
            col.as_slice()
        };
        matmul(acc, dys, Op::N, src, Op::T, (c_out, rows, cols), true, par);
    };
    let col_len = if g.is_pointwise() { 0 } else { rows * cols };
    let zero = || (vec![T::ZERO; c_out * rows], vec![T::ZERO; col_len]);
    if over_batch {
        (0..b)
            .into_par_iter()
            .fold(zero, |(mut acc, mut col), s| {
                accumulate(&mut acc, &mut col, s);
                (acc, col)
            })
            .map(|(acc, _)| acc)
            .reduce(
                || vec![T::ZERO; c_out * rows],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    } else {
        let (mut acc, mut col) = zero();
        (0..b).for_each(|s| accumulate(&mut acc, &mut col, s));
        acc
    }
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

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (c_out, _, k, _) = l2.shape().dims4()?;
        let (b, g) = geometry(l1.dims(), k, self.stride, self.padding)?;
        let out = dispatch!(s1, l1, s2, l2, forward, b, c_out, g);
        Ok((out, Shape::from((b, c_out, g.h_out(), g.w_out()))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, k, _) = w.dims4()?;
        let (_, g) = geometry(x.dims(), k, self.stride, self.padding)?;
        let dy = dy.contiguous()?;
        let dx = dy.apply_op2_no_bwd(w, &InputGrad { g })?;
        let dw = dy.apply_op2_no_bwd(x, &WeightGrad { g })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// (dy, w) → dx.
struct InputGrad {
    g: Geometry,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "mdeq-conv2d-input-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c_out, _, _) = l1.shape().dims4()?;
        let g = self.g;
        let out = dispatch!(s1, l1, s2, l2, input_grad, b, c_out, g);
        Ok((out, Shape::from((b, g.c_in, g.h, g.w))))
    }
}

/// (dy, x) → dw.
struct WeightGrad {
    g: Geometry,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "mdeq-conv2d-weight-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c_out, _, _) = l1.shape().dims4()?;
        let g = self.g;
        let out = dispatch!(s1, l1, s2, l2, weight_grad, b, c_out, g);
        Ok((out, Shape::from((c_out, g.c_in, g.k, g.k))))
    }
}
