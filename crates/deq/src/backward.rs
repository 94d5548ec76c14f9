//! Backward modes for a DEQ: implicit differentiation and its cheaper alternatives.
//!
//! With out = f(z*) computed once with the graph recorded and gbar = ∂L/∂out arriving from
//! the loss, the implicit (IFT) mode replaces gbar by the solution y of y = y J + gbar, J = ∂f/∂z
//! at z* (reference §4.4); the caller then backpropagates y through the same one application of f to
//! the parameters and the injection. Everything here works on (B, D) tensors and closures.

use crate::solver::{FixedPointMap, Solution, SolverKind, SolverOptions};
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// How gradients reach the parameters (one config switch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackwardMode {
    /// Implicit differentiation: solve y = yJ + gbar.
    Ift,
    /// Phantom gradient (Geng et al. 2021): k damped steps y ← τ(yJ) + (1−τ)y + τ gbar.
    Phantom {
        /// Unrolled steps.
        k: usize,
        /// Damping.
        tau: f64,
    },
    /// Jacobian-free (one-step) gradient: y = gbar.
    Jfb,
}

/// A vector–Jacobian product y ↦ y J through one recorded graph of f at z*.
///
/// Built from `out = f(z)` where `z` is a [`Var`]; each call back-propagates sum(out ⊙ y) to `z`
/// only, so the graph is recorded once and reused for every product. Build `out` from detached
/// parameters so that no parameter gradient is computed inside the solve.
pub struct GraphVjp {
    z: Var,
    out: Tensor,
    /// Products taken so far.
    pub calls: usize,
}

impl GraphVjp {
    /// Wraps the recorded `out = f(z)`.
    pub fn new(z: Var, out: Tensor) -> Self {
        Self { z, out, calls: 0 }
    }

    /// y J.
    pub fn vjp(&mut self, y: &Tensor) -> Result<Tensor> {
        self.calls += 1;
        let grads = (&self.out * y)?.sum_all()?.backward()?;
        match grads.get(self.z.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => self.z.as_tensor().zeros_like(),
        }
    }
}

/// Replaces `gbar` by the gradient the backward mode prescribes, using `vjp` for y ↦ yJ.
pub fn adjoint(
    mode: &BackwardMode,
    vjp: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    gbar: &Tensor,
    solver: &SolverKind,
    opts: &SolverOptions,
) -> Result<(Tensor, Option<Solution>)> {
    match *mode {
        BackwardMode::Jfb => Ok((gbar.clone(), None)),
        BackwardMode::Phantom { k, tau } => {
            let mut y = gbar.clone();
            for _ in 0..k {
                let step = (vjp(&y)? + gbar)?;
                y = ((step * tau)? + (&y * (1.0 - tau))?)?;
            }
            Ok((y, None))
        }
        BackwardMode::Ift => {
            let mut map = |y: &Tensor| -> Result<Tensor> { vjp(y)? + gbar };
            let map: &mut dyn FixedPointMap = &mut map;
            let sol = solver.solve(map, &gbar.zeros_like()?, opts)?;
            Ok((sol.z.clone(), Some(sol)))
        }
    }
}
