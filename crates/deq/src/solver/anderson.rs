//! Anderson acceleration (reference §3.4) that survives a singular Gram system.
//!
//! The official code solves the bordered system with a plain linear solve and fails when the
//! history becomes rank-deficient (locuslab/deq #20, #26). Here the small system
//! (GGᵀ + λI) α = 1 is solved per sample by Cholesky in f64 with escalating regularisation, and
//! falls back to the newest iterate if it is still not positive definite.

use super::residual::ResidualTracker;
use super::{FixedPointMap, Solution, SolverOptions};
use candle_core::{Result, Tensor};
use mdeq_kernels::{mix_rows, residual_with_norms, row_dots};

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
    // History slots: iterate, f of it, and its residual g = f − x, kept from the evaluation.
    let mut xs: Vec<Tensor> = vec![z0.clone()];
    let f0 = tracker.evaluate(f, z0)?;
    let (g0, g2, f2) = residual_with_norms(&f0, z0)?;
    tracker.record_norms(z0, &g2, &f2)?;
    let mut fs: Vec<Tensor> = vec![f0];
    let mut gs: Vec<Tensor> = vec![g0];
    // Per sample, the Gram matrix ⟨g_i, g_j⟩ of the slots (m × m, float64), updated by the new
    // slot's row and column only.
    let mut gram = vec![vec![0f64; m * m]; b];
    let set_gram_row = |gram: &mut [Vec<f64>], slot: usize, gs: &[Tensor]| -> Result<()> {
        let refs: Vec<&Tensor> = gs.iter().collect();
        for (gb, d) in gram.iter_mut().zip(row_dots(&gs[slot], &refs)?) {
            for (j, v) in d.into_iter().enumerate() {
                gb[slot * m + j] = v;
                gb[j * m + slot] = v;
            }
        }
        Ok(())
    };
    set_gram_row(&mut gram, 0, &gs)?;
    let mut k = 1;
    let mut newest = 0;
    while tracker.stats_steps() < opts.threshold && !tracker.done() {
        // Candidate from the current history.
        let n = xs.len();
        let x_next = if n == 1 {
            fs[0].clone()
        } else {
            let weights: Vec<Vec<f64>> = gram
                .iter()
                .map(|gb| {
                    let sub: Vec<f64> = (0..n * n).map(|ij| gb[(ij / n) * m + ij % n]).collect();
                    mixing_weights(&sub, n, a.lambda).unwrap_or_else(|| {
                        let mut w = vec![0.0; n];
                        w[newest] = 1.0;
                        w
                    })
                })
                .collect();
            let mixed_f = mix_rows(&weights, &fs.iter().collect::<Vec<_>>())?;
            if a.beta == 1.0 {
                mixed_f
            } else {
                let mixed_x = mix_rows(&weights, &xs.iter().collect::<Vec<_>>())?;
                ((mixed_f * a.beta)? + (mixed_x * (1.0 - a.beta))?)?
            }
        };
        let prev = xs.last().expect("history").clone();
        let mask = tracker.active_mask(&prev)?;
        let x_next = (&prev + (x_next - &prev)?.broadcast_mul(&mask)?)?;
        let fx = tracker.evaluate(f, &x_next)?;
        let (gx, g2, f2) = residual_with_norms(&fx, &x_next)?;
        tracker.record_norms(&x_next, &g2, &f2)?;
        if xs.len() == m {
            newest = k % m;
            xs[newest] = x_next;
            fs[newest] = fx;
            gs[newest] = gx;
        } else {
            newest = xs.len();
            xs.push(x_next);
            fs.push(fx);
            gs.push(gx);
        }
        set_gram_row(&mut gram, newest, &gs)?;
        k += 1;
    }
    Ok(tracker.finish())
}
