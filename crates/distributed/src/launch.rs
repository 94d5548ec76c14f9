//! Joining a job: whether this process was started by an MPI launcher, and the world it is a
//! rank of. `mpirun` (Open MPI), MPICH's Hydra and `srun` say so in the environment; without
//! one of their variables the process is a job of one and MPI is never initialised.

use crate::world::World;
use candle_core::Device;

/// Why a process cannot take its place in a job.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Started by an MPI launcher as one of several ranks, in a build without MPI: each rank
    /// would train alone and all would write the same files.
    #[error(
        "{var}={size}: this process is one of {size} ranks of an MPI job, but this mdeq was \
         built without MPI; build it with `--features mpi` (docs/distributed.md), or run \
         one process without mpirun"
    )]
    NotBuilt {
        /// The launcher's variable that gave it away.
        var: &'static str,
        /// World size the launcher announced.
        size: usize,
    },
    /// MPI or NCCL failed to set up.
    #[error("joining the MPI job: {0}")]
    Setup(String),
}

/// The launcher's variables that carry the world size: Open MPI's `mpirun`, then the PMI
/// of MPICH's Hydra, Intel MPI and `srun --mpi=pmi2`.
const SIZE_VARIABLES: [&str; 2] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"];
/// PMIx (`srun --mpi=pmix`, Open MPI 5) names the rank but not the size.
const PMIX_RANK: &str = "PMIX_RANK";

/// The world size an MPI launcher announced (`Some(None)`: launched, size unknown), or None
/// when no launcher started this process.
fn launched() -> Option<(&'static str, Option<usize>)> {
    for var in SIZE_VARIABLES {
        if let Ok(v) = std::env::var(var) {
            return Some((var, v.trim().parse().ok()));
        }
    }
    std::env::var(PMIX_RANK).ok().map(|_| (PMIX_RANK, None))
}

/// This process's world: MPI's when an MPI launcher started it (in a build with the `mpi`
/// feature), else a job of one. Tensors travel over MPI; [`on_device`] moves them to NCCL
/// when the rank computes on a GPU.
pub fn join() -> Result<World, LaunchError> {
    match launched() {
        None => Ok(World::single()),
        Some(launch) => join_launched(launch),
    }
}

#[cfg(feature = "mpi")]
fn join_launched(_launch: (&'static str, Option<usize>)) -> Result<World, LaunchError> {
    crate::mpi_transport::join()
}

#[cfg(not(feature = "mpi"))]
fn join_launched((var, size): (&'static str, Option<usize>)) -> Result<World, LaunchError> {
    match size {
        Some(size) if size <= 1 => Ok(World::single()),
        Some(size) => Err(LaunchError::NotBuilt { var, size }),
        // PMIx without a size: refuse rather than risk N lone copies writing the same files.
        None => Err(LaunchError::NotBuilt { var, size: 0 }),
    }
}

/// `world` with its tensors travelling the fastest way for `device`: NCCL on device memory for
/// a CUDA device in a build with the `nccl` feature, else as joined (MPI through host memory).
pub fn on_device(world: World, device: &Device) -> Result<World, LaunchError> {
    if !world.is_distributed() {
        return Ok(world);
    }
    #[cfg(feature = "nccl")]
    if let Device::Cuda(cuda) = device {
        return crate::nccl_transport::join(world, cuda.clone());
    }
    let _ = device;
    Ok(world)
}
