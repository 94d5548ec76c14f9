//! Anderson acceleration (reference §3.4) that survives a singular Gram system.
//!
//! The official code solves the bordered system with a plain linear solve and fails when the
//! history becomes rank-deficient (locuslab/deq #20, #26). Here the small system
//! (GGᵀ + λI) α = 1 is solved per sample by Cholesky in f64 with escalating regularisation, and
//! falls back to the newest iterate if it is still not positive definite.

use super::residual::ResidualTracker;
use super::{FixedPointMap, Solution, SolverOptions};
use candle_core::{DType, Result, Tensor};

/// Default history size.
pub fn default_m() -> usize {
    6
}
/// Default regularisation.
pub fn default_lambda() -> f64 {
    1e-4
}
/// Default mixing.
pub fn default_beta() -> f64 {
    1.0
}

/// Anderson parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AndersonOptions {
    /// History size m.
    pub m: usize,
    /// Tikhonov λ.
    pub lambda: f64,
    /// Mixing β.
    pub beta: f64,
}

/// Solves (A + λI) α = 1 by Cholesky, normalises α to sum 1; None if it cannot.
pub fn mixing_weights(gram: &[f64], n: usize, lambda: f64) -> Option<Vec<f64>> {
    let scale = (0..n)
        .map(|i| gram[i * n + i].abs())
        .fold(0.0, f64::max)
        .max(1e-300);
    let mut reg = lambda;
    for _ in 0..8 {
        if let Some(alpha) = try_cholesky_solve(gram, n, reg * scale.max(1.0)) {
            let s: f64 = alpha.iter().sum();
            if s.is_finite() && s.abs() > 1e-300 {
                let a: Vec<f64> = alpha.iter().map(|x| x / s).collect();
                if a.iter().all(|x| x.is_finite()) {
                    return Some(a);
                }
            }
        }
        reg *= 100.0;
    }
    None
}

fn try_cholesky_solve(a: &[f64], n: usize, reg: f64) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j] + if i == j { reg } else { 0.0 };
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if s.is_nan() || s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let mut y = vec![0.0; n];
    for i in 0..n {
        let mut s = 1.0;
        for k in 0..i {
            s -= l[i * n + k] * y[k];
        }
        y[i] = s / l[i * n + i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let mut s = y[i];
        for k in i + 1..n {
            s -= l[k * n + i] * x[k];
        }
        x[i] = s / l[i * n + i];
    }
    Some(x)
}

/// Solves z = f(z) from `z0`.
pub fn solve(
    f: &mut dyn FixedPointMap,
    z0: &Tensor,
    opts: &SolverOptions,
    a: &AndersonOptions,
) -> Result<Solution> {
    let (b, _) = z0.dims2()?;
    let m = a.m.max(1);
    let mut tracker = ResidualTracker::new("anderson", z0, opts, 1e-5)?;
    let mut xs: Vec<Tensor> = vec![z0.clone()];
    let f0 = tracker.evaluate(f, z0)?;
    let mut fs: Vec<Tensor> = vec![f0.clone()];
    tracker.record(z0, &(&f0 - z0)?, &f0)?;
    let mut k = 1;
    let mut newest = 0;
    while tracker.stats_steps() < opts.threshold && !tracker.done() {
        // Candidate from the current history.
        let n = xs.len();
        let x_next = if n == 1 {
            fs[0].clone()
        } else {
            let gs: Vec<Tensor> = (0..n).map(|i| &fs[i] - &xs[i]).collect::<Result<_>>()?;
            let g = Tensor::stack(&gs, 1)?.to_dtype(DType::F64)?; // (B, n, D)
            let gram = g.matmul(&g.t()?)?.to_vec3::<f64>()?;
            let mut weights = Vec::with_capacity(b * n);
            for gram_b in gram.iter() {
                let flat: Vec<f64> = gram_b.iter().flatten().cloned().collect();
                let alpha = mixing_weights(&flat, n, a.lambda).unwrap_or_else(|| {
                    let mut w = vec![0.0; n];
                    w[newest] = 1.0;
                    w
                });
                weights.extend(alpha);
            }
            let alpha = Tensor::from_vec(weights, (b, 1, n), z0.device())?.to_dtype(z0.dtype())?;
            let fstack = Tensor::stack(&fs, 1)?; // (B, n, D)
            let mixed_f = alpha.matmul(&fstack)?.squeeze(1)?;
            if a.beta == 1.0 {
                mixed_f
            } else {
                let xstack = Tensor::stack(&xs, 1)?;
                let mixed_x = alpha.matmul(&xstack)?.squeeze(1)?;
                ((mixed_f * a.beta)? + (mixed_x * (1.0 - a.beta))?)?
            }
        };
        let prev = xs.last().expect("history").clone();
        let mask = tracker.active_mask(&prev)?;
        let x_next = (&prev + (x_next - &prev)?.broadcast_mul(&mask)?)?;
        let fx = tracker.evaluate(f, &x_next)?;
        tracker.record(&x_next, &(&fx - &x_next)?, &fx)?;
        if xs.len() == m {
            newest = k % m;
            xs[newest] = x_next;
            fs[newest] = fx;
        } else {
            newest = xs.len();
            xs.push(x_next);
            fs.push(fx);
        }
        k += 1;
    }
    Ok(tracker.finish())
}
