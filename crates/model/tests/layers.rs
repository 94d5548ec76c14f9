//! Layers against independent references: hand computation and float64 finite differences.

use candle_core::{DType, Device, Tensor, Var};
use mdeq_model::nn::{bilinear_resize, nearest_upsample, BatchNorm2d, GroupNorm};
use mdeq_model::params::ParamBuilder;
use mdeq_model::ParamStore;
use rand::SeedableRng;

fn t(v: Vec<f64>, shape: (usize, usize, usize, usize)) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn nearest_upsample_repeats_pixels() -> mdeq_testkit::Result {
    let x = t(vec![1.0, 2.0, 3.0, 4.0], (1, 1, 2, 2));
    let y = nearest_upsample(&x, 2)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(
        y,
        vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
    );
    Ok(())
}

fn nearest_upsample_gradient_accumulates_with_other_uses_of_its_input() -> mdeq_testkit::Result {
    // L = sum(w ⊙ up(x)) + 3·sum(x): dL/dx = (sum of w over each 2×2 block) + 3.
    let x = Var::from_tensor(&t(vec![0.5, -1.0, 2.0, 0.25], (1, 1, 2, 2)))?;
    let w: Vec<f64> = (0..16).map(|i| i as f64).collect();
    let wt = t(w.clone(), (1, 1, 4, 4));
    let loss = ((nearest_upsample(x.as_tensor(), 2)? * &wt)?.sum_all()?
        + (x.as_tensor() * 3.0)?.sum_all()?)?;
    let g = loss
        .backward()?
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()?
        .to_vec1::<f64>()?;
    let block = |r: usize, c: usize| {
        w[r * 8 + c * 2] + w[r * 8 + c * 2 + 1] + w[r * 8 + 4 + c * 2] + w[r * 8 + 4 + c * 2 + 1]
    };
    let expected = [
        block(0, 0) + 3.0,
        block(0, 1) + 3.0,
        block(1, 0) + 3.0,
        block(1, 1) + 3.0,
    ];
    assert_eq!(g, expected);
    Ok(())
}

fn bilinear_matches_hand_computed_values() -> mdeq_testkit::Result {
    let x = t(vec![0.0, 1.0, 2.0, 3.0], (1, 1, 2, 2));
    // align_corners = true, 2 → 3: the middle sample is the average of its neighbours.
    let y = bilinear_resize(&x, 3, 3, true)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    assert_eq!(y, vec![0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0]);
    // align_corners = false, 2 → 4 along a row [0, 1]: PyTorch gives 0, 0.25, 0.75, 1.
    let row = t(vec![0.0, 1.0], (1, 1, 1, 2));
    let y = bilinear_resize(&row, 1, 4, false)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    assert_eq!(y, vec![0.0, 0.25, 0.75, 1.0]);
    Ok(())
}

fn bilinear_gradient_matches_finite_differences() -> mdeq_testkit::Result {
    for align in [true, false] {
        let base: Vec<f64> = (0..2 * 3 * 5)
            .map(|i| ((i * 13 % 7) as f64 * 0.37).sin())
            .collect();
        let w: Vec<f64> = (0..2 * 7 * 9)
            .map(|i| ((i % 11) as f64 * 0.21).cos())
            .collect();
        let wt = Tensor::from_vec(w, (1, 2, 7, 9), &Device::Cpu)?;
        let loss_of = |x: &Tensor| {
            (bilinear_resize(x, 7, 9, align).unwrap() * &wt)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let x = Var::from_vec(base.clone(), (1, 2, 3, 5), &Device::Cpu)?;
        let g = loss_of(x.as_tensor())
            .backward()?
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f64>()?;
        let h = 1e-6;
        for k in 0..base.len() {
            let eval = |d: f64| {
                let mut v = base.clone();
                v[k] += d;
                loss_of(&Tensor::from_vec(v, (1, 2, 3, 5), &Device::Cpu).unwrap())
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (g[k] - fd).abs() < 1e-7,
                "align {align}, element {k}: {} vs {fd}",
                g[k]
            );
        }
    }
    Ok(())
}

fn group_norm_matches_hand_computation() -> mdeq_testkit::Result {
    // One sample, 4 channels of 1 pixel, 2 groups: each group normalises 2 values.
    let x = t(vec![1.0, 3.0, -2.0, 2.0], (1, 4, 1, 1));
    let gamma = Tensor::new(&[1.0f64, 2.0, 1.0, 0.5], &Device::Cpu)?;
    let beta = Tensor::new(&[0.0f64, 1.0, 0.0, -1.0], &Device::Cpu)?;
    let gn = GroupNorm::from_tensors(2, Some((gamma, beta)));
    let y = gn.forward(&x)?.flatten_all()?.to_vec1::<f64>()?;
    let s1 = 1.0 / (1.0f64 + 1e-5).sqrt(); // group 1: mean 2, var 1
    let s2 = 2.0 / (4.0f64 + 1e-5).sqrt(); // group 2: mean 0, var 4
    let expected = [-s1, 2.0 * s1 + 1.0, -s2, 0.5 * s2 - 1.0];
    for (a, b) in y.iter().zip(expected) {
        assert!((a - b).abs() < 1e-12, "{y:?} vs {expected:?}");
    }
    let non_affine = GroupNorm::from_tensors(2, None).forward(&x.to_dtype(DType::F32)?)?;
    assert_eq!(non_affine.dtype(), DType::F32);
    Ok(())
}

fn train_mode_batch_norm_matches_hand_computation_and_refuses_a_single_value(
) -> mdeq_testkit::Result {
    let mut store = ParamStore::new(DType::F64, &Device::Cpu);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let bn = BatchNorm2d::new(&mut ParamBuilder::new(&mut store, &mut rng), 1, false, 0.1)?;
    // One channel, values 1, 2, 3, 6 over (B = 2, H = 1, W = 2): mean 3, biased variance 3.5.
    let x = t(vec![1.0, 2.0, 3.0, 6.0], (2, 1, 1, 2));
    let y = bn.forward(&x, true)?.flatten_all()?;
    let sd = (3.5f64 + 1e-5).sqrt();
    for (got, v) in y.to_vec1::<f64>()?.iter().zip([1.0, 2.0, 3.0, 6.0]) {
        assert!((got - (v - 3.0) / sd).abs() < 1e-12, "{got}");
    }
    let err = bn.forward(&t(vec![5.0], (1, 1, 1, 1)), true).unwrap_err();
    assert!(
        err.to_string().contains("more than one value per channel"),
        "{err}"
    );
    // Eval mode normalises a single value with the running statistics.
    assert!(bn.forward(&t(vec![5.0], (1, 1, 1, 1)), false).is_ok());
    Ok(())
}

mdeq_testkit::on_every_kernel!(
    nearest_upsample_repeats_pixels,
    nearest_upsample_gradient_accumulates_with_other_uses_of_its_input,
    bilinear_matches_hand_computed_values,
    bilinear_gradient_matches_finite_differences,
    group_norm_matches_hand_computation,
    train_mode_batch_norm_matches_hand_computation_and_refuses_a_single_value,
);
