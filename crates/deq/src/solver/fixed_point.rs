//! Damped fixed-point iteration z ← τ f(z) + (1 − τ) z (torchdeq's naive solver, reference §3.5).

use super::residual::ResidualTracker;
use super::{FixedPointMap, Solution, SolverOptions};
use candle_core::{Result, Tensor};

/// Default damping (plain iteration).
pub fn default_tau() -> f64 {
    1.0
}

/// Solves z = f(z) from `z0`; the kept candidate is the damped update of the lowest residual.
pub fn solve(
    f: &mut dyn FixedPointMap,
    z0: &Tensor,
    opts: &SolverOptions,
    tau: f64,
) -> Result<Solution> {
    let mut tracker = ResidualTracker::new("fixed_point", z0, opts, 1e-9)?;
    let mut x = z0.clone();
    while tracker.stats_steps() < opts.threshold {
        let fx = tracker.evaluate(f, &x)?;
        let next = if tau == 1.0 {
            fx.clone()
        } else {
            ((&fx * tau)? + (&x * (1.0 - tau))?)?
        };
        tracker.record(&next, &(&fx - &x)?, &fx)?;
        if tracker.done() {
            break;
        }
        let mask = tracker.active_mask(&x)?;
        x = (&x + (next - &x)?.broadcast_mul(&mask)?)?;
    }
    Ok(tracker.finish())
}
