//! Unfolding of convolution patches into columns and its adjoint.

use crate::element::Element;

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
}

/// col[(c·k + ky)·k + kx, oy·W_out + ox] = x[c, oy·s − p + ky, ox·s − p + kx] (0 outside).
pub fn im2col<T: Element>(x: &[T], g: &Geometry, col: &mut [T]) {
    let (ho, wo) = (g.h_out(), g.w_out());
    for c in 0..g.c_in {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &mut col[((c * g.k + ky) * g.k + kx) * ho * wo..][..ho * wo];
                for oy in 0..ho {
                    let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                    let out = &mut row[oy * wo..(oy + 1) * wo];
                    if iy < 0 || iy >= g.h as isize {
                        out.fill(T::ZERO);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    for (ox, o) in out.iter_mut().enumerate() {
                        let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                        *o = if ix < 0 || ix >= g.w as isize { T::ZERO } else { src[ix as usize] };
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: dx[c, iy, ix] += Σ of the column entries that read it. `dx` must
/// be zeroed by the caller.
pub fn col2im<T: Element>(col: &[T], g: &Geometry, dx: &mut [T]) {
    let (ho, wo) = (g.h_out(), g.w_out());
    for c in 0..g.c_in {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &col[((c * g.k + ky) * g.k + kx) * ho * wo..][..ho * wo];
                for oy in 0..ho {
                    let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    for (ox, v) in row[oy * wo..(oy + 1) * wo].iter().enumerate() {
                        let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                        if ix >= 0 && ix < g.w as isize {
                            dst[ix as usize] += *v;
                        }
                    }
                }
            }
        }
    }
}
