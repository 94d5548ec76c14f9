//! Nearest-neighbour upsampling by an integer factor, as one pass over the output.
//!
//! Composed from candle ops it is a reshape, a broadcast and `contiguous()`, whose strided copy
//! of a 6-D broadcast runs single-threaded, element by element: a few percent of every
//! application of the MDEQ cell, where each fuse layer upsamples the coarser branches.

use crate::element::{fast_path, Element};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// (B, C, H, W) → (B, C, H·factor, W·factor), each value repeated over a factor × factor block.
pub fn nearest_upsample(x: &Tensor, factor: usize) -> Result<Tensor> {
    if factor == 0 {
        candle_core::bail!("nearest_upsample: factor must be at least 1");
    }
    if factor == 1 {
        return Ok(x.clone());
    }
    if fast_path(x) {
        x.contiguous()?.apply_op1(NearestUpsample { factor })
    } else {
        composed(x, factor)
    }
}

/// The same from candle ops (other devices and dtypes).
pub fn composed(x: &Tensor, factor: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, factor, w, factor))?
        .contiguous()?
        .reshape((b, c, h * factor, w * factor))
}

/// The adjoint of [`nearest_upsample`]: each factor × factor block of `dy` summed.
pub fn nearest_upsample_grad(dy: &Tensor, factor: usize) -> Result<Tensor> {
    if factor <= 1 {
        return Ok(dy.clone());
    }
    // The block mean times factor² (exact when factor is a power of two, as in MDEQ).
    dy.avg_pool2d(factor)? * (factor * factor) as f64
}

struct NearestUpsample {
    factor: usize,
}

fn forward<T: Element>(x: &[T], planes: usize, h: usize, w: usize, f: usize) -> Vec<T> {
    let (out_w, rows) = (w * f, planes * h);
    // Every output row is written below.
    let mut y = uninit_vec::<T>(rows * f * out_w);
    let out = Shared(y.as_mut_ptr());
    for_each_chunk(rows, |range| {
        for r in range {
            // SAFETY: input row r owns the f output rows r·f .. (r+1)·f.
            let block = unsafe { out.slice(r * f * out_w, f * out_w) };
            let (first, rest) = block.split_at_mut(out_w);
            for (o, v) in first.chunks_exact_mut(f).zip(&x[r * w..(r + 1) * w]) {
                o.fill(*v);
            }
            for copy in rest.chunks_exact_mut(out_w) {
                copy.copy_from_slice(first);
            }
        }
    });
    y
}

impl CustomOp1 for NearestUpsample {
    fn name(&self) -> &'static str {
        "mdeq-nearest-upsample"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let f = self.factor;
        let out = match s {
            CpuStorage::F32(_) => f32::storage(forward(f32::slice(s, l)?, b * c, h, w, f)),
            CpuStorage::F64(_) => f64::storage(forward(f64::slice(s, l)?, b * c, h, w, f)),
            _ => candle_core::bail!("nearest_upsample: f32 and f64 only"),
        };
        Ok((out, Shape::from((b, c, h * f, w * f))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(nearest_upsample_grad(dy, self.factor)?))
    }
}
