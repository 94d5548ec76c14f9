//! Work splitting over candle's CPU thread pool, the pool candle's own ops use, so our kernels and
//! candle's never compete for the cores.

use std::ops::Range;

/// A pointer into an output buffer whose disjoint parts are written by different threads.
#[derive(Clone, Copy)]
pub struct Shared<T>(pub *mut T);
// SAFETY: users write only the disjoint part of the buffer their work item owns.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The `len` elements from `start`.
    ///
    /// # Safety
    /// No other thread may access this range while the slice lives, and it must be in bounds.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Calls `f` on chunks of 0..n on all threads.
pub fn for_each_chunk(n: usize, f: impl Fn(Range<usize>) + Sync) {
    if candle_core::utils::get_num_threads() <= 1 || n <= 1 {
        f(0..n);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(n, f);
    }
}

/// Runs `f` inside a function compiled for AVX-512 (or AVX2+FMA) when the CPU has it, so the
/// loops inlined into it are vectorised for the machine the binary runs on, not for the
/// baseline x86-64 it was built for.
#[inline(always)]
pub fn with_best_isa<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            // SAFETY: the features were detected at run time.
            return unsafe { isa_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { isa_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn isa_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn isa_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// A vector of `n` elements whose contents the caller overwrites entirely before reading.
pub fn uninit_vec<T: crate::element::Element>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32/f64 have no invalid bit patterns and every caller writes all n elements
    // before the vector is read (each use site says so).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}
