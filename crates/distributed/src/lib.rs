//! Data-parallel training across processes and machines. A job is N ranks, one per process,
//! launched by MPI (`mpirun`, `srun`); [`World`] is this process's place in it. Tensors travel
//! through a [`Collective`]: MPI through host memory on CPUs, NCCL on device memory on GPUs.
//! On top of it: the bucketed gradient all-reduce ([`buckets`]), the differentiable cross-rank
//! sum behind synchronised BatchNorm ([`replica_sum`]) and each rank's rows of a global batch
//! ([`shard`]). Without an MPI launch, or in a build without the `mpi` feature, the world is a
//! single process and every collective is the identity.

pub mod buckets;
pub mod collective;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi_transport;
#[cfg(feature = "nccl")]
pub mod nccl_transport;
pub mod replica_sum;
pub mod shard;
pub mod testing;
pub mod world;

pub use buckets::average_gradients;
pub use collective::{Collective, Reduce, SingleProcess};
pub use launch::{join, LaunchError};
pub use replica_sum::replica_sum;
pub use shard::Shard;
pub use world::{eprint_whole_line, World};
