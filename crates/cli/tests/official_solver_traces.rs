//! The official-mode Broyden against the official solver's own residual traces: every fixture's
//! `meta.json` records, step by step, the residuals the official `broyden` saw in float64 and in
//! float32 (forward solve in eval and train mode, and the backward solve of the train path). Ours,
//! on the same model, input and settings, must see the same residuals, and in float64 stop at the
//! same step.

use candle_core::{DType, Device, Tensor};
use mdeq_deq::{Coupling, SolverStats};
use mdeq_model::equilibrium::{eval_forward, train_gradients, DeqRuntime, Phase};
use mdeq_model::{ExperimentConfig, Mdeq};
use serde_json::Value;

/// How closely a trace must be followed in one precision.
struct Agreement {
    /// Residuals above this are compared; below it both solvers are in rounding noise, where
    /// the traces legitimately part.
    above: f64,
    /// Relative agreement required above it.
    rtol: f64,
}

/// float64: observed 1e-15 at the first step, growing to ~3e-7 as the residual nears 1e-9.
const F64: Agreement = Agreement {
    above: 1e-9,
    rtol: 1e-5,
};

/// float32: observed ~1e-6 at the first steps, up to ~3e-4 as the residual nears 1e-4 (the
/// fixture README: "about 3 digits until float32 reaches its floor").
const F32: Agreement = Agreement {
    above: 1e-4,
    rtol: 1e-3,
};

struct Fixture {
    meta: Value,
    config: ExperimentConfig,
    model: Mdeq,
    io: std::collections::HashMap<String, Tensor>,
}

/// The fixture's model in `dtype`, with the reference tensors of that precision.
fn fixture(name: &str, dtype: DType) -> Fixture {
    let dir = format!(
        "{}/../../../shared/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let config = ExperimentConfig::load(&format!("{dir}/config.yaml")).unwrap();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/meta.json")).unwrap())
            .unwrap();
    let model = Mdeq::new(&config.model, dtype, &Device::Cpu, 0).unwrap();
    let weights = format!("{dir}/weights.safetensors");
    let state = mdeq_checkpoint::read_state_dict(&weights).unwrap();
    mdeq_checkpoint::import::load_into(&model, state, &weights).unwrap();
    let io_file = if dtype == DType::F64 { "io_f64" } else { "io" };
    let io = candle_core::safetensors::load(format!("{dir}/{io_file}.safetensors"), &Device::Cpu)
        .unwrap();
    Fixture {
        meta,
        config,
        model,
        io,
    }
}

/// The official Broyden, both directions, with the threshold and eps the reference in `dtype`
/// was solved with.
fn official_runtime(f: &Fixture, dtype: DType) -> DeqRuntime {
    let c = &f.meta["config"];
    let (thres, eps) = if dtype == DType::F64 {
        ("f64_reference_thres", "f64_reference_eps")
    } else {
        ("fixture_thres", "fixture_eps")
    };
    let mut deq = f.config.deq.clone();
    deq.coupling = Coupling::Official;
    deq.f_solver = "broyden".into();
    deq.b_solver = "broyden".into();
    deq.fallback.clear();
    deq.f_thres = c[thres].as_u64().unwrap() as usize;
    deq.b_thres = deq.f_thres;
    deq.eps = c[eps].as_f64().unwrap();
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
fn assert_same_trace(
    label: &str,
    ours: &SolverStats,
    official: &Value,
    agreement: &Agreement,
    same_stop: bool,
) {
    let (rel, abs) = (
        floats(&official["rel_trace"]),
        floats(&official["abs_trace"]),
    );
    let mut compared = 0;
    for (k, (r, a)) in rel.iter().zip(&abs).enumerate().take(ours.steps) {
        if *r < agreement.above || *a < agreement.above {
            break;
        }
        let (our_r, our_a) = (ours.rel_trace[k][0], ours.abs_trace[k][0]);
        let diff = ((our_r - r) / r).abs().max(((our_a - a) / a).abs());
        assert!(
            diff <= agreement.rtol,
            "{label}, step {}: ours rel {our_r:e} abs {our_a:e}, official rel {r:e} abs {a:e}",
            k + 1
        );
        compared += 1;
    }
    assert!(
        compared >= 2,
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

/// Every solve the fixtures record in `dtype`; `same_stop` checks the stopping step too.
fn check_fixture_solves(dtype: DType, agreement: &Agreement, same_stop: bool) {
    let key = if dtype == DType::F64 { "f64" } else { "f32" };
    let f = fixture("cls-tiny", dtype);
    let rt = official_runtime(&f, dtype);
    let x = &f.io["x"];
    let label = |what: &str| format!("cls-tiny {key} {what}");
    let (_, _, eval) = eval_forward(&f.model, x, &rt).unwrap();
    let eval_ref = &f.meta[format!("eval_{key}")]["forward_solver"];
    assert_same_trace(
        &label("eval forward"),
        &eval,
        eval_ref,
        agreement,
        same_stop,
    );

    let labels = f.io["train.labels"].to_dtype(DType::I64).unwrap();
    let loss = |logits: &Tensor| candle_nn::loss::cross_entropy(logits, &labels);
    let masks = vec![None; f.config.model.num_branches()];
    let g = train_gradients(&f.model, x, &masks, &loss, &rt, Phase::Deq, None).unwrap();
    let train = &f.meta[format!("train_{key}")];
    let forward = g.forward_stats.as_ref().unwrap();
    let backward = g.backward_stats.as_ref().unwrap();
    let (fwd_ref, bwd_ref) = (&train["forward_solver"], &train["backward_solver"]);
    assert_same_trace(
        &label("train forward"),
        forward,
        fwd_ref,
        agreement,
        same_stop,
    );
    assert_same_trace(
        &label("train backward"),
        backward,
        bwd_ref,
        agreement,
        same_stop,
    );

    // seg-tiny stops in abs mode at an eps below its state's rounding floor (float64: ~3e-14
    // from step 11 on), so its lowest step is rounding noise in both: the trace alone counts.
    let f = fixture("seg-tiny", dtype);
    let rt = official_runtime(&f, dtype);
    let (_, _, eval) = eval_forward(&f.model, &f.io["x"], &rt).unwrap();
    let eval_ref = &f.meta[format!("eval_{key}")]["forward_solver"];
    let label = format!("seg-tiny {key} eval forward");
    assert_same_trace(&label, &eval, eval_ref, agreement, false);
}

/// In float64 ours stops where the official code did (cls-tiny: 55, 55, 52).
#[test]
fn official_broyden_sees_the_official_float64_residuals_step_by_step() {
    check_fixture_solves(DType::F64, &F64, true);
}

/// In float32 both reach the floor (~1e-7) and then wander in rounding noise, so where the
/// lowest residual falls (the official stopping step) is noise too: the trace alone counts.
#[test]
fn official_broyden_sees_the_official_float32_residuals_until_the_rounding_floor() {
    check_fixture_solves(DType::F32, &F32, false);
}
