//! ReLU with PyTorch's derivative at 0 (zero), one pass forward and one pass backward.
//!
//! candle's own `relu` back-propagates 1 at exactly 0; composing the PyTorch semantics from candle
//! ops costs four passes each way.

use crate::element::{fast_path, Element};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use multiversion::multiversion;

/// max(x, 0) with d/dx = 1 for x > 0 and 0 otherwise; NaN stays NaN, as in PyTorch.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op1(Relu)
    } else {
        // x · [x > 0] keeps NaN (NaN · 0 is NaN).
        let positive = x.gt(0.0)?.to_dtype(x.dtype())?;
        x * positive
    }
}

/// dy where x > 0, zero elsewhere: the backward of [`relu`] given its input.
pub fn relu_grad(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if x.dims() != dy.dims() {
        candle_core::bail!("relu_grad: x {:?} and dy {:?} differ", x.dims(), dy.dims());
    }
    if fast_path(x) && x.dtype() == dy.dtype() {
        x.contiguous()?
            .apply_op2_no_bwd(&dy.contiguous()?, &ReluBackward)
    } else {
        dy * x.gt(0.0)?.to_dtype(dy.dtype())?
    }
}

const BLOCK: usize = 1 << 14;

fn map<T: Element>(n: usize, f: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    // Every element is written by `f` below.
    let mut out = uninit_vec::<T>(n);
    let ptr = Shared(out.as_mut_ptr());
    for_each_chunk(n.div_ceil(BLOCK), |blocks| {
        for blk in blocks {
            let start = blk * BLOCK;
            let len = BLOCK.min(n - start);
            // SAFETY: block blk owns out[start..start+len].
            f(start, unsafe { ptr.slice(start, len) });
        }
    });
    out
}

#[multiversion(targets = "simd")]
fn forward_block<T: Element>(x: &[T], out: &mut [T]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = if v.to_f64() <= 0.0 { T::ZERO } else { *v };
    }
}

#[multiversion(targets = "simd")]
fn backward_block<T: Element>(x: &[T], dy: &[T], out: &mut [T]) {
    for ((o, v), d) in out.iter_mut().zip(x).zip(dy) {
        *o = if v.to_f64() > 0.0 { *d } else { T::ZERO };
    }
}

fn forward<T: Element>(x: &[T]) -> Vec<T> {
    map(x.len(), |start, out| forward_block(&x[start..], out))
}

fn backward<T: Element>(x: &[T], dy: &[T]) -> Vec<T> {
    map(x.len(), |start, out| {
        backward_block(&x[start..], &dy[start..], out)
    })
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "mdeq-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => f32::storage(forward(f32::slice(s, l)?)),
            CpuStorage::F64(_) => f64::storage(forward(f64::slice(s, l)?)),
            _ => candle_core::bail!("relu: f32 and f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &ReluBackward)?))
    }
}

struct ReluBackward;

impl CustomOp2 for ReluBackward {
    fn name(&self) -> &'static str {
        "mdeq-relu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(backward(f32::slice(s1, l1)?, f32::slice(s2, l2)?)),
            CpuStorage::F64(_) => f64::storage(backward(f64::slice(s1, l1)?, f64::slice(s2, l2)?)),
            _ => candle_core::bail!("relu: f32 and f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}
