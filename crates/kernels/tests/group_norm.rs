//! The fused GroupNorm against the composed candle version (forward and every gradient) and
//! float64 finite differences.

use candle_core::{DType, Device, Tensor, Var};
use mdeq_kernels::group_norm::{
    composed, group_norm, group_norm_input_grad, group_norm_input_grad_with_relus, group_norm_relu,
    AdjacentRelus,
};
use mdeq_testkit::{hashed, max_rel, wave};

#[test]
fn fused_matches_composed_forward_and_backward() -> mdeq_testkit::Result {
    // (batch, channels, h, w, groups)
    for &(b, c, h, w, g) in &[
        (1, 4, 3, 5, 2),
        (3, 24, 8, 8, 8),
        (2, 12, 5, 7, 4),
        (2, 6, 1, 1, 3),
        (2, 120, 4, 4, 8),
    ] {
        for (affine, relu) in [(false, false), (true, false), (false, true), (true, true)] {
            for dtype in [DType::F64, DType::F32] {
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                // Hashed values lie on a grid, where an element can equal its group's mean and
                // sit exactly on the ReLU's kink; a small wave moves every element off the grid.
                let shape = [b, c, h, w];
                let x =
                    (hashed(&shape, 1)?.affine(1.6, 0.2)? + (wave(&shape, 0.71, 0.1)? * 0.01)?)?;
                let x = Var::from_tensor(&x.to_dtype(dtype)?)?;
                let gamma = Var::from_tensor(
                    &(hashed(&[c], 2)?.affine(1.6, 0.2)? + 1.0)?.to_dtype(dtype)?,
                )?;
                let beta = Var::from_tensor(&hashed(&[c], 3)?.affine(1.6, 0.2)?.to_dtype(dtype)?)?;
                let aff = affine.then(|| (gamma.as_tensor(), beta.as_tensor()));
                let (ours, reference) = if relu {
                    // x · [x > 0]: derivative 1 above zero and 0 at or below it.
                    let r = composed(x.as_tensor(), g, aff, 1e-5)?;
                    let mask = r.gt(0.0)?.to_dtype(dtype)?;
                    (group_norm_relu(x.as_tensor(), g, aff, 1e-5)?, (r * mask)?)
                } else {
                    (
                        group_norm(x.as_tensor(), g, aff, 1e-5)?,
                        composed(x.as_tensor(), g, aff, 1e-5)?,
                    )
                };
                let case = (b, c, h, w, g, affine, relu, dtype);
                assert!(max_rel(&ours, &reference)? < tol, "forward {case:?}");
                let up = hashed(&[b, c, h, w], 4)?
                    .affine(1.6, 0.2)?
                    .to_dtype(dtype)?;
                let go = (&ours * &up)?.sum_all()?.backward()?;
                let gr = (&reference * &up)?.sum_all()?.backward()?;
                let mut vars = vec![("x", &x)];
                if affine {
                    vars.extend([("gamma", &gamma), ("beta", &beta)]);
                }
                for (name, v) in vars {
                    // A group of two values normalises to ±1 whatever they are, so dx is zero
                    // up to eps and its relative error measures rounding noise alone.
                    if name == "x" && (c / g) * h * w == 2 {
                        continue;
                    }
                    let (a, r) = (
                        go.get(v.as_tensor()).unwrap(),
                        gr.get(v.as_tensor()).unwrap(),
                    );
                    // dx sums to zero per group, so compare against the gradient's own scale.
                    assert!(
                        max_rel(a, r)? < tol * 10.0,
                        "{name} {case:?}: {}",
                        max_rel(a, r)?
                    );
                }
            }
        }
    }
    Ok(())
}

fn input_gradient_matches_finite_differences() -> mdeq_testkit::Result {
    let (b, c, h, w, g) = (2, 6, 3, 4, 3);
    let x0 = hashed(&[b, c, h, w], 7)?.affine(1.6, 0.2)?;
    let gamma = (hashed(&[c], 8)?.affine(1.6, 0.2)? + 1.0)?;
    let beta = hashed(&[c], 9)?.affine(1.6, 0.2)?;
    let up = hashed(&[b, c, h, w], 10)?.affine(1.6, 0.2)?;
    let loss = |x: &Tensor| {
        (group_norm(x, g, Some((&gamma, &beta)), 1e-5).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let xv = Var::from_tensor(&x0)?;
    let grad = (group_norm(xv.as_tensor(), g, Some((&gamma, &beta)), 1e-5)? * &up)?
        .sum_all()?
        .backward()?;
    let grad = grad
        .get(xv.as_tensor())
        .unwrap()
        .flatten_all()?
        .to_vec1::<f64>()?;
    let flat = x0.flatten_all()?.to_vec1::<f64>()?;
    for i in (0..flat.len()).step_by(5) {
        let at = |d: f64| {
            let mut v = flat.clone();
            v[i] += d;
            loss(&Tensor::from_vec(v, (b, c, h, w), &Device::Cpu).unwrap())
        };
        let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
        assert!(
            (fd - grad[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "[{i}] {} vs {fd}",
            grad[i]
        );
    }
    Ok(())
}

fn relus_folded_into_the_input_grad_match_finite_differences() -> mdeq_testkit::Result {
    // L(s) = Σ up ⊙ ReLU(GN(ReLU(s))): dL/ds = [s > 0] ⊙ GN′ᵀ(up ⊙ [r > 0]) with r the outer
    // ReLU's output, which is exactly the fused call with both ReLUs. Central differences in
    // float64 are the reference.
    let (b, c, h, w, g) = (2, 6, 3, 4, 3);
    let s0 = hashed(&[b, c, h, w], 11)?.affine(1.6, -0.1)?;
    let gamma = (hashed(&[c], 12)?.affine(1.6, 0.2)? + 1.0)?;
    let beta = hashed(&[c], 13)?.affine(1.6, 0.2)?;
    let up = hashed(&[b, c, h, w], 14)?.affine(1.6, 0.2)?;
    let outer = |s: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
        let x = mdeq_kernels::relu(s)?;
        let r = group_norm_relu(&x, g, Some((&gamma, &beta)), 1e-5)?;
        Ok((x, r))
    };
    let (x0, r0) = outer(&s0)?;
    let relus = AdjacentRelus {
        before: true,
        after: Some(&r0),
    };
    let grad = group_norm_input_grad_with_relus(&x0, g, Some(&gamma), 1e-5, &up, relus)?;
    // The same three steps as separate passes give the same values exactly.
    let separate = mdeq_kernels::relu_grad(
        &x0,
        &group_norm_input_grad(
            &x0,
            g,
            Some(&gamma),
            1e-5,
            &mdeq_kernels::relu_grad(&r0, &up)?,
        )?,
    )?;
    assert_eq!(
        grad.flatten_all()?.to_vec1::<f64>()?,
        separate.flatten_all()?.to_vec1::<f64>()?
    );
    let grad = grad.flatten_all()?.to_vec1::<f64>()?;
    let flat = s0.flatten_all()?.to_vec1::<f64>()?;
    let pre = {
        let (x, _) = outer(&s0)?;
        let y = group_norm(&x, g, Some((&gamma, &beta)), 1e-5)?;
        y.flatten_all()?.to_vec1::<f64>()?
    };
    let loss = |s: &[f64]| -> candle_core::Result<f64> {
        let (_, r) = outer(&Tensor::from_vec(s.to_vec(), (b, c, h, w), &Device::Cpu)?)?;
        (r * &up)?.sum_all()?.to_scalar::<f64>()
    };
    // A ±1e-6 nudge moves no GroupNorm output across the outer kink…
    assert!(
        pre.iter().all(|p| p.abs() > 1e-4),
        "an output sits on the kink"
    );
    let mut checked = 0;
    for i in 0..flat.len() {
        // …and inputs at the inner kink are skipped.
        if flat[i].abs() < 1e-3 {
            continue;
        }
        let at = |d: f64| {
            let mut v = flat.clone();
            v[i] += d;
            loss(&v)
        };
        let fd = (at(1e-6)? - at(-1e-6)?) / 2e-6;
        assert!(
            (fd - grad[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "[{i}] {} vs {fd}",
            grad[i]
        );
        checked += 1;
    }
    assert!(
        checked > flat.len() / 2,
        "only {checked} elements away from the kinks"
    );
    Ok(())
}

fn relu_and_fused_group_norm_relu_pass_nan_through() -> mdeq_testkit::Result {
    let x = Tensor::new(&[[[[1.0f32, f32::NAN], [-2.0, 0.5]]]], &Device::Cpu)?;
    let y: Vec<f32> = mdeq_kernels::relu(&x)?.flatten_all()?.to_vec1()?;
    assert_eq!(y[0], 1.0);
    assert!(y[1].is_nan(), "{y:?}");
    assert_eq!(y[2], 0.0);
    // A NaN in a group makes its statistics NaN, so the whole group comes out NaN, not zeros.
    let n: Vec<f32> = group_norm_relu(&x, 1, None, 1e-5)?
        .flatten_all()?
        .to_vec1()?;
    assert!(n.iter().all(|v| v.is_nan()), "{n:?}");
    Ok(())
}

mdeq_testkit::on_every_kernel!(
    input_gradient_matches_finite_differences,
    relus_folded_into_the_input_grad_match_finite_differences,
    relu_and_fused_group_norm_relu_pass_nan_through,
);
