//! `mdeq bench`: side-by-side timing of the MDEQ cell against the PyTorch reference
//! (`bench/torch_cell.py`), same weights, shapes, thread count and work per figure.

use crate::compute::ComputeArgs;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use mdeq_deq::{
    adjoint, BackwardMode, Coupling, FixedPointMap, SolverKind, SolverOptions, SolverStats,
    StopMode,
};
use mdeq_model::cell::solver_map::{CellMap, CellVjp};
use mdeq_model::{Compute, Mdeq};
use mdeq_recipe::ExperimentConfig;
use serde_json::{json, Map, Value};
use std::time::Instant;

pub mod contention;
pub mod training;

/// Bench settings (the defaults are torch_cell.py's).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Fixture folder with config.yaml, meta.json and weights.safetensors.
    #[arg(long, default_value = "fixtures/cls-tiny")]
    pub fixture: String,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 15)]
    pub repeats: usize,
    /// Plain forward iterations in the training-step figure.
    #[arg(long, default_value_t = 18)]
    pub f_steps: usize,
    /// Plain backward iterations in the training-step figure.
    #[arg(long, default_value_t = 20)]
    pub b_steps: usize,
    /// Relative residual at which the `train_step_frozen` figure freezes a sample.
    #[arg(long, default_value_t = 1e-3)]
    pub freeze_eps: f64,
    /// Only these figures, comma-separated: cell_forward, forward_backward, vjp, train_step,
    /// train_step_frozen, train_step_{ift,ift_whole_batch,phantom,jfb,unrolled},
    /// forward_solve, inference_per_image.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// Flags of `mdeq bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to time, and how often.
    #[command(flatten)]
    pub options: BenchOptions,
    /// A Python with torch, numpy and safetensors: runs torch_cell.py before and after us.
    #[arg(long)]
    pub compare_torch: Option<String>,
    /// The PyTorch reference script.
    #[arg(long, default_value = "bench/torch_cell.py")]
    pub torch_script: String,
    /// Print only the JSON report (one line) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Busy processes to run beside every figure, ours and PyTorch's (each spins one core), to
    /// measure speed on a shared machine.
    #[arg(long, default_value_t = 0)]
    pub busy: usize,
    /// Where and in what mdeq computes (PyTorch runs on the same device).
    #[command(flatten)]
    pub compute: ComputeArgs,
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Times mdeq (between two PyTorch runs when asked) and prints the table and the JSON report.
pub fn run(args: Args) -> Result<()> {
    let opts = &args.options;
    let compute = args.compute.resolve()?;
    let threads = rayon_threads();
    let torch_device = compute.device_name();
    let _load = contention::BusyLoad::start(args.busy)?;
    if args.busy > 0 {
        eprintln!("{} busy processes run beside every figure", args.busy);
    }
    let mut torch_runs = Vec::new();
    let mut time_torch = |when: &str| -> Result<()> {
        if let Some(py) = &args.compare_torch {
            eprintln!("running PyTorch{when} ({threads} threads)...");
            torch_runs.push(run_torch(
                py,
                &args.torch_script,
                opts,
                threads,
                &torch_device,
            )?);
        }
        Ok(())
    };
    time_torch("")?;
    eprintln!("running mdeq ({threads} threads)...");
    let ours = compute.run(|| run_mdeq(opts, &compute))?;
    time_torch(" again")?;
    let report = report(&ours, &torch_runs);
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "{:<26} {:>12} {:>12} {:>12} {:>8}",
        "figure", "mdeq median", "mdeq min", "torch median", "ratio"
    );
    let cell = |section: &str, name: &str| {
        report[section][name]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.2}"))
    };
    for (name, t) in &ours {
        println!(
            "{name:<26} {:>12.2} {:>12.2} {:>12} {:>8}",
            t.median_ms,
            t.min_ms,
            cell("torch", name),
            cell("ratio", name)
        );
    }
    println!("{report}");
    Ok(())
}

impl BenchOptions {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == figure)
    }
}

/// Median and minimum wall time in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Median.
    pub median_ms: f64,
    /// Minimum.
    pub min_ms: f64,
}

/// Times `f`; on a GPU each run ends when the device has finished its queued work, not when the
/// last launch returned.
fn time_it(
    device: &Device,
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
    })
}

/// This machine's memory bandwidth in bytes per second (read plus write): the best of five
/// copies of 256 MiB split over all threads. A Broyden history (133 MB on `tiny-init`) is read
/// once per step and does not stay in any cache between steps, so the bound its algebra is
/// measured against is main memory's, not a cache's (the 32 MiB copy used before ran about 2.4×
/// faster here, from L3). Measured once, when the first solve is described (outside the timed
/// runs); the peak-memory figure does not count the probe's buffers ([`peak_rss_mib`]).
pub fn copy_bandwidth() -> f64 {
    static BANDWIDTH: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *BANDWIDTH.get_or_init(|| {
        let peak_before = peak_rss_mib();
        let n = 256 << 20;
        let threads = rayon_threads().max(1);
        let (source, mut target) = (SystemBuffer::new(n, 1), SystemBuffer::new(n, 0));
        let (src, dst) = (source.bytes(), target.bytes_mut());
        let part = n.div_ceil(threads);
        let best = (0..5)
            .map(|_| {
                let t = Instant::now();
                std::thread::scope(|s| {
                    for (d, c) in dst.chunks_mut(part).zip(src.chunks(part)) {
                        s.spawn(move || d.copy_from_slice(c));
                    }
                });
                std::hint::black_box(&dst);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        drop((source, target));
        reset_peak_rss(peak_before);
        2.0 * n as f64 / best
    })
}

/// Bytes from the system allocator, which hands them back to the OS when dropped (the global
/// allocator keeps freed pages for reuse, so they would stay resident).
struct SystemBuffer {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl SystemBuffer {
    fn new(n: usize, fill: u8) -> Self {
        use std::alloc::GlobalAlloc;
        let layout = std::alloc::Layout::from_size_align(n.max(1), 64).expect("a valid layout");
        // SAFETY: the layout has a non-zero size; a null result is handled.
        let ptr = unsafe { std::alloc::System.alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: ptr holds n writable bytes.
        unsafe { ptr.write_bytes(fill, n) };
        Self { ptr, layout }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: initialised in `new`, alive while self is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for SystemBuffer {
    fn drop(&mut self) {
        use std::alloc::GlobalAlloc;
        // SAFETY: allocated by System with this layout.
        unsafe { std::alloc::System.dealloc(self.ptr, self.layout) };
    }
}

/// The peak RSS in MiB before the last reset of the mark (`f64` bits; 0 when never reset).
static PEAK_BEFORE_RESET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Resets the peak-RSS mark to the current resident size (Linux: `clear_refs` 5), keeping
/// `peak_before` for [`peak_rss_mib`]; elsewhere the peak keeps counting what came in between.
fn reset_peak_rss(peak_before: Option<f64>) {
    let kept = f64::from_bits(PEAK_BEFORE_RESET.load(std::sync::atomic::Ordering::Relaxed));
    let peak = peak_before.unwrap_or(0.0).max(kept);
    PEAK_BEFORE_RESET.store(peak.to_bits(), std::sync::atomic::Ordering::Relaxed);
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory of this process in MiB (VmHWM), not counting the bandwidth probe's
/// buffers: the higher of the mark before the probe reset it and the mark since.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let before_reset = f64::from_bits(PEAK_BEFORE_RESET.load(std::sync::atomic::Ordering::Relaxed));
    Some((kib / 1024.0).max(before_reset))
}

/// Uniform values in [-1, 1) from `seed`, the same on every device, in `compute`'s float type.
fn randn(shape: (usize, usize, usize, usize), seed: u64, compute: &Compute) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &compute.device)?.to_dtype(compute.dtype)?)
}

/// Times torch_cell.py's figures for our implementation, then our own whole-step figures
/// ([`training::figures`]).
pub fn run_mdeq(opts: &BenchOptions, compute: &Compute) -> Result<Vec<(&'static str, Timing)>> {
    let cfg = ExperimentConfig::load(&format!("{}/config.yaml", opts.fixture))?;
    let model = Mdeq::new(&cfg.model, compute.dtype, &compute.device, 0)?;
    let device = &compute.device;
    let weights = format!("{}/weights.safetensors", opts.fixture);
    mdeq_checkpoint::import::load_into(
        &model,
        mdeq_checkpoint::read_state_dict(&weights)?,
        &weights,
    )?;
    let [h, w] = cfg.model.image_size;
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(format!(
        "{}/meta.json",
        opts.fixture
    ))?)?;
    let input: Vec<usize> = meta["config"]["input_shape"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as usize)
                .collect()
        })
        .unwrap_or(vec![1, 3, h, w]);
    let layout = model.layout(input[2], input[3]);
    let b = opts.batch;
    let shapes: Vec<_> = layout
        .branches
        .iter()
        .map(|&(c, hh, ww)| (b, c, hh, ww))
        .collect();
    let z: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, &s)| randn(s, 10 + i as u64, compute))
        .collect::<Result<_>>()?;
    let x: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if i == 0 {
                randn(s, 20, compute)
            } else {
                Ok(Tensor::zeros(s, compute.dtype, device)?)
            }
        })
        .collect::<Result<_>>()?;
    let v: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, &s)| randn(s, 30 + i as u64, compute))
        .collect::<Result<_>>()?;
    let v_flat = layout.flatten(&v)?;
    let masks = vec![None; shapes.len()];
    let params: Vec<Tensor> = model
        .store()
        .parameters()
        .filter(|e| e.name.starts_with("fullstage."))
        .map(|e| e.var.as_tensor().clone())
        .collect();
    let (warm, reps) = (opts.warmup, opts.repeats);
    let mut out = Vec::new();

    let fixed = model.cell().prepared(true)?;
    if opts.wants("cell_forward") {
        out.push((
            "cell_forward",
            time_it(device, warm, reps, || {
                fixed.forward(&z, &x, &masks)?;
                Ok(())
            })?,
        ));
    }

    if opts.wants("forward_backward") {
        out.push((
            "forward_backward",
            time_it(device, warm, reps, || {
                let cell = model.cell().prepared(false)?;
                let zv = Var::from_tensor(&layout.flatten(&z)?)?;
                let f = layout.flatten(&cell.forward(
                    &layout.unflatten(zv.as_tensor())?,
                    &x,
                    &masks,
                )?)?;
                let g = (f * &v_flat)?.sum_all()?.backward()?;
                if g.get(zv.as_tensor()).is_none() || params.iter().any(|p| g.get(p).is_none()) {
                    bail!("forward_backward: a gradient is missing");
                }
                Ok(())
            })?,
        ));
    }

    if opts.wants("vjp") {
        // The implicit backward's unit of work: a product through f recorded once at z.
        let map = CellMap {
            cell: &fixed,
            injection: &x,
            masks: &masks,
            layout: &layout,
        };
        let mut recorded = CellVjp::record(&map, &layout.flatten(&z)?)?;
        out.push((
            "vjp",
            time_it(device, warm, reps, || {
                recorded.vjp(&v_flat)?;
                Ok(())
            })?,
        ));
    }

    // torch_cell.py's training step: plain iteration at fixed counts; `freeze` runs the same
    // iterations with per-sample freezing at that relative tolerance (converged samples leave
    // the batch of the forward solve and stop being updated in the backward one).
    let stand_in_step = |freeze: Option<f64>| -> Result<Option<SolverStats>> {
        let cell = model.cell().prepared(false)?;
        let detached = model.cell().prepared(true)?;
        let map = CellMap {
            cell: &detached,
            injection: &x,
            masks: &masks,
            layout: &layout,
        };
        let zeros = Tensor::zeros((b, layout.size()), compute.dtype, device)?;
        let plain = SolverKind::FixedPoint { tau: 1.0 };
        let options = |threshold: usize, eps: f64| SolverOptions {
            threshold,
            eps,
            stop_mode: StopMode::Rel,
            coupling: Coupling::PerSample,
            compact_batch: true,
        };
        let (zstar, stats) = match freeze {
            Some(eps) => {
                let sol =
                    plain.solve(&mut CellMap { ..map }, &zeros, &options(opts.f_steps, eps))?;
                (sol.z, Some(sol.stats))
            }
            None => {
                let mut z = zeros;
                for _ in 0..opts.f_steps {
                    z = CellMap { ..map }.apply(&z)?;
                }
                (z, None)
            }
        };
        let zleaf = Var::from_tensor(&zstar)?;
        let outp =
            layout.flatten(&cell.forward(&layout.unflatten(zleaf.as_tensor())?, &x, &masks)?)?;
        let mut recorded = CellVjp::record(&map, &zstar)?;
        let y = match freeze {
            Some(eps) => {
                let mut vjp = |y: &Tensor| recorded.vjp(y);
                let opts = options(opts.b_steps, eps);
                adjoint(&BackwardMode::Ift, &mut vjp, &v_flat, &plain, &opts)?.0
            }
            None => {
                let mut y = v_flat.clone();
                for _ in 0..opts.b_steps {
                    y = (recorded.vjp(&y)? + &v_flat)?;
                }
                y
            }
        };
        let g = (outp * y)?.sum_all()?.backward()?;
        if params.iter().any(|p| g.get(p).is_none()) {
            bail!("train_step: a parameter gradient is missing");
        }
        Ok(stats)
    };
    for (name, freeze) in [
        ("train_step", None),
        ("train_step_frozen", Some(opts.freeze_eps)),
    ] {
        if opts.wants(name) {
            let t = training::time_solver_figure(
                name,
                opts,
                device,
                b * layout.size() * compute.dtype.size_in_bytes(),
                || {
                    Ok(stand_in_step(freeze)?
                        .into_iter()
                        .map(|s| ("forward", s))
                        .collect())
                },
            )?;
            out.push((name, t));
        }
    }
    out.extend(training::figures(
        &model,
        &cfg,
        opts,
        compute,
        (input[2], input[3]),
    )?);
    Ok(out)
}

/// Runs torch_cell.py with `python` and returns its timings (median, min) by figure name.
pub fn run_torch(
    python: &str,
    script: &str,
    opts: &BenchOptions,
    threads: usize,
    device: &str,
) -> Result<Map<String, Value>> {
    let output = std::process::Command::new(python)
        .arg(script)
        .args(["--fixture", &opts.fixture, "--device", device])
        .args([
            "--batch",
            &opts.batch.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .args([
            "--warmup",
            &opts.warmup.to_string(),
            "--repeats",
            &opts.repeats.to_string(),
        ])
        .args([
            "--f-steps",
            &opts.f_steps.to_string(),
            "--b-steps",
            &opts.b_steps.to_string(),
        ])
        .args(["--only", &torch_figures(&opts.only).join(",")])
        .output()
        .with_context(|| format!("running {python} {script}"))?;
    if !output.status.success() {
        bail!(
            "{python} {script} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: Value =
        serde_json::from_slice(&output.stdout).context("torch_cell.py printed no JSON")?;
    report["timings_ms"]
        .as_object()
        .cloned()
        .context("torch_cell.py JSON has no timings_ms")
}

/// torch_cell.py's name for each of our figures.
pub const TORCH_NAMES: &[(&str, &str)] = &[
    ("cell_forward", "cell_nograd"),
    ("forward_backward", "fwd_bwd"),
    ("vjp", "vjp_z"),
    ("train_step", "train_step"),
];

/// torch_cell.py's names of the figures `only` asks for that it has (all when `only` is empty).
fn torch_figures(only: &[String]) -> Vec<&'static str> {
    TORCH_NAMES
        .iter()
        .filter(|(ours, _)| only.is_empty() || only.iter().any(|o| o == ours))
        .map(|(_, theirs)| *theirs)
        .collect()
}

/// The JSON report: ours, torch's (lower of the runs' medians) and the ratios ours / torch.
pub fn report(ours: &[(&str, Timing)], torch_runs: &[Map<String, Value>]) -> Value {
    let mut mdeq = Map::new();
    for (name, t) in ours {
        mdeq.insert(name.to_string(), json!(t.median_ms));
    }
    let mut torch = Map::new();
    let mut ratio = Map::new();
    for (ours_name, torch_name) in TORCH_NAMES {
        let best = torch_runs
            .iter()
            .filter_map(|r| r.get(*torch_name)?["median_ms"].as_f64())
            .fold(f64::INFINITY, f64::min);
        if best.is_finite() {
            torch.insert(ours_name.to_string(), json!(best));
            if let Some((_, t)) = ours.iter().find(|(n, _)| n == ours_name) {
                ratio.insert(ours_name.to_string(), json!(t.median_ms / best));
            }
        }
    }
    json!({ "mdeq": mdeq, "torch": torch, "ratio": ratio, "peak_rss_mib": peak_rss_mib() })
}
