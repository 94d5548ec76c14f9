//! The cell's hand-written VJP (`MultiscaleCell::vjp` through `CellVjp`) against candle's
//! autograd through the same forward, and against float64 central differences, on a
//! three-branch cell (downsampling chains of two stages, upsampling by 4), with dropout masks and
//! the injection.

use candle_core::{DType, Device, Tensor, Var};
use mdeq_deq::{FixedPointMap, GraphVjp};
use mdeq_model::cell::solver_map::{CellMap, CellVjp};
use mdeq_model::Mdeq;
use mdeq_recipe::ExperimentConfig;
use rand::SeedableRng;

const RECIPE: &str = r#"
name = "cell-vjp"
[model]
task = "classification"
num_channels = [4, 8, 8]
expansion_factor = 2
num_groups = 2
downsample_times = 0
dropout = 0.25
post_gn_affine = POST_AFFINE
num_layers = 3
num_classes = 5
image_size = [8, 8]
in_channels = 1
[model.classification_head]
head_channels = [2, 4, 4]
final_chansize = 8
[deq]
f_thres = 4
b_thres = 4
stop_mode = "rel"
[train]
optimizer = "adam"
lr = 0.01
epochs = 1
batch_size = 3
[data]
dataset = "mnist"
"#;

fn wave(n: usize, a: f64, b: f64) -> Vec<f64> {
    (0..n).map(|i| (a * i as f64 + b).sin()).collect()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    let (d, s) = (
        diff.to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        scale
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
    );
    d / s.max(1e-30)
}

fn check(dtype: DType, autograd_tol: f64, post_affine: bool) {
    let recipe = RECIPE.replace("POST_AFFINE", &post_affine.to_string());
    let cfg = ExperimentConfig::from_toml_str(&recipe, "test").unwrap();
    let dev = Device::Cpu;
    let model = Mdeq::new(&cfg.model, dtype, &dev, 11).unwrap();
    let batch = 3;
    let image = Tensor::from_vec(wave(batch * 64, 0.37, 0.2), (batch, 1, 8, 8), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let injection = model.injection(&image, false).unwrap();
    let masks = model
        .dropout_masks(batch, true, &mut rand::rngs::StdRng::seed_from_u64(3))
        .unwrap();
    let layout = model.layout(8, 8);
    let cell = model.cell().prepared(true).unwrap();
    let map = CellMap {
        cell: &cell,
        injection: &injection,
        masks: &masks,
        layout: &layout,
    };
    let d = layout.size();
    let z = Tensor::from_vec(wave(batch * d, 0.71, 0.5), (batch, d), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let y = Tensor::from_vec(wave(batch * d, 1.13, 0.1), (batch, d), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();

    let mut ours = CellVjp::record(&map, &z).unwrap();
    let by_hand = ours.vjp(&y).unwrap();

    let zv = Var::from_tensor(&z).unwrap();
    let out = CellMap { ..map }.apply(zv.as_tensor()).unwrap();
    let by_autograd = GraphVjp::new(zv, out).vjp(&y).unwrap();
    let rel = max_rel(&by_hand, &by_autograd);
    assert!(rel < autograd_tol, "{dtype:?}: hand VJP vs autograd {rel}");

    // The tape serves any number of products: a second one is linear in y.
    let twice = ours.vjp(&(&y * 2.0).unwrap()).unwrap();
    assert!(max_rel(&twice, &(&by_hand * 2.0).unwrap()) < autograd_tol);
    assert_eq!(ours.calls, 2);

    if dtype == DType::F64 {
        // y·J·v against central differences of y·f along v.
        let v = Tensor::from_vec(wave(batch * d, 0.53, 0.9), (batch, d), &dev).unwrap();
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
        let plus = f.apply(&(&z + (&v * h).unwrap()).unwrap()).unwrap();
        let minus = f.apply(&(&z - (&v * h).unwrap()).unwrap()).unwrap();
        let fd = (yf(&plus) - yf(&minus)) / (2.0 * h);
        let analytic = (&by_hand * &v)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (fd - analytic).abs() <= 1e-6 * analytic.abs().max(1.0),
            "y·J·v {analytic} vs central differences {fd}"
        );
    }
}

#[test]
fn hand_vjp_matches_autograd_and_finite_differences_in_f64() {
    check(DType::F64, 1e-12, false);
    check(DType::F64, 1e-12, true);
}

#[test]
fn hand_vjp_matches_autograd_in_f32() {
    check(DType::F32, 1e-5, false);
    check(DType::F32, 1e-5, true);
}
