//! Order statistics of a sample of values, for the diagnostics of an evaluation.

use serde::Serialize;

/// Summary of a sample of values: the order statistics a reader checks first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distribution {
    /// Finite values summarised.
    pub count: usize,
    /// Values that were NaN or infinite (left out of the rest).
    pub non_finite: usize,
    /// Mean of the finite values.
    pub mean: f64,
    /// Smallest.
    pub min: f64,
    /// Median (nearest rank).
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Fraction of the finite values below `threshold`.
    pub below: f64,
    /// The threshold of `below`: for residuals the solver's tolerance (1e-2 when it bounds the
    /// absolute residual instead), for spectral radii 1.
    pub threshold: f64,
}

impl Distribution {
    /// Summarises `values`; NaN statistics when none is finite.
    pub fn of(values: &[f64], threshold: f64) -> Self {
        let mut finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        finite.sort_by(f64::total_cmp);
        let n = finite.len();
        // Nearest rank: the smallest value with at least q·n values at or below it.
        let rank = |q: f64| {
            finite
                .get(((q * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1)
                .copied()
                .unwrap_or(f64::NAN)
        };
        let mean = if n == 0 {
            f64::NAN
        } else {
            finite.iter().sum::<f64>() / n as f64
        };
        Self {
            count: n,
            non_finite: values.len() - n,
            mean,
            min: finite.first().copied().unwrap_or(f64::NAN),
            median: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: finite.last().copied().unwrap_or(f64::NAN),
            below: finite.iter().filter(|&&v| v < threshold).count() as f64 / n.max(1) as f64,
            threshold,
        }
    }

    /// One line for humans.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "mean {:.3e}, min {:.3e}, median {:.3e}, p90 {:.3e}, p99 {:.3e}, max {:.3e}; \
             {:.1}% below {:e}",
            self.mean,
            self.min,
            self.median,
            self.p90,
            self.p99,
            self.max,
            100.0 * self.below,
            self.threshold
        );
        if self.non_finite > 0 {
            line += &format!("; {} not finite", self.non_finite);
        }
        line
    }
}
