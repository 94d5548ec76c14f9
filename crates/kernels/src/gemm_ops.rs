//! Row-major matrix products over slices, on top of the `gemm` crate.

use crate::element::Element;
use gemm::Parallelism;

/// Which operand is read transposed.
#[derive(Clone, Copy)]
pub enum Op {
    /// As stored.
    N,
    /// Transposed.
    T,
}

/// dst (m×n) = [dst +] op(a) (m×k) · op(b) (k×n), all row-major; `a` is stored m×k (N) or k×m (T),
/// `b` is stored k×n (N) or n×k (T). With `accumulate`, the product is added to dst.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Element>(
    dst: &mut [T],
    a: &[T],
    op_a: Op,
    b: &[T],
    op_b: Op,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    assert!(
        dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "matmul operand sizes"
    );
    let (a_cs, a_rs) = match op_a {
        Op::N => (1, k as isize),
        Op::T => (m as isize, 1),
    };
    let (b_cs, b_rs) = match op_b {
        Op::N => (1, n as isize),
        Op::T => (k as isize, 1),
    };
    // SAFETY: the asserts above bound every index gemm computes from (m, n, k) and the strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { T::ONE } else { T::ZERO },
            T::ONE,
            false,
            false,
            false,
            parallelism,
        )
    }
}
