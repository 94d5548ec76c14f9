//! The cell as the solvers' map: evaluating it on the unconverged samples only (batch
//! compaction) gives every sample the answer it gets when the whole batch is evaluated, with
//! dropout masks and the injection following their samples.

use candle_core::{DType, Device, Tensor};
use mdeq_deq::{Coupling, SampleStatus, SolverKind, SolverOptions, StopMode};
use mdeq_model::cell::solver_map::CellMap;
use mdeq_model::Mdeq;
use mdeq_testkit::tiny_classifier;
use rand::SeedableRng;

fn compacted_solves_match_whole_batch_solves_sample_for_sample() -> mdeq_testkit::Result {
    let mut cfg = tiny_classifier(&[4, 8]);
    cfg.model.dropout = 0.3;
    cfg.model.post_gn_affine = true;
    let dev = Device::Cpu;
    let model = Mdeq::new(&cfg.model, DType::F64, &dev, 5)?;
    let batch = 6;
    // Images of very different contrast converge after different numbers of steps.
    let pixels: Vec<f64> = (0..batch * 64)
        .map(|i| ((i * 29 % 17) as f64 - 8.0) / 6.0 * (1 + i / 64) as f64 * 0.5)
        .collect();
    let image = Tensor::from_vec(pixels, (batch, 1, 8, 8), &dev)?;
    let injection = model.injection(&image, false)?;
    let masks = model.dropout_masks(batch, true, &mut rand::rngs::StdRng::seed_from_u64(1))?;
    assert!(masks.iter().all(Option::is_some));
    let layout = model.layout(8, 8);
    let cell = model.cell().prepared(true)?;
    let map = CellMap {
        cell: &cell,
        injection: &injection,
        masks: &masks,
        layout: &layout,
    };
    let z0 = Tensor::zeros((batch, layout.size()), DType::F64, &dev)?;
    let opts = SolverOptions {
        threshold: 40,
        // A randomly initialised cell is far from contractive: with this tolerance some samples
        // converge (and are frozen) early and the others run to the step limit.
        eps: 0.35,
        stop_mode: StopMode::Rel,
        coupling: Coupling::PerSample,
        compact_batch: true,
    };
    for name in ["broyden", "anderson"] {
        let kind = SolverKind::from_name(name).unwrap();
        let mut compacting = CellMap { ..map };
        let compacted = kind.solve(&mut compacting, &z0, &opts)?;
        let whole_batch = SolverOptions {
            compact_batch: false,
            ..opts
        };
        let full = kind.solve(&mut CellMap { ..map }, &z0, &whole_batch)?;
        let (c, f) = (&compacted.stats, &full.stats);
        assert!(
            f.status.contains(&SampleStatus::Converged)
                && f.status.contains(&SampleStatus::MaxSteps),
            "{name}: {:?} {:?}",
            f.status,
            f.lowest
        );
        assert_eq!(c.status, f.status, "{name}");
        assert_eq!(f.sample_evaluations, batch * f.evaluations, "{name}");
        assert!(
            c.sample_evaluations < f.sample_evaluations,
            "{name}: {} sample evaluations, {} without compaction",
            c.sample_evaluations,
            f.sample_evaluations
        );
        let diff = (&compacted.z - &full.z)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{name}: z* differs by {diff}");
    }
    Ok(())
}

mdeq_testkit::on_every_kernel!(compacted_solves_match_whole_batch_solves_sample_for_sample,);
