//! The float types the kernels are written for.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};

/// f32 or f64, with access to candle CPU storage.
pub trait Element:
    Copy
    + Default
    + Send
    + Sync
    + std::ops::AddAssign
    + std::ops::Mul<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Neg<Output = Self>
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// The contiguous slice of a storage under `layout`.
    fn slice<'a>(s: &'a CpuStorage, layout: &Layout) -> Result<&'a [Self]>;
    /// Wraps a vector as storage.
    fn storage(v: Vec<Self>) -> CpuStorage;
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// Narrows from f64.
    fn from_f64(v: f64) -> Self;
}

fn contiguous<'a, T>(v: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("mdeq-kernels: input is not contiguous"),
    }
}

macro_rules! element {
    ($t:ty, $variant:ident, $dtype:ident) => {
        impl Element for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn slice<'a>(s: &'a CpuStorage, layout: &Layout) -> Result<&'a [Self]> {
                match s {
                    CpuStorage::$variant(v) => contiguous(v, layout),
                    _ => candle_core::bail!("mdeq-kernels: expected {:?} storage", DType::$dtype),
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}

element!(f32, F32, F32);
element!(f64, F64, F64);

/// True when the fast kernels handle `t`: native kernels chosen on this thread, CPU storage, f32
/// or f64. Everything else goes through candle's own ops.
pub fn fast_path(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu)
        && matches!(t.dtype(), DType::F32 | DType::F64)
        && crate::active_kernels() == crate::KernelChoice::Native
}

/// Checks that every tensor of `others` has the (B, D) shape and dtype of `x`, naming `what`;
/// returns (B, D).
pub(crate) fn check_operands<'a>(
    what: &str,
    x: &Tensor,
    others: impl IntoIterator<Item = &'a Tensor>,
) -> Result<(usize, usize)> {
    let dims = x.dims2()?;
    for t in others {
        if t.dims() != x.dims() || t.dtype() != x.dtype() {
            candle_core::bail!(
                "{what}: operand {:?} {:?} does not match x {:?} {:?}",
                t.dims(),
                t.dtype(),
                x.dims(),
                x.dtype()
            );
        }
    }
    Ok(dims)
}

/// Runs `f` on the data of `tensors`, each contiguous, on the CPU and of dtype `T`.
pub(crate) fn with_cpu_slices<T: Element, R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(s) => slices.push(T::slice(s, layout)?),
            _ => candle_core::bail!("mdeq-kernels: expected CPU storage"),
        }
    }
    Ok(f(&slices))
}
