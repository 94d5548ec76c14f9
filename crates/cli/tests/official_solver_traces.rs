//! The official-mode Broyden against the official solver's own residual traces: every fixture's
//! `meta.json` records, step by step, the residuals the official `broyden` saw in float64
//! (forward solve in eval and train mode, and the backward solve of the train path). Ours, on the
//! same model, input and settings, must see the same residuals and stop at the same step.

use candle_core::{DType, Device, Tensor};
use mdeq_deq::{Coupling, SolverStats};
use mdeq_model::equilibrium::{eval_forward, train_gradients, DeqRuntime, Phase};
use mdeq_model::{ExperimentConfig, Mdeq};
use serde_json::Value;

/// Residuals above this are compared; below it both solvers are in float64 rounding noise
/// (relative residual ~1e-16 · amplification), where the traces legitimately part.
const COMPARED_ABOVE: f64 = 1e-9;
/// Relative agreement required above that floor (observed: 1e-15 at the first step, growing
/// to ~3e-7 as the residual approaches 1e-9).
const TRACE_RTOL: f64 = 1e-5;

struct Fixture {
    meta: Value,
    config: ExperimentConfig,
    model: Mdeq,
    io: std::collections::HashMap<String, Tensor>,
}

fn fixture(name: &str) -> Fixture {
    let dir = format!(
        "{}/../../../shared/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let config = ExperimentConfig::load(&format!("{dir}/config.yaml")).unwrap();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/meta.json")).unwrap())
            .unwrap();
    let model = Mdeq::new(&config.model, DType::F64, &Device::Cpu, 0).unwrap();
    let weights = format!("{dir}/weights.safetensors");
    let state = mdeq_checkpoint::read_state_dict(&weights).unwrap();
    mdeq_checkpoint::import::load_into(&model, state, &weights).unwrap();
    let io =
        candle_core::safetensors::load(format!("{dir}/io_f64.safetensors"), &Device::Cpu).unwrap();
    Fixture {
        meta,
        config,
        model,
        io,
    }
}

/// The official Broyden with the float64 reference's threshold and eps, both directions.
fn official_runtime(f: &Fixture) -> DeqRuntime {
    let c = &f.meta["config"];
    let mut deq = f.config.deq.clone();
    deq.coupling = Coupling::Official;
    deq.f_solver = "broyden".into();
    deq.b_solver = "broyden".into();
    deq.fallback.clear();
    deq.f_thres = c["f64_reference_thres"].as_u64().unwrap() as usize;
    deq.b_thres = deq.f_thres;
    deq.eps = c["f64_reference_eps"].as_f64().unwrap();
    DeqRuntime::from_config(&deq).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Compares our trace with the official one (official mode: every sample carries the batch
/// norm); with `same_stop`, also the step of the lowest residual, which is where both stopped.
fn assert_same_trace(label: &str, ours: &SolverStats, official: &Value, same_stop: bool) {
    let (rel, abs) = (
        floats(&official["rel_trace"]),
        floats(&official["abs_trace"]),
    );
    let mut compared = 0;
    for (k, (r, a)) in rel.iter().zip(&abs).enumerate().take(ours.steps) {
        if *r < COMPARED_ABOVE || *a < COMPARED_ABOVE {
            break;
        }
        let (our_r, our_a) = (ours.rel_trace[k][0], ours.abs_trace[k][0]);
        let diff = ((our_r - r) / r).abs().max(((our_a - a) / a).abs());
        assert!(
            diff <= TRACE_RTOL,
            "{label}, step {}: ours rel {our_r:e} abs {our_a:e}, official rel {r:e} abs {a:e}",
            k + 1
        );
        compared += 1;
    }
    assert!(
        compared >= 5,
        "{label}: only {compared} steps above the floor"
    );
    if same_stop {
        let nstep = official["nstep"].as_u64().unwrap() as usize;
        assert_eq!(ours.steps, nstep, "{label}: steps taken");
        assert!(
            ours.lowest_step.iter().all(|&s| s == nstep),
            "{label}: lowest at {:?}, official at {nstep}",
            ours.lowest_step
        );
    }
}

#[test]
fn official_broyden_sees_the_official_residuals_step_by_step() {
    let f = fixture("cls-tiny");
    let rt = official_runtime(&f);
    let x = &f.io["x"];
    let (_, _, eval) = eval_forward(&f.model, x, &rt).unwrap();
    assert_same_trace(
        "cls-tiny eval forward",
        &eval,
        &f.meta["eval_f64"]["forward_solver"],
        true,
    );

    let labels = f.io["train.labels"].to_dtype(DType::I64).unwrap();
    let loss = |logits: &Tensor| candle_nn::loss::cross_entropy(logits, &labels);
    let masks = vec![None; f.config.model.num_branches()];
    let g = train_gradients(&f.model, x, &masks, &loss, &rt, Phase::Deq, None).unwrap();
    let train = &f.meta["train_f64"];
    assert_same_trace(
        "cls-tiny train forward",
        g.forward_stats.as_ref().unwrap(),
        &train["forward_solver"],
        true,
    );
    assert_same_trace(
        "cls-tiny train backward",
        g.backward_stats.as_ref().unwrap(),
        &train["backward_solver"],
        true,
    );

    // seg-tiny stops in abs mode at an eps (1e-14) below float64's floor for its state (~3e-14
    // from step 11 on), so its lowest step is rounding noise in both: the trace alone is compared.
    let f = fixture("seg-tiny");
    let rt = official_runtime(&f);
    let (_, _, eval) = eval_forward(&f.model, &f.io["x"], &rt).unwrap();
    assert_same_trace(
        "seg-tiny eval forward",
        &eval,
        &f.meta["eval_f64"]["forward_solver"],
        false,
    );
}
