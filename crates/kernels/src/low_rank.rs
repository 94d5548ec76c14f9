//! Products with a per-sample low-rank-plus-identity matrix, −x + Σ_k a_k ⟨b_k, x⟩ for each row
//! of (B, D) tensors: the whole of Broyden's inverse-Jacobian algebra (spec §3.2).
//!
//! Composed from candle ops, each of the k terms costs a product, a reduction, a broadcast
//! product and a sum, each a fresh (B, D) tensor; here the k dot products and the k updates of
//! one row run in one pass over each operand, rows spread over the threads.

use crate::element::Element;
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use candle_core::{DType, Device, Result, Storage, Tensor};
use multiversion::multiversion;

/// Independent partial sums of a dot product, so that the loop vectorises.
const LANES: usize = 8;

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
    let fast = matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::F32 | DType::F64);
    if !fast || a.is_empty() {
        return composed(x, a, b);
    }
    let x = x.contiguous()?;
    let a: Vec<Tensor> = a.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let b: Vec<Tensor> = b.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = std::iter::once(&x)
        .chain(&a)
        .chain(&b)
        .map(|t| t.storage_and_layout())
        .collect();
    macro_rules! run {
        ($t:ty) => {{
            let mut slices: Vec<&[$t]> = Vec::with_capacity(guards.len());
            for (storage, layout) in &guards {
                match &**storage {
                    Storage::Cpu(s) => slices.push(<$t as Element>::slice(s, layout)?),
                    _ => candle_core::bail!("low_rank_apply: expected CPU storage"),
                }
            }
            let k = a.len();
            let out = fused(slices[0], &slices[1..1 + k], &slices[1 + k..], rows, d);
            Tensor::from_vec(out, (rows, d), &Device::Cpu)
        }};
    }
    match x.dtype() {
        DType::F32 => run!(f32),
        _ => run!(f64),
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
        let bk = &bk[span.clone()];
        let mut acc = [0f64; LANES];
        let (bc, xc) = (bk.chunks_exact(LANES), x.chunks_exact(LANES));
        let tail: f64 = bc
            .remainder()
            .iter()
            .zip(xc.remainder())
            .map(|(p, q)| p.to_f64() * q.to_f64())
            .sum();
        for (p, q) in bc.zip(xc) {
            for l in 0..LANES {
                acc[l] += p[l].to_f64() * q[l].to_f64();
            }
        }
        *c = T::from_f64(acc.iter().sum::<f64>() + tail);
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
