//! Fused train-mode BatchNorm against the same normalisation composed from candle ops (forward,
//! and the gradients of x, γ and β by autograd), and its per-channel moments.

use candle_core::{DType, Tensor, Var};
use mdeq_kernels::batch_norm::{batch_norm_train, channel_moments};
use mdeq_testkit::{max_rel, wave};

/// A normalisation of x with optional (γ, β).
type Norm = dyn Fn(&Tensor, Option<(&Tensor, &Tensor)>) -> Tensor;

fn composed(x: &Tensor, affine: Option<(&Tensor, &Tensor)>) -> Tensor {
    let c = x.dim(1).unwrap();
    let mean = x.mean_keepdim((0, 2, 3)).unwrap();
    let centered = x.broadcast_sub(&mean).unwrap();
    let var = centered.sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
    let y = centered
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap();
    match affine {
        None => y,
        Some((g, b)) => y
            .broadcast_mul(&g.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap(),
    }
}

#[test]
fn fused_batch_norm_matches_candle_ops_forward_and_backward() -> mdeq_testkit::Result {
    // Batch 1, odd channel counts and spatial sizes not multiples of the 8 lanes.
    for &(b, c, h, w) in &[(1, 3, 5, 7), (2, 8, 4, 4), (5, 11, 3, 1)] {
        let x = wave(&[b, c, h, w], 0.77, 0.2)?.affine(3.0, 0.5)?;
        let dy = wave(&[b, c, h, w], 1.9, 0.2)?.affine(1.0, 0.5)?;
        let gamma = wave(&[c], 0.5, 0.2)?.affine(0.5, 0.5)?;
        let beta = wave(&[c], 1.3, 0.2)?.affine(0.2, 0.5)?;
        for affine in [false, true] {
            let run = |f: &Norm| {
                let (xv, gv, bv) = (
                    Var::from_tensor(&x).unwrap(),
                    Var::from_tensor(&gamma).unwrap(),
                    Var::from_tensor(&beta).unwrap(),
                );
                let y = f(
                    xv.as_tensor(),
                    affine.then_some((gv.as_tensor(), bv.as_tensor())),
                );
                let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                let mut out = vec![y, grads.get(xv.as_tensor()).unwrap().clone()];
                if affine {
                    out.push(grads.get(gv.as_tensor()).unwrap().clone());
                    out.push(grads.get(bv.as_tensor()).unwrap().clone());
                }
                out
            };
            let reference = run(&|x, a| composed(x, a));
            let fused = run(&|x, a| batch_norm_train(x, a, 1e-5).unwrap());
            for (k, (f, r)) in fused.iter().zip(&reference).enumerate() {
                let rel = max_rel(f, r)?;
                assert!(
                    rel < 1e-11,
                    "{:?} affine {affine} output {k}: {rel}",
                    (b, c, h, w)
                );
            }
            // float32 against the float64 reference.
            let y32 = batch_norm_train(&x.to_dtype(DType::F32)?, None, 1e-5)?;
            if !affine {
                let rel = max_rel(&y32.to_dtype(DType::F64)?, &reference[0])?;
                assert!(rel < 1e-6, "f32 forward: {rel}");
            }
        }
        let (mean, var) = channel_moments(&x)?;
        let m = x.mean_keepdim((0, 2, 3))?;
        let v = x.broadcast_sub(&m)?.sqr()?.mean_keepdim((0, 2, 3))?;
        let (m, v) = (
            m.flatten_all()?.to_vec1::<f64>()?,
            v.flatten_all()?.to_vec1::<f64>()?,
        );
        for ch in 0..c {
            assert!((mean[ch] - m[ch]).abs() < 1e-12 && (var[ch] - v[ch]).abs() < 1e-12);
        }
    }
    let x = wave(&[2, 3, 2, 2], 0.1, 0.2)?.affine(1.0, 0.5)?;
    let short = wave(&[2], 0.1, 0.2)?.affine(1.0, 0.5)?;
    assert!(batch_norm_train(&x, Some((&short, &short)), 1e-5).is_err());
    Ok(())
}
