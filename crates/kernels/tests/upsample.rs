//! The one-pass nearest upsampling against its composition from candle ops, forward and
//! gradient, on odd shapes.

use candle_core::{DType, Tensor, Var};
use mdeq_kernels::upsample::{composed, nearest_upsample};
use mdeq_testkit::{max_rel, wave};

#[test]
fn matches_the_composed_op_forward_and_backward() -> mdeq_testkit::Result {
    for &(b, c, h, w, f) in &[
        (1, 1, 1, 1, 2),
        (2, 3, 5, 7, 2),
        (3, 5, 4, 3, 3),
        (1, 2, 2, 6, 4),
    ] {
        for dtype in [DType::F64, DType::F32] {
            let x = Var::from_tensor(&wave(&[b, c, h, w], 0.7, 0.3)?.to_dtype(dtype)?)?;
            let ours = nearest_upsample(x.as_tensor(), f)?;
            let reference = composed(x.as_tensor(), f)?;
            assert_eq!(ours.dims(), &[b, c, h * f, w * f]);
            // Copies only: bit for bit equal.
            assert_eq!(
                max_rel(&ours, &reference)?,
                0.0,
                "{:?}",
                (b, c, h, w, f, dtype)
            );
            let up = wave(&[b, c, h * f, w * f], 1.3, 0.3)?.to_dtype(dtype)?;
            let grad = |y: &Tensor| {
                let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(x.as_tensor()).unwrap().clone()
            };
            let tol = if dtype == DType::F64 { 1e-14 } else { 1e-6 };
            let rel = max_rel(&grad(&ours), &grad(&reference))?;
            assert!(rel < tol, "grad {:?}: {rel}", (b, c, h, w, f, dtype));
        }
    }
    let x = wave(&[1, 1, 2, 2], 0.1, 0.3)?;
    assert_eq!(max_rel(&nearest_upsample(&x, 1)?, &x)?, 0.0);
    assert!(nearest_upsample(&x, 0).is_err());
    Ok(())
}
