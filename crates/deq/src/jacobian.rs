//! Jacobian diagnostics and regularisation at an equilibrium, from first-order products only.

use crate::solver::FixedPointMap;
use candle_core::{DType, Result, Tensor};
use rand::Rng;

/// Spectral radius of J at z* by power iteration with VJPs, per sample: v ← vJ / ‖vJ‖ for
/// `iterations` steps; returns the geometric mean of the growth ‖vJ‖ / ‖v‖ over the second
/// half of them. The official analysis reads the Rayleigh quotient |⟨vJ, v⟩| / ⟨v, v⟩ instead
/// (reference §4.5), which J at an MDEQ equilibrium, neither symmetric nor with a real
/// dominant eigenvalue in general, can leave far below ρ; the growth converges to ρ whenever
/// the dominant eigenvalues share one modulus, a complex pair included.
pub fn spectral_radius(
    vjp: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    v0: &Tensor,
    iterations: usize,
) -> Result<Vec<f64>> {
    let iterations = iterations.max(2);
    let norms = |v: &Tensor| -> Result<Tensor> { v.sqr()?.sum_keepdim(1)?.sqrt() };
    let mut v = v0.broadcast_div(&norms(v0)?.clamp(1e-30, f64::MAX)?)?;
    let mut log_growth = vec![0.0; v.dim(0)?];
    for step in 0..iterations {
        let w = vjp(&v)?;
        // ‖v‖ = 1 (up to rounding): ‖w‖ is this step's growth.
        let growth = norms(&w)?;
        if step >= iterations / 2 {
            let g = growth
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            for (total, g) in log_growth.iter_mut().zip(g) {
                *total += g.max(1e-300).ln();
            }
        }
        v = w.broadcast_div(&growth.clamp(1e-30, f64::MAX)?)?;
    }
    let counted = (iterations - iterations / 2) as f64;
    Ok(log_growth.iter().map(|t| (t / counted).exp()).collect())
}

/// Hutchinson estimate of ‖J‖²_F / (B·D) with `samples` Gaussian probes: E‖εᵀJ‖² = ‖J‖²_F.
/// `vjp` must be differentiable w.r.t. the parameters for the result to train them.
pub fn frobenius_sq_hutchinson(
    vjp: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    like: &Tensor,
    samples: usize,
    rng: &mut impl Rng,
) -> Result<Tensor> {
    let (b, d) = like.dims2()?;
    let mut total: Option<Tensor> = None;
    for _ in 0..samples.max(1) {
        let eps: Vec<f64> = (0..b * d).map(|_| gaussian(rng)).collect();
        let eps = Tensor::from_vec(eps, (b, d), like.device())?.to_dtype(like.dtype())?;
        let term = vjp(&eps)?.sqr()?.sum_all()?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    total.expect("at least one probe") / (samples.max(1) * b * d) as f64
}

/// Hutchinson estimate of ‖J‖²_F / (B·D) from Jacobian-vector products taken by central finite
/// differences, Jε ≈ (f(z + hε) − f(z − hε)) / 2h, using E‖Jε‖² = ‖J‖²_F, over the Gaussian
/// `probes` (each shaped like z; [`gaussian_probes`] draws them). It needs only first-order
/// gradients, so it trains the parameters of `f` by ordinary backprop through the two
/// evaluations (candle has no double backward for the official vector-Jacobian form). The
/// finite difference is exact for maps linear in z and has an O(h²) bias otherwise. The
/// probes are the caller's so that a batch split over ranks can use its rows of the probes one
/// process would have drawn for the whole batch.
pub fn frobenius_sq_finite_difference(
    f: &mut dyn FixedPointMap,
    z: &Tensor,
    probes: &[Tensor],
    h: f64,
) -> Result<Tensor> {
    let (b, d) = z.dims2()?;
    if probes.is_empty() {
        candle_core::bail!("the Jacobian estimate needs at least one probe");
    }
    let z = z.detach();
    let mut total: Option<Tensor> = None;
    for probe in probes {
        let eps = (probe.to_dtype(z.dtype())? * h)?;
        let jv = ((f.apply(&(&z + &eps)?)? - f.apply(&(&z - &eps)?)?)? / (2.0 * h))?;
        let term = jv.sqr()?.sum_all()?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    total.expect("at least one probe") / (probes.len() * b * d) as f64
}

/// `count` standard Gaussian (rows, cols) tensors drawn from `rng` in row-major order, one
/// probe after the other.
pub fn gaussian_probes(
    rng: &mut impl Rng,
    count: usize,
    (rows, cols): (usize, usize),
    device: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    (0..count)
        .map(|_| {
            let values: Vec<f64> = (0..rows * cols).map(|_| gaussian(rng)).collect();
            Tensor::from_vec(values, (rows, cols), device)
        })
        .collect()
}

fn gaussian(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
