//! The cell's hand-written VJP (`MultiscaleCell::vjp` through `CellVjp`) against candle's
//! autograd through the same forward, and against float64 central differences, on a
//! three-branch cell (downsampling chains of two stages, upsampling by 4), with dropout masks and
//! the injection.

use candle_core::{DType, Device, Tensor, Var};
use mdeq_deq::{FixedPointMap, GraphVjp};
use mdeq_model::cell::solver_map::{CellMap, CellVjp};
use mdeq_model::Mdeq;
use mdeq_testkit::{max_rel, tiny_classifier, wave_values};
use rand::SeedableRng;

fn check(dtype: DType, autograd_tol: f64, post_affine: bool) -> mdeq_testkit::Result {
    let mut cfg = tiny_classifier(&[4, 8, 8]);
    cfg.model.dropout = 0.25;
    cfg.model.post_gn_affine = post_affine;
    let dev = Device::Cpu;
    let model = Mdeq::new(&cfg.model, dtype, &dev, 11)?;
    let batch = 3;
    let image = Tensor::from_vec(wave_values(batch * 64, 0.37, 0.2), (batch, 1, 8, 8), &dev)?
        .to_dtype(dtype)?;
    let injection = model.injection(&image, false)?;
    let masks = model.dropout_masks(batch, true, &mut rand::rngs::StdRng::seed_from_u64(3))?;
    let layout = model.layout(8, 8);
    let cell = model.cell().prepared(true)?;
    let map = CellMap {
        cell: &cell,
        injection: &injection,
        masks: &masks,
        layout: &layout,
    };
    let d = layout.size();
    let z =
        Tensor::from_vec(wave_values(batch * d, 0.71, 0.5), (batch, d), &dev)?.to_dtype(dtype)?;
    let y =
        Tensor::from_vec(wave_values(batch * d, 1.13, 0.1), (batch, d), &dev)?.to_dtype(dtype)?;

    let mut ours = CellVjp::record(&map, &z)?;
    let by_hand = ours.vjp(&y)?;

    let zv = Var::from_tensor(&z)?;
    let out = CellMap { ..map }.apply(zv.as_tensor())?;
    let by_autograd = GraphVjp::new(zv, out).vjp(&y)?;
    let rel = max_rel(&by_hand, &by_autograd)?;
    assert!(rel < autograd_tol, "{dtype:?}: hand VJP vs autograd {rel}");

    // The tape serves any number of products: a second one is linear in y.
    let twice = ours.vjp(&(&y * 2.0)?)?;
    assert!(max_rel(&twice, &(&by_hand * 2.0)?)? < autograd_tol);
    assert_eq!(ours.calls, 2);

    if dtype == DType::F64 {
        // y·J·v against central differences of y·f along v.
        let v = Tensor::from_vec(wave_values(batch * d, 0.53, 0.9), (batch, d), &dev)?;
        let h = 1e-6;
        let mut f = CellMap { ..map };
        let yf = |t: &Tensor| {
            (&y * t)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let plus = f.apply(&(&z + (&v * h)?)?)?;
        let minus = f.apply(&(&z - (&v * h)?)?)?;
        let fd = (yf(&plus) - yf(&minus)) / (2.0 * h);
        let analytic = (&by_hand * &v)?.sum_all()?.to_scalar::<f64>()?;
        assert!(
            (fd - analytic).abs() <= 1e-6 * analytic.abs().max(1.0),
            "y·J·v {analytic} vs central differences {fd}"
        );
    }
    Ok(())
}

fn hand_vjp_matches_autograd_and_finite_differences_in_f64() -> mdeq_testkit::Result {
    check(DType::F64, 1e-12, false)?;
    check(DType::F64, 1e-12, true)?;
    Ok(())
}

fn hand_vjp_matches_autograd_in_f32() -> mdeq_testkit::Result {
    check(DType::F32, 1e-5, false)?;
    check(DType::F32, 1e-5, true)?;
    Ok(())
}

mdeq_testkit::on_every_kernel!(
    hand_vjp_matches_autograd_and_finite_differences_in_f64,
    hand_vjp_matches_autograd_in_f32,
);
