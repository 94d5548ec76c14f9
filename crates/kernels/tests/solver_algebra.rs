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

/// The fused Broyden update against its composition from candle's stock ops (portable kernels
/// throughout, so the reference shares no code with the kernel), for every history change,
/// frozen rows and a NaN; and the analytic property that defines "good" Broyden, the secant
/// condition M'Δg = Δx for the updated operator M' = M + u vᵀ.
#[test]
fn fused_broyden_update_matches_candle_ops_and_the_secant_condition() -> mdeq_testkit::Result {
    use mdeq_kernels::{
        broyden_update, with_kernels, BroydenStep, HistoryChange, KernelChoice, Pairs,
    };
    let (rows, d) = (5, 203);
    let t = |freq: f64, phase: f64| wave((rows, d), freq, phase);
    let (x, x_new, g, g_new) = (t(0.7, 0.1)?, t(0.9, 0.3)?, t(1.3, 0.2)?, t(0.4, 0.6)?);
    for k in [0usize, 1, 6] {
        let us: Vec<Tensor> = (0..k).map(|j| t(1.1 + j as f64, 0.05).unwrap()).collect();
        let vs: Vec<Tensor> = (0..k)
            .map(|j| t(0.2 + 0.7 * j as f64, 0.1).unwrap())
            .collect();
        let changes: &[HistoryChange] = if k == 0 {
            &[HistoryChange::Append, HistoryChange::Discard]
        } else {
            &[HistoryChange::Append, HistoryChange::ReplaceOldest]
        };
        for &change in changes {
            // Row 3 frozen; row 1 of x_new holds a NaN (a diverged sample).
            let mask = Tensor::new(&[[1.0f64], [1.0], [1.0], [0.0], [1.0]], x.device())?;
            let mut xv = x_new.to_vec2::<f64>()?;
            xv[1][7] = f64::NAN;
            let x_new = Tensor::new(xv, x.device())?;
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
                let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let (uc, vc): (Vec<Tensor>, Vec<Tensor>) =
                    (us.iter().map(c).collect(), vs.iter().map(c).collect());
                let (ur, vr): (Vec<&Tensor>, Vec<&Tensor>) =
                    (uc.iter().collect(), vc.iter().collect());
                let (xc, xnc, gc, gnc) = (c(&x), c(&x_new), c(&g), c(&g_new));
                let step = BroydenStep {
                    x: &xc,
                    x_new: &xnc,
                    g: &gc,
                    g_new: &gnc,
                };
                let run = |kernels| {
                    with_kernels(kernels, || {
                        broyden_update(
                            step,
                            Pairs {
                                us: &ur,
                                vs: &vr,
                                change,
                            },
                            &c(&mask),
                        )
                    })
                };
                let (got, want) = (run(KernelChoice::Native)?, run(KernelChoice::Portable)?);
                for (name, a, b) in [
                    ("u", &got.u, &want.u),
                    ("vt", &got.vt, &want.vt),
                    ("x_next", &got.x_next, &want.x_next),
                ] {
                    let (a, b) = (
                        a.to_dtype(DType::F64)?.to_vec2::<f64>()?,
                        b.to_dtype(DType::F64)?.to_vec2::<f64>()?,
                    );
                    for r in 0..rows {
                        for i in 0..d {
                            let (p, q) = (a[r][i], b[r][i]);
                            let same = (p.is_nan() && q.is_nan())
                                || (p - q).abs() <= tol * (1.0 + q.abs());
                            assert!(
                                same,
                                "{name}[{r}][{i}] k={k} {change:?} {dtype:?}: {p} vs {q}"
                            );
                        }
                    }
                }
                // Row 3 is frozen: it stays at x_new.
                let (xn3, next3) = (xnc.get(3)?, got.x_next.get(3)?);
                assert_eq!(
                    xn3.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                    next3.to_dtype(DType::F64)?.to_vec1::<f64>()?
                );
                if dtype == DType::F64 && change != HistoryChange::Discard {
                    // Secant condition on the rows without a NaN: M'Δg = Δx.
                    let dx = (&xnc - &xc)?;
                    let dg = (&gnc - &gc)?;
                    let mut u2 = ur.clone();
                    let mut v2 = vr.clone();
                    u2.push(&got.u);
                    v2.push(&got.vt);
                    let m_dg =
                        with_kernels(KernelChoice::Portable, || low_rank_apply(&dg, &u2, &v2))?;
                    for r in [0usize, 2, 3, 4] {
                        let rel = max_rel(&m_dg.get(r)?, &dx.get(r)?)?;
                        assert!(rel < 1e-10, "secant row {r}, k={k}: {rel}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// The residual with both norms in one pass equals the subtraction and two norms of candle's
/// ops: g exactly (one rounding either way), the float64 norms to rounding.
#[test]
fn residual_with_norms_matches_candle_ops() -> mdeq_testkit::Result {
    use mdeq_kernels::{residual_with_norms, with_kernels, KernelChoice};
    for dtype in [DType::F32, DType::F64] {
        let f = wave((6, 301), 0.8, 0.3)?.to_dtype(dtype)?;
        let x = wave((6, 301), 1.7, 0.1)?.to_dtype(dtype)?;
        let (g, g2, f2) = residual_with_norms(&f, &x)?;
        let (gr, g2r, f2r) = with_kernels(KernelChoice::Portable, || residual_with_norms(&f, &x))?;
        assert_eq!(
            g.to_dtype(DType::F64)?.to_vec2::<f64>()?,
            gr.to_dtype(DType::F64)?.to_vec2::<f64>()?
        );
        for (a, b) in g2.iter().zip(&g2r).chain(f2.iter().zip(&f2r)) {
            assert!((a - b).abs() <= 1e-12 * b, "{dtype:?}: {a} vs {b}");
        }
    }
    assert!(residual_with_norms(&wave((2, 3), 0.1, 0.1)?, &wave((3, 2), 0.1, 0.1)?).is_err());
    Ok(())
}

/// Anderson's Gram row and mixing against candle's ops (portable kernels), in both float types;
/// the mixing weights of one row touch that row only.
#[test]
fn anderson_gram_row_and_mixing_match_candle_ops() -> mdeq_testkit::Result {
    use mdeq_kernels::{mix_rows, row_dots, with_kernels, KernelChoice};
    let (rows, d, n) = (4, 157, 5);
    for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-6)] {
        let ts: Vec<Tensor> = (0..n)
            .map(|i| {
                wave((rows, d), 0.3 + 0.4 * i as f64, 0.2)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            })
            .collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let weights: Vec<Vec<f64>> = (0..rows)
            .map(|r| (0..n).map(|i| ((r * n + i) as f64 * 0.37).sin()).collect())
            .collect();
        let run = |k| {
            with_kernels(k, || -> candle_core::Result<_> {
                Ok((row_dots(&ts[2], &refs)?, mix_rows(&weights, &refs)?))
            })
        };
        let ((dots, mix), (dots_ref, mix_ref)) =
            (run(KernelChoice::Native)?, run(KernelChoice::Portable)?);
        for (a, b) in dots.iter().flatten().zip(dots_ref.iter().flatten()) {
            assert!(
                (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                "{dtype:?} dots: {a} vs {b}"
            );
        }
        let rel = max_rel(&mix, &mix_ref)?;
        assert!(rel < tol, "{dtype:?} mix: {rel}");
        // Row 1 of the mix is row 1 of the inputs weighted by weights[1].
        let by_hand = (0..n).try_fold(Tensor::zeros(d, dtype, ts[0].device())?, |acc, i| {
            acc + (ts[i].get(1)? * weights[1][i])?
        })?;
        assert!(max_rel(&mix.get(1)?, &by_hand)? < tol);
    }
    assert!(mix_rows(&[vec![1.0]], &[]).is_err());
    Ok(())
}
