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

/// What a sequence of Broyden updates gave: each next iterate, the stored pairs, the history.
type Run = (
    Vec<Tensor>,
    Vec<(Tensor, Tensor)>,
    mdeq_kernels::BroydenHistory,
);

/// The native Broyden history (one ring buffer, the fused update) against the same updates
/// composed from candle's stock ops (portable kernels throughout, so the reference shares no code
/// with the kernel), over sequences of steps that append, replace the oldest pair once the cap
/// is reached, or keep nothing (cap 0), with a frozen row and a NaN; and the analytic property
/// that defines "good" Broyden, the secant condition M'Δg = Δx of each updated operator.
#[test]
fn broyden_history_matches_candle_ops_and_the_secant_condition() -> mdeq_testkit::Result {
    use mdeq_kernels::{with_kernels, BroydenHistory, BroydenStep, KernelChoice};
    // Odd width (not a multiple of the lanes), five rows.
    let (rows, d) = (5, 203);
    let t = |freq: f64, phase: f64| wave((rows, d), freq, phase);
    // Row 3 frozen throughout.
    let moving = [true, true, true, false, true];
    // Cap 8 is never reached in five steps: every update appends.
    for cap in [0usize, 1, 3, 8] {
        // Five chained updates amplify the two paths' different summation orders through the
        // denominators ⟨vᵀ, Δg⟩, and candle's float32 reference sums in float32 (observed
        // ≤ 1.3e-12 in float64, ≤ 2e-4 in float32); a wrong update is off by O(1).
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-3)] {
            let c = |t: Tensor| t.to_dtype(dtype).unwrap();
            // Iterates and residuals of five steps (x_s, g_s); step s updates from s to s + 1.
            let xs: Vec<Tensor> = (0..6)
                .map(|s| c(t(0.7 + 0.2 * s as f64, 0.1).unwrap()))
                .collect();
            let gs: Vec<Tensor> = (0..6)
                .map(|s| c(t(1.3 - 0.15 * s as f64, 0.2 + 0.1 * s as f64).unwrap()))
                .collect();
            let run = |kernels| -> candle_core::Result<Run> {
                with_kernels(kernels, || {
                    let mut history = BroydenHistory::new(&xs[0], cap)?;
                    let mut next = Vec::new();
                    for s in 0..5 {
                        let mut x_new = xs[s + 1].clone();
                        if s == 2 {
                            // A diverged sample: row 1 of x_new holds a NaN.
                            let mut v = x_new.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                            v[1][7] = f64::NAN;
                            x_new = Tensor::new(v, x_new.device())?.to_dtype(dtype)?;
                        }
                        let step = BroydenStep {
                            x: &xs[s],
                            x_new: &x_new,
                            g: &gs[s],
                            g_new: &gs[s + 1],
                        };
                        next.push(history.update(step, &moving)?);
                        assert_eq!(history.pairs(), cap.min(s + 1));
                    }
                    let pairs = history.pair_tensors()?;
                    Ok((next, pairs, history))
                })
            };
            let (got, got_pairs, native) = run(KernelChoice::Native)?;
            let (want, want_pairs, _) = run(KernelChoice::Portable)?;
            let close = |name: &str, a: &Tensor, b: &Tensor| -> mdeq_testkit::Result {
                let (a, b) = (
                    a.to_dtype(DType::F64)?.to_vec2::<f64>()?,
                    b.to_dtype(DType::F64)?.to_vec2::<f64>()?,
                );
                for r in 0..rows {
                    for i in 0..d {
                        let (p, q) = (a[r][i], b[r][i]);
                        let same =
                            (p.is_nan() && q.is_nan()) || (p - q).abs() <= tol * (1.0 + q.abs());
                        assert!(same, "{name}[{r}][{i}] cap {cap} {dtype:?}: {p} vs {q}");
                    }
                }
                Ok(())
            };
            for (s, (a, b)) in got.iter().zip(&want).enumerate() {
                close(&format!("x_next of step {s}"), a, b)?;
                // Row 3 is frozen: it stays at x_new.
                if s != 2 {
                    assert_eq!(
                        a.get(3)?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                        xs[s + 1].get(3)?.to_dtype(DType::F64)?.to_vec1::<f64>()?
                    );
                }
            }
            assert_eq!(got_pairs.len(), want_pairs.len());
            for ((u, v), (wu, wv)) in got_pairs.iter().zip(&want_pairs) {
                close("u", u, wu)?;
                close("vt", v, wv)?;
            }
            if dtype == DType::F64 && cap == 8 {
                // Secant condition of the last update (step 4, no NaN in its inputs) on every
                // row: M'Δg = Δx, for M' = M + u vᵀ (dropping the oldest pair at a cap breaks it,
                // in the official solver too).
                let dx = (&xs[5] - &xs[4])?;
                let dg = (&gs[5] - &gs[4])?;
                let m_dg = native.apply(&dg)?;
                for r in 0..rows {
                    let rel = max_rel(&m_dg.get(r)?, &dx.get(r)?)?;
                    assert!(rel < 1e-10, "secant row {r}, cap {cap}: {rel}");
                }
            }
        }
    }
    // A step of another shape than the history's is an error, not a panic.
    let mut history = BroydenHistory::new(&t(0.1, 0.1)?, 2)?;
    let other = wave((rows, d + 1), 0.3, 0.1)?;
    let step = BroydenStep {
        x: &other,
        x_new: &other,
        g: &other,
        g_new: &other,
    };
    assert!(history.update(step, &moving).is_err());
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
