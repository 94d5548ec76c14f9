//! Squared Euclidean norm of every row of a (B, D) tensor, accumulated in float64: the residual
//! norms a solver reads at every step, in one pass and without a float64 copy of the state.

use crate::element::{check_operands, fast_path, with_cpu_slices, Element};
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

/// A solver step's residual g = f − x with the squared row norms of g and of f, in one pass
/// (three otherwise: the subtraction, then a pass for each norm).
pub fn residual_with_norms(f: &Tensor, x: &Tensor) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let (rows, d) = check_operands("residual_with_norms", f, [x])?;
    if !fast_path(f) {
        let g = (f - x)?;
        let (g2, f2) = (row_sq_norms(&g)?, row_sq_norms(f)?);
        return Ok((g, g2, f2));
    }
    let (f, x) = (f.contiguous()?, x.contiguous()?);
    match f.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&[&f, &x], |s| residual_tensor(s, rows, d))?,
        _ => with_cpu_slices::<f64, _>(&[&f, &x], |s| residual_tensor(s, rows, d))?,
    }
}

/// [`residual`] of the slices `s` = [f, x], with g as a tensor.
fn residual_tensor<T: Element + candle_core::WithDType>(
    s: &[&[T]],
    rows: usize,
    d: usize,
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let (g, g2, f2) = residual(s[0], s[1], rows, d);
    Ok((
        Tensor::from_vec(g, (rows, d), &candle_core::Device::Cpu)?,
        g2,
        f2,
    ))
}

fn residual<T: Element>(f: &[T], x: &[T], rows: usize, d: usize) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    // Every element of g is written below.
    let mut g = crate::parallel::uninit_vec::<T>(rows * d);
    let (mut g2, mut f2) = (vec![0f64; rows], vec![0f64; rows]);
    let (pg, pg2, pf2) = (
        Shared(g.as_mut_ptr()),
        Shared(g2.as_mut_ptr()),
        Shared(f2.as_mut_ptr()),
    );
    for_each_chunk(rows, |range| {
        for r in range {
            let span = r * d..(r + 1) * d;
            // SAFETY: row r owns g's row r and entry r of both norms.
            let (gr, n) = unsafe { (pg.slice(r * d, d), (pg2.slice(r, 1), pf2.slice(r, 1))) };
            let (a, b) = residual_row(&f[span.clone()], &x[span], gr);
            n.0[0] = a;
            n.1[0] = b;
        }
    });
    (g, g2, f2)
}

#[multiversion(targets = "simd")]
fn residual_row<T: Element>(f: &[T], x: &[T], g: &mut [T]) -> (f64, f64) {
    for i in 0..f.len() {
        g[i] = T::from_f64(f[i].to_f64() - x[i].to_f64());
    }
    (sum_by(g, |v| v * v), sum_by(f, |v| v * v))
}
