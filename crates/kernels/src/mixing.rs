//! Anderson acceleration's vector algebra: the new row of each sample's Gram matrix (the dot
//! products of the newest residual with every stored one) and the mixed iterate Σ_i α_i f_i,
//! one pass each, rows over the threads. Composed from candle ops each step stacked the whole
//! history into one float64 copy and recomputed the full Gram matrix.

use crate::element::{check_operands, fast_path, with_cpu_slices, Element};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use crate::reduce::dot;
use candle_core::{DType, Device, Result, Tensor};
use multiversion::multiversion;

/// ⟨a_b, o_i,b⟩ for every row b and every tensor o_i, in float64: `out[b][i]`.
pub fn row_dots(a: &Tensor, others: &[&Tensor]) -> Result<Vec<Vec<f64>>> {
    let (rows, d) = check_operands("row_dots", a, others.iter().copied())?;
    if !fast_path(a) || others.is_empty() {
        let a64 = a.to_dtype(DType::F64)?;
        let cols = others
            .iter()
            .map(|o| (&a64 * o.to_dtype(DType::F64)?)?.sum(1)?.to_vec1::<f64>())
            .collect::<Result<Vec<_>>>()?;
        return Ok((0..rows)
            .map(|b| cols.iter().map(|c| c[b]).collect())
            .collect());
    }
    let all: Vec<Tensor> = std::iter::once(a)
        .chain(others.iter().copied())
        .map(Tensor::contiguous)
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = all.iter().collect();
    let n = others.len();
    let flat = match a.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&refs, |s| dots(s, rows, d))?,
        _ => with_cpu_slices::<f64, _>(&refs, |s| dots(s, rows, d))?,
    };
    Ok(flat.chunks(n).map(<[f64]>::to_vec).collect())
}

fn dots<T: Element>(s: &[&[T]], rows: usize, d: usize) -> Vec<f64> {
    let n = s.len() - 1;
    let mut out = vec![0f64; rows * n];
    let p = Shared(out.as_mut_ptr());
    for_each_chunk(rows, |range| {
        for r in range {
            let span = r * d..(r + 1) * d;
            // SAFETY: row r owns out[r·n..(r+1)·n].
            let o = unsafe { p.slice(r * n, n) };
            for (i, t) in s[1..].iter().enumerate() {
                o[i] = dot(&s[0][span.clone()], &t[span.clone()]);
            }
        }
    });
    out
}

/// Σ_i w[b][i] t_i,b for every row b: the weights of row b mix the rows b of the tensors.
pub fn mix_rows(weights: &[Vec<f64>], ts: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = ts.first() else {
        candle_core::bail!("mix_rows: nothing to mix");
    };
    let (rows, d) = check_operands("mix_rows", first, ts.iter().copied())?;
    if weights.len() != rows || weights.iter().any(|w| w.len() != ts.len()) {
        candle_core::bail!(
            "mix_rows: {} weight rows for {rows} rows of {} tensors",
            weights.len(),
            ts.len()
        );
    }
    if !fast_path(first) {
        let n = ts.len();
        let flat: Vec<f64> = weights.iter().flatten().copied().collect();
        let alpha =
            Tensor::from_vec(flat, (rows, 1, n), first.device())?.to_dtype(first.dtype())?;
        return alpha.matmul(&Tensor::stack(ts, 1)?)?.squeeze(1);
    }
    let all: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = all.iter().collect();
    match first.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&refs, |s| {
            Tensor::from_vec(mixed(s, weights, rows, d), (rows, d), &Device::Cpu)
        })?,
        _ => with_cpu_slices::<f64, _>(&refs, |s| {
            Tensor::from_vec(mixed(s, weights, rows, d), (rows, d), &Device::Cpu)
        })?,
    }
}

fn mixed<T: Element>(s: &[&[T]], weights: &[Vec<f64>], rows: usize, d: usize) -> Vec<T> {
    // Every element is written below.
    let mut out = uninit_vec::<T>(rows * d);
    let p = Shared(out.as_mut_ptr());
    for_each_chunk(rows, |range| {
        for r in range {
            let span = r * d..(r + 1) * d;
            let inputs: Vec<&[T]> = s.iter().map(|t| &t[span.clone()]).collect();
            // SAFETY: row r of the output is owned by this work item.
            mix_row(&inputs, &weights[r], unsafe { p.slice(r * d, d) });
        }
    });
    out
}

#[multiversion(targets = "simd")]
fn mix_row<T: Element>(inputs: &[&[T]], w: &[f64], out: &mut [T]) {
    out.fill(T::ZERO);
    for (t, &wi) in inputs.iter().zip(w) {
        let wi = T::from_f64(wi);
        for (o, &v) in out.iter_mut().zip(t.iter()) {
            *o += wi * v;
        }
    }
}
