//! Where and in what the model computes — a device, a float type and a kernel choice — chosen
//! once by a command and passed down (the shape of candle-examples' `device(cpu)`).

use candle_core::{DType, Device};
use mdeq_kernels::{with_kernels, KernelChoice};
use std::fmt;
use std::str::FromStr;

/// Host memory: where files are read and written before weights move to the compute device.
pub const HOST: Device = Device::Cpu;

/// A device as the command line names it: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why a device cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// CUDA asked of a binary built without it.
    #[error(
        "--device {0}: this mdeq was built without CUDA; build it with `--features cuda` \
         (docs/gpu.md), or use --device cpu"
    )]
    NotBuilt(DeviceSpec),
    /// CUDA built in, but the device cannot be opened (no GPU, no driver, a bad index).
    #[error("--device {spec}: no usable CUDA device here ({reason}); use --device cpu")]
    Unavailable {
        /// The device asked for.
        spec: DeviceSpec,
        /// What the driver said.
        reason: String,
    },
    /// A float type the model does not compute in.
    #[error("--dtype {0:?}: the model computes in f32 or f64")]
    Dtype(DType),
}

/// Opens the device `spec` names; `None` is the default: the first CUDA device when this binary
/// was built with CUDA and one is present, else the CPU.
pub fn open_device(spec: Option<DeviceSpec>) -> Result<Device, ComputeError> {
    match spec {
        Some(DeviceSpec::Cpu) => Ok(HOST),
        Some(spec @ DeviceSpec::Cuda(n)) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(ComputeError::NotBuilt(spec));
            }
            Device::new_cuda(n).map_err(|e| ComputeError::Unavailable {
                spec,
                reason: first_line(&e.to_string()),
            })
        }
        None if candle_core::utils::cuda_is_available() => Ok(Device::new_cuda(0).unwrap_or(HOST)),
        None => Ok(HOST),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// The device, float type and kernels a command computes with.
#[derive(Debug, Clone)]
pub struct Compute {
    /// Where tensors live.
    pub device: Device,
    /// The model's float type (f32 or f64).
    pub dtype: DType,
    /// Which kernels the entry points of `mdeq-kernels` dispatch to.
    pub kernels: KernelChoice,
}

impl Compute {
    /// Checks the float type and bundles the choice.
    pub fn new(device: Device, dtype: DType, kernels: KernelChoice) -> Result<Self, ComputeError> {
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(ComputeError::Dtype(dtype));
        }
        Ok(Self {
            device,
            dtype,
            kernels,
        })
    }

    /// The CPU with native kernels, in `dtype`.
    pub fn cpu(dtype: DType) -> Self {
        Self {
            device: HOST,
            dtype,
            kernels: KernelChoice::Native,
        }
    }

    /// The same with another kernel choice.
    pub fn with_kernels(self, kernels: KernelChoice) -> Self {
        Self { kernels, ..self }
    }

    /// Runs `f` with this choice of kernels active on the calling thread.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        with_kernels(self.kernels, f)
    }

    /// The device's name: `cpu` or `cuda:N`.
    pub fn device_name(&self) -> String {
        match self.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".into(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }
}

impl fmt::Display for Compute {
    /// One line for the start of a run: `cpu, f32, native kernels`; off the CPU, what native
    /// means there.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dtype = if self.dtype == DType::F64 {
            "f64"
        } else {
            "f32"
        };
        let kernels = match (self.device.is_cpu(), self.kernels) {
            (true, KernelChoice::Native) => "native kernels (mdeq's CPU kernels)",
            (_, KernelChoice::Portable) => "portable kernels (candle's stock ops)",
            (false, KernelChoice::Native) => "candle's device kernels",
        };
        write!(f, "{}, {dtype}, {kernels}", self.device_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (s, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceSpec>(), Ok(spec));
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn cuda_without_a_cuda_device_is_one_clear_error_and_the_default_falls_back_to_the_cpu() {
        // In a CPU-only build the error says the build lacks CUDA; in a CUDA build on a machine
        // without a GPU, that no device is usable. A machine with a GPU has nothing to refuse.
        if let Err(e) = open_device(Some(DeviceSpec::Cuda(0))) {
            let msg = e.to_string();
            assert!(msg.starts_with("--device cuda:0: "), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
            match e {
                ComputeError::NotBuilt(_) => {
                    assert!(!candle_core::utils::cuda_is_available());
                    assert!(msg.contains("--features cuda"), "{msg}");
                    assert!(open_device(None).unwrap().is_cpu());
                }
                ComputeError::Unavailable { .. } => assert!(open_device(None).unwrap().is_cpu()),
                ComputeError::Dtype(_) => unreachable!(),
            }
        }
        assert!(open_device(Some(DeviceSpec::Cpu)).unwrap().is_cpu());
    }

    #[test]
    fn only_f32_and_f64_are_accepted() {
        assert!(Compute::new(HOST, DType::F64, KernelChoice::Portable).is_ok());
        let e = Compute::new(HOST, DType::F16, KernelChoice::Native).unwrap_err();
        assert!(e.to_string().contains("f32 or f64"), "{e}");
    }

    #[test]
    fn the_start_line_says_device_dtype_and_kernels() {
        let c = Compute::cpu(DType::F64).with_kernels(KernelChoice::Portable);
        assert_eq!(
            c.to_string(),
            "cpu, f64, portable kernels (candle's stock ops)"
        );
    }
}
