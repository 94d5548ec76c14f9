//! The one interface through which tensors cross ranks. Implementations: [`SingleProcess`]
//! (the identity), MPI (`mpi_transport`, host memory) and NCCL (`nccl_transport`, device
//! memory); which one a job uses is decided by its device when it joins.

use candle_core::{Result, Tensor};

/// How values of the ranks combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
}

/// Collective operations over every rank of a job. Every rank must make the same calls in the
/// same order with tensors of the same shape and float type (f32 or f64); a rank that does not
/// blocks the others, so errors that can differ between ranks end the job through
/// [`Collective::abort`] instead.
pub trait Collective: Send + Sync {
    /// How tensors travel, for the start-up line ("MPI", "NCCL").
    fn transport(&self) -> &'static str;
    /// `t` combined element-wise over all ranks by `op`, on `t`'s device.
    fn all_reduce(&self, t: &Tensor, op: Reduce) -> Result<Tensor>;
    /// Rank `root`'s `t`, on every rank (on each rank's own device).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Ends every rank of the job with exit status `code` (MPI_Abort); the caller has said why.
    fn abort(&self, code: i32) -> !;
}

/// The collective of a job of one: every operation returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn transport(&self) -> &'static str {
        "none (one process)"
    }

    fn all_reduce(&self, t: &Tensor, _op: Reduce) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
