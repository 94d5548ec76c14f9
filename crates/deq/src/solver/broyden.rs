//! Limited-memory "good" Broyden, as the official `lib/solvers.py` (reference §3.2).
//!
//! The inverse Jacobian of g(z) = f(z) − z is estimated per sample as M = −I + Σ_k u_k v_kᵀ; the
//! first step is therefore plain iteration z₁ = f(z₀). The history is capped by a number of pairs
//! and/or bytes (the official code keeps all 2·B·D·T floats); the oldest pairs go first.

use super::residual::ResidualTracker;
use super::{FixedPointMap, Solution, SolverOptions};
use candle_core::{Result, Tensor};
use mdeq_kernels::{low_rank_apply, low_rank_apply_many};
use std::collections::VecDeque;

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

/// Per-sample dot products of (B, D) tensors, shaped (B, 1).
fn dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a * b)?.sum_keepdim(1)
}

/// Replaces NaN entries by 0 (infinities are left alone, as in the official code).
fn nan_to_zero(t: &Tensor) -> Result<Tensor> {
    let is_num = t.eq(t)?;
    is_num.where_cond(t, &t.zeros_like()?)
}

struct LowRank {
    pairs: VecDeque<(Tensor, Tensor)>,
    cap: usize,
}

impl LowRank {
    fn halves(&self) -> (Vec<&Tensor>, Vec<&Tensor>) {
        self.pairs.iter().map(|(u, v)| (u, v)).unzip()
    }

    /// M x = −x + Σ u_k (v_k · x).
    fn matvec(&self, x: &Tensor) -> Result<Tensor> {
        let (us, vs) = self.halves();
        low_rank_apply(x, &us, &vs)
    }

    /// xᵀ M = −x + Σ (x · u_k) v_k.
    fn rmatvec(&self, x: &Tensor) -> Result<Tensor> {
        let (us, vs) = self.halves();
        low_rank_apply(x, &vs, &us)
    }

    /// M x and M y in one pass over the history.
    fn matvec2(&self, x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let (us, vs) = self.halves();
        let [mx, my]: [Tensor; 2] = low_rank_apply_many(&[x, y], &us, &vs)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("low_rank_apply_many: not two products".into()))?;
        Ok((mx, my))
    }

    /// Appends a pair, dropping the oldest at the cap.
    fn push(&mut self, u: Tensor, v: Tensor) -> Pushed {
        if self.cap == 0 {
            return Pushed::Dropped;
        }
        let evicted = self.pairs.len() == self.cap;
        if evicted {
            self.pairs.pop_front();
        }
        self.pairs.push_back((u, v));
        if evicted {
            Pushed::ReplacedOldest
        } else {
            Pushed::Appended
        }
    }
}

/// What [`LowRank::push`] did to the operator.
enum Pushed {
    /// Added a term: M' x = M x + u ⟨v, x⟩.
    Appended,
    /// Added a term and removed the oldest.
    ReplacedOldest,
    /// No history is kept (cap 0): M unchanged.
    Dropped,
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
    let mut history = LowRank {
        pairs: VecDeque::new(),
        cap,
    };
    let mut tracker = ResidualTracker::new("broyden", z0, opts, 1e-9)?;
    let mut x = z0.clone();
    let mut gx = (tracker.evaluate(f, &x)? - &x)?;
    let mut update = gx.clone();
    while tracker.stats_steps() < opts.threshold {
        let mask = tracker.active_mask(&x)?;
        let x_new = (&x + update.broadcast_mul(&mask)?)?;
        let fx = tracker.evaluate(f, &x_new)?;
        let g_new = (&fx - &x_new)?;
        tracker.record(&x_new, &g_new, &fx)?;
        if tracker.done() {
            break;
        }
        let dx = (&x_new - &x)?;
        let dg = (&g_new - &gx)?;
        let vt = history.rmatvec(&dx)?;
        // M dg and M g_new share one pass over the history; M g_new then only needs the new
        // pair's term to become the next update (unless the oldest pair was dropped).
        let (m_dg, m_g) = history.matvec2(&dg, &g_new)?;
        let u = (&dx - m_dg)?.broadcast_div(&dot(&vt, &dg)?)?;
        let (u, vt) = (nan_to_zero(&u)?, nan_to_zero(&vt)?);
        let m_g_next = match history.push(u.clone(), vt.clone()) {
            Pushed::Appended => (m_g + u.broadcast_mul(&dot(&vt, &g_new)?)?)?,
            Pushed::ReplacedOldest => history.matvec(&g_new)?,
            Pushed::Dropped => m_g,
        };
        update = m_g_next.neg()?;
        x = x_new;
        gx = g_new;
    }
    Ok(tracker.finish())
}
