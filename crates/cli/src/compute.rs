//! `--device`, `--dtype`, `--kernels`: the flags every computing command shares, turned once into
//! the [`Compute`] value that the command passes down.

use anyhow::Result;
use candle_core::DType;
use mdeq_distributed::World;
use mdeq_kernels::{active_kernels, KernelChoice};
use mdeq_model::compute::{open_device, Compute, DeviceSpec};

/// The float type the model computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// float32, as the official code trains.
    F32,
    /// float64, where every comparison with a reference is well posed.
    F64,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
        }
    }
}

/// Where and in what a command computes.
#[derive(Debug, Clone, clap::Args)]
pub struct ComputeArgs {
    /// cpu, cuda or cuda:N [default: the first CUDA device when this binary was built with CUDA
    /// and one is present, else cpu].
    #[arg(long, value_parser = |s: &str| s.parse::<DeviceSpec>())]
    pub device: Option<DeviceSpec>,
    /// Float type the model computes in.
    #[arg(long, visible_alias = "precision", value_enum, default_value = "f32")]
    pub dtype: Precision,
    /// native: the fastest kernels for the device (mdeq's own on the CPU); portable: candle's
    /// stock ops, the very code path a GPU runs, here on the CPU [default: $MDEQ_KERNELS, else
    /// native].
    #[arg(long, value_parser = |s: &str| s.parse::<KernelChoice>())]
    pub kernels: Option<KernelChoice>,
}

impl ComputeArgs {
    /// The CPU, f32, the process's default kernels: what a command computes with when its
    /// caller gives no flags.
    pub fn cpu() -> Self {
        Self {
            device: Some(DeviceSpec::Cpu),
            dtype: Precision::F32,
            kernels: None,
        }
    }

    /// Opens the device and says on stderr, once, what the command computes with.
    pub fn resolve(&self) -> Result<Compute> {
        self.resolve_on(&World::single())
    }

    /// As [`Self::resolve`] for one rank of `world`: by default each rank on a machine drives
    /// its own GPU (`cuda:<local rank>`); the line on stderr names the rank in a job of several.
    pub fn resolve_on(&self, world: &World) -> Result<Compute> {
        let spec = match self.device {
            None if world.is_distributed() && candle_core::utils::cuda_is_available() => {
                Some(DeviceSpec::Cuda(world.local_rank()))
            }
            spec => spec,
        };
        let device = open_device(spec)?;
        let compute = Compute::new(
            device,
            self.dtype.dtype(),
            self.kernels.unwrap_or_else(active_kernels),
        )?;
        if world.is_distributed() {
            mdeq_distributed::eprint_whole_line(&format!(
                "{}: computing on {compute}",
                world.describe()
            ));
        } else {
            eprintln!("computing on {compute}");
        }
        Ok(compute)
    }
}
