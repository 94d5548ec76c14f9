//! Solvers and backward modes on small analytic maps, in float64.

use candle_core::{DType, Device, Result, Tensor, Var};
use mdeq_deq::solver::{solve_with_fallback, SampleStatus};
use mdeq_deq::{
    adjoint, BackwardMode, Coupling, FixedPointMap, GraphVjp, SolverKind, SolverOptions, StopMode,
};

const D: usize = 6;

fn opts(threshold: usize, eps: f64) -> SolverOptions {
    SolverOptions {
        threshold,
        eps,
        stop_mode: StopMode::Abs,
        coupling: Coupling::PerSample,
        compact_batch: true,
    }
}

fn all_solvers() -> Vec<SolverKind> {
    ["broyden", "anderson", "fixed_point"]
        .iter()
        .map(|n| SolverKind::from_name(n).unwrap())
        .collect()
}

/// A (D, D) matrix with spectral norm below `scale`, deterministic.
fn contraction(scale: f64) -> Vec<f64> {
    let raw: Vec<f64> = (0..D * D)
        .map(|k| ((k * 7 + 3) as f64 * 0.61).sin())
        .collect();
    let fro = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    raw.iter().map(|x| x * scale / fro).collect()
}

/// Aᵀ of a row-major (D, D) matrix, so that the rows of z·Aᵀ are A z.
fn transposed(a: &[f64]) -> Tensor {
    Tensor::from_vec(a.to_vec(), (D, D), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap()
        .contiguous()
        .unwrap()
}

fn linear_map(a: &[f64], b: &Tensor) -> impl FnMut(&Tensor) -> Result<Tensor> {
    let at = transposed(a);
    let b = b.clone();
    move |z: &Tensor| z.matmul(&at)?.broadcast_add(&b)
}

/// Solves (I − A) z = b by Gaussian elimination, independently of the solvers.
fn direct_solve(a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut m: Vec<Vec<f64>> = (0..D)
        .map(|i| {
            (0..D)
                .map(|j| if i == j { 1.0 } else { 0.0 } - a[i * D + j])
                .chain([b[i]])
                .collect()
        })
        .collect();
    for c in 0..D {
        let p = (c..D)
            .max_by(|&x, &y| m[x][c].abs().total_cmp(&m[y][c].abs()))
            .unwrap();
        m.swap(c, p);
        for r in 0..D {
            if r != c {
                let f = m[r][c] / m[c][c];
                let pivot = m[c].clone();
                for (x, p) in m[r].iter_mut().zip(&pivot).skip(c) {
                    *x -= f * p;
                }
            }
        }
    }
    (0..D).map(|i| m[i][D] / m[i][i]).collect()
}

fn every_solver_finds_the_fixed_point_of_a_linear_map() -> mdeq_testkit::Result {
    let a = contraction(0.8);
    let bv: Vec<f64> = (0..D).map(|i| i as f64 * 0.3 - 0.7).collect();
    let b = Tensor::from_vec(bv.clone(), (1, D), &Device::Cpu)?;
    let expected = direct_solve(&a, &bv);
    let z0 = Tensor::zeros((1, D), DType::F64, &Device::Cpu)?;
    for kind in all_solvers() {
        let mut f = linear_map(&a, &b);
        let sol = kind.solve(&mut f, &z0, &opts(200, 1e-11))?;
        let z = sol.z.flatten_all()?.to_vec1::<f64>()?;
        let err = z
            .iter()
            .zip(&expected)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-9, "{kind:?}: max error {err}");
        assert_eq!(sol.stats.status, vec![SampleStatus::Converged], "{kind:?}");
    }
    Ok(())
}

fn broyden_needs_far_fewer_steps_than_iteration_on_a_slow_contraction() -> mdeq_testkit::Result {
    // Eigenvalues 0.97, 0.87, ...: plain iteration needs ~800 steps for 1e-10.
    let a: Vec<f64> = (0..D * D)
        .map(|k| {
            if k % (D + 1) == 0 {
                0.97 - 0.1 * (k / (D + 1)) as f64
            } else {
                0.0
            }
        })
        .collect();
    let b = Tensor::ones((1, D), DType::F64, &Device::Cpu)?;
    let z0 = Tensor::zeros((1, D), DType::F64, &Device::Cpu)?;
    let run = |name: &str| {
        let mut f = linear_map(&a, &b);
        SolverKind::from_name(name)
            .unwrap()
            .solve(&mut f, &z0, &opts(2000, 1e-10))
            .unwrap()
            .stats
            .steps
    };
    let (broyden, naive) = (run("broyden"), run("fixed_point"));
    assert!(
        broyden * 5 < naive,
        "broyden {broyden} steps, fixed point {naive}"
    );
    Ok(())
}

fn per_sample_answers_do_not_depend_on_the_batch() -> mdeq_testkit::Result {
    let a = contraction(0.9);
    let rows: Vec<Vec<f64>> = (0..3)
        .map(|s| {
            (0..D)
                .map(|i| ((s * D + i) as f64).cos() * (s + 1) as f64)
                .collect()
        })
        .collect();
    let solve = |sample_rows: &[Vec<f64>]| {
        let n = sample_rows.len();
        let b = Tensor::from_vec(sample_rows.concat(), (n, D), &Device::Cpu).unwrap();
        let at = transposed(&a);
        // b enters per sample, so batch composition changes each sample's neighbours only.
        let mut f = |z: &Tensor| z.matmul(&at)? + &b;
        let z0 = Tensor::zeros((n, D), DType::F64, &Device::Cpu).unwrap();
        SolverKind::from_name("broyden")
            .unwrap()
            .solve(&mut f, &z0, &opts(100, 1e-8))
            .unwrap()
            .z
            .to_vec2::<f64>()
            .unwrap()
    };
    let alone = solve(&rows[..1]);
    let together = solve(&rows);
    let with_other = solve(&[rows[2].clone(), rows[0].clone()]);
    assert_eq!(alone[0], together[0], "sample 0 alone vs in a batch of 3");
    assert_eq!(
        alone[0], with_other[1],
        "sample 0 alone vs after another sample"
    );
    Ok(())
}

fn official_coupling_uses_whole_batch_norms() -> mdeq_testkit::Result {
    let a = contraction(0.5);
    let b = Tensor::from_vec(
        (0..2 * D).map(|i| i as f64).collect::<Vec<_>>(),
        (2, D),
        &Device::Cpu,
    )?;
    let at = transposed(&a);
    let mut f = |z: &Tensor| z.matmul(&at)? + &b;
    let z0 = Tensor::zeros((2, D), DType::F64, &Device::Cpu)?;
    let o = SolverOptions {
        coupling: Coupling::Official,
        ..opts(30, 1e-6)
    };
    let sol = SolverKind::from_name("broyden")
        .unwrap()
        .solve(&mut f, &z0, &o)?;
    // The first step is z1 = f(0) = b, whose residual is f(b) − b = A b: check the batch norm.
    let ab = b.matmul(&at)?;
    let expected = ab.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    let first = &sol.stats.abs_trace[0];
    assert!(
        (first[0] - expected).abs() < 1e-12 && first[0] == first[1],
        "{first:?} vs {expected}"
    );
    Ok(())
}

fn anderson_survives_a_rank_deficient_history() -> mdeq_testkit::Result {
    // All residuals lie on one line, so the Gram matrix of the history is rank one.
    let dir = Tensor::from_vec(
        (0..D).map(|i| (i + 1) as f64).collect::<Vec<_>>(),
        (1, D),
        &Device::Cpu,
    )?;
    let mut f = |z: &Tensor| (z * 0.5)? + &dir;
    let z0 = Tensor::zeros((1, D), DType::F64, &Device::Cpu)?;
    let kind = SolverKind::Anderson {
        m: 5,
        lambda: 0.0,
        beta: 1.0,
    };
    let sol = kind.solve(&mut f, &z0, &opts(50, 1e-9))?;
    let expected = (&dir * 2.0)?;
    let err = (&sol.z - expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(err < 1e-8, "error {err}");
    assert_eq!(sol.stats.status[0], SampleStatus::Converged);
    Ok(())
}

fn stagnation_rule_stops_a_sample_stuck_just_above_eps() -> mdeq_testkit::Result {
    // f(z) = z + δ_k per sample, so fixed-point iteration's absolute residual is |δ_k| exactly.
    // Sample 0 sits at 2·eps for ever: inside [eps, 3·eps) and flat, so the official rule
    // (step > 30, the last 30 residuals within 1.3× of each other) stops it at step 31.
    // Sample 1 alternates 2·eps and 2.8·eps (ratio 1.4): never stagnant, so it runs to the
    // threshold. Sample 2 is flat at 4·eps, outside the band: also to the threshold.
    let eps = 1e-3;
    let scale = (D as f64).sqrt();
    let mut calls = 0usize;
    // Sample 0's iterate at every call: it moves by δ per step until it is frozen.
    let mut seen_row0: Vec<f64> = Vec::new();
    let mut f = |z: &Tensor| {
        calls += 1;
        seen_row0.push(z.get(0)?.get(0)?.to_scalar::<f64>()?);
        let wobble = if calls.is_multiple_of(2) { 2.8 } else { 2.0 };
        let delta: Vec<f64> = [2.0, wobble, 4.0]
            .iter()
            .flat_map(|l| std::iter::repeat_n(l * eps / scale, D))
            .collect();
        z + Tensor::from_vec(delta, (3, D), z.device())?
    };
    let z0 = Tensor::zeros((3, D), DType::F64, &Device::Cpu)?;
    let sol = SolverKind::from_name("fixed_point")
        .unwrap()
        .solve(&mut f, &z0, &opts(45, eps))?;
    let s = &sol.stats;
    assert_eq!(s.status[0], SampleStatus::Converged);
    assert_eq!(s.status[1], SampleStatus::MaxSteps);
    assert_eq!(s.status[2], SampleStatus::MaxSteps);
    assert_eq!(s.steps, 45);
    // Evaluations 1…31 see sample 0 at 0, δ, …, 30δ; after step 31 it is frozen at 30δ.
    let step = 2.0 * eps / scale;
    for (call, &v) in seen_row0.iter().enumerate() {
        let want = step * call.min(30) as f64;
        assert!((v - want).abs() < 1e-12, "call {}: {v} vs {want}", call + 1);
    }
    Ok(())
}

fn nan_is_reported_per_sample_and_never_returned() -> mdeq_testkit::Result {
    // Sample 1 produces NaN after the first step; sample 0 is a healthy contraction.
    let mut calls = 0;
    let mut f = |z: &Tensor| {
        calls += 1;
        let healthy = (z.narrow(0, 0, 1)? * 0.5)?.affine(1.0, 1.0)?;
        let other = if calls > 1 {
            z.narrow(0, 1, 1)?.affine(0.0, f64::NAN)?
        } else {
            z.narrow(0, 1, 1)?.affine(0.5, 1.0)?
        };
        Tensor::cat(&[healthy, other], 0)
    };
    let z0 = Tensor::zeros((2, D), DType::F64, &Device::Cpu)?;
    let sol = SolverKind::from_name("broyden")
        .unwrap()
        .solve(&mut f, &z0, &opts(40, 1e-10))?;
    assert_eq!(sol.stats.status[0], SampleStatus::Converged);
    assert_eq!(sol.stats.status[1], SampleStatus::Diverged);
    let z = sol.z.flatten_all()?.to_vec1::<f64>()?;
    assert!(z.iter().all(|x| x.is_finite()), "{z:?}");
    Ok(())
}

fn fallback_chain_rescues_an_unconverged_solve() -> mdeq_testkit::Result {
    let a = contraction(0.9);
    let b = Tensor::ones((1, D), DType::F64, &Device::Cpu)?;
    let z0 = Tensor::zeros((1, D), DType::F64, &Device::Cpu)?;
    let chain = vec![
        SolverKind::from_name("fixed_point").unwrap(),
        SolverKind::from_name("broyden").unwrap(),
    ];
    let mut f = linear_map(&a, &b);
    let sol = solve_with_fallback(&chain, &mut f, &z0, &opts(5, 1e-10))?;
    let mut g = linear_map(&a, &b);
    let only_first = chain[0].solve(&mut g, &z0, &opts(5, 1e-10))?;
    assert_ne!(only_first.stats.status[0], SampleStatus::Converged);
    assert!(
        sol.stats.lowest[0] < only_first.stats.lowest[0] * 1e-3,
        "{} vs {}",
        sol.stats.lowest[0],
        only_first.stats.lowest[0]
    );
    assert_eq!(sol.stats.solver, "fixed_point+broyden");
    Ok(())
}

/// The final relative residual the stats report is ‖f(z) − z‖ / ‖f(z)‖ of the iterate the
/// solve returned, recomputed here from that iterate — per sample, for Broyden and Anderson,
/// with the samples of a batch stopping at different steps, and through a fallback chain
/// (whose traces are concatenated). Fixed-point iteration returns f(x) for the residual it
/// measured at x, which bounds the returned point's own on a contraction.
fn final_residual_is_that_of_the_returned_iterate() -> mdeq_testkit::Result {
    let a = contraction(0.9);
    let rows: Vec<f64> = (0..3 * D)
        .map(|k| (k as f64 * 0.37).cos() * (1 + k / D) as f64)
        .collect();
    let b = Tensor::from_vec(rows, (3, D), &Device::Cpu)?;
    let z0 = Tensor::zeros((3, D), DType::F64, &Device::Cpu)?;
    let mut runs: Vec<(String, Vec<SolverKind>)> = all_solvers()
        .into_iter()
        .map(|k| (format!("{k:?}"), vec![k]))
        .collect();
    runs.push((
        "fixed_point+broyden".into(),
        vec![all_solvers()[2].clone(), all_solvers()[0].clone()],
    ));
    for (name, chain) in runs {
        let mut f = linear_map(&a, &b);
        let mut options = opts(6, 1e-4);
        options.stop_mode = StopMode::Rel;
        let sol = solve_with_fallback(&chain, &mut f, &z0, &options)?;
        let fz = linear_map(&a, &b)(&sol.z)?;
        let r = (&fz - &sol.z)?.sqr()?.sum(1)?.sqrt()?.to_vec1::<f64>()?;
        let n = fz.sqr()?.sum(1)?.sqrt()?.to_vec1::<f64>()?;
        let reported = sol.stats.final_rel_residual();
        for i in 0..3 {
            // The solvers add their official floor (≤ 1e-5) to ‖f(z)‖; a step off changes the
            // residual by far more than this (the map contracts by 0.9 at best).
            let expected = r[i] / n[i];
            if name.starts_with("FixedPoint") {
                assert!(reported[i] > expected, "{name} sample {i}");
                continue;
            }
            assert!(
                (reported[i] - expected).abs() <= 1e-4 * expected,
                "{name} sample {i}: reported {} vs recomputed {expected}",
                reported[i]
            );
        }
    }
    Ok(())
}

/// L(θ) = c · z*(θ) for z* = tanh(W z* + U x + θ); returns (L, dL/dθ by the IFT).
fn tanh_deq(theta: &[f64], w_scale: f64, mode: &BackwardMode) -> (f64, Vec<f64>) {
    let dev = Device::Cpu;
    let w = Tensor::from_vec(contraction(w_scale), (D, D), &dev)
        .unwrap()
        .t()
        .unwrap()
        .contiguous()
        .unwrap();
    let ux = Tensor::from_vec(
        (0..D).map(|i| (i as f64 * 1.3).sin()).collect::<Vec<_>>(),
        (1, D),
        &dev,
    )
    .unwrap();
    let c = Tensor::from_vec(
        (0..D).map(|i| 1.0 + i as f64 * 0.1).collect::<Vec<_>>(),
        (1, D),
        &dev,
    )
    .unwrap();
    let th = Var::from_vec(theta.to_vec(), (1, D), &dev).unwrap();
    let th_d = th.as_tensor().detach();
    let mut f = |z: &Tensor| (z.matmul(&w)? + &ux)?.broadcast_add(&th_d)?.tanh();
    let z0 = Tensor::zeros((1, D), DType::F64, &dev).unwrap();
    let kind = SolverKind::from_name("broyden").unwrap();
    let zstar = kind.solve(&mut f, &z0, &opts(200, 1e-14)).unwrap().z;
    // out = f(z*) with the graph to θ; gbar = c.
    let z_leaf = Var::from_tensor(&zstar).unwrap();
    let out = (z_leaf.as_tensor().matmul(&w).unwrap() + &ux)
        .unwrap()
        .broadcast_add(th.as_tensor())
        .unwrap()
        .tanh()
        .unwrap();
    let loss = (&out * &c)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let z_vjp = Var::from_tensor(&zstar).unwrap();
    let out_vjp = (z_vjp.as_tensor().matmul(&w).unwrap() + &ux)
        .unwrap()
        .broadcast_add(&th_d)
        .unwrap()
        .tanh()
        .unwrap();
    let mut graph = GraphVjp::new(z_vjp, out_vjp);
    let mut vjp = |y: &Tensor| graph.vjp(y);
    let (y, _) = adjoint(mode, &mut vjp, &c, &kind, &opts(200, 1e-14)).unwrap();
    let grads = (&out * y).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads
        .get(th.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (loss, g)
}

fn implicit_gradient_matches_central_finite_differences() -> mdeq_testkit::Result {
    let theta: Vec<f64> = (0..D).map(|i| 0.2 * i as f64 - 0.5).collect();
    let (_, grad) = tanh_deq(&theta, 0.9, &BackwardMode::Ift);
    let h = 1e-6;
    for k in 0..D {
        let mut p = theta.clone();
        p[k] += h;
        let mut m = theta.clone();
        m[k] -= h;
        let fd = (tanh_deq(&p, 0.9, &BackwardMode::Jfb).0
            - tanh_deq(&m, 0.9, &BackwardMode::Jfb).0)
            / (2.0 * h);
        let rel = (grad[k] - fd).abs() / fd.abs().max(1e-8);
        assert!(
            rel < 1e-4,
            "θ[{k}]: implicit {} vs finite difference {fd} (rel {rel})",
            grad[k]
        );
    }
    Ok(())
}

fn phantom_and_jfb_approach_ift_as_the_map_contracts() -> mdeq_testkit::Result {
    let theta: Vec<f64> = (0..D).map(|i| 0.1 * i as f64).collect();
    let rel_err = |scale: f64, mode: BackwardMode| {
        let (_, exact) = tanh_deq(&theta, scale, &BackwardMode::Ift);
        let (_, approx) = tanh_deq(&theta, scale, &mode);
        let num: f64 = exact
            .iter()
            .zip(&approx)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        num / exact.iter().map(|a| a * a).sum::<f64>().sqrt()
    };
    for mode in [BackwardMode::Jfb, BackwardMode::Phantom { k: 3, tau: 0.8 }] {
        let loose = rel_err(0.8, mode.clone());
        let tight = rel_err(0.05, mode.clone());
        assert!(
            tight < loose / 5.0 && tight < 0.05,
            "{mode:?}: {loose} at 0.8, {tight} at 0.05"
        );
    }
    Ok(())
}

fn graph_vjp_matches_the_transposed_jacobian_of_a_linear_map() -> mdeq_testkit::Result {
    let a = contraction(0.7);
    let at = transposed(&a);
    let z = Var::zeros((1, D), DType::F64, &Device::Cpu)?;
    let out = z.as_tensor().matmul(&at)?;
    let mut g = GraphVjp::new(z, out);
    for k in 0..D {
        let mut e = vec![0.0; D];
        e[k] = 1.0;
        let row = g
            .vjp(&Tensor::from_vec(e, (1, D), &Device::Cpu)?)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        for j in 0..D {
            assert!((row[j] - a[k * D + j]).abs() < 1e-15);
        }
    }
    assert_eq!(g.calls, D);
    Ok(())
}

/// z ↦ tanh(s_k·A z + b_k) per sample k, which says its samples are independent (`compact`) or
/// not.
struct RowwiseLinear {
    at: Tensor,
    scale: Tensor,
    b: Tensor,
    compact: bool,
    rows_seen: Vec<usize>,
}

impl RowwiseLinear {
    fn eval(&self, z: &Tensor, scale: &Tensor, b: &Tensor) -> Result<Tensor> {
        (z.matmul(&self.at)?.broadcast_mul(scale)? + b)?.tanh()
    }
}

impl FixedPointMap for RowwiseLinear {
    fn apply(&mut self, z: &Tensor) -> Result<Tensor> {
        self.rows_seen.push(z.dim(0)?);
        self.eval(z, &self.scale, &self.b)
    }

    fn apply_rows(&mut self, z_rows: &Tensor, rows: &Tensor) -> Result<Option<Tensor>> {
        if !self.compact {
            return Ok(None);
        }
        self.rows_seen.push(z_rows.dim(0)?);
        let (scale, b) = (
            self.scale.index_select(rows, 0)?,
            self.b.index_select(rows, 0)?,
        );
        self.eval(z_rows, &scale, &b).map(Some)
    }
}

fn compaction_skips_converged_samples_without_changing_any_answer() -> mdeq_testkit::Result {
    let a = contraction(0.95);
    let at = transposed(&a);
    // Contraction factors from 0.1 to 0.95: the samples converge after very different counts.
    let scales = [0.1, 0.95, 0.4, 0.7];
    let n = scales.len();
    let scale = Tensor::from_vec(scales.to_vec(), (n, 1), &Device::Cpu)?;
    let b = Tensor::from_vec(
        (0..n * D).map(|k| (k as f64 * 0.37).sin()).collect(),
        (n, D),
        &Device::Cpu,
    )?;
    let z0 = Tensor::zeros((n, D), DType::F64, &Device::Cpu)?;
    for kind in all_solvers() {
        let run = |compact: bool, compact_batch: bool| {
            let mut f = RowwiseLinear {
                at: at.clone(),
                scale: scale.clone(),
                b: b.clone(),
                compact,
                rows_seen: Vec::new(),
            };
            let o = SolverOptions {
                compact_batch,
                ..opts(400, 1e-10)
            };
            let sol = kind.solve(&mut f, &z0, &o).unwrap();
            (sol, f.rows_seen)
        };
        let (full, full_rows) = run(false, true);
        let (compacted, compacted_rows) = run(true, true);
        assert!(full_rows.iter().all(|&r| r == n), "{kind:?}: {full_rows:?}");
        // A map that could be restricted, with compaction switched off: the whole batch each time.
        let (switched_off, switched_off_rows) = run(true, false);
        assert_eq!(switched_off_rows, full_rows, "{kind:?}");
        assert_eq!(
            switched_off.stats.sample_evaluations,
            full.stats.sample_evaluations
        );
        assert_eq!(full.stats.sample_evaluations, n * full.stats.evaluations);
        // Fewer rows evaluated, as the statistics say, and never more than once per step.
        assert_eq!(
            compacted.stats.sample_evaluations,
            compacted_rows.iter().sum::<usize>(),
            "{kind:?}"
        );
        assert!(
            compacted.stats.sample_evaluations < full.stats.sample_evaluations,
            "{kind:?}: {} rows evaluated vs {}",
            compacted.stats.sample_evaluations,
            full.stats.sample_evaluations
        );
        assert!(compacted_rows.iter().any(|&r| r < n), "{kind:?}");
        assert!(compacted_rows.windows(2).all(|w| w[1] <= w[0]), "{kind:?}");
        // Same iterates, steps, residual traces and statuses for every sample.
        assert_eq!(compacted.stats.steps, full.stats.steps, "{kind:?}");
        assert_eq!(compacted.stats.status, full.stats.status, "{kind:?}");
        assert!(compacted.stats.all_converged(), "{kind:?}");
        let (zc, zf) = (
            compacted.z.flatten_all()?.to_vec1::<f64>()?,
            full.z.flatten_all()?.to_vec1::<f64>()?,
        );
        let diff = zc
            .iter()
            .zip(&zf)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-13, "{kind:?}: answers differ by {diff}");
    }
    Ok(())
}

/// Limited-memory Broyden for one sample written plainly over `Vec<f64>`, keeping the newest
/// `cap` pairs: the reference for the solver's in-place history buffers.
fn reference_broyden(
    f: impl Fn(&[f64]) -> Vec<f64>,
    z0: &[f64],
    steps: usize,
    cap: usize,
) -> Vec<f64> {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let sub = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    let mut pairs: std::collections::VecDeque<(Vec<f64>, Vec<f64>)> = Default::default();
    // M x = −x + Σ a_k (b_k · x) with (a, b) = (u, v), or (v, u) for xᵀ M.
    let apply = |pairs: &std::collections::VecDeque<(Vec<f64>, Vec<f64>)>, x: &[f64], t: bool| {
        let mut out: Vec<f64> = x.iter().map(|v| -v).collect();
        for (u, v) in pairs {
            let (a, b) = if t { (v, u) } else { (u, v) };
            let c = dot(b, x);
            out.iter_mut().zip(a).for_each(|(o, ai)| *o += ai * c);
        }
        out
    };
    let mut x = z0.to_vec();
    let mut gx = sub(&f(&x), &x);
    let mut update = gx.clone();
    let (mut best, mut lowest) = (x.clone(), f64::INFINITY);
    for _ in 0..steps {
        let x_new: Vec<f64> = x.iter().zip(&update).map(|(a, b)| a + b).collect();
        let g_new = sub(&f(&x_new), &x_new);
        let r = dot(&g_new, &g_new).sqrt();
        if r < lowest {
            (best, lowest) = (x_new.clone(), r);
        }
        let (dx, dg) = (sub(&x_new, &x), sub(&g_new, &gx));
        let vt = apply(&pairs, &dx, true);
        let denom = dot(&vt, &dg);
        let u: Vec<f64> = sub(&dx, &apply(&pairs, &dg, false))
            .iter()
            .map(|v| v / denom)
            .collect();
        if pairs.len() == cap {
            pairs.pop_front();
        }
        pairs.push_back((u, vt));
        update = apply(&pairs, &g_new, false).iter().map(|v| -v).collect();
        (x, gx) = (x_new, g_new);
    }
    best
}

fn capped_broyden_history_matches_a_plain_reference() -> mdeq_testkit::Result {
    let a = contraction(1.3);
    let bias: Vec<f64> = (0..D).map(|i| (i as f64 * 0.9).cos()).collect();
    let f = |z: &[f64]| -> Vec<f64> {
        (0..D)
            .map(|i| ((0..D).map(|j| a[i * D + j] * z[j]).sum::<f64>() + bias[i]).tanh())
            .collect()
    };
    let at = transposed(&a);
    let b = Tensor::from_vec(bias.clone(), (1, D), &Device::Cpu)?;
    let z0v: Vec<f64> = (0..D).map(|i| 0.1 * i as f64).collect();
    let z0 = Tensor::from_vec(z0v.clone(), (1, D), &Device::Cpu)?;
    // Few enough steps that the residual never reaches exactly zero.
    let steps = 9;
    // Caps below, at and above the growth steps of the buffers (4, 8, ...), and uncapped.
    for cap in [1, 3, 4, 5, 8, steps] {
        let mut map = |z: &Tensor| z.matmul(&at)?.broadcast_add(&b)?.tanh();
        let kind = SolverKind::Broyden {
            max_pairs: Some(cap),
            max_history_bytes: None,
        };
        let sol = kind.solve(&mut map, &z0, &opts(steps, 1e-300))?;
        let ours = sol.z.flatten_all()?.to_vec1::<f64>()?;
        let reference = reference_broyden(f, &z0v, steps, cap);
        let diff = ours
            .iter()
            .zip(&reference)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            diff < 1e-12,
            "cap {cap}: differs from the reference by {diff}"
        );
        assert_eq!(sol.stats.steps, steps, "cap {cap}");
    }
    Ok(())
}

fn broyden_history_is_bounded_by_default_but_never_below_official_settings() -> mdeq_testkit::Result
{
    use mdeq_deq::solver::broyden::{history_cap, BroydenOptions, DEFAULT_MAX_HISTORY_BYTES};
    let uncapped = BroydenOptions::default();
    // Official settings keep their threshold's worth of pairs: ImageNet SMALL (B = 32,
    // D = 188,160, T = 27) and Cityscapes XL on a full frame (B = 1, D = 21,626,880 for
    // channels 88/176/352/704 at 256×512 … 32×64, T = 27), in float32.
    assert_eq!(history_cap(32, 188_160, 4, 27, &uncapped), 27);
    let xl = 88 * 256 * 512 + 176 * 128 * 256 + 352 * 64 * 128 + 704 * 32 * 64;
    assert_eq!(xl, 21_626_880);
    assert_eq!(history_cap(1, xl, 4, 27, &uncapped), 27);
    // A runaway threshold is bounded by the default: 8 GiB / (2 · 256 · 4704 · 4 bytes).
    let pair = 2 * 256 * 4704 * 4;
    assert_eq!(
        history_cap(256, 4704, 4, 10_000, &uncapped),
        DEFAULT_MAX_HISTORY_BYTES / pair
    );
    assert_eq!(DEFAULT_MAX_HISTORY_BYTES / pair, 891);
    // Explicit caps still rule.
    let capped = BroydenOptions {
        max_pairs: Some(8),
        max_history_bytes: Some(3 * pair),
    };
    assert_eq!(history_cap(256, 4704, 4, 10_000, &capped), 3);
    Ok(())
}

mdeq_testkit::on_every_kernel!(
    every_solver_finds_the_fixed_point_of_a_linear_map,
    broyden_needs_far_fewer_steps_than_iteration_on_a_slow_contraction,
    per_sample_answers_do_not_depend_on_the_batch,
    official_coupling_uses_whole_batch_norms,
    anderson_survives_a_rank_deficient_history,
    stagnation_rule_stops_a_sample_stuck_just_above_eps,
    nan_is_reported_per_sample_and_never_returned,
    fallback_chain_rescues_an_unconverged_solve,
    final_residual_is_that_of_the_returned_iterate,
    implicit_gradient_matches_central_finite_differences,
    phantom_and_jfb_approach_ift_as_the_map_contracts,
    graph_vjp_matches_the_transposed_jacobian_of_a_linear_map,
    compaction_skips_converged_samples_without_changing_any_answer,
    capped_broyden_history_matches_a_plain_reference,
    broyden_history_is_bounded_by_default_but_never_below_official_settings,
);
