//! The solvers' fused vector algebra (low-rank products, row norms) against its composition from
//! candle ops.

use candle_core::{DType, Tensor};
use mdeq_kernels::low_rank::{composed, low_rank_apply, low_rank_apply_many};
use mdeq_kernels::row_sq_norms;
use mdeq_testkit::{max_rel, wave};

#[test]
fn fused_low_rank_product_matches_candle_ops() -> mdeq_testkit::Result {
    // Odd widths (not multiples of the 8 lanes), one row, no pairs, many pairs.
    for &(rows, d, k) in &[(1, 13, 1), (3, 37, 0), (5, 64, 4), (7, 1001, 19)] {
        let x = wave((rows, d), 0.7, 0.4)?;
        let a: Vec<Tensor> = (0..k)
            .map(|j| wave((rows, d), 1.1 + j as f64, 0.4).unwrap())
            .collect();
        let b: Vec<Tensor> = (0..k)
            .map(|j| wave((rows, d), 0.3 + j as f64 * 0.9, 0.4).unwrap())
            .collect();
        let (ar, br): (Vec<&Tensor>, Vec<&Tensor>) = (a.iter().collect(), b.iter().collect());
        let reference = composed(&x, &ar, &br)?;
        for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-5)] {
            let cast = |ts: &[Tensor]| -> Vec<Tensor> {
                ts.iter().map(|t| t.to_dtype(dtype).unwrap()).collect()
            };
            let (ac, bc) = (cast(&a), cast(&b));
            let got = low_rank_apply(
                &x.to_dtype(dtype)?,
                &ac.iter().collect::<Vec<_>>(),
                &bc.iter().collect::<Vec<_>>(),
            )?;
            let rel = max_rel(&got.to_dtype(DType::F64)?, &reference)?;
            assert!(rel < tol, "{:?} {dtype:?}: {rel}", (rows, d, k));
        }
    }
    let x = wave((2, 5), 0.1, 0.4)?;
    let y = wave((2, 6), 0.1, 0.4)?;
    assert!(low_rank_apply(&x, &[&y], &[&x]).is_err());
    assert!(low_rank_apply(&x, &[&x], &[]).is_err());
    Ok(())
}

#[test]
fn one_operator_applied_to_several_vectors_equals_separate_products() -> mdeq_testkit::Result {
    for &(rows, d, k) in &[(1, 13, 1), (3, 37, 0), (7, 1001, 19)] {
        let a: Vec<Tensor> = (0..k)
            .map(|j| wave((rows, d), 1.1 + j as f64, 0.4).unwrap())
            .collect();
        let b: Vec<Tensor> = (0..k)
            .map(|j| wave((rows, d), 0.3 + j as f64, 0.4).unwrap())
            .collect();
        let xs: Vec<Tensor> = (0..3)
            .map(|j| wave((rows, d), 0.7 + j as f64 * 0.2, 0.4).unwrap())
            .collect();
        for dtype in [DType::F64, DType::F32] {
            let cast = |ts: &[Tensor]| -> Vec<Tensor> {
                ts.iter().map(|t| t.to_dtype(dtype).unwrap()).collect()
            };
            let (a, b, xs) = (cast(&a), cast(&b), cast(&xs));
            let (ar, br): (Vec<&Tensor>, Vec<&Tensor>) = (a.iter().collect(), b.iter().collect());
            let together = low_rank_apply_many(&xs.iter().collect::<Vec<_>>(), &ar, &br)?;
            assert_eq!(together.len(), 3);
            for (x, got) in xs.iter().zip(&together) {
                // Same sums in the same order: bit for bit what one product at a time gives.
                let alone = low_rank_apply(x, &ar, &br)?;
                let diff = (got - &alone)?
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                assert_eq!(diff, 0.0, "{:?} {dtype:?}", (rows, d, k));
                let rel = max_rel(
                    &got.to_dtype(DType::F64)?,
                    &composed(x, &ar, &br)?.to_dtype(DType::F64)?,
                )?;
                assert!(rel < 1e-5, "{:?} {dtype:?}: {rel}", (rows, d, k));
            }
        }
    }
    let x = wave((2, 5), 0.1, 0.4)?;
    assert!(low_rank_apply_many(&[], &[&x], &[&x])?.is_empty());
    assert!(low_rank_apply_many(&[&x, &wave((2, 6), 0.1, 0.4)?], &[&x], &[&x]).is_err());
    Ok(())
}

#[test]
fn row_norms_match_candle_ops() -> mdeq_testkit::Result {
    for &(rows, d) in &[(1, 5), (4, 8), (3, 1001)] {
        let t = (wave((rows, d), 0.9, 0.4)? * 1e3)?;
        let reference = t.sqr()?.sum(1)?.to_vec1::<f64>()?;
        for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 1e-6)] {
            let got = row_sq_norms(&t.to_dtype(dtype)?)?;
            for (g, r) in got.iter().zip(&reference) {
                assert!(
                    (g - r).abs() <= tol * r,
                    "{:?} {dtype:?}: {g} vs {r}",
                    (rows, d)
                );
            }
        }
    }
    Ok(())
}
