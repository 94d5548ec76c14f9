//! Limited-memory "good" Broyden, as the official `lib/solvers.py` (reference §3.2).
//!
//! The inverse Jacobian of g(z) = f(z) − z is estimated per sample as M = −I + Σ_k u_k v_kᵀ; the
//! first step is therefore plain iteration z₁ = f(z₀). The history is capped by a number of pairs
//! and/or bytes (the official code keeps all 2·B·D·T floats); the oldest pairs go first. The
//! estimate and its update are the kernels' [`BroydenHistory`].

use super::residual::ResidualTracker;
use super::{FixedPointMap, Solution, SolverOptions};
use candle_core::{Result, Tensor};
use mdeq_kernels::{residual_with_norms, BroydenHistory, BroydenStep};

/// Broyden-specific options.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BroydenOptions {
    /// Maximum stored (u, v) pairs; None: the threshold.
    pub max_pairs: Option<usize>,
    /// Maximum bytes of stored pairs; None: [`DEFAULT_MAX_HISTORY_BYTES`].
    pub max_history_bytes: Option<usize>,
}

/// The history's size when no cap is set: 8 GiB, above every official setting (the largest,
/// Cityscapes XL on a full 1024×2048 frame at batch 1, needs 4.7 GB for its 27 pairs), so only
/// runaway thresholds are bounded by it.
pub const DEFAULT_MAX_HISTORY_BYTES: usize = 8 << 30;

/// How many (u, v) pairs a solve of a (batch, dim) state of `element_bytes`-byte floats keeps.
pub fn history_cap(
    batch: usize,
    dim: usize,
    element_bytes: usize,
    threshold: usize,
    bopts: &BroydenOptions,
) -> usize {
    let pair_bytes = 2usize
        .saturating_mul(batch)
        .saturating_mul(dim)
        .saturating_mul(element_bytes)
        .max(1);
    let bytes = bopts.max_history_bytes.unwrap_or(DEFAULT_MAX_HISTORY_BYTES);
    bopts.max_pairs.unwrap_or(threshold).min(bytes / pair_bytes)
}

/// Solves z = f(z) from `z0` (B, D).
pub fn solve(
    f: &mut dyn FixedPointMap,
    z0: &Tensor,
    opts: &SolverOptions,
    bopts: &BroydenOptions,
) -> Result<Solution> {
    let (b, d) = z0.dims2()?;
    let cap = history_cap(b, d, z0.dtype().size_in_bytes(), opts.threshold, bopts);
    let mut history = BroydenHistory::new(z0, cap)?;
    let mut tracker = ResidualTracker::new("broyden", z0, opts, 1e-9)?;
    let mut x = z0.clone();
    let mut gx = (tracker.evaluate(f, &x)? - &x)?;
    // The first step is plain iteration (M = −I): x₁ = x₀ + g₀.
    let mut x_new = (&x + gx.broadcast_mul(&tracker.active_mask(&x)?)?)?;
    while tracker.stats_steps() < opts.threshold {
        let fx = tracker.evaluate(f, &x_new)?;
        let (g_new, g2, f2) = residual_with_norms(&fx, &x_new)?;
        tracker.record_norms(&x_new, &g2, &f2)?;
        if tracker.done() || tracker.stats_steps() == opts.threshold {
            break;
        }
        let step = BroydenStep {
            x: &x,
            x_new: &x_new,
            g: &gx,
            g_new: &g_new,
        };
        let x_next = history.update(step, tracker.active())?;
        x = std::mem::replace(&mut x_new, x_next);
        gx = g_new;
    }
    Ok(tracker.finish())
}
