//! Tensors over MPI (rsmpi over the system's MPI library): every collective stages its tensor
//! through host memory, which is what CPU ranks have anyway. MPI is initialised with
//! `MPI_THREAD_SERIALIZED` and every call holds one lock, so the transport may be shared
//! between threads.

use crate::collective::{Collective, Reduce};
use crate::launch::LaunchError;
use crate::world::World;
use candle_core::{DType, Device, Result, Tensor};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::sync::{Arc, Mutex};

/// MPI_COMM_WORLD and the MPI library's lifetime (dropping the last handle finalises MPI).
pub struct MpiTransport {
    comm: Mutex<SimpleCommunicator>,
    // Dropped after `comm` (fields drop in order): MPI_Finalize comes last.
    _universe: Universe,
}

// SAFETY: MPI is initialised with at least MPI_THREAD_SERIALIZED (checked in `join`) and every
// use of the communicator goes through the mutex, so no two threads call MPI at once.
unsafe impl Send for MpiTransport {}
// SAFETY: as above; `&MpiTransport` only reaches MPI through the mutex.
unsafe impl Sync for MpiTransport {}

/// Initialises MPI and returns this rank's world.
pub fn join() -> std::result::Result<World, LaunchError> {
    let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
        .ok_or_else(|| LaunchError::Setup("MPI was already initialised".into()))?;
    if threading < Threading::Serialized {
        return Err(LaunchError::Setup(format!(
            "the MPI library offers thread support {threading:?}; mdeq needs Serialized"
        )));
    }
    let comm = universe.world();
    let (rank, size) = (comm.rank() as usize, comm.size() as usize);
    // The ranks sharing this machine's memory, ordered by world rank: which GPU is whose.
    let local_rank = comm.split_shared(comm.rank()).rank() as usize;
    let transport = Arc::new(MpiTransport {
        comm: Mutex::new(comm),
        _universe: universe,
    });
    Ok(World::new(rank, size, local_rank, transport))
}

impl MpiTransport {
    fn comm(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
        // A panic while holding the lock leaves MPI as it was: the guard is still usable.
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rank `root`'s bytes in `buf` on every rank (NCCL's unique id travels this way).
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) {
        self.comm().process_at_rank(root as i32).broadcast_into(buf);
    }
}

/// `t`'s values on the host, as `T`.
fn host_values<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<T>()
}

impl MpiTransport {
    fn all_reduce_as<T: candle_core::WithDType + Equivalence>(
        &self,
        t: &Tensor,
        op: Reduce,
    ) -> Result<Tensor> {
        let send = host_values::<T>(t)?;
        let mut recv = vec![T::zero(); send.len()];
        let op = match op {
            Reduce::Sum => SystemOperation::sum(),
            Reduce::Max => SystemOperation::max(),
        };
        self.comm().all_reduce_into(&send[..], &mut recv[..], op);
        Tensor::from_vec(recv, t.shape(), &Device::Cpu)?.to_device(t.device())
    }

    fn broadcast_as<T: candle_core::WithDType + Equivalence>(
        &self,
        t: &Tensor,
        root: usize,
    ) -> Result<Tensor> {
        let mut buf = host_values::<T>(t)?;
        self.comm()
            .process_at_rank(root as i32)
            .broadcast_into(&mut buf[..]);
        Tensor::from_vec(buf, t.shape(), &Device::Cpu)?.to_device(t.device())
    }
}

impl Collective for MpiTransport {
    fn transport(&self) -> &'static str {
        "MPI"
    }

    fn all_reduce(&self, t: &Tensor, op: Reduce) -> Result<Tensor> {
        match t.dtype() {
            DType::F32 => self.all_reduce_as::<f32>(t, op),
            DType::F64 => self.all_reduce_as::<f64>(t, op),
            other => candle_core::bail!("MPI all-reduce of {other:?} tensors (f32 or f64 only)"),
        }
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        match t.dtype() {
            DType::F32 => self.broadcast_as::<f32>(t, root),
            DType::F64 => self.broadcast_as::<f64>(t, root),
            DType::I64 => self.broadcast_as::<i64>(t, root),
            other => candle_core::bail!("MPI broadcast of {other:?} tensors"),
        }
    }

    fn abort(&self, code: i32) -> ! {
        self.comm().abort(code)
    }
}
