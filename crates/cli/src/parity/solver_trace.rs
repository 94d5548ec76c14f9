//! Our official-mode solves against the official solver's own step-by-step record: a fixture's
//! `meta.json` keeps the relative and absolute residual after every Broyden step of each solve
//! (`eval_f64.forward_solver.rel_trace`, …), in float64 and float32. z* alone hides how a solver
//! got there; the trace does not.

use super::Status;
use candle_core::DType;
use mdeq_deq::SolverStats;
use serde_json::Value;

/// How closely a trace must be followed in one precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    /// Steps are compared while the official residual is above this; below it both solvers are
    /// in rounding noise, where the traces legitimately part.
    pub above: f64,
    /// Relative agreement required above it.
    pub rtol: f64,
}

impl Agreement {
    /// float64: the cls-tiny traces agree to 1e-15 at the first step and ~3e-7 near 1e-9.
    /// float32: ~1e-6 at the first steps, ~3e-4 near 1e-4 (the fixture README: "about 3 digits
    /// until float32 reaches its floor").
    pub fn for_dtype(dtype: DType) -> Self {
        if dtype == DType::F64 {
            Self {
                above: 1e-9,
                rtol: 1e-5,
            }
        } else {
            Self {
                above: 1e-4,
                rtol: 1e-3,
            }
        }
    }
}

/// One solve's residual trace against the official one.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceCheck {
    /// Which solve, e.g. `eval_f64.forward_solver`.
    pub name: String,
    /// Steps compared (official residual above the agreement's floor).
    pub compared_steps: usize,
    /// Largest relative difference of the relative or absolute residual over those steps.
    pub max_rel_diff: f64,
    /// The agreement required.
    pub agreement: Agreement,
    /// Our and the official step of the lowest residual, when we ran the official settings and
    /// the official solve converged below its eps (otherwise the lowest step lies in rounding
    /// noise and is not compared).
    pub stop_steps: Option<(usize, usize)>,
    /// Pass when every compared step agrees, at least two were compared, and the stop steps
    /// (where compared) are equal.
    pub status: Status,
}

/// Compares `ours`, solved with `settings` (threshold, eps), with `official` (a `*_solver`
/// object of meta.json). Official mode gives every sample the batch norm, so sample 0's trace is
/// the batch's. None when `official` holds no traces.
pub fn check_trace(
    name: &str,
    ours: &SolverStats,
    settings: (usize, f64),
    official: &Value,
    agreement: Agreement,
) -> Option<TraceCheck> {
    let floats =
        |v: &Value| -> Option<Vec<f64>> { v.as_array()?.iter().map(Value::as_f64).collect() };
    let (rel, abs) = (
        floats(&official["rel_trace"])?,
        floats(&official["abs_trace"])?,
    );
    let mut compared_steps = 0;
    let mut max_rel_diff = 0f64;
    for (k, (r, a)) in rel.iter().zip(&abs).enumerate().take(ours.steps) {
        if *r < agreement.above || *a < agreement.above {
            break;
        }
        let (our_r, our_a) = (ours.rel_trace[k][0], ours.abs_trace[k][0]);
        let diff = ((our_r - r) / r).abs().max(((our_a - a) / a).abs());
        max_rel_diff = max_rel_diff.max(if diff.is_nan() { f64::INFINITY } else { diff });
        compared_steps += 1;
    }
    // Where the lowest residual falls is comparable only for the same settings and a solve
    // that ended by converging (otherwise it lies in rounding noise).
    let same_settings = official["threshold"].as_u64() == Some(settings.0 as u64)
        && official["eps"].as_f64() == Some(settings.1);
    let converged = official["lowest"]
        .as_f64()
        .zip(official["eps"].as_f64())
        .is_some_and(|(lowest, eps)| lowest < eps);
    let stop_steps = match official["nstep"].as_u64() {
        Some(n) if same_settings && converged => {
            Some((ours.lowest_step.iter().copied().max()?, n as usize))
        }
        _ => None,
    };
    let ok = compared_steps >= 2
        && max_rel_diff <= agreement.rtol
        && stop_steps.is_none_or(|(a, b)| a == b);
    Some(TraceCheck {
        name: name.to_string(),
        compared_steps,
        max_rel_diff,
        agreement,
        stop_steps,
        status: if ok { Status::Pass } else { Status::Fail },
    })
}

impl TraceCheck {
    /// One line for the parity report.
    pub fn describe(&self) -> String {
        let stop = match self.stop_steps {
            Some((ours, official)) => {
                format!("; lowest residual at step {ours} (official {official})")
            }
            None => String::new(),
        };
        let status = if self.status == Status::Pass {
            "PASS"
        } else {
            "FAIL"
        };
        format!(
            "solver trace {}: {} steps above {:.0e} compared, largest difference {:.1e} (allowed {:.0e}){stop}  {status}",
            self.name, self.compared_steps, self.agreement.above, self.max_rel_diff, self.agreement.rtol
        )
    }
}
