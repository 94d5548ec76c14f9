//! Products with a per-sample low-rank-plus-identity matrix, −x + Σ_k a_k ⟨b_k, x⟩ for each row
//! of (B, D) tensors: the whole of Broyden's inverse-Jacobian algebra (spec §3.2).
//!
//! Composed from candle ops, each of the k terms costs a product, a reduction, a broadcast
//! product and a sum, each a fresh (B, D) tensor; here the k dot products and the k updates of
//! one row run in one pass over each operand, rows spread over the threads.

use crate::element::{fast_path, with_cpu_slices, Element};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use crate::reduce::dot;
use candle_core::{DType, Device, Result, Tensor};
use multiversion::multiversion;

/// −x + Σ_k a_k ⟨b_k, x⟩ per row; `a` and `b` hold k tensors shaped like `x` (B, D).
pub fn low_rank_apply(x: &Tensor, a: &[&Tensor], b: &[&Tensor]) -> Result<Tensor> {
    if a.len() != b.len() {
        candle_core::bail!(
            "low_rank_apply: {} a-vectors but {} b-vectors",
            a.len(),
            b.len()
        );
    }
    let (rows, d) = x.dims2()?;
    for t in a.iter().chain(b) {
        if t.dims() != x.dims() || t.dtype() != x.dtype() {
            candle_core::bail!(
                "low_rank_apply: operand {:?} {:?} does not match x {:?} {:?}",
                t.dims(),
                t.dtype(),
                x.dims(),
                x.dtype()
            );
        }
    }
    if !fast_path(x) || a.is_empty() {
        return composed(x, a, b);
    }
    let x = x.contiguous()?;
    let a: Vec<Tensor> = a.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let b: Vec<Tensor> = b.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let all: Vec<&Tensor> = std::iter::once(&x).chain(&a).chain(&b).collect();
    let k = a.len();
    let shape = (rows, d);
    match x.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&all, |s| {
            Tensor::from_vec(
                fused(s[0], &s[1..1 + k], &s[1 + k..], rows, d),
                shape,
                &Device::Cpu,
            )
        })?,
        _ => with_cpu_slices::<f64, _>(&all, |s| {
            Tensor::from_vec(
                fused(s[0], &s[1..1 + k], &s[1 + k..], rows, d),
                shape,
                &Device::Cpu,
            )
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

fn fused<T: Element>(x: &[T], a: &[&[T]], b: &[&[T]], rows: usize, d: usize) -> Vec<T> {
    let mut out = uninit_vec::<T>(rows * d); // every row is written in full below
    let ptr = Shared(out.as_mut_ptr());
    for_each_chunk(rows, |range| {
        let mut coeffs = vec![T::ZERO; a.len()];
        for r in range {
            let span = r * d..(r + 1) * d;
            // SAFETY: row r owns out[r·d..(r+1)·d].
            let o = unsafe { ptr.slice(r * d, d) };
            row(&x[span.clone()], a, b, span, o, &mut coeffs);
        }
    });
    out
}

#[multiversion(targets = "simd")]
fn row<T: Element>(
    x: &[T],
    a: &[&[T]],
    b: &[&[T]],
    span: std::ops::Range<usize>,
    out: &mut [T],
    coeffs: &mut [T],
) {
    for (c, bk) in coeffs.iter_mut().zip(b) {
        *c = T::from_f64(dot(&bk[span.clone()], x));
    }
    for (o, v) in out.iter_mut().zip(x) {
        *o = T::from_f64(-v.to_f64());
    }
    for (c, ak) in coeffs.iter().zip(a) {
        let c = *c;
        for (o, v) in out.iter_mut().zip(&ak[span.clone()]) {
            *o += c * *v;
        }
    }
}
