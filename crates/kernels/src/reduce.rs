//! Float64 reductions over f32/f64 slices, written so that they vectorise: a single running float
//! sum is a serial dependency chain the compiler may not reorder, so each reduction keeps
//! [`LANES`] independent partial sums (two AVX-512 registers of f64: with one, Broyden's dot
//! products waited on the adder — cls-tiny's forward solve took 590 ms instead of 522).

use crate::element::Element;

/// Independent partial sums per reduction.
pub(crate) const LANES: usize = 16;

/// Σ f(x) in f64 over `x`.
#[inline(always)]
pub(crate) fn sum_by<T: Element>(x: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|v| f(v.to_f64())).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f(v.to_f64());
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// ⟨a, b⟩ in f64.
#[inline(always)]
pub(crate) fn dot<T: Element>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(p, q)| p.to_f64() * q.to_f64())
        .sum();
    for (p, q) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += p[l].to_f64() * q[l].to_f64();
        }
    }
    acc.iter().sum::<f64>() + tail
}
