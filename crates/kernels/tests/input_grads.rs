//! The input-gradient functions a hand-written VJP uses (`conv2d_input_grad`,
//! `group_norm_input_grad`, `relu_grad`) against autograd through the forward ops, on odd shapes;
//! and their fallback for dtypes the fast kernels do not cover (f16), against the f64 result.

use candle_core::{DType, Tensor, Var};
use mdeq_kernels::group_norm::composed;
use mdeq_kernels::{conv2d_input_grad, group_norm_input_grad, relu_grad};
use mdeq_testkit::{max_rel, wave};

/// dL/dx of sum(f(x) ⊙ dy) by candle's autograd.
fn autograd(x: &Tensor, dy: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let xv = Var::from_tensor(x).unwrap();
    let grads = (f(xv.as_tensor()) * dy)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    grads.get(xv.as_tensor()).unwrap().clone()
}

#[test]
fn conv2d_input_grad_matches_candle_autograd() -> mdeq_testkit::Result {
    // (batch, c_in, h, w, c_out, k, stride)
    for &(b, ci, h, w, co, k, s) in &[
        (1, 3, 7, 5, 5, 3, 1),
        (2, 13, 9, 12, 7, 3, 2),
        (2, 120, 8, 6, 24, 3, 1),
        (3, 5, 6, 10, 11, 1, 1),
        (1, 7, 10, 10, 5, 5, 2),
    ] {
        let x = wave(&[b, ci, h, w], 0.37, 0.3)?;
        let wt = wave(&[co, ci, k, k], 0.91, 0.3)?;
        let y = x.conv2d(&wt, k / 2, s, 1, 1)?;
        let dy = wave(y.dims(), 1.7, 0.3)?;
        // Through the fast forward op (candle's own conv2d backward gets the input size wrong
        // for stride 2 on even sizes); that op's gradients are checked against finite
        // differences in conv2d.rs.
        let reference = autograd(&x, &dy, |t| mdeq_kernels::conv2d(t, &wt, s, k / 2).unwrap());
        for dtype in [DType::F64, DType::F32, DType::F16] {
            let got = conv2d_input_grad(
                &dy.to_dtype(dtype)?,
                &wt.to_dtype(dtype)?,
                s,
                k / 2,
                x.dims(),
            )?;
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 1e-5,
                _ => 2e-2,
            };
            let rel = max_rel(&got.to_dtype(DType::F64)?, &reference)?;
            assert!(rel < tol, "{:?} {dtype:?}: {rel}", (b, ci, h, w, co, k, s));
        }
    }
    let dy = wave(&[1, 4, 5, 5], 0.3, 0.3)?;
    let wt = wave(&[5, 3, 3, 3], 0.3, 0.3)?;
    assert!(conv2d_input_grad(&dy, &wt, 1, 1, &[1, 3, 5, 5]).is_err());
    Ok(())
}

#[test]
fn group_norm_and_relu_input_grads_match_candle_autograd() -> mdeq_testkit::Result {
    for &(b, c, h, w, groups) in &[(1, 6, 5, 7, 3), (3, 24, 4, 4, 8), (2, 10, 3, 9, 5)] {
        let x = (wave(&[b, c, h, w], 0.73, 0.3)? * 3.0)?;
        let dy = wave(&[b, c, h, w], 1.31, 0.3)?;
        let gamma = (wave(&[c], 0.5, 0.3)? + 1.5)?;
        let beta = wave(&[c], 0.2, 0.3)?;
        for affine in [false, true] {
            let reference = autograd(&x, &dy, |t| {
                composed(t, groups, affine.then_some((&gamma, &beta)), 1e-5).unwrap()
            });
            for dtype in [DType::F64, DType::F32, DType::F16] {
                let g = gamma.to_dtype(dtype)?;
                let got = group_norm_input_grad(
                    &x.to_dtype(dtype)?,
                    groups,
                    affine.then_some(&g),
                    1e-5,
                    &dy.to_dtype(dtype)?,
                )?;
                let tol = match dtype {
                    DType::F64 => 1e-12,
                    DType::F32 => 1e-5,
                    _ => 5e-2,
                };
                let rel = max_rel(&got.to_dtype(DType::F64)?, &reference)?;
                assert!(
                    rel < tol,
                    "{:?} affine {affine} {dtype:?}: {rel}",
                    (b, c, h, w)
                );
            }
        }
        let reference = autograd(&x, &dy, |t| {
            (t * t.gt(0.0).unwrap().to_dtype(DType::F64).unwrap()).unwrap()
        });
        for dtype in [DType::F64, DType::F16] {
            let got = relu_grad(&x.to_dtype(dtype)?, &dy.to_dtype(dtype)?)?;
            let rel = max_rel(&got.to_dtype(DType::F64)?, &reference)?;
            assert!(rel < 1e-3, "relu {dtype:?}: {rel}");
        }
    }
    let x = wave(&[1, 6, 2, 2], 0.1, 0.3)?;
    assert!(group_norm_input_grad(&x, 4, None, 1e-5, &x).is_err());
    assert!(relu_grad(&x, &wave(&[1, 6, 2, 3], 0.1, 0.3)?).is_err());
    Ok(())
}
