//! `mdeq train`: a recipe trained as `mdeq_train::train` does it; the summary is printed as
//! one JSON line.

use crate::compute::ComputeArgs;
use anyhow::Result;
use mdeq_recipe::ExperimentConfig;
use mdeq_train::TrainOptions;

/// Flags of `mdeq train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The recipe (TOML, official YAML or preset name).
    #[arg(long)]
    pub config: String,
    /// How this run departs from the recipe, and where it writes.
    #[command(flatten)]
    pub options: TrainOptions,
    /// Where and in what the model trains.
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Trains the recipe.
pub fn run(args: Args) -> Result<()> {
    let cfg = ExperimentConfig::load(&args.config)?;
    let compute = args.compute.resolve()?;
    let summary = mdeq_train::train(&cfg, &args.options, &compute)?;
    println!(
        "{}",
        serde_json::json!({
            "steps": summary.steps,
            "last_loss": summary.last_loss,
            "last_eval": summary.last_eval,
        })
    );
    Ok(())
}
