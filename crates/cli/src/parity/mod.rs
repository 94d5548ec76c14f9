//! `mdeq parity`: compares our model, tensor by tensor, with reference tensors produced by the
//! official PyTorch code (the fixture layout of `fixtures/*/io*.safetensors`).

use crate::compute::ComputeArgs;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use mdeq_deq::{Coupling, SolverKind, SolverOptions, SolverStats};
use mdeq_model::equilibrium::{eval_forward, DeqRuntime};
use mdeq_model::nn::bilinear_resize;
use mdeq_model::{Compute, Mdeq, Task};
use mdeq_recipe::ExperimentConfig;
use mdeq_train::step::{train_gradients, Phase};
use serde_json::Value;
use std::collections::HashMap;

mod conditioning;
mod solver_trace;
pub use conditioning::{perturb_by_one_ulp, probe_head_gradient, Centre, GradientConditioning};
pub use solver_trace::{check_trace, Agreement, TraceCheck};

/// Random one-ulp perturbations of f(z*) the gradient-conditioning probe tries.
const CONDITIONING_TRIALS: usize = 40;

/// Outcome of one comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Within tolerance.
    Pass,
    /// Outside tolerance.
    Fail,
    /// Not checked, with the reason.
    Skipped(String),
}

/// One row of the parity report.
#[derive(Debug, Clone)]
pub struct Row {
    /// Reference tensor name.
    pub name: String,
    /// max |ours − reference|.
    pub max_abs_err: f64,
    /// max_abs_err / max |reference|.
    pub max_rel_err: f64,
    /// Allowed max_abs_err.
    pub tolerance: f64,
    /// Pass, fail or skipped.
    pub status: Status,
}

/// What `run` found: one row per reference tensor, and, where the reference has gradients, how
/// well posed comparing them is in the precision we computed in.
#[derive(Debug, Clone)]
pub struct Report {
    /// One row per reference tensor.
    pub rows: Vec<Row>,
    /// The head-gradient conditioning probe at our f(z*) (train path only).
    pub gradient_conditioning: Option<GradientConditioning>,
    /// Our solves against the official solver's residual traces in `meta.json`, where it has
    /// them for the precision we computed in.
    pub solver_traces: Vec<TraceCheck>,
}

/// Parity options.
#[derive(Debug, Clone)]
pub struct ParityOptions {
    /// Solver step limit for both directions; default: the fixture's meta.json, else the config.
    pub threshold: Option<usize>,
    /// Solver tolerance; default: the fixture's meta.json, else the config.
    pub eps: Option<f64>,
    /// Overrides every relative tolerance.
    pub tol_rel: Option<f64>,
    /// Device, float type and kernels our model computes with.
    pub compute: Compute,
}

impl Default for ParityOptions {
    fn default() -> Self {
        Self {
            threshold: None,
            eps: None,
            tol_rel: None,
            compute: Compute::cpu(DType::F32),
        }
    }
}

/// (relative tolerance vs max|ref|, absolute floor) for a reference tensor, from the fixture
/// README's recommendations; doubled when the reference itself is float32.
fn tolerance_for(name: &str, task: Task, ref_is_f32: bool) -> (f64, f64) {
    let (rtol, atol) = if name.starts_with("grad.") {
        (1e-3, 2e-6)
    } else if name.starts_with("train.logits") {
        (5e-5, 1e-6)
    } else if name.starts_with("logits") {
        (
            if task == Task::Segmentation {
                1e-4
            } else {
                5e-5
            },
            1e-6,
        )
    } else {
        (1e-5, 1e-6)
    };
    let k = if ref_is_f32 { 2.0 } else { 1.0 };
    (rtol * k, atol * k)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// Compares `ours` with `reference` (shape and values).
pub fn compare(
    name: &str,
    ours: &Tensor,
    reference: &Tensor,
    task: Task,
    tol_rel: Option<f64>,
) -> Result<Row> {
    let ref_is_f32 = reference.dtype() != DType::F64;
    if ours.dims() != reference.dims() {
        // An infinite error in the report marks the shape mismatch.
        return Ok(Row {
            name: name.into(),
            max_abs_err: f64::INFINITY,
            max_rel_err: f64::INFINITY,
            tolerance: 0.0,
            status: Status::Fail,
        });
    }
    let reference = reference.to_dtype(DType::F64)?;
    let ours = ours.to_dtype(DType::F64)?.to_device(reference.device())?;
    let err = max_abs(&(&ours - &reference)?)?;
    let scale = max_abs(&reference)?;
    let (rtol, atol) = tolerance_for(name, task, ref_is_f32);
    let rtol = tol_rel.unwrap_or(rtol);
    let tolerance = (rtol * scale).max(atol);
    let rel = if scale > 0.0 { err / scale } else { err };
    let ok = err.is_finite() && err <= tolerance;
    Ok(Row {
        name: name.into(),
        max_abs_err: err,
        max_rel_err: rel,
        tolerance,
        status: if ok { Status::Pass } else { Status::Fail },
    })
}

fn skipped(name: &str, reason: &str) -> Row {
    Row {
        name: name.into(),
        max_abs_err: f64::NAN,
        max_rel_err: f64::NAN,
        tolerance: f64::NAN,
        status: Status::Skipped(reason.into()),
    }
}

/// Reference tensors of an io file, and how many branches they hold.
struct Reference {
    tensors: HashMap<String, Tensor>,
}

impl Reference {
    fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
    /// `prefix.0`, `prefix.1`, … as `dtype`, until the first missing index.
    fn branches(&self, prefix: &str, dtype: DType) -> candle_core::Result<Vec<Tensor>> {
        (0..)
            .map_while(|i| self.tensors.get(&format!("{prefix}.{i}")))
            .map(|t| t.to_dtype(dtype))
            .collect()
    }
    fn names_with(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// Flags of `mdeq parity`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The experiment config (TOML, official YAML or preset name).
    #[arg(long)]
    pub config: String,
    /// Weights: official state dict in any supported format, or an mdeq checkpoint.
    #[arg(long)]
    pub weights: String,
    /// Reference tensors (io.safetensors / io_f64.safetensors).
    #[arg(long)]
    pub io: String,
    /// Overrides every relative tolerance.
    #[arg(long)]
    pub tol_rel: Option<f64>,
    /// Where and in what our model computes.
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Solver step limit (default: the fixture's meta.json, else the config).
    #[arg(long)]
    pub threshold: Option<usize>,
    /// Solver tolerance (default: the fixture's meta.json, else the config).
    #[arg(long)]
    pub eps: Option<f64>,
}

/// Checks, prints the report, and fails when any tensor or solver trace failed.
pub fn run(args: Args) -> Result<()> {
    let cfg = ExperimentConfig::load(&args.config)?;
    let opts = ParityOptions {
        threshold: args.threshold,
        eps: args.eps,
        tol_rel: args.tol_rel,
        compute: args.compute.resolve()?,
    };
    let report = check(&cfg, &args.weights, &args.io, &opts)?;
    if !print_report(&report) {
        anyhow::bail!("parity check failed");
    }
    Ok(())
}

/// Runs every path that `io` has references for and returns one row per reference tensor.
pub fn check(
    config: &ExperimentConfig,
    weights: &str,
    io: &str,
    opts: &ParityOptions,
) -> Result<Report> {
    opts.compute.run(|| check_on(config, weights, io, opts))
}

fn check_on(
    config: &ExperimentConfig,
    weights: &str,
    io: &str,
    opts: &ParityOptions,
) -> Result<Report> {
    let device = &opts.compute.device;
    let model = Mdeq::new(&config.model, opts.compute.dtype, device, 0)?;
    let state = mdeq_checkpoint::read_state_dict(weights)?;
    mdeq_checkpoint::import::load_into(&model, state, weights)?;
    let tensors = candle_core::safetensors::load(io, device)
        .with_context(|| format!("reading reference tensors {io}"))?;
    let reference = Reference { tensors };
    let task = config.model.task;
    let cast = |t: &Tensor| t.to_dtype(opts.compute.dtype);
    let mut rows = Vec::new();
    let mut gradient_conditioning = None;
    let check = |rows: &mut Vec<Row>, name: &str, ours: &Tensor| -> Result<()> {
        if let Some(r) = reference.get(name) {
            rows.push(compare(name, ours, r, task, opts.tol_rel)?);
        }
        Ok(())
    };

    let x = cast(
        reference
            .get("x")
            .context("reference file has no input tensor 'x'")?,
    )?;

    // Eval path: injection, one cell application, head on the reference equilibrium.
    let injection = model.injection(&x, false)?;
    for (i, t) in injection.iter().enumerate() {
        check(&mut rows, &format!("injection.{i}"), t)?;
    }
    let z0 = reference.branches("z0", opts.compute.dtype)?;
    if !z0.is_empty() {
        let cell = model.cell().prepared(true)?;
        let masks = model.dropout_masks(x.dim(0)?, false, &mut rand::thread_rng())?;
        let fz0 = cell.forward(&z0, &injection, &masks)?;
        for (i, t) in fz0.iter().enumerate() {
            check(&mut rows, &format!("f_z0.{i}"), t)?;
        }
    }
    let zstar_ref = reference.branches("zstar", opts.compute.dtype)?;
    if !zstar_ref.is_empty() {
        let logits = model.head(&zstar_ref, false)?;
        let (_, _, h, w) = x.dims4()?;
        for (name, ours) in [
            ("logits".to_string(), logits.clone()),
            (
                "logits_full_ac_true".to_string(),
                upsample_if(task, &logits, h, w, true)?,
            ),
            (
                "logits_full_ac_false".to_string(),
                upsample_if(task, &logits, h, w, false)?,
            ),
        ] {
            if let Some(r) = reference.get(&name) {
                let row = compare(
                    &format!("{name} [head on reference zstar]"),
                    &ours,
                    r,
                    task,
                    opts.tol_rel,
                )?;
                rows.push(row);
            }
        }
    }
    // DEQ eval path: our own equilibrium and the head on it.
    let meta = read_meta(io)?;
    let rt = runtime(config, meta.as_ref(), opts)?;
    let precision = if opts.compute.dtype == DType::F64 {
        "f64"
    } else {
        "f32"
    };
    let mut solver_traces = Vec::new();
    // The official trace of `solve` (e.g. "eval" / "forward_solver") in our precision, if any.
    let mut trace = |solve: &str, which: &str, ours: &SolverStats, o: &SolverOptions| {
        let name = format!("{solve}_{precision}.{which}");
        let official = meta
            .as_ref()
            .map(|m| &m[format!("{solve}_{precision}")][which]);
        let settings = (o.threshold, o.eps);
        let agreement = Agreement::for_dtype(opts.compute.dtype);
        if let Some(c) = official.and_then(|v| check_trace(&name, ours, settings, v, agreement)) {
            solver_traces.push(c);
        }
    };
    let (logits, zstar, stats) = eval_forward(&model, &x, &rt)?;
    trace("eval", "forward_solver", &stats, &rt.forward);
    for (i, t) in zstar.iter().enumerate() {
        check(&mut rows, &format!("zstar.{i}"), t)?;
    }
    let (_, _, h, w) = x.dims4()?;
    check(&mut rows, "logits", &logits)?;
    check(
        &mut rows,
        "logits_full_ac_true",
        &upsample_if(task, &logits, h, w, true)?,
    )?;
    check(
        &mut rows,
        "logits_full_ac_false",
        &upsample_if(task, &logits, h, w, false)?,
    )?;
    eprintln!(
        "eval forward: {} steps, lowest {:?} residual {:.3e}",
        stats.steps,
        config.deq.stop_mode,
        stats.worst_lowest()
    );

    // Train path: BatchNorm in train mode, output f(z*), implicit backward.
    if let Some(labels) = reference.get("train.labels") {
        let labels = labels.to_dtype(DType::I64)?;
        let loss_fn = |logits: &Tensor| candle_nn::loss::cross_entropy(logits, &labels);
        let masks = vec![None; config.model.num_branches()];
        let g = train_gradients(&model, &x, &masks, &loss_fn, &rt, Phase::Deq, None)?;
        if let Some(f) = &g.forward_stats {
            trace("train", "forward_solver", f, &rt.forward);
        }
        if let Some(b) = &g.backward_stats {
            trace("train", "backward_solver", b, &rt.backward);
        }
        for (i, t) in g.injection.iter().enumerate() {
            check(&mut rows, &format!("train.injection.{i}"), t)?;
        }
        for (i, t) in g.zstar.iter().enumerate() {
            check(&mut rows, &format!("train.zstar.{i}"), t)?;
        }
        check(&mut rows, "train.logits", &g.logits)?;
        check(&mut rows, "train.loss", &g.loss.reshape(1)?)?;
        for (name, grad) in &g.grads {
            let key = format!("grad.{name}");
            match grad {
                Some(t) => check(&mut rows, &key, t)?,
                None if reference.get(&key).is_some() => rows.push(Row {
                    name: key,
                    max_abs_err: f64::INFINITY,
                    max_rel_err: f64::INFINITY,
                    tolerance: 0.0,
                    status: Status::Fail,
                }),
                None => {}
            }
        }
        for e in model.store().entries() {
            check(
                &mut rows,
                &format!("train.bn_after.{}", e.name),
                e.var.as_tensor(),
            )?;
        }
        // After the running statistics were checked: the probe runs the head in train mode.
        // Centred on the reference equilibrium where there is one (a converged z* is f(z*) to
        // within the solve's residual), so the verdict is about the reference problem, not about
        // where our solve happened to land.
        let reference_zstar = reference.branches("train.zstar", opts.compute.dtype)?;
        let (out, centre) = if reference_zstar.len() == g.zstar.len() {
            (reference_zstar, Centre::Reference)
        } else {
            let cell = model.cell().prepared(true)?;
            (cell.forward(&g.zstar, &g.injection, &masks)?, Centre::Ours)
        };
        let (grad_rtol, _) = tolerance_for("grad.", task, false);
        gradient_conditioning = Some(probe_head_gradient(
            &model,
            &out,
            &loss_fn,
            centre,
            CONDITIONING_TRIALS,
            0.1 * opts.tol_rel.unwrap_or(grad_rtol),
            0,
        )?);
        if let Some(b) = &g.backward_stats {
            eprintln!(
                "train backward: {} steps, lowest residual {:.3e}",
                b.steps,
                b.worst_lowest()
            );
        }
    }
    let checked: std::collections::HashSet<String> = rows
        .iter()
        .map(|r| r.name.split(' ').next().unwrap_or("").to_string())
        .collect();
    for name in reference.names_with("") {
        let is_input = name == "x" || name == "train.labels" || name.starts_with("z0.");
        if !is_input && !checked.contains(&name) {
            rows.push(skipped(
                &name,
                "no computation in mdeq produces this tensor",
            ));
        }
    }
    Ok(Report {
        rows,
        gradient_conditioning,
        solver_traces,
    })
}

/// `meta.json` beside the io file, if there is one.
fn read_meta(io: &str) -> Result<Option<Value>> {
    let path = std::path::Path::new(io).with_file_name("meta.json");
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let meta =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(meta))
}

/// The official solver, whole-batch norms, with the settings the reference in our precision was
/// solved with: options first, then `meta.json` (`config.f64_reference_thres` / `_eps` for
/// float64, `config.fixture_thres` / `fixture_eps` otherwise), then the experiment config.
fn runtime(
    config: &ExperimentConfig,
    meta: Option<&Value>,
    opts: &ParityOptions,
) -> Result<DeqRuntime> {
    let from_meta = |k: &str| meta.and_then(|m| m["config"][k].as_f64());
    let (thres_key, eps_key) = if opts.compute.dtype == DType::F64 {
        ("f64_reference_thres", "f64_reference_eps")
    } else {
        ("fixture_thres", "fixture_eps")
    };
    let mut deq = config.deq.clone();
    deq.coupling = Coupling::Official;
    deq.f_solver = SolverKind::BROYDEN;
    deq.b_solver = SolverKind::BROYDEN;
    deq.fallback.clear();
    let thres = opts.threshold.or(from_meta(thres_key)
        .or(from_meta("fixture_thres"))
        .map(|t| t as usize));
    if let Some(t) = thres {
        deq.f_thres = t;
        deq.b_thres = t;
    }
    if let Some(e) = opts.eps.or(from_meta(eps_key).or(from_meta("fixture_eps"))) {
        deq.eps = e;
    }
    let rt = deq.runtime();
    debug_assert!(matches!(rt.forward_chain[0], SolverKind::Broyden { .. }));
    Ok(rt)
}

fn upsample_if(
    task: Task,
    logits: &Tensor,
    h: usize,
    w: usize,
    align_corners: bool,
) -> Result<Tensor> {
    Ok(match task {
        Task::Segmentation => bilinear_resize(logits, h, w, align_corners)?,
        Task::Classification => logits.clone(),
    })
}

/// A gradient compared where the probe found the comparison ill posed still has to agree this
/// well: one kink flip moves it by about 1%, a broken backward by O(1).
pub const ILL_POSED_GRADIENT_BOUND: f64 = 5e-2;

impl Report {
    /// The rounding sensitivity of dL/df(z*) where the probe found the gradient comparison ill
    /// posed in this precision (a loss kink within one ulp of f(z*)); None where it is well posed.
    pub fn ill_posed_sensitivity(&self) -> Option<f64> {
        self.gradient_conditioning
            .as_ref()
            .filter(|c| c.ill_conditioned())
            .map(|c| c.max_change)
    }

    /// True when a failing row is explained by an ill-posed gradient comparison: a `grad.*` row
    /// within [`ILL_POSED_GRADIENT_BOUND`] while the probe says the comparison is ill posed.
    pub fn ill_posed(&self, row: &Row) -> bool {
        self.ill_posed_sensitivity().is_some()
            && row.name.starts_with("grad.")
            && row.status == Status::Fail
            && row.max_rel_err < ILL_POSED_GRADIENT_BOUND
    }

    /// Whether a solver trace is followed. The backward solve's right-hand side is dL/df(z*):
    /// where that moves by up to `s` under one-ulp changes of f(z*), its trace can follow the
    /// official one only to `s`, and must.
    pub fn trace_followed(&self, t: &TraceCheck) -> bool {
        match self.ill_posed_sensitivity() {
            Some(s) if t.name.ends_with("backward_solver") => {
                t.compared_steps >= 2 && t.max_rel_diff <= s.max(t.agreement.rtol)
            }
            _ => t.status == Status::Pass,
        }
    }
}

/// Prints the report as a table; returns true when nothing failed.
pub fn print_report(report: &Report) -> bool {
    let rows = &report.rows;
    println!(
        "{:<62} {:>12} {:>12} {:>12}  status",
        "tensor", "max abs err", "max rel err", "tolerance"
    );
    let (mut pass, mut fail, mut skip, mut ill) = (0, 0, 0, 0);
    for r in rows {
        let status = match &r.status {
            Status::Pass => {
                pass += 1;
                "PASS".to_string()
            }
            Status::Fail if report.ill_posed(r) => {
                ill += 1;
                format!("ILL-POSED (within {ILL_POSED_GRADIENT_BOUND:.0e}; see the probe below)")
            }
            Status::Fail => {
                fail += 1;
                "FAIL".to_string()
            }
            Status::Skipped(why) => {
                skip += 1;
                format!("SKIPPED ({why})")
            }
        };
        println!(
            "{:<62} {:>12.3e} {:>12.3e} {:>12.3e}  {status}",
            r.name, r.max_abs_err, r.max_rel_err, r.tolerance
        );
    }
    for t in &report.solver_traces {
        let followed = report.trace_followed(t);
        match (t.status == Status::Pass, followed) {
            (false, true) => println!(
                "{} (within the right-hand side's rounding sensitivity {:.1e}: ILL-POSED)",
                t.describe(),
                report.ill_posed_sensitivity().unwrap_or_default()
            ),
            _ => println!("{}", t.describe()),
        }
        if !followed {
            fail += 1;
        }
    }
    if let Some(c) = &report.gradient_conditioning {
        println!("{}", c.describe());
    }
    println!("parity: {pass} passed, {fail} failed, {skip} skipped, {ill} ill-posed");
    fail == 0
}
