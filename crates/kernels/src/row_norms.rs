//! Squared Euclidean norm of every row of a (B, D) tensor, accumulated in float64: the residual
//! norms a solver reads at every step, in one pass and without a float64 copy of the state.

use crate::element::Element;
use crate::parallel::{for_each_chunk, Shared};
use candle_core::{DType, Device, Result, Storage, Tensor};
use multiversion::multiversion;

/// Independent partial sums, so that the loop vectorises.
const LANES: usize = 8;

/// Σ_d t[b, d]² for every row b, in float64.
pub fn row_sq_norms(t: &Tensor) -> Result<Vec<f64>> {
    let (rows, d) = t.dims2()?;
    if !matches!(t.device(), Device::Cpu) || !matches!(t.dtype(), DType::F32 | DType::F64) {
        return t.to_dtype(DType::F64)?.sqr()?.sum(1)?.to_vec1::<f64>();
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("row_sq_norms: expected CPU storage");
    };
    let mut out = vec![0f64; rows];
    let ptr = Shared(out.as_mut_ptr());
    macro_rules! run {
        ($t:ty) => {{
            let v = <$t as Element>::slice(cpu, layout)?;
            for_each_chunk(rows, |range| {
                for r in range {
                    // SAFETY: row r owns out[r].
                    unsafe { ptr.slice(r, 1)[0] = sum_sq(&v[r * d..(r + 1) * d]) };
                }
            });
        }};
    }
    match t.dtype() {
        DType::F32 => run!(f32),
        _ => run!(f64),
    }
    Ok(out)
}

#[multiversion(targets = "simd")]
fn sum_sq<T: Element>(x: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|v| v.to_f64().powi(2)).sum();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l].to_f64();
            acc[l] += v * v;
        }
    }
    acc.iter().sum::<f64>() + tail
}
