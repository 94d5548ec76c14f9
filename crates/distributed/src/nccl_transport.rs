//! Tensors over NCCL on device memory: each rank drives its own GPU, the communicator's unique
//! id travels from rank 0 over MPI, and sums and broadcasts never leave the GPUs. MPI stays the
//! transport's way to end the job.

use crate::collective::{Collective, Reduce};
use crate::launch::LaunchError;
use crate::world::World;
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor,
};
use std::sync::{Arc, Mutex};

/// A NCCL communicator over every rank's GPU.
pub struct NcclTransport {
    comm: Mutex<Comm>,
    device: CudaDevice,
    control: Arc<dyn Collective>,
}

// SAFETY: the communicator is only used through the mutex, one call at a time, on the stream
// it was created with.
unsafe impl Send for NcclTransport {}
// SAFETY: as above.
unsafe impl Sync for NcclTransport {}

/// `world` (joined over MPI) with a NCCL communicator on `device`.
pub fn join(world: World, device: CudaDevice) -> std::result::Result<World, LaunchError> {
    let setup = |e: String| LaunchError::Setup(format!("NCCL on {}: {e}", world.describe()));
    let mpi = world.collective().clone();
    // The 128-byte unique id as float64 values: the world's broadcast carries any tensor.
    let id = if world.is_leader() {
        Some(Id::new().map_err(|e| setup(format!("{e:?}")))?)
    } else {
        None
    };
    let bytes: Vec<f64> = match &id {
        Some(id) => id.internal().iter().map(|&c| c as u8 as f64).collect(),
        None => vec![0.0; 128],
    };
    let bytes = world
        .broadcast_host(&bytes)
        .map_err(|e| setup(e.to_string()))?;
    let mut internal = [0 as std::ffi::c_char; 128];
    for (slot, v) in internal.iter_mut().zip(&bytes) {
        *slot = *v as u8 as std::ffi::c_char;
    }
    let comm = Comm::from_rank(
        device.cuda_stream(),
        world.rank(),
        world.size(),
        Id::uninit(internal),
    )
    .map_err(|e| setup(format!("{e:?}")))?;
    let transport = NcclTransport {
        comm: Mutex::new(comm),
        device,
        control: mpi,
    };
    Ok(World::new(
        world.rank(),
        world.size(),
        world.local_rank(),
        Arc::new(transport),
    ))
}

/// What one NCCL call does with its input.
#[derive(Clone, Copy)]
enum Call {
    AllReduce(Reduce),
    Broadcast(usize),
}

struct NcclOp<'a> {
    transport: &'a NcclTransport,
    call: Call,
}

impl NcclOp<'_> {
    fn run<T>(&self, storage: &CudaStorage, layout: &Layout) -> Result<CudaStorage>
    where
        T: candle_core::cuda::CudaDType + candle_core::cuda::cudarc::nccl::NcclType,
        T: candle_core::cuda::cudarc::driver::DeviceRepr
            + candle_core::cuda::cudarc::driver::ValidAsZeroBits,
    {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL takes contiguous tensors");
        };
        let src = storage.as_cuda_slice::<T>()?.slice(start..end);
        let dev = &self.transport.device;
        let mut dst = dev.alloc_zeros::<T>(end - start)?;
        let comm = self
            .transport
            .comm
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let outcome = match self.call {
            Call::AllReduce(op) => {
                let op = match op {
                    Reduce::Sum => ReduceOp::Sum,
                    Reduce::Max => ReduceOp::Max,
                };
                comm.all_reduce(&src, &mut dst, &op)
            }
            Call::Broadcast(root) => comm.broadcast(Some(&src), &mut dst, root as i32),
        };
        outcome.map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        debug_assert_eq!(dst.len(), end - start);
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives take tensors on the GPU")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = match storage.dtype() {
            DType::F32 => self.run::<f32>(storage, layout)?,
            DType::F64 => self.run::<f64>(storage, layout)?,
            other => candle_core::bail!("NCCL collective of {other:?} tensors"),
        };
        Ok((out, layout.shape().clone()))
    }
}

impl NcclTransport {
    fn call(&self, t: &Tensor, call: Call) -> Result<Tensor> {
        let device = t.device().clone();
        let on_gpu = t
            .to_device(&Device::Cuda(self.device.clone()))?
            .contiguous()?;
        on_gpu
            .apply_op1_no_bwd(&NcclOp {
                transport: self,
                call,
            })?
            .to_device(&device)
    }
}

impl Collective for NcclTransport {
    fn transport(&self) -> &'static str {
        "NCCL"
    }

    fn all_reduce(&self, t: &Tensor, op: Reduce) -> Result<Tensor> {
        self.call(t, Call::AllReduce(op))
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.call(t, Call::Broadcast(root))
    }

    fn abort(&self, code: i32) -> ! {
        self.control.abort(code)
    }
}
