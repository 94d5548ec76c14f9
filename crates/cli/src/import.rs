//! `mdeq import`: an official state dict (.pth zip, legacy .pth/.pkl, safetensors) converted
//! into an mdeq checkpoint, every key checked against the model the config describes.

use anyhow::Result;
use candle_core::DType;
use mdeq_checkpoint::{format, import, official};
use mdeq_model::{Mdeq, HOST};
use mdeq_recipe::ExperimentConfig;
use std::path::PathBuf;

/// Flags of `mdeq import`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The experiment config (TOML, official YAML or preset name) the weights belong to.
    #[arg(long)]
    pub config: String,
    /// The official weights file.
    pub file: String,
    /// Output checkpoint (.safetensors).
    #[arg(short, long)]
    pub out: PathBuf,
}

/// Imports `args.file` into `args.out`.
pub fn run(args: Args) -> Result<()> {
    let cfg = ExperimentConfig::load(&args.config)?;
    // A file-to-file conversion: the weights pass through host memory, nothing is computed.
    let model = Mdeq::new(&cfg.model, DType::F32, &HOST, 0)?;
    let entries = official::read_state_dict(&args.file)?;
    let (_, dropped) = import::normalize_keys(entries.clone());
    import::load_into(&model, entries, &args.file)?;
    format::save(&args.out, &model, &cfg, None)?;
    println!(
        "imported {} tensors from {} into {} ({} ignored: fullstage_copy/deq/loss entries)",
        model.store().entries().len(),
        args.file,
        args.out.display(),
        dropped.len()
    );
    Ok(())
}
