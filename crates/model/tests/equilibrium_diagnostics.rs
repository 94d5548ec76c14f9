//! `spectral_radius_at` (what `mdeq eval --diagnose` reports) against the spectral radius of
//! the dense Jacobian at the same equilibrium, built column by column from float64 central
//! differences of the cell — independently of the VJP tape and of the engine's power iteration.

use candle_core::{DType, Device, Tensor};
use mdeq_deq::FixedPointMap;
use mdeq_model::cell::solver_map::CellMap;
use mdeq_model::equilibrium::{eval_forward, spectral_radius_at};
use mdeq_model::Mdeq;
use mdeq_testkit::{tiny_classifier, wave_values};

/// ρ(J) of a dense row-major (d, d) matrix as lim ‖Jᵏv‖^{1/k}, taken as the growth over the
/// second half of `steps` normalised products, which converges for a complex dominant pair too.
fn dense_spectral_radius(j: &[f64], d: usize, steps: usize) -> f64 {
    let mut v: Vec<f64> = (0..d).map(|i| 1.0 + (i as f64 * 0.77).sin()).collect();
    let mut log_growth = 0.0;
    for step in 0..steps {
        let w: Vec<f64> = (0..d)
            .map(|r| (0..d).map(|c| j[r * d + c] * v[c]).sum())
            .collect();
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        let before = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if step >= steps / 2 {
            log_growth += (norm / before).ln();
        }
        v = w.iter().map(|x| x / norm).collect();
    }
    (log_growth / (steps - steps / 2) as f64).exp()
}

fn spectral_radius_matches_the_dense_jacobian_of_central_differences() -> mdeq_testkit::Result {
    let cfg = tiny_classifier(&[4, 4]);
    let dev = Device::Cpu;
    let model = Mdeq::new(&cfg.model, DType::F64, &dev, 7)?;
    let batch = 2;
    let image = Tensor::from_vec(wave_values(batch * 64, 0.41, 0.3), (batch, 1, 8, 8), &dev)?;
    let mut deq = cfg.deq.clone();
    deq.f_thres = 40;
    deq.eps = 1e-9;
    let (_, z, _) = eval_forward(&model, &image, &deq.runtime())?;
    let ours = spectral_radius_at(&model, &image, &z, 300, 1)?;

    // J[:, c] = (f(z + h e_c) − f(z − h e_c)) / 2h, every sample perturbed at once (the eval
    // cell treats samples independently).
    let layout = model.layout(8, 8);
    let injection = model.injection(&image, false)?;
    let cell = model.cell().prepared(true)?;
    let masks = vec![None; layout.branches.len()];
    let mut f = CellMap {
        cell: &cell,
        injection: &injection,
        masks: &masks,
        layout: &layout,
    };
    let zf = layout.flatten(&z)?;
    let d = layout.size();
    let h = 1e-5;
    let mut jac = vec![vec![0.0; d * d]; batch];
    for c in 0..d {
        let mut e = vec![0.0; batch * d];
        for b in 0..batch {
            e[b * d + c] = h;
        }
        let e = Tensor::from_vec(e, (batch, d), &dev)?;
        let plus = f.apply(&(&zf + &e)?)?.to_vec2::<f64>()?;
        let minus = f.apply(&(&zf - &e)?)?.to_vec2::<f64>()?;
        for b in 0..batch {
            for r in 0..d {
                jac[b][r * d + c] = (plus[b][r] - minus[b][r]) / (2.0 * h);
            }
        }
    }
    for b in 0..batch {
        let reference = dense_spectral_radius(&jac[b], d, 2000);
        assert!(
            reference > 0.05,
            "sample {b}: a degenerate test, ρ = {reference}"
        );
        assert!(
            (ours[b] - reference).abs() <= 1e-2 * reference,
            "sample {b}: power iteration {} vs dense central differences {reference}",
            ours[b]
        );
    }
    Ok(())
}

mdeq_testkit::on_every_kernel!(spectral_radius_matches_the_dense_jacobian_of_central_differences);
