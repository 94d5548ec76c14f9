//! `mdeq train`: a recipe trained as `mdeq_train::train` does it; the summary is printed as
//! one JSON line. Under an MPI launcher (`mpirun -np N mdeq train …`, in a build with the `mpi`
//! feature) this process is one rank of a data-parallel job; an error on any rank ends them all.

use crate::compute::ComputeArgs;
use anyhow::Result;
use mdeq_distributed::{launch, World};
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

/// Trains the recipe, as one rank of the job this process was launched in.
pub fn run(args: Args) -> Result<()> {
    let world = launch::join()?;
    let outcome = run_rank(&args, world.clone());
    if let Err(e) = &outcome {
        if world.is_distributed() {
            // The other ranks wait in a collective that this rank will never join: end them
            // all now, with the cause on stderr.
            mdeq_distributed::eprint_whole_line(&format!("error on {}: {e:#}", world.describe()));
            world.abort(2);
        }
    }
    outcome
}

fn run_rank(args: &Args, world: World) -> Result<()> {
    let mut cfg = ExperimentConfig::load(&args.config)?;
    if let Some(parts) = args.options.micro_batches {
        cfg.train.micro_batches = parts;
        cfg.validate().map_err(anyhow::Error::msg)?;
    }
    let compute = args.compute.resolve_on(&world)?;
    let world = launch::on_device(world, &compute.device)?;
    if world.is_distributed() && world.is_leader() {
        eprintln!(
            "data-parallel over {} ranks (gradients through {}, BatchNorm {:?})",
            world.size(),
            world.collective().transport(),
            cfg.train.batch_norm
        );
    }
    let summary = mdeq_train::train(&cfg, &args.options, &compute, &world)?;
    if world.is_leader() {
        println!(
            "{}",
            serde_json::json!({
                "steps": summary.steps,
                "last_loss": summary.last_loss,
                "last_eval": summary.last_eval,
            })
        );
    }
    Ok(())
}
