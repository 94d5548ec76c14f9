//! `mdeq`: Multiscale Deep Equilibrium Models from the command line. Each command is a module
//! of the `mdeq` library that owns its flags (`Args`) and its `run`; this file only dispatches.

use clap::{Parser, Subcommand};
use mdeq::{bench, eval, import, info, parity, predict, presets, train};

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

#[derive(Subcommand)]
enum Command {
    /// Architecture summary, parameter count and solver state size of a config, preset or checkpoint.
    Info(info::Args),
    /// Converts an official state dict (.pth zip, legacy .pth/.pkl, safetensors) into an mdeq checkpoint.
    Import(import::Args),
    /// Checks our model against reference tensors from the official code, tensor by tensor.
    Parity(parity::Args),
    /// Lists the built-in presets named after the official experiments.
    Presets,
    /// Trains a recipe: unrolled pretraining, then DEQ mode; checkpoints and metrics in --out.
    Train(train::Args),
    /// Evaluates a checkpoint in DEQ mode: top-1/top-5 accuracy, or mIoU with per-class IoU.
    Eval(eval::Args),
    /// Predicts images: top-k classes with probabilities, or for segmentation models a colour
    /// label map and an overlay PNG per image.
    Predict(predict::Args),
    /// Times the MDEQ cell (forward, forward+backward, one VJP, a training step), optionally side by
    /// side with the PyTorch reference; the last stdout line is a JSON object with the ratios.
    Bench(bench::Args),
    /// Spins one core until killed: the competing load of `mdeq bench --busy`.
    #[command(name = bench::contention::BUSY_LOOP_COMMAND, hide = true)]
    BusyLoop,
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info(args) => info::run(args),
        Command::Import(args) => import::run(args),
        Command::Parity(args) => parity::run(args),
        Command::Presets => presets::run(),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BusyLoop => bench::contention::spin_forever(),
    }
}
