//! The `[deq]` section: solvers, thresholds and the backward mode (reference §3–4).

use mdeq_deq::{BackwardMode, Coupling, SolverKind, SolverOptions, StopMode};
use mdeq_model::equilibrium::DeqRuntime;
use serde::{Deserialize, Serialize};

/// The largest step limit a config may ask for: far above any official threshold (≤ 30) or
/// parity solve (100), low enough that a typo cannot run a solve for hours.
pub const MAX_THRESHOLD: usize = 10_000;

/// Equilibrium settings of an experiment. Missing keys take [`DeqConfig::default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeqConfig {
    /// Forward solver: a name (`broyden`, `anderson`, `fixed_point`) or a table with `kind` and
    /// its parameters, e.g. `{ kind = "broyden", max_pairs = 8, max_history_bytes = 1e8 }`.
    pub f_solver: SolverKind,
    /// Backward solver, as `f_solver`.
    pub b_solver: SolverKind,
    /// Forward solver step limit (F_THRES).
    pub f_thres: usize,
    /// Backward solver step limit (B_THRES).
    pub b_thres: usize,
    /// Stopping criterion.
    pub stop_mode: StopMode,
    /// Solver tolerance (the official code uses 1e-3 in both directions).
    pub eps: f64,
    /// Optimizer steps spent in unrolled pretraining before DEQ mode.
    pub pretrain_steps: usize,
    /// On steps that compute the Jacobian loss, the forward limit is F_THRES + δ with δ uniform
    /// in [−d, d − 1] (reference §4.3); 0 turns the jitter off.
    pub rand_f_thres_delta: usize,
    /// Per-sample norms with freezing, or the official whole-batch norms.
    pub coupling: Coupling,
    /// How gradients reach the parameters in DEQ mode.
    pub backward: BackwardMode,
    /// Solvers tried, in order, on samples the forward solver left unconverged.
    pub fallback: Vec<SolverKind>,
    /// With per-sample coupling, evaluate f only on the samples not yet converged (off evaluates
    /// the whole batch at every step, for comparison).
    pub compact_batch: bool,
}

impl Default for DeqConfig {
    /// The official code's defaults (yacs `DEQ.*`), per-sample coupling with compaction, IFT,
    /// no pretraining and no threshold jitter.
    fn default() -> Self {
        Self {
            f_solver: SolverKind::BROYDEN,
            b_solver: SolverKind::BROYDEN,
            f_thres: 30,
            b_thres: 40,
            stop_mode: StopMode::Abs,
            eps: 1e-3,
            pretrain_steps: 0,
            rand_f_thres_delta: 0,
            coupling: Coupling::PerSample,
            backward: BackwardMode::Ift,
            fallback: Vec::new(),
            compact_batch: true,
        }
    }
}

impl DeqConfig {
    /// Checks every setting; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!(
                "deq.eps = {} must be finite and positive",
                self.eps
            ));
        }
        for (key, value) in [("f_thres", self.f_thres), ("b_thres", self.b_thres)] {
            if !(1..=MAX_THRESHOLD).contains(&value) {
                return Err(format!(
                    "deq.{key} = {value} must be in 1..={MAX_THRESHOLD}"
                ));
            }
        }
        if self.rand_f_thres_delta >= self.f_thres {
            return Err(format!(
                "deq.rand_f_thres_delta = {} must be below deq.f_thres = {}",
                self.rand_f_thres_delta, self.f_thres
            ));
        }
        if let BackwardMode::Phantom { k, tau } = self.backward {
            if k == 0 || !(tau > 0.0 && tau <= 1.0) {
                return Err(format!(
                    "deq.backward: phantom needs k ≥ 1 and tau in (0, 1], found k = {k}, tau = {tau}"
                ));
            }
        }
        let solvers = [("f_solver", &self.f_solver), ("b_solver", &self.b_solver)]
            .into_iter()
            .chain(self.fallback.iter().map(|s| ("fallback", s)));
        for (key, solver) in solvers {
            solver.validate().map_err(|m| format!("deq.{key}: {m}"))?;
        }
        Ok(())
    }

    /// The solver settings the model runs with.
    pub fn runtime(&self) -> DeqRuntime {
        let options = |threshold| SolverOptions {
            threshold,
            eps: self.eps,
            stop_mode: self.stop_mode,
            coupling: self.coupling,
            compact_batch: self.compact_batch,
        };
        DeqRuntime {
            forward_chain: std::iter::once(&self.f_solver)
                .chain(&self.fallback)
                .cloned()
                .collect(),
            backward_solver: self.b_solver.clone(),
            forward: options(self.f_thres),
            backward: options(self.b_thres),
            mode: self.backward.clone(),
        }
    }
}
