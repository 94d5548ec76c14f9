//! The unrolled pretraining phase (reference §4.2) differentiated end to end: parameter gradients of
//! a small two-branch classification MDEQ in float64 against central finite differences of the
//! loss, for parameters of every part (stem, cell, fuse, head).

use candle_core::{DType, Device, Tensor};
use mdeq_model::Mdeq;
use mdeq_recipe::ExperimentConfig;
use mdeq_train::step::{train_gradients, Phase};

const RECIPE: &str = r#"
name = "unrolled-fd"
[model]
task = "classification"
num_channels = [4, 8]
expansion_factor = 2
num_groups = 2
downsample_times = 0
dropout = 0.0
post_gn_affine = false
num_layers = 3
num_classes = 5
image_size = [8, 8]
in_channels = 1
[model.classification_head]
head_channels = [2, 4]
final_chansize = 8
[deq]
f_thres = 4
b_thres = 4
stop_mode = "rel"
pretrain_steps = 10
[train]
optimizer = "adam"
lr = 0.01
epochs = 1
batch_size = 4
[data]
dataset = "mnist"
"#;

#[test]
fn unrolled_gradients_match_float64_finite_differences() {
    let cfg = ExperimentConfig::from_toml_str(RECIPE, "test").unwrap();
    let model = Mdeq::new(&cfg.model, DType::F64, &Device::Cpu, 3).unwrap();
    let dev = Device::Cpu;
    // Zero-initialised biases put ReLU inputs exactly on the kink, where backprop's convention
    // (derivative 0) and finite differences (half the slope) rightly disagree: move every
    // parameter off its initial value.
    for (i, e) in model.store().parameters().enumerate() {
        let n = e.var.elem_count();
        let noise: Vec<f64> = (0..n)
            .map(|j| (((i * 131 + j * 71) % 97) as f64 / 97.0 - 0.5) * 0.1)
            .collect();
        let noise = Tensor::from_vec(noise, e.var.shape(), &dev).unwrap();
        e.var.set(&(e.var.as_tensor() + noise).unwrap()).unwrap();
    }
    let pixels: Vec<f64> = (0..4 * 64)
        .map(|i| ((i * 29 % 17) as f64 - 8.0) / 6.0)
        .collect();
    let image = Tensor::from_vec(pixels, (4, 1, 8, 8), &dev).unwrap();
    let labels = Tensor::new(&[0i64, 3, 1, 4], &dev).unwrap();
    let loss_fn = |logits: &Tensor| candle_nn::loss::cross_entropy(logits, &labels);
    let rt = cfg.deq.runtime();
    let masks = vec![None, None];
    let phase = Phase::Unrolled(cfg.model.num_layers);
    let g = train_gradients(&model, &image, &masks, &loss_fn, &rt, phase, None).unwrap();
    let loss_at = || -> f64 {
        let g = train_gradients(&model, &image, &masks, &loss_fn, &rt, phase, None).unwrap();
        g.loss.to_scalar::<f64>().unwrap()
    };
    let mut checked = 0;
    for (name, grad) in &g.grads {
        let prefix_of_interest = [
            "downsample.0",
            "fullstage.branches.0",
            "fullstage.fuse_layers",
            "incre_modules",
            "classifier",
        ];
        if !prefix_of_interest.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let entry = model.store().get(name).unwrap();
        let base = entry
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let analytic = grad
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // One entry per tensor, away from its start.
        {
            let k = base.len() / 3;
            let at = |delta: f64| {
                let mut v = base.clone();
                v[k] += delta;
                let t = Tensor::from_vec(v, entry.var.shape(), &dev).unwrap();
                entry.var.set(&t).unwrap();
                let l = loss_at();
                entry
                    .var
                    .set(&Tensor::from_vec(base.clone(), entry.var.shape(), &dev).unwrap())
                    .unwrap();
                l
            };
            // The stem's weights touch every pixel: ReLU kinks lie within 1e-6 of the point, so
            // the step is small (float64 round-off stays near 1e-9 of the loss).
            let h = 1e-7;
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let err = (analytic[k] - fd).abs() / fd.abs().max(1e-3);
            assert!(
                err < 1e-5,
                "{name}[{k}]: backprop {} vs finite differences {fd}",
                analytic[k]
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} entries checked");
}
