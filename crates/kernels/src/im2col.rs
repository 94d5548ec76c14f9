//! Unfolding of convolution patches into columns and its adjoint.

use crate::element::Element;
use multiversion::multiversion;

/// Geometry of one 2-D convolution on one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Square kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Geometry {
    /// Output height.
    pub fn h_out(&self) -> usize {
        (self.h + 2 * self.padding - self.k) / self.stride + 1
    }
    /// Output width.
    pub fn w_out(&self) -> usize {
        (self.w + 2 * self.padding - self.k) / self.stride + 1
    }
    /// Rows of the column matrix, C_in·k·k.
    pub fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }
    /// Columns of the column matrix, H_out·W_out.
    pub fn cols(&self) -> usize {
        self.h_out() * self.w_out()
    }
    /// True when the column matrix is the input itself (1×1, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }

    /// The output positions o in 0..n_out whose input index o·s − p + kk lies in 0..n_in.
    fn valid(&self, kk: usize, n_in: usize, n_out: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let first = if kk >= p { 0 } else { (p - kk).div_ceil(s) };
        // o·s + kk − p ≤ n_in − 1  ⇔  o ≤ (n_in − 1 + p − kk) / s
        let last = if n_in + p > kk {
            ((n_in - 1 + p - kk) / s + 1).min(n_out)
        } else {
            0
        };
        (first.min(last), last)
    }
}

/// col[(c·k + ky)·k + kx, oy·W_out + ox] = x[c, oy·s − p + ky, ox·s − p + kx] (0 outside).
#[multiversion(targets = "simd")]
pub fn im2col<T: Element>(x: &[T], g: &Geometry, col: &mut [T]) {
    let (ho, wo, s, p) = (g.h_out(), g.w_out(), g.stride, g.padding);
    for c in 0..g.c_in {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            let (oy0, oy1) = g.valid(ky, g.h, ho);
            for kx in 0..g.k {
                let (ox0, ox1) = g.valid(kx, g.w, wo);
                let row = &mut col[((c * g.k + ky) * g.k + kx) * ho * wo..][..ho * wo];
                row[..oy0 * wo].fill(T::ZERO);
                row[oy1 * wo..].fill(T::ZERO);
                for oy in oy0..oy1 {
                    let src = &plane[(oy * s + ky - p) * g.w..][..g.w];
                    let out = &mut row[oy * wo..(oy + 1) * wo];
                    out[..ox0].fill(T::ZERO);
                    out[ox1..].fill(T::ZERO);
                    let ix0 = ox0 * s + kx - p;
                    if s == 1 {
                        out[ox0..ox1].copy_from_slice(&src[ix0..ix0 + (ox1 - ox0)]);
                    } else {
                        for (o, i) in out[ox0..ox1].iter_mut().zip((ix0..).step_by(s)) {
                            *o = src[i];
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: dx[c, iy, ix] += Σ of the column entries that read it. `dx` must
/// be zeroed by the caller.
#[multiversion(targets = "simd")]
pub fn col2im<T: Element>(col: &[T], g: &Geometry, dx: &mut [T]) {
    let (ho, wo, s, p) = (g.h_out(), g.w_out(), g.stride, g.padding);
    for c in 0..g.c_in {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            let (oy0, oy1) = g.valid(ky, g.h, ho);
            for kx in 0..g.k {
                let (ox0, ox1) = g.valid(kx, g.w, wo);
                let row = &col[((c * g.k + ky) * g.k + kx) * ho * wo..][..ho * wo];
                for oy in oy0..oy1 {
                    let dst = &mut plane[(oy * s + ky - p) * g.w..][..g.w];
                    let src = &row[oy * wo + ox0..oy * wo + ox1];
                    let ix0 = ox0 * s + kx - p;
                    if s == 1 {
                        for (d, v) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                            *d += *v;
                        }
                    } else {
                        for (v, i) in src.iter().zip((ix0..).step_by(s)) {
                            dst[i] += *v;
                        }
                    }
                }
            }
        }
    }
}
