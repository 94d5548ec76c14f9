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

    /// The `len` elements from `start`, read-only.
    ///
    /// # Safety
    /// No thread may write this range while the slice lives, and it must be in bounds.
    pub unsafe fn read<'a>(&self, start: usize, len: usize) -> &'a [T] {
        std::slice::from_raw_parts(self.0.add(start), len)
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
