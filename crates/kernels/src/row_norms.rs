//! Squared Euclidean norm of every row of a (B, D) tensor, accumulated in float64: the residual
//! norms a solver reads at every step, in one pass and without a float64 copy of the state.

use crate::element::{fast_path, with_cpu_slices, Element};
use crate::parallel::{for_each_chunk, Shared};
use crate::reduce::sum_by;
use candle_core::{DType, Result, Tensor};
use multiversion::multiversion;

/// Σ_d t[b, d]² for every row b, in float64.
pub fn row_sq_norms(t: &Tensor) -> Result<Vec<f64>> {
    let (rows, d) = t.dims2()?;
    if !fast_path(t) {
        return t.to_dtype(DType::F64)?.sqr()?.sum(1)?.to_vec1::<f64>();
    }
    let t = t.contiguous()?;
    match t.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&[&t], |s| norms(s[0], rows, d)),
        _ => with_cpu_slices::<f64, _>(&[&t], |s| norms(s[0], rows, d)),
    }
}

fn norms<T: Element>(v: &[T], rows: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0f64; rows];
    let ptr = Shared(out.as_mut_ptr());
    for_each_chunk(rows, |range| {
        for r in range {
            // SAFETY: row r owns out[r].
            unsafe { ptr.slice(r, 1)[0] = sum_sq(&v[r * d..(r + 1) * d]) };
        }
    });
    out
}

#[multiversion(targets = "simd")]
fn sum_sq<T: Element>(x: &[T]) -> f64 {
    sum_by(x, |v| v * v)
}
