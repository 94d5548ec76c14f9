//! Training end to end on a small synthetic IDX dataset: both phases run, checkpoints are
//! written, and a run interrupted and resumed ends bit-for-bit where an uninterrupted one does.

use mdeq_model::Compute;
use mdeq_recipe::ExperimentConfig;
use mdeq_testkit::{error_text, tiny_classifier, write_toy_idx};
use mdeq_train::step::{jacobian_penalty, jittered_threshold};
use mdeq_train::{TrainOptions, TrainSummary};
use std::path::{Path, PathBuf};

/// The CPU with the process default kernels (`MDEQ_KERNELS`), in float32.
/// A run of one process.
fn train(
    cfg: &ExperimentConfig,
    opts: &TrainOptions,
    compute: &Compute,
) -> anyhow::Result<TrainSummary> {
    mdeq_train::train(cfg, opts, compute, &mdeq_distributed::World::single())
}

fn cpu() -> Compute {
    Compute::cpu(candle_core::DType::F32).with_kernels(mdeq_kernels::active_kernels())
}

/// The tiny classifier as a ten-class, two-epoch recipe that pretrains for three steps.
fn config() -> ExperimentConfig {
    let mut cfg = tiny_classifier(&[4, 4]);
    cfg.model.dropout = 0.1;
    cfg.model.num_layers = 2;
    cfg.model.num_classes = 10;
    cfg.deq.pretrain_steps = 3;
    cfg.train.weight_decay = 1e-4;
    cfg.train.epochs = 2;
    cfg
}

fn opts(data: &Path, out: PathBuf, max_steps: usize, resume: bool) -> TrainOptions {
    TrainOptions {
        data: Some(data.to_path_buf()),
        out,
        epochs: None,
        max_steps: Some(max_steps),
        batch_size: None,
        seed: 3,
        resume,
        log_every: 1,
        eval_limit: None,
        micro_batches: None,
    }
}

fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .filter(|(k, _)| !k.starts_with("optim.") && !k.ends_with("num_batches_tracked"))
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn interrupted_and_resumed_training_matches_an_uninterrupted_run() -> mdeq_testkit::Result {
    let root = std::env::temp_dir().join(format!("mdeq-train-{}", std::process::id()));
    let data = root.join("data");
    write_toy_idx(&data, 24)?;
    let cfg = config();
    let straight = train(&cfg, &opts(&data, root.join("a"), 8, false), &cpu())?;
    assert_eq!(straight.steps, 8);
    let first = train(&cfg, &opts(&data, root.join("b"), 5, false), &cpu())?;
    assert_eq!(first.steps, 5);
    let resumed = train(&cfg, &opts(&data, root.join("b"), 8, true), &cpu())?;
    assert_eq!(resumed.steps, 8);
    assert_eq!(
        straight.last_loss.to_bits(),
        resumed.last_loss.to_bits(),
        "last loss"
    );
    assert_eq!(
        weights(&root.join("a/checkpoint-last.safetensors")),
        weights(&root.join("b/checkpoint-last.safetensors"))
    );
    // A training checkpoint loads as a model (optimizer state is skipped) for eval and predict.
    let (cfg2, _) = mdeq_checkpoint::format::load(
        &root.join("a/checkpoint-best.safetensors"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    assert_eq!(cfg2, cfg);
    // Both phases ran and were logged, with solver statistics in DEQ mode.
    let log = std::fs::read_to_string(root.join("a/metrics.jsonl"))?;
    assert!(log.contains("\"phase\":\"unrolled\"") && log.contains("\"phase\":\"deq\""));
    assert!(log.lines().any(|l| l.contains("\"phase\":\"deq\"")
        && l.contains("\"forward_steps\":")
        && !l.contains("\"forward_steps\":null")));
    // TensorBoard events and the PNG plots (a font is installed by .ci/run).
    let names: Vec<String> = std::fs::read_dir(root.join("a"))?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("events.out.tfevents.")),
        "{names:?}"
    );
    for png in ["loss.png", "score.png", "residuals.png"] {
        let bytes = std::fs::read(root.join("a").join(png))?;
        assert!(bytes.starts_with(b"\x89PNG"), "{png}");
    }
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn missing_data_is_an_error_naming_the_path() -> mdeq_testkit::Result {
    let err = train(
        &config(),
        &opts(
            Path::new("/nonexistent/mdeq"),
            std::env::temp_dir().join("mdeq-nodata"),
            1,
            false,
        ),
        &cpu(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("/nonexistent/mdeq"), "{err:#}");
    Ok(())
}

#[test]
fn jacobian_loss_follows_the_official_schedule_and_is_logged() -> mdeq_testkit::Result {
    let mut cfg = config();
    cfg.train.pretrain_jac_loss_weight = 0.2;
    cfg.train.jac_loss_weight = 0.5;
    cfg.train.jac_incremental = 2;
    cfg.train.jac_stop_epoch = 1;
    cfg.train.jac_loss_freq = 1.0;
    // pretrain_steps = 3: weight 0.2 while pretraining, then 0.5 + 0.1 per 2 steps, 0 from epoch 1.
    let factor = |step, epoch| jacobian_penalty(&cfg, step, epoch, 9).map(|p| p.factor);
    assert_eq!(factor(0, 0), Some(0.2));
    assert_eq!(factor(3, 0), Some(0.5));
    assert!((factor(7, 0).unwrap() - 0.7).abs() < 1e-12);
    assert_eq!(factor(7, 1), None);
    let mut rare = cfg.clone();
    rare.train.jac_loss_freq = 0.25;
    let hits = (0..2000)
        .filter(|&s| jacobian_penalty(&rare, s, 0, 9).is_some())
        .count();
    assert!(
        (400..600).contains(&hits),
        "{hits} of 2000 steps at frequency 0.25"
    );

    let root = std::env::temp_dir().join(format!("mdeq-jac-{}", std::process::id()));
    let data = root.join("data");
    write_toy_idx(&data, 24)?;
    train(&cfg, &opts(&data, root.join("run"), 5, false), &cpu())?;
    let log = std::fs::read_to_string(root.join("run/metrics.jsonl"))?;
    let penalties: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("\"kind\":\"step\""))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["jacobian_penalty"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(penalties.len(), 5, "both phases carry the penalty");
    assert!(
        penalties.iter().all(|p| p.is_finite() && *p > 0.0),
        "{penalties:?}"
    );
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn forward_threshold_is_jittered_on_jacobian_loss_steps_as_the_official_code_does(
) -> mdeq_testkit::Result {
    let mut cfg = config();
    cfg.deq.f_thres = 18;
    cfg.deq.rand_f_thres_delta = 2;
    // numpy's randint(-2, 2): δ uniform over {-2, -1, 0, 1}.
    let mut counts = std::collections::BTreeMap::new();
    for step in 0..4000 {
        *counts.entry(jittered_threshold(&cfg, step, 9)).or_insert(0) += 1;
    }
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        vec![16, 17, 18, 19]
    );
    assert!(
        counts.values().all(|&n| (850..1150).contains(&n)),
        "{counts:?}"
    );
    cfg.deq.rand_f_thres_delta = 0;
    assert!((0..100).all(|s| jittered_threshold(&cfg, s, 9) == 18));

    // In training: a solve that cannot converge runs its whole limit, so the logged forward
    // steps show the limit each penalised step drew.
    let mut cfg = config();
    cfg.deq.pretrain_steps = 0;
    cfg.deq.eps = 1e-30;
    cfg.deq.rand_f_thres_delta = 2;
    cfg.train.jac_loss_weight = 0.1;
    cfg.train.jac_loss_freq = 1.0;
    let root = std::env::temp_dir().join(format!("mdeq-jitter-{}", std::process::id()));
    let data = root.join("data");
    write_toy_idx(&data, 24)?;
    train(&cfg, &opts(&data, root.join("run"), 6, false), &cpu())?;
    let log = std::fs::read_to_string(root.join("run/metrics.jsonl"))?;
    let mut steps = Vec::new();
    for line in log.lines().filter(|l| l.contains("\"kind\":\"step\"")) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let (step, forward) = (v["step"].as_u64(), v["forward_steps"].as_u64());
        let (Some(step), Some(forward)) = (step, forward) else {
            mdeq_testkit::bail!("step line without steps: {line}");
        };
        // The log's step counts steps taken, the draw is keyed by the step's index.
        assert_eq!(
            forward as usize,
            jittered_threshold(&cfg, step as usize - 1, 3)
        );
        steps.push(forward);
    }
    assert_eq!(steps.len(), 6);
    assert!(steps.iter().any(|&s| s != 4), "no jitter in {steps:?}");
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn a_diverging_run_stops_with_an_error_and_never_checkpoints_non_finite_weights(
) -> mdeq_testkit::Result {
    // Adam moves every weight by about lr per step: at 1e30 the first step leaves finite but
    // huge weights, whose next forward overflows. The run must stop, say why, and leave no
    // checkpoint with NaN or ±∞ behind (an evaluation of such weights must not score either).
    let mut cfg = config();
    cfg.train.lr = 1e30;
    let root = mdeq_testkit::scratch_dir("diverge")?;
    let data = root.join("data");
    write_toy_idx(&data, 24)?;
    let mut o = opts(&data, root.join("run"), 12, false);
    o.eval_limit = Some(8);
    let err = error_text("training at lr 1e30", train(&cfg, &o, &cpu()))?;
    assert!(
        err.contains("non-finite") || err.contains("the loss is"),
        "{err}"
    );
    for name in ["checkpoint-last.safetensors", "checkpoint-best.safetensors"] {
        let path = root.join("run").join(name);
        if path.exists() {
            for (key, t) in candle_core::safetensors::load(&path, &candle_core::Device::Cpu)? {
                assert!(mdeq_model::params::all_finite(&t)?, "{name}: {key}");
            }
        }
    }
    // Writing non-finite weights is refused outright, naming the tensor and the file.
    let dev = candle_core::Device::Cpu;
    for (values, finite) in [
        ([1.0f32, 2.0], true),
        ([1.0, f32::INFINITY], false),
        ([f32::NAN, 0.0], false),
    ] {
        let t = candle_core::Tensor::new(&values, &dev)?;
        assert_eq!(mdeq_model::params::all_finite(&t)?, finite, "{values:?}");
    }
    let model = mdeq_model::Mdeq::new(
        &cfg.model,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        0,
    )?;
    let entry = &model.store().entries()[0];
    entry.var.set(&(entry.var.as_tensor() * f64::NAN)?)?;
    let path = root.join("nan.safetensors");
    let err = mdeq_checkpoint::format::save(&path, &model, &cfg, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&entry.name) && err.contains("nan.safetensors"),
        "{err}"
    );
    assert!(!path.exists());
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn an_empty_dataset_is_an_error_not_a_run_of_nothing() -> mdeq_testkit::Result {
    let root = mdeq_testkit::scratch_dir("empty-data")?;
    let data = root.join("data");
    write_toy_idx(&data, 0)?;
    let err = error_text(
        "training on no data",
        train(&config(), &opts(&data, root.join("run"), 2, false), &cpu()),
    )?;
    assert!(
        err.contains("holds no samples") && err.contains("data"),
        "{err}"
    );
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn resume_refuses_a_checkpoint_of_another_recipe_or_without_a_training_state(
) -> mdeq_testkit::Result {
    let root = mdeq_testkit::scratch_dir("resume-mismatch")?;
    let data = root.join("data");
    write_toy_idx(&data, 24)?;
    let cfg = config();
    train(&cfg, &opts(&data, root.join("run"), 2, false), &cpu())?;
    let mut other = cfg.clone();
    other.train.lr = 0.02;
    let err = error_text(
        "resuming another recipe's run",
        train(&other, &opts(&data, root.join("run"), 4, true), &cpu()),
    )?;
    assert!(
        err.contains("checkpoint-last.safetensors")
            && err.contains("another recipe")
            && err.contains("- lr = 0.01")
            && err.contains("+ lr = 0.02"),
        "{err}"
    );
    // A checkpoint written by `mdeq import` (weights and config only) cannot be resumed.
    let model = mdeq_model::Mdeq::new(
        &cfg.model,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        0,
    )?;
    let last = root.join("run/checkpoint-last.safetensors");
    mdeq_checkpoint::format::save(&last, &model, &cfg, None)?;
    let err = error_text(
        "resuming without a training state",
        train(&cfg, &opts(&data, root.join("run"), 4, true), &cpu()),
    )?;
    assert!(err.contains("no training state"), "{err}");
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn zero_batch_size_or_epochs_are_errors_not_a_division_by_zero() -> mdeq_testkit::Result {
    let root = mdeq_testkit::scratch_dir("zero-batch")?;
    let data = root.join("data");
    write_toy_idx(&data, 8)?;
    for (batch, epochs) in [(Some(0), None), (None, Some(0))] {
        let mut o = opts(&data, root.join("run"), 2, false);
        (o.batch_size, o.epochs) = (batch, epochs);
        let err = error_text(
            &format!("batch {batch:?}, epochs {epochs:?}"),
            train(&config(), &o, &cpu()),
        )?;
        assert!(err.contains("must be positive"), "{err}");
    }
    // The recipe itself cannot say 0 either.
    let mut cfg = config();
    cfg.train.batch_size = 0;
    let err = mdeq_recipe::ExperimentConfig::from_toml_str(&cfg.to_toml_string(), "zero.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.batch_size = 0"), "{err}");
    cfg.train.batch_size = 4;
    cfg.train.lr = -1.0;
    let err = mdeq_recipe::ExperimentConfig::from_toml_str(&cfg.to_toml_string(), "neg.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.lr = -1"), "{err}");
    std::fs::remove_dir_all(root)?;
    Ok(())
}

/// The same five steps (three unrolled, two DEQ with Broyden and the implicit backward) through
/// our CPU kernels and through the portable ones (candle's stock ops: the CUDA code path), in
/// float32 and float64. Two independent implementations in float64 must agree to rounding; each
/// float32 run must stay within float32 error of them; and a float32 run resumed in float64 (the
/// optimizer's moments move to the new precision) must continue the same run.
#[test]
fn every_kernel_choice_and_float_type_trains_the_same_run() -> mdeq_testkit::Result {
    use candle_core::DType;
    use mdeq_kernels::KernelChoice::{Native, Portable};
    let root = mdeq_testkit::scratch_dir("train-kernels")?;
    let data = root.join("data");
    write_toy_idx(&data, 24)?;
    let cfg = config();
    let mut loss = std::collections::HashMap::new();
    for kernels in [Native, Portable] {
        for dtype in [DType::F32, DType::F64] {
            let out = root.join(format!("{kernels}-{dtype:?}"));
            let compute = Compute::cpu(dtype).with_kernels(kernels);
            let run = train(&cfg, &opts(&data, out, 5, false), &compute)?;
            assert_eq!(run.steps, 5);
            loss.insert((kernels, dtype), run.last_loss);
        }
    }
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    let reference = loss[&(Native, DType::F64)];
    assert!(
        rel(loss[&(Portable, DType::F64)], reference) < 1e-9,
        "{loss:?}"
    );
    for kernels in [Native, Portable] {
        assert!(
            rel(loss[&(kernels, DType::F32)], reference) < 1e-3,
            "{loss:?}"
        );
    }
    let out = root.join("resumed-in-f64");
    train(&cfg, &opts(&data, out.clone(), 3, false), &cpu())?;
    let resumed = train(&cfg, &opts(&data, out, 5, true), &Compute::cpu(DType::F64))?;
    assert_eq!(resumed.steps, 5);
    assert!(
        rel(resumed.last_loss, reference) < 1e-3,
        "{} vs {reference}",
        resumed.last_loss
    );
    std::fs::remove_dir_all(root)?;
    Ok(())
}

// With data.validation the run trains on the rest of the training files and evaluates on the
// held-out part, never on the test split: the test files here are made unreadable, and the
// epoch length shows the held-out samples left out of training.
#[test]
fn a_validation_split_is_held_out_of_training_and_the_test_split_is_not_read(
) -> mdeq_testkit::Result {
    let root = mdeq_testkit::scratch_dir("validation-split")?;
    let data = root.join("data");
    write_toy_idx(&data, 24)?;
    for entry in std::fs::read_dir(&data)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("t10k"))
        {
            std::fs::write(&path, b"not an IDX file")?;
        }
    }
    let mut cfg = config();
    cfg.data.validation = 8;
    cfg.train.batch_size = 4;
    cfg.train.epochs = 1;
    // 16 training samples in batches of 4: one epoch is 4 steps, then one evaluation.
    let summary = train(&cfg, &opts(&data, root.join("run"), 100, false), &cpu())?;
    assert_eq!(summary.steps, 4);
    let log = std::fs::read_to_string(root.join("run/metrics.jsonl"))?;
    let evals: Vec<serde_json::Value> = log
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<serde_json::Value>, _>>()?
        .into_iter()
        .filter(|v| v["kind"] == "eval")
        .collect();
    assert_eq!(evals.len(), 1);
    assert_eq!(evals[0]["split"], "validation");
    assert_eq!(evals[0]["n"], 8);
    Ok(())
}
