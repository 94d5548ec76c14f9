//! Is a gradient comparison well posed at this point? The loss behind `grad.*` is only piecewise
//! smooth (ReLUs in the head), so when a pre-activation sits within rounding of a kink, every
//! implementation in that precision lands on either side by chance and its gradients jump. This
//! probe moves the head's input f(z*) by one unit in the last place per element, at random, and
//! counts how often ∂L/∂f(z*) moves by more than a fraction of the gradient tolerance.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use mdeq_model::Mdeq;
use rand::{Rng, SeedableRng};

/// Which f(z*) the probe perturbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Centre {
    /// The reference equilibrium, rounded to our precision.
    Reference,
    /// Our own f(z*).
    Ours,
}

/// How ∂L/∂f(z*) responds to one-ulp perturbations of f(z*).
#[derive(Debug, Clone, PartialEq)]
pub struct GradientConditioning {
    /// Perturbations tried.
    pub trials: usize,
    /// Trials whose relative change of ∂L/∂f(z*) exceeded `threshold`.
    pub flagged: usize,
    /// The relative change counted as a jump.
    pub threshold: f64,
    /// Largest relative change seen.
    pub max_change: f64,
    /// The float type the probe computed in.
    pub dtype: DType,
    /// The point perturbed.
    pub centre: Centre,
}

impl GradientConditioning {
    /// True when some rounding-level perturbation of f(z*) changes the gradient by more than the
    /// threshold: gradients in this precision agree with the reference only by chance.
    pub fn ill_conditioned(&self) -> bool {
        self.flagged > 0
    }

    /// One line for the parity report.
    pub fn describe(&self) -> String {
        let verdict = if self.ill_conditioned() {
            "the loss has a kink within rounding of f(z*): grad.* can agree with the \
             reference only by chance in this precision"
        } else {
            "grad.* is well posed in this precision"
        };
        let centre = match self.centre {
            Centre::Reference => "the reference f(z*)",
            Centre::Ours => "our f(z*)",
        };
        format!(
            "gradient conditioning ({:?}): {} of {} random ±1-ulp perturbations of {centre} move \
             dL/df(z*) by more than {:.0e} (largest {:.1e}); {verdict}",
            self.dtype, self.flagged, self.trials, self.threshold, self.max_change
        )
    }
}

/// Runs the head (train mode, as the training output sees it) and the loss on `out` (the point
/// `centre` names) and on `trials` one-ulp perturbations of it. Train-mode BatchNorm updates the
/// running statistics of `model` once per evaluation, so call this after anything that reads them.
pub fn probe_head_gradient(
    model: &Mdeq,
    out: &[Tensor],
    loss_fn: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    centre: Centre,
    trials: usize,
    threshold: f64,
    seed: u64,
) -> Result<GradientConditioning> {
    let grad_at = |z: &[Tensor]| -> Result<Tensor> {
        let leaves = z
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let inputs: Vec<Tensor> = leaves.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = loss_fn(&model.head(&inputs, true)?)?.backward()?;
        let flat = leaves
            .iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_dtype(DType::F64),
                None => v
                    .as_tensor()
                    .flatten_all()?
                    .zeros_like()?
                    .to_dtype(DType::F64),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&flat, 0)?)
    };
    let norm = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
    let base = grad_at(out)?;
    let base_norm = norm(&base)?;
    if base_norm == 0.0 {
        bail!("the loss has zero gradient with respect to f(z*): nothing to probe");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut result = GradientConditioning {
        trials,
        flagged: 0,
        threshold,
        max_change: 0.0,
        dtype: out[0].dtype(),
        centre,
    };
    for _ in 0..trials {
        let moved = out
            .iter()
            .map(|t| perturb_by_one_ulp(t, &mut rng))
            .collect::<Result<Vec<_>>>()?;
        let change = norm(&(grad_at(&moved)? - &base)?)? / base_norm;
        result.max_change = result.max_change.max(change);
        if change > threshold {
            result.flagged += 1;
        }
    }
    Ok(result)
}

/// Moves every element independently down one ulp, up one ulp or not at all (equal odds).
pub fn perturb_by_one_ulp(t: &Tensor, rng: &mut impl Rng) -> Result<Tensor> {
    match t.dtype() {
        DType::F32 => perturb::<f32>(t, rng),
        DType::F64 => perturb::<f64>(t, rng),
        other => bail!("one-ulp perturbation supports float32 and float64, not {other:?}"),
    }
}

/// A float with neighbours one unit in the last place away.
trait Ulp: candle_core::WithDType {
    fn step(self, direction: i8) -> Self;
}

macro_rules! impl_ulp {
    ($($t:ty),*) => {$(
        impl Ulp for $t {
            fn step(self, direction: i8) -> Self {
                match direction {
                    1 => self.next_up(),
                    -1 => self.next_down(),
                    _ => self,
                }
            }
        }
    )*};
}
impl_ulp!(f32, f64);

fn perturb<T: Ulp>(t: &Tensor, rng: &mut impl Rng) -> Result<Tensor> {
    let moved: Vec<T> = t
        .flatten_all()?
        .to_vec1::<T>()?
        .into_iter()
        .map(|x| x.step(rng.gen_range(-1i8..=1)))
        .collect();
    Ok(Tensor::from_vec(moved, t.shape(), t.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn moves_each_element_by_at_most_one_ulp_and_moves_some() -> mdeq_testkit::Result {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let x = Tensor::new(&[1.0f32, -2.5, 0.0, 1e-30, 3.0e5, 7.0], &Device::Cpu)?;
        let y = perturb_by_one_ulp(&x, &mut rng)?;
        let (x, y): (Vec<f32>, Vec<f32>) = (x.to_vec1()?, y.to_vec1()?);
        let mut moved = 0;
        for (a, b) in x.iter().zip(&y) {
            assert!(
                *b == *a || *b == a.next_up() || *b == a.next_down(),
                "{a} -> {b}"
            );
            moved += usize::from(a != b);
        }
        assert!(moved > 0, "{x:?} -> {y:?}");
        let z = Tensor::new(&[1.0f64, -1.0], &Device::Cpu)?;
        let w: Vec<f64> = perturb_by_one_ulp(&z, &mut rng)?.to_vec1()?;
        assert!((w[0] - 1.0).abs() <= f64::EPSILON && (w[1] + 1.0).abs() <= f64::EPSILON);
        let bad = Tensor::new(&[1u8], &Device::Cpu)?;
        let err = perturb_by_one_ulp(&bad, &mut rng).unwrap_err().to_string();
        assert!(err.contains("U8"), "{err}");
        Ok(())
    }
}
