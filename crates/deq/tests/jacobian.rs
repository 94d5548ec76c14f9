//! Jacobian diagnostics on linear maps with known spectra.

use candle_core::{DType, Device, Tensor};
use mdeq_deq::jacobian::{frobenius_sq_hutchinson, spectral_radius};
use rand::SeedableRng;

const D: usize = 5;

/// vJ for J = Q diag(λ) Qᵀ with a fixed orthogonal Q (a Householder reflection).
fn linear_vjp(lambda: [f64; D]) -> impl FnMut(&Tensor) -> candle_core::Result<Tensor> {
    let u: Vec<f64> = (0..D).map(|i| (i as f64 + 1.0).sqrt()).collect();
    let n2: f64 = u.iter().map(|x| x * x).sum();
    let mut j = vec![0.0; D * D];
    for r in 0..D {
        for c in 0..D {
            let q = |a: usize, b: usize| (if a == b { 1.0 } else { 0.0 }) - 2.0 * u[a] * u[b] / n2;
            j[r * D + c] = lambda
                .iter()
                .enumerate()
                .map(|(k, l)| q(r, k) * l * q(c, k))
                .sum();
        }
    }
    let jt = Tensor::from_vec(j, (D, D), &Device::Cpu).unwrap();
    move |v: &Tensor| v.matmul(&jt)
}

#[test]
fn power_iteration_finds_the_dominant_eigenvalue() {
    let lambda = [-2.5, 0.9, 0.3, -0.2, 0.1];
    let mut vjp = linear_vjp(lambda);
    let v0 = Tensor::ones((2, D), DType::F64, &Device::Cpu).unwrap();
    let rho = spectral_radius(&mut vjp, &v0, 150).unwrap();
    for r in rho {
        assert!((r - 2.5).abs() < 1e-6, "{r}");
    }
}

#[test]
fn hutchinson_estimates_the_frobenius_norm_and_converges() {
    let lambda = [1.5, -1.0, 0.5, 0.25, 2.0];
    // ‖J‖²_F = Σ λ² (J is orthogonally similar to diag(λ)), per sample; the estimator divides by B·D.
    let exact = lambda.iter().map(|l| l * l).sum::<f64>() / D as f64;
    let like = Tensor::zeros((4, D), DType::F64, &Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut vjp = linear_vjp(lambda);
    let err_with =
        |probes: usize,
         rng: &mut rand::rngs::StdRng,
         vjp: &mut dyn FnMut(&Tensor) -> candle_core::Result<Tensor>| {
            let trials = 20;
            let mse: f64 = (0..trials)
                .map(|_| {
                    (frobenius_sq_hutchinson(vjp, &like, probes, rng)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                        - exact)
                        .powi(2)
                })
                .sum::<f64>()
                / trials as f64;
            mse.sqrt() / exact
        };
    let few = err_with(2, &mut rng, &mut vjp);
    let many = err_with(200, &mut rng, &mut vjp);
    assert!(many < 0.05, "relative RMS error with 200 probes: {many}");
    assert!(
        many < few / 3.0,
        "error should shrink like 1/sqrt(probes): {few} -> {many}"
    );
}
