//! Root finders for z = f(z) over a batched state (B, D).
//!
//! Every solver returns the lowest-residual iterate per sample with per-sample diagnostics. Norms
//! are either per sample (the default: a sample's answer does not depend on the rest of the batch;
//! converged samples are frozen) or [`Coupling::Official`], which reproduces the official code's
//! whole-batch norms, stop rules and iterate choice exactly.

pub mod anderson;
pub mod broyden;
mod compaction;
pub mod fixed_point;
mod kind;
mod residual;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

pub use kind::SolverKind;
pub use residual::ResidualTracker;

/// A map whose fixed point is sought; the state is (B, D).
pub trait FixedPointMap {
    /// Evaluates f(z).
    fn apply(&mut self, z: &Tensor) -> Result<Tensor>;

    /// Evaluates f on some samples only: `z_rows` holds the rows `rows` (a u32 index, ascending)
    /// of the state. Maps whose samples do not interact implement this so that converged,
    /// frozen samples cost nothing; `None` (the default) says the map cannot be restricted and
    /// the whole batch is evaluated instead.
    fn apply_rows(&mut self, z_rows: &Tensor, rows: &Tensor) -> Result<Option<Tensor>> {
        let _ = (z_rows, rows);
        Ok(None)
    }
}

impl<F: FnMut(&Tensor) -> Result<Tensor>> FixedPointMap for F {
    fn apply(&mut self, z: &Tensor) -> Result<Tensor> {
        self(z)
    }
}

/// Which residual the stopping rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// ‖f(z) − z‖.
    Abs,
    /// ‖f(z) − z‖ / ‖f(z)‖.
    Rel,
}

/// How samples of a batch share norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Coupling {
    /// Norms per sample; converged samples are frozen.
    PerSample,
    /// Whole-batch norms, as the official code (for parity).
    Official,
}

/// Settings shared by all solvers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverOptions {
    /// Maximum number of steps (F_THRES / B_THRES).
    pub threshold: usize,
    /// Tolerance of the stop mode's residual.
    pub eps: f64,
    /// Residual the stopping rule reads.
    pub stop_mode: StopMode,
    /// Per-sample or official whole-batch norms.
    pub coupling: Coupling,
    /// Evaluate f on the unconverged samples only, where the map can be restricted to rows
    /// ([`FixedPointMap::apply_rows`]); false evaluates the whole batch every step.
    pub compact_batch: bool,
}

impl SolverOptions {
    /// Official-mode options (whole-batch norms).
    pub fn official(threshold: usize, eps: f64, stop_mode: StopMode) -> Self {
        Self {
            threshold,
            eps,
            stop_mode,
            coupling: Coupling::Official,
            compact_batch: true,
        }
    }
}

/// How a sample's solve ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleStatus {
    /// Residual below eps (or the official stagnation rule fired).
    Converged,
    /// Ran out of steps.
    MaxSteps,
    /// Residual grew past the protective threshold; the best iterate is returned.
    ProtectiveBreak,
    /// NaN or Inf appeared; the best finite iterate is returned.
    Diverged,
}

/// Per-sample diagnostics of one solve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SolverStats {
    /// Solver name.
    pub solver: String,
    /// Evaluations of f.
    pub evaluations: usize,
    /// Samples f was evaluated on, summed over evaluations (below evaluations × B when
    /// converged samples were compacted out of the batch).
    #[serde(default)]
    pub sample_evaluations: usize,
    /// Steps taken (recorded residuals).
    pub steps: usize,
    /// abs residual per step, per sample (step-major).
    pub abs_trace: Vec<Vec<f64>>,
    /// rel residual per step, per sample.
    pub rel_trace: Vec<Vec<f64>>,
    /// Lowest stop-mode residual per sample.
    pub lowest: Vec<f64>,
    /// Step (1-based) of the lowest residual per sample (0: the initial guess).
    pub lowest_step: Vec<usize>,
    /// How each sample's solve ended.
    pub status: Vec<SampleStatus>,
    /// Wall time of the whole solve, in seconds (on a GPU: until its last launch returned).
    #[serde(default)]
    pub seconds: f64,
    /// The part of it spent evaluating the map (f, or the VJP in a backward solve); the rest is
    /// the solver's own algebra and bookkeeping.
    #[serde(default)]
    pub map_seconds: f64,
}

impl SolverStats {
    /// The largest lowest-residual over the batch.
    pub fn worst_lowest(&self) -> f64 {
        self.lowest.iter().cloned().fold(0.0, f64::max)
    }

    /// The relative residual at each step, averaged over the batch (for residual-vs-step plots).
    pub fn mean_rel_trace(&self) -> Vec<f64> {
        self.rel_trace
            .iter()
            .map(|row| row.iter().sum::<f64>() / row.len().max(1) as f64)
            .collect()
    }

    /// The relative residual ‖f(z) − z‖ / ‖f(z)‖ recorded for the iterate returned for each
    /// sample (at the step of its lowest stop-mode residual; fixed-point iteration returns the
    /// image f(x) of the point measured, whose own residual is lower on a contraction); NaN for
    /// a sample whose answer is the initial guess, no step having improved on it, so that a
    /// mean over them shows it.
    pub fn final_rel_residual(&self) -> Vec<f64> {
        self.lowest_step
            .iter()
            .enumerate()
            .map(|(b, &step)| match step {
                0 => f64::NAN,
                s => self.rel_trace[s - 1][b],
            })
            .collect()
    }

    /// True when every sample converged.
    pub fn all_converged(&self) -> bool {
        self.status.iter().all(|s| *s == SampleStatus::Converged)
    }
}

/// A solver's answer: the chosen iterate and its diagnostics.
#[derive(Debug, Clone)]
pub struct Solution {
    /// The lowest-residual iterate per sample, (B, D).
    pub z: Tensor,
    /// Diagnostics.
    pub stats: SolverStats,
}

/// Runs `chain[0]`, then each later solver from the current answer for as long as some sample
/// has not converged, keeping per sample whichever answer has the lower residual.
pub fn solve_with_fallback(
    chain: &[SolverKind],
    f: &mut dyn FixedPointMap,
    z0: &Tensor,
    opts: &SolverOptions,
) -> Result<Solution> {
    let (first, rest) = chain
        .split_first()
        .ok_or_else(|| candle_core::Error::Msg("empty solver chain".into()))?;
    let mut best = first.solve(f, z0, opts)?;
    for next in rest {
        if best.stats.all_converged() {
            break;
        }
        let other = next.solve(f, &best.z, opts)?;
        best = residual::merge_better(best, other)?;
    }
    Ok(best)
}
