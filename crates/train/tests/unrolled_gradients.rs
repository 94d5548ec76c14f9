//! The unrolled pretraining phase (reference §4.2) differentiated end to end: parameter gradients of
//! a small two-branch classification MDEQ in float64 against central finite differences of the
//! loss, for parameters of every part (stem, cell, fuse, head).

use candle_core::{DType, Device, Tensor};
use mdeq_model::Mdeq;
use mdeq_testkit::tiny_classifier;
use mdeq_train::step::{train_gradients, Phase};

#[test]
fn unrolled_gradients_match_float64_finite_differences() -> mdeq_testkit::Result {
    let mut cfg = tiny_classifier(&[4, 8]);
    cfg.deq.pretrain_steps = 10;
    let model = Mdeq::new(&cfg.model, DType::F64, &Device::Cpu, 3)?;
    let dev = Device::Cpu;
    // Zero-initialised biases put ReLU inputs exactly on the kink, where backprop's convention
    // (derivative 0) and finite differences (half the slope) rightly disagree: move every
    // parameter off its initial value.
    for (i, e) in model.store().parameters().enumerate() {
        let n = e.var.elem_count();
        let noise: Vec<f64> = (0..n)
            .map(|j| (((i * 131 + j * 71) % 97) as f64 / 97.0 - 0.5) * 0.1)
            .collect();
        let noise = Tensor::from_vec(noise, e.var.shape(), &dev)?;
        e.var.set(&(e.var.as_tensor() + noise)?)?;
    }
    let pixels: Vec<f64> = (0..4 * 64)
        .map(|i| ((i * 29 % 17) as f64 - 8.0) / 6.0)
        .collect();
    let image = Tensor::from_vec(pixels, (4, 1, 8, 8), &dev)?;
    let labels = Tensor::new(&[0i64, 3, 1, 4], &dev)?;
    let loss_fn = |logits: &Tensor| candle_nn::loss::cross_entropy(logits, &labels);
    let rt = cfg.deq.runtime();
    let masks = vec![None, None];
    let phase = Phase::Unrolled(cfg.model.num_layers);
    let g = train_gradients(&model, &image, &masks, &loss_fn, &rt, phase, None)?;
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
        let base = entry.var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let analytic = grad.as_ref().unwrap().flatten_all()?.to_vec1::<f64>()?;
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
    Ok(())
}
