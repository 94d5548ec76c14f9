//! Residual bookkeeping shared by the solvers: per-sample or whole-batch norms, traces, the
//! lowest-residual iterate, stop rules, freezing, NaN detection.

use super::compaction;
use super::{
    Coupling, FixedPointMap, SampleStatus, Solution, SolverOptions, SolverStats, StopMode,
};
use candle_core::{DType, Result, Tensor};
use std::time::Instant;

/// Tracks residuals and the best iterate of one solve.
pub struct ResidualTracker {
    opts: SolverOptions,
    rel_floor: f64,
    batch: usize,
    stats: SolverStats,
    best: Tensor,
    /// Samples still being updated.
    active: Vec<bool>,
    first_objective: Option<Vec<f64>>,
    /// f at the previous evaluation (its frozen rows are reused when f is compacted).
    previous_f: Option<Tensor>,
    /// When the solve began.
    started: Instant,
}

impl ResidualTracker {
    /// Starts tracking from the initial guess `z0`; `rel_floor` is the solver's denominator guard
    /// (1e-9 for Broyden, 1e-5 for Anderson, as in the official code).
    pub fn new(solver: &str, z0: &Tensor, opts: &SolverOptions, rel_floor: f64) -> Result<Self> {
        let batch = z0.dim(0)?;
        Ok(Self {
            opts: *opts,
            rel_floor,
            batch,
            stats: SolverStats {
                solver: solver.to_string(),
                evaluations: 0,
                sample_evaluations: 0,
                steps: 0,
                abs_trace: Vec::new(),
                rel_trace: Vec::new(),
                lowest: vec![1e8; batch],
                lowest_step: vec![0; batch],
                status: vec![SampleStatus::MaxSteps; batch],
                seconds: 0.0,
                map_seconds: 0.0,
            },
            best: z0.clone(),
            active: vec![true; batch],
            first_objective: None,
            previous_f: None,
            started: Instant::now(),
        })
    }

    /// f(x), evaluated on the active samples only where the map allows it. The solvers keep
    /// frozen samples where they were when f was last evaluated, so their rows of f are reused.
    pub fn evaluate(&mut self, f: &mut dyn FixedPointMap, x: &Tensor) -> Result<Tensor> {
        let previous = self.previous_f.as_ref().filter(|_| self.opts.compact_batch);
        let t = Instant::now();
        let (fx, rows) = compaction::evaluate(f, x, &self.active, previous)?;
        self.stats.map_seconds += t.elapsed().as_secs_f64();
        self.stats.evaluations += 1;
        self.stats.sample_evaluations += rows;
        self.previous_f = Some(fx.clone());
        Ok(fx)
    }

    /// Samples still being updated.
    pub fn active(&self) -> &[bool] {
        &self.active
    }

    /// True when no sample needs more steps.
    pub fn done(&self) -> bool {
        !self.active.iter().any(|&a| a)
    }

    /// A (B, 1) 0/1 mask of active samples, in `like`'s dtype.
    pub fn active_mask(&self, like: &Tensor) -> Result<Tensor> {
        let v: Vec<f64> = self
            .active
            .iter()
            .map(|&a| if a { 1.0 } else { 0.0 })
            .collect();
        Tensor::from_vec(v, (self.batch, 1), like.device())?.to_dtype(like.dtype())
    }

    /// Records the residual of candidate `x` with `fx = f(x)`; `residual = fx − x` (or the
    /// solver's own residual vector). Updates the best iterate (`candidate`, which is `x` for
    /// Broyden and Anderson and `fx` for fixed-point iteration) and applies the stop rules.
    pub fn record(&mut self, candidate: &Tensor, residual: &Tensor, fx: &Tensor) -> Result<()> {
        let r2 = mdeq_kernels::row_sq_norms(residual)?;
        let f2 = mdeq_kernels::row_sq_norms(fx)?;
        self.record_norms(candidate, &r2, &f2)
    }

    /// [`Self::record`] from the squared row norms of the residual (`r2`) and of f (`f2`).
    pub fn record_norms(&mut self, candidate: &Tensor, r2: &[f64], f2: &[f64]) -> Result<()> {
        self.stats.steps += 1;
        let step = self.stats.steps;
        let (abs, rel): (Vec<f64>, Vec<f64>) = match self.opts.coupling {
            Coupling::PerSample => r2
                .iter()
                .zip(f2)
                .map(|(r, f)| (r.sqrt(), r.sqrt() / (f.sqrt() + self.rel_floor)))
                .unzip(),
            Coupling::Official => {
                let a = r2.iter().sum::<f64>().sqrt();
                let r = a / (f2.iter().sum::<f64>().sqrt() + self.rel_floor);
                (vec![a; self.batch], vec![r; self.batch])
            }
        };
        let obj = match self.opts.stop_mode {
            StopMode::Abs => abs.clone(),
            StopMode::Rel => rel.clone(),
        };
        let first = self
            .first_objective
            .get_or_insert_with(|| obj.clone())
            .clone();
        let mut improved = vec![false; self.batch];
        for b in 0..self.batch {
            if !self.active[b] {
                continue;
            }
            let o = obj[b];
            if !o.is_finite() {
                self.stats.status[b] = SampleStatus::Diverged;
                self.active[b] = false;
                continue;
            }
            if o < self.stats.lowest[b] {
                self.stats.lowest[b] = o;
                self.stats.lowest_step[b] = step;
                improved[b] = true;
            }
            let protect = match self.opts.stop_mode {
                StopMode::Abs => 1e6,
                StopMode::Rel => 1e3,
            };
            if o < self.opts.eps
                || (o < 3.0 * self.opts.eps && step > 30 && stagnated(&self.recent_of(b), o))
            {
                self.stats.status[b] = SampleStatus::Converged;
                self.active[b] = false;
            } else if o > first[b] * protect {
                self.stats.status[b] = SampleStatus::ProtectiveBreak;
                self.active[b] = false;
            }
        }
        self.stats.abs_trace.push(abs);
        self.stats.rel_trace.push(rel);
        if improved.iter().all(|&i| i) {
            // Every sample improved (the common case while a solve descends): no copy at all.
            self.best = candidate.clone();
        } else if improved.iter().any(|&i| i) {
            let mask: Vec<f64> = improved
                .iter()
                .map(|&i| if i { 1.0 } else { 0.0 })
                .collect();
            let mask =
                Tensor::from_vec(mask, (self.batch, 1), candidate.device())?.to_dtype(DType::U8)?;
            let mask = mask.broadcast_as(candidate.shape())?;
            self.best = mask.where_cond(candidate, &self.best)?;
        }
        Ok(())
    }

    /// Sample `b`'s last [`STAGNATION_WINDOW`] − 1 stop objectives before this step, oldest
    /// first: all the stagnation rule reads, so a step costs O(window), not O(steps).
    fn recent_of(&self, b: usize) -> Vec<f64> {
        let trace = match self.opts.stop_mode {
            StopMode::Abs => &self.stats.abs_trace,
            StopMode::Rel => &self.stats.rel_trace,
        };
        let from = trace.len().saturating_sub(STAGNATION_WINDOW - 1);
        trace[from..].iter().map(|s| s[b]).collect()
    }

    /// Ends tracking and returns the best iterate with the statistics.
    pub fn finish(mut self) -> Solution {
        self.stats.seconds = self.started.elapsed().as_secs_f64();
        Solution {
            z: self.best,
            stats: self.stats,
        }
    }
}

/// Residuals the official stagnation rule looks at, the newest included.
const STAGNATION_WINDOW: usize = 30;

/// The official stagnation rule: the last [`STAGNATION_WINDOW`] residuals (including the
/// newest) vary by < 1.3×.
fn stagnated(previous: &[f64], newest: f64) -> bool {
    let window = previous
        .iter()
        .rev()
        .take(STAGNATION_WINDOW - 1)
        .chain([&newest]);
    let (count, min, max) = window.fold((0, f64::MAX, f64::MIN), |(n, lo, hi), &v| {
        (n + 1, lo.min(v), hi.max(v))
    });
    count >= STAGNATION_WINDOW && min > 0.0 && max / min < 1.3
}

/// Per sample, keeps the answer with the lower lowest-residual.
pub fn merge_better(a: Solution, b: Solution) -> Result<Solution> {
    let n = a.stats.lowest.len();
    let take_b: Vec<bool> = (0..n)
        .map(|i| b.stats.lowest[i] < a.stats.lowest[i])
        .collect();
    let mask: Vec<u8> = take_b.iter().map(|&t| t as u8).collect();
    let mask = Tensor::from_vec(mask, (n, 1), a.z.device())?.broadcast_as(a.z.shape())?;
    let z = mask.where_cond(&b.z, &a.z)?;
    let mut stats = a.stats.clone();
    stats.solver = format!("{}+{}", a.stats.solver, b.stats.solver);
    stats.evaluations += b.stats.evaluations;
    stats.sample_evaluations += b.stats.sample_evaluations;
    stats.steps += b.stats.steps;
    stats.seconds += b.stats.seconds;
    stats.map_seconds += b.stats.map_seconds;
    stats.abs_trace.extend(b.stats.abs_trace.iter().cloned());
    stats.rel_trace.extend(b.stats.rel_trace.iter().cloned());
    for (i, &take) in take_b.iter().enumerate() {
        if take {
            stats.lowest[i] = b.stats.lowest[i];
            stats.lowest_step[i] = a.stats.steps + b.stats.lowest_step[i];
            stats.status[i] = b.stats.status[i];
        }
    }
    Ok(Solution { z, stats })
}

impl ResidualTracker {
    /// Steps recorded so far.
    pub fn stats_steps(&self) -> usize {
        self.stats.steps
    }
}
