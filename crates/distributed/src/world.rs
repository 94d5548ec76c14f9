//! This process's place in a job: rank, world size, rank on its machine, and the collective.

use crate::collective::{Collective, Reduce, SingleProcess};
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// One rank of a data-parallel job. Cloning shares the same collective.
#[derive(Clone)]
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    collective: Arc<dyn Collective>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .field("transport", &self.collective.transport())
            .finish()
    }
}

impl World {
    /// A job of one process.
    pub fn single() -> Self {
        Self::new(0, 1, 0, Arc::new(SingleProcess))
    }

    /// Rank `rank` of `size` (`local_rank` among the ranks on its machine) talking through
    /// `collective`.
    pub fn new(
        rank: usize,
        size: usize,
        local_rank: usize,
        collective: Arc<dyn Collective>,
    ) -> Self {
        debug_assert!(rank < size && local_rank <= rank);
        Self {
            rank,
            size,
            local_rank,
            collective,
        }
    }

    /// This process's rank, 0..size.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the job.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank among the processes on this machine (which GPU this rank drives).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// True on the rank that writes checkpoints, logs and plots (rank 0).
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// True when there is more than one rank.
    pub fn is_distributed(&self) -> bool {
        self.size > 1
    }

    /// The collective tensors travel through.
    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.collective
    }

    /// "rank 1 of 2" — how messages name this process.
    pub fn describe(&self) -> String {
        format!("rank {} of {}", self.rank, self.size)
    }

    /// `t` combined over all ranks.
    pub fn all_reduce(&self, t: &Tensor, op: Reduce) -> Result<Tensor> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        self.collective.all_reduce(t, op)
    }

    /// Rank 0's `t` on every rank.
    pub fn broadcast(&self, t: &Tensor) -> Result<Tensor> {
        if self.size == 1 {
            return Ok(t.clone());
        }
        self.collective.broadcast(t, 0)
    }

    /// Host numbers combined over all ranks (float64, exact for counts below 2^53): the
    /// reductions behind logging, evaluation and decisions every rank must take alike.
    pub fn all_reduce_host(&self, values: &[f64], op: Reduce) -> Result<Vec<f64>> {
        if self.size == 1 {
            return Ok(values.to_vec());
        }
        let t = Tensor::from_slice(values, values.len(), &Device::Cpu)?;
        self.collective
            .all_reduce(&t, op)?
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f64>()
    }

    /// Rank 0's host numbers on every rank.
    pub fn broadcast_host(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.size == 1 {
            return Ok(values.to_vec());
        }
        let t = Tensor::from_slice(values, values.len(), &Device::Cpu)?;
        self.collective
            .broadcast(&t, 0)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f64>()
    }

    /// Ends every rank with exit status `code`.
    pub fn abort(&self, code: i32) -> ! {
        self.collective.abort(code)
    }
}

/// Writes `line` and its newline to stderr in one write, so that the lines of ranks sharing a
/// terminal or pipe do not interleave mid-line (`eprintln!` writes each formatted piece
/// separately, and stderr is unbuffered).
pub fn eprint_whole_line(line: &str) {
    use std::io::Write;
    let text = format!("{line}\n");
    // Nothing is left to report a failed write of the error report to.
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
