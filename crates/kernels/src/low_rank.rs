//! Products with a per-sample low-rank-plus-identity matrix, −x + Σ_k a_k ⟨b_k, x⟩ for each row
//! of (B, D) tensors: the whole of Broyden's inverse-Jacobian algebra (reference §3.2).
//!
//! Composed from candle ops, each of the k terms costs a product, a reduction, a broadcast
//! product and a sum, each a fresh (B, D) tensor; here the k dot products and the k updates of
//! one row run in one pass over each operand, rows spread over the threads.

use crate::element::{check_operands, fast_path, with_cpu_slices, Element};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use crate::reduce::dot;
use candle_core::{DType, Device, Result, Tensor};
use multiversion::multiversion;

/// −x + Σ_k a_k ⟨b_k, x⟩ per row; `a` and `b` hold k tensors shaped like `x` (B, D).
pub fn low_rank_apply(x: &Tensor, a: &[&Tensor], b: &[&Tensor]) -> Result<Tensor> {
    let mut out = low_rank_apply_many(&[x], a, b)?;
    Ok(out.remove(0))
}

/// [`low_rank_apply`] of one operator to several right-hand sides, reading each a_k and b_k
/// once for all of them (the operator's vectors are what the product is bound by).
pub fn low_rank_apply_many(xs: &[&Tensor], a: &[&Tensor], b: &[&Tensor]) -> Result<Vec<Tensor>> {
    if a.len() != b.len() {
        candle_core::bail!(
            "low_rank_apply: {} a-vectors but {} b-vectors",
            a.len(),
            b.len()
        );
    }
    let Some(x) = xs.first() else {
        return Ok(Vec::new());
    };
    let (rows, d) = check_operands("low_rank_apply", x, a.iter().chain(b).chain(xs).copied())?;
    if !fast_path(x) || a.is_empty() {
        return xs.iter().map(|x| composed(x, a, b)).collect();
    }
    let contiguous =
        |ts: &[&Tensor]| -> Result<Vec<Tensor>> { ts.iter().map(|t| t.contiguous()).collect() };
    let (xs, a, b) = (contiguous(xs)?, contiguous(a)?, contiguous(b)?);
    let all: Vec<&Tensor> = xs.iter().chain(&a).chain(&b).collect();
    let (n, k) = (xs.len(), a.len());
    match x.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&all, |s| {
            to_tensors(fused(&s[..n], &s[n..n + k], &s[n + k..], rows, d), rows, d)
        })?,
        _ => with_cpu_slices::<f64, _>(&all, |s| {
            to_tensors(fused(&s[..n], &s[n..n + k], &s[n + k..], rows, d), rows, d)
        })?,
    }
}

/// The same from candle ops (other devices and dtypes).
pub fn composed(x: &Tensor, a: &[&Tensor], b: &[&Tensor]) -> Result<Tensor> {
    let mut out = x.neg()?;
    for (ak, bk) in a.iter().zip(b) {
        out = (out + ak.broadcast_mul(&(*bk * x)?.sum_keepdim(1)?)?)?;
    }
    Ok(out)
}

fn to_tensors<T: Element + candle_core::WithDType>(
    outs: Vec<Vec<T>>,
    rows: usize,
    d: usize,
) -> Result<Vec<Tensor>> {
    outs.into_iter()
        .map(|o| Tensor::from_vec(o, (rows, d), &Device::Cpu))
        .collect()
}

fn fused<T: Element>(xs: &[&[T]], a: &[&[T]], b: &[&[T]], rows: usize, d: usize) -> Vec<Vec<T>> {
    // Every row of every output is written in full below.
    let mut outs: Vec<Vec<T>> = xs.iter().map(|_| uninit_vec::<T>(rows * d)).collect();
    let ptrs: Vec<Shared<T>> = outs.iter_mut().map(|o| Shared(o.as_mut_ptr())).collect();
    for_each_chunk(rows, |range| {
        // coeffs[j·k + i] = ⟨b_i, x_j⟩ of the current row.
        let mut coeffs = vec![T::ZERO; xs.len() * a.len()];
        let mut row_out: Vec<&mut [T]> = Vec::with_capacity(xs.len());
        for r in range {
            let span = r * d..(r + 1) * d;
            row_out.clear();
            // SAFETY: row r of every output is owned by this work item.
            row_out.extend(ptrs.iter().map(|p| unsafe { p.slice(r * d, d) }));
            let row_xs: Vec<&[T]> = xs.iter().map(|x| &x[span.clone()]).collect();
            row(&row_xs, a, b, span, &mut row_out, &mut coeffs);
        }
    });
    outs
}

#[multiversion(targets = "simd")]
fn row<T: Element>(
    xs: &[&[T]],
    a: &[&[T]],
    b: &[&[T]],
    span: std::ops::Range<usize>,
    out: &mut [&mut [T]],
    coeffs: &mut [T],
) {
    let k = a.len();
    for (i, bi) in b.iter().enumerate() {
        let bi = &bi[span.clone()];
        for (j, x) in xs.iter().enumerate() {
            coeffs[j * k + i] = T::from_f64(dot(bi, x));
        }
    }
    for (o, x) in out.iter_mut().zip(xs) {
        for (o, v) in o.iter_mut().zip(x.iter()) {
            *o = T::from_f64(-v.to_f64());
        }
    }
    for (i, ai) in a.iter().enumerate() {
        let ai = &ai[span.clone()];
        for (j, o) in out.iter_mut().enumerate() {
            let c = coeffs[j * k + i];
            for (o, v) in o.iter_mut().zip(ai) {
                *o += c * *v;
            }
        }
    }
}
