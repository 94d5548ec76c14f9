//! Jacobian diagnostics on linear maps with known spectra, and the finite-difference Jacobian
//! penalty on a tanh map with an analytic Jacobian.

use candle_core::Var;
use candle_core::{DType, Device, Tensor};
use mdeq_deq::jacobian::{
    frobenius_sq_finite_difference, frobenius_sq_hutchinson, gaussian_probes, spectral_radius,
};
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

fn power_iteration_finds_the_dominant_eigenvalue() -> mdeq_testkit::Result {
    let lambda = [-2.5, 0.9, 0.3, -0.2, 0.1];
    let mut vjp = linear_vjp(lambda);
    let v0 = Tensor::ones((2, D), DType::F64, &Device::Cpu)?;
    let rho = spectral_radius(&mut vjp, &v0, 150)?;
    for r in rho {
        assert!((r - 2.5).abs() < 1e-6, "{r}");
    }
    Ok(())
}

/// A dominant complex pair: J = blockdiag(ρ·R(θ), 0.3, −0.2, 0.1) with R a rotation, whose
/// eigenvalues ρe^{±iθ} have modulus ρ. The official Rayleigh quotient |⟨vJ, v⟩| / ⟨v, v⟩
/// reads ρ|cos θ| here; the power iteration's growth must read ρ.
fn power_iteration_finds_the_modulus_of_a_complex_pair() -> mdeq_testkit::Result {
    let (rho, theta) = (0.8f64, 1.1f64);
    let mut j = vec![0.0; D * D];
    j[0] = rho * theta.cos();
    j[1] = -rho * theta.sin();
    j[D] = rho * theta.sin();
    j[D + 1] = rho * theta.cos();
    for (k, l) in [(2, 0.3), (3, -0.2), (4, 0.1)] {
        j[k * D + k] = l;
    }
    let jt = Tensor::from_vec(j, (D, D), &Device::Cpu)?;
    let mut vjp = |v: &Tensor| v.matmul(&jt);
    let v0 = Tensor::ones((1, D), DType::F64, &Device::Cpu)?;
    let estimate = spectral_radius(&mut vjp, &v0, 200)?[0];
    assert!((estimate - rho).abs() < 1e-9, "{estimate} vs ρ = {rho}");
    Ok(())
}

fn hutchinson_estimates_the_frobenius_norm_and_converges() -> mdeq_testkit::Result {
    let lambda = [1.5, -1.0, 0.5, 0.25, 2.0];
    // ‖J‖²_F = Σ λ² (J is orthogonally similar to diag(λ)), per sample; the estimator divides by B·D.
    let exact = lambda.iter().map(|l| l * l).sum::<f64>() / D as f64;
    let like = Tensor::zeros((4, D), DType::F64, &Device::Cpu)?;
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
    Ok(())
}

/// f(z) = tanh(z W + c) with W a trainable (D, D) matrix, row-vector convention.
fn tanh_map(w: &Var) -> impl FnMut(&Tensor) -> candle_core::Result<Tensor> + '_ {
    let c = Tensor::new(&[0.1f64, -0.2, 0.3, 0.0, -0.1], &Device::Cpu).unwrap();
    move |z: &Tensor| z.matmul(w.as_tensor())?.broadcast_add(&c)?.tanh()
}

fn tanh_setup() -> (Var, Tensor) {
    let w: Vec<f64> = (0..D * D)
        .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.15)
        .collect();
    let z: Vec<f64> = (0..3 * D)
        .map(|i| ((i * 13 % 7) as f64 - 3.0) * 0.3)
        .collect();
    (
        Var::from_tensor(&Tensor::from_vec(w, (D, D), &Device::Cpu).unwrap()).unwrap(),
        Tensor::from_vec(z, (3, D), &Device::Cpu).unwrap(),
    )
}

fn finite_difference_penalty_estimates_the_frobenius_norm() -> mdeq_testkit::Result {
    let (w, z) = tanh_setup();
    // Exact: ∂f_i/∂z_j = (1 − t_i²) W_ji, so ‖J_b‖²_F = Σ_i (1 − t_i²)² Σ_j W_ji².
    let t = tanh_map(&w)(&z)?.to_vec2::<f64>()?;
    let wv = w.as_tensor().to_vec2::<f64>()?;
    let col_sq: Vec<f64> = (0..D)
        .map(|i| (0..D).map(|j| wv[j][i] * wv[j][i]).sum())
        .collect();
    let exact: f64 = t
        .iter()
        .map(|row| {
            (0..D)
                .map(|i| (1.0 - row[i] * row[i]).powi(2) * col_sq[i])
                .sum::<f64>()
        })
        .sum::<f64>()
        / (3 * D) as f64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut f = tanh_map(&w);
    let probes = gaussian_probes(&mut rng, 2000, z.dims2()?, z.device())?;
    let est = frobenius_sq_finite_difference(&mut f, &z, &probes, 1e-4)?.to_scalar::<f64>()?;
    assert!((est - exact).abs() / exact < 0.03, "{est} vs exact {exact}");
    Ok(())
}

fn finite_difference_penalty_trains_the_parameters() -> mdeq_testkit::Result {
    let (w, z) = tanh_setup();
    // With fixed probes (same seed) the penalty is a smooth function of W: its backprop gradient
    // must match central differences in W.
    let penalty = |w: &Var| -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut f = tanh_map(w);
        let probes = gaussian_probes(&mut rng, 2, z.dims2().unwrap(), z.device()).unwrap();
        frobenius_sq_finite_difference(&mut f, &z, &probes, 1e-4).unwrap()
    };
    let grads = penalty(&w).backward()?;
    let g = grads.get(w.as_tensor()).unwrap().to_vec2::<f64>()?;
    let base = w.as_tensor().to_vec2::<f64>()?;
    for (r, c) in [(0, 0), (1, 3), (4, 2), (2, 4)] {
        let at = |delta: f64| {
            let mut m = base.clone();
            m[r][c] += delta;
            let flat: Vec<f64> = m.concat();
            let v =
                Var::from_tensor(&Tensor::from_vec(flat, (D, D), &Device::Cpu).unwrap()).unwrap();
            penalty(&v).to_scalar::<f64>().unwrap()
        };
        let fd = (at(1e-5) - at(-1e-5)) / 2e-5;
        assert!(
            (g[r][c] - fd).abs() <= 1e-6 * fd.abs().max(1e-3),
            "W[{r}][{c}]: {} vs {fd}",
            g[r][c]
        );
    }
    Ok(())
}

mdeq_testkit::on_every_kernel!(
    power_iteration_finds_the_dominant_eigenvalue,
    power_iteration_finds_the_modulus_of_a_complex_pair,
    hutchinson_estimates_the_frobenius_norm_and_converges,
    finite_difference_penalty_estimates_the_frobenius_norm,
    finite_difference_penalty_trains_the_parameters,
);
