//! `mdeq`: Multiscale Deep Equilibrium Models from the command line.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use mdeq::{info, parity};
use mdeq_checkpoint::{format, import, official};
use mdeq_model::Mdeq;
use mdeq_recipe::ExperimentConfig;
use std::path::PathBuf;

// candle allocates a fresh buffer per op; glibc hands large ones back to the kernel at once, so
// every solver step paid page faults and TLB shootdowns. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "mdeq",
    version,
    about = "Multiscale Deep Equilibrium Models (MDEQ) in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    F32,
    F64,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Architecture summary, parameter count and solver state size of a config, preset or checkpoint.
    Info {
        /// A TOML config, an official YAML, a preset name (e.g. cifar-tiny) or an mdeq checkpoint.
        target: String,
    },
    /// Converts an official state dict (.pth zip, legacy .pth/.pkl, safetensors) into an mdeq checkpoint.
    Import {
        /// The experiment config (TOML, official YAML or preset name) the weights belong to.
        #[arg(long)]
        config: String,
        /// The official weights file.
        file: String,
        /// Output checkpoint (.safetensors).
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Checks our model against reference tensors from the official code, tensor by tensor.
    Parity {
        /// The experiment config (TOML, official YAML or preset name).
        #[arg(long)]
        config: String,
        /// Weights: official state dict in any supported format, or an mdeq checkpoint.
        #[arg(long)]
        weights: String,
        /// Reference tensors (io.safetensors / io_f64.safetensors).
        #[arg(long)]
        io: String,
        /// Overrides every relative tolerance.
        #[arg(long)]
        tol_rel: Option<f64>,
        /// Precision our model computes in.
        #[arg(long, value_enum, default_value = "f32")]
        precision: Precision,
        /// Solver step limit (default: the fixture's meta.json, else the config).
        #[arg(long)]
        threshold: Option<usize>,
        /// Solver tolerance (default: the fixture's meta.json, else the config).
        #[arg(long)]
        eps: Option<f64>,
    },
    /// Lists the built-in presets named after the official experiments.
    Presets,
    /// Trains a recipe: unrolled pretraining, then DEQ mode; checkpoints and metrics in --out.
    Train {
        /// The recipe (TOML, official YAML or preset name).
        #[arg(long)]
        config: String,
        /// Dataset directory (default: the recipe's data.root).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "runs/latest")]
        out: PathBuf,
        /// Overrides the recipe's epochs.
        #[arg(long)]
        epochs: Option<usize>,
        /// Stops after this many optimizer steps in total.
        #[arg(long)]
        max_steps: Option<usize>,
        /// Overrides the recipe's batch size.
        #[arg(long)]
        batch_size: Option<usize>,
        /// Seed of initialisation, shuffling and dropout.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Continue from <out>/checkpoint-last.safetensors.
        #[arg(long)]
        resume: bool,
        /// Log every N steps.
        #[arg(long, default_value_t = 20)]
        log_every: usize,
        /// Evaluate on at most N test images at each epoch end.
        #[arg(long)]
        eval_limit: Option<usize>,
    },
    /// Evaluates a checkpoint in DEQ mode: top-1/top-5 accuracy, or mIoU with per-class IoU.
    Eval {
        /// An mdeq checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Dataset directory (default: the recipe's data.root).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Forward solver step limits to evaluate at (default: the recipe's F_THRES); several give
        /// the accuracy-against-compute curve.
        #[arg(long, value_delimiter = ',')]
        f_thres: Vec<usize>,
        /// Batch size.
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Evaluate at most N images.
        #[arg(long)]
        limit: Option<usize>,
        /// PNG of the accuracy-against-compute curve (default with several --f-thres:
        /// accuracy_vs_compute.png beside the checkpoint).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Predicts images: top-k classes with probabilities, or for segmentation models a colour
    /// label map and an overlay PNG per image.
    Predict {
        /// An mdeq checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// How many classes to list.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Directory for segmentation PNGs.
        #[arg(long, default_value = "predictions")]
        out: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Image files (PNG or JPEG).
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Times the MDEQ cell (forward, forward+backward, one VJP, a training step), optionally side by
    /// side with the PyTorch reference; the last stdout line is a JSON object with the ratios.
    Bench {
        /// Fixture folder with config.yaml, meta.json and weights.safetensors.
        #[arg(long, default_value = "fixtures/cls-tiny")]
        fixture: String,
        /// Batch size.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed runs.
        #[arg(long, default_value_t = 15)]
        repeats: usize,
        /// Plain forward iterations in the training-step figure.
        #[arg(long, default_value_t = 18)]
        f_steps: usize,
        /// Plain backward iterations in the training-step figure.
        #[arg(long, default_value_t = 20)]
        b_steps: usize,
        /// A Python with torch, numpy and safetensors: runs torch_cell.py before and after us.
        #[arg(long)]
        compare_torch: Option<String>,
        /// The PyTorch reference script.
        #[arg(long, default_value = "bench/torch_cell.py")]
        torch_script: String,
        /// Print only the JSON report (one line) on stdout.
        #[arg(long)]
        json: bool,
        /// Relative residual at which the `train_step_frozen` figure freezes a sample.
        #[arg(long, default_value_t = 1e-3)]
        freeze_eps: f64,
        /// Only these figures, comma-separated: cell_forward, forward_backward, vjp, train_step,
        /// train_step_frozen, train_step_{ift,ift_whole_batch,phantom,jfb,unrolled},
        /// forward_solve, inference_per_image.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (v2 and v3); the Rust binding lacks it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Keep freed pages instead of returning them to the OS after 10 ms: the solver frees and
    // re-allocates the same sizes every step, and re-faulting them cost ~10% of a training step.
    // SAFETY: sets a process-wide allocator option before any threads start.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { target } => {
            let cfg = if target.ends_with(".safetensors") && std::path::Path::new(&target).exists()
            {
                let bytes = std::fs::read(&target).with_context(|| format!("reading {target}"))?;
                format::read_config(&bytes, &target)?
            } else {
                ExperimentConfig::load(&target)?
            };
            let model = Mdeq::new(&cfg.model, DType::F32, &Device::Cpu, 0)?;
            print!("{}", info::summary(&cfg, &model));
        }
        Command::Import { config, file, out } => {
            let cfg = ExperimentConfig::load(&config)?;
            let model = Mdeq::new(&cfg.model, DType::F32, &Device::Cpu, 0)?;
            let entries = official::read_state_dict(&file)?;
            let (_, dropped) = import::normalize_keys(entries.clone());
            import::load_into(&model, entries, &file)?;
            format::save(&out, &model, &cfg, None)?;
            println!(
                "imported {} tensors from {file} into {} ({} ignored: fullstage_copy/deq/loss entries)",
                model.store().entries().len(),
                out.display(),
                dropped.len()
            );
        }
        Command::Parity {
            config,
            weights,
            io,
            tol_rel,
            precision,
            threshold,
            eps,
        } => {
            let cfg = ExperimentConfig::load(&config)?;
            let opts = parity::ParityOptions {
                threshold,
                eps,
                tol_rel,
                dtype: precision.dtype(),
            };
            let report = parity::run(&cfg, &weights, &io, &opts)?;
            if !parity::print_report(&report) {
                bail!("parity check failed");
            }
        }
        Command::Bench {
            fixture,
            batch,
            warmup,
            repeats,
            f_steps,
            b_steps,
            compare_torch,
            torch_script,
            json,
            freeze_eps,
            only,
        } => {
            let opts = mdeq::bench::BenchOptions {
                freeze_eps,
                fixture,
                batch,
                warmup,
                repeats,
                f_steps,
                b_steps,
                only,
            };
            let threads = rayon_threads();
            let mut torch_runs = Vec::new();
            if let Some(py) = &compare_torch {
                eprintln!("running PyTorch ({threads} threads)...");
                torch_runs.push(mdeq::bench::run_torch(py, &torch_script, &opts, threads)?);
            }
            eprintln!("running mdeq ({threads} threads)...");
            let ours = mdeq::bench::run_mdeq(&opts)?;
            if let Some(py) = &compare_torch {
                eprintln!("running PyTorch again...");
                torch_runs.push(mdeq::bench::run_torch(py, &torch_script, &opts, threads)?);
            }
            let report = mdeq::bench::report(&ours, &torch_runs);
            if json {
                println!("{report}");
                return Ok(());
            }
            println!(
                "{:<26} {:>12} {:>12} {:>12} {:>8}",
                "figure", "mdeq median", "mdeq min", "torch median", "ratio"
            );
            for (name, t) in &ours {
                let torch = report["torch"][*name]
                    .as_f64()
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or("-".into());
                let ratio = report["ratio"][*name]
                    .as_f64()
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or("-".into());
                println!(
                    "{name:<26} {:>12.2} {:>12.2} {torch:>12} {ratio:>8}",
                    t.median_ms, t.min_ms
                );
            }
            println!("{report}");
        }
        Command::Train {
            config,
            data,
            out,
            epochs,
            max_steps,
            batch_size,
            seed,
            resume,
            log_every,
            eval_limit,
        } => {
            let cfg = ExperimentConfig::load(&config)?;
            let data = data.unwrap_or_else(|| PathBuf::from(&cfg.data.root));
            let opts = mdeq_train::TrainOptions {
                data,
                out,
                epochs,
                max_steps,
                batch_size,
                seed,
                resume,
                log_every,
                eval_limit,
            };
            let summary = mdeq_train::train(&cfg, &opts)?;
            println!(
                "{}",
                serde_json::json!({ "steps": summary.steps, "last_loss": summary.last_loss, "last_eval": summary.last_eval })
            );
        }
        Command::Eval {
            checkpoint,
            data,
            f_thres,
            batch_size,
            limit,
            plot,
            json,
        } => {
            let several = f_thres.len() > 1;
            let req = mdeq::eval::EvalRequest {
                plot: plot.or_else(|| {
                    several.then(|| {
                        checkpoint
                            .parent()
                            .unwrap_or(std::path::Path::new("."))
                            .join("accuracy_vs_compute.png")
                    })
                }),
                checkpoint,
                data,
                f_thres,
                batch_size,
                limit,
            };
            let (points, names) = mdeq::eval::run(&req)?;
            if let Some(path) = &req.plot {
                match mdeq::eval::plot(&points, path) {
                    Ok(()) => eprintln!("wrote {}", path.display()),
                    Err(e) => eprintln!("warning: no plot: {e:#}"),
                }
            }
            if json {
                println!("{}", mdeq::eval::json_report(&points));
            } else {
                print!("{}", mdeq::eval::report(&points, &names));
            }
        }
        Command::Predict {
            checkpoint,
            top_k,
            out,
            json,
            images,
        } => {
            let preds = mdeq::predict::run(&checkpoint, &images, top_k, &out)?;
            if json {
                println!("{}", serde_json::json!({ "predictions": preds }));
            } else {
                for p in &preds {
                    println!(
                        "{} ({} solver steps, residual {:.1e})",
                        p.image, p.solver_steps, p.residual
                    );
                    for (c, name, prob) in &p.top {
                        println!("  {:>6.2}%  {name} ({c})", 100.0 * prob);
                    }
                    for w in &p.written {
                        println!("  wrote {w}");
                    }
                }
            }
        }
        Command::Presets => {
            for (name, _) in mdeq_recipe::presets::PRESETS {
                let cfg = mdeq_recipe::presets::preset_or_error(name)?;
                println!(
                    "{name:<20} {}",
                    cfg.model
                        .num_channels
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join("/")
                );
            }
        }
    }
    Ok(())
}
