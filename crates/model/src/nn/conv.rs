//! Plain 2-D convolution with "same" padding (k/2), as every MDEQ convolution uses.

use crate::params::{Init, ParamBuilder};
use candle_core::{Result, Tensor};

/// A convolution without weight normalisation (stem, stage0, fuse layers, heads).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
}

impl Conv2d {
    /// Registers `weight` (and `bias`) under the builder's prefix, initialised N(0, 0.01²) as the
    /// official `init_weights` does.
    pub fn new(
        pb: &mut ParamBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = pb.param("weight", (c_out, c_in, k, k), Init::Normal(0.01))?;
        let bias = if bias {
            Some(pb.param("bias", c_out, Init::Normal(0.01))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
        })
    }

    /// A plain convolution from explicit tensors (tests and fused graphs).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>, stride: usize) -> Self {
        Self {
            weight,
            bias,
            stride,
        }
    }

    /// Applies the convolution.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        let y = mdeq_kernels::conv2d(x, &self.weight, self.stride, k / 2)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        }
    }

    /// The same convolution, optionally cut from the autodiff graph.
    /// dL/dx for an input of `x_dims` given dL/dy, with the weights held fixed.
    pub fn input_grad(&self, dy: &Tensor, x_dims: &[usize]) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        mdeq_kernels::conv2d_input_grad(dy, &self.weight, self.stride, k / 2, x_dims)
    }

    pub fn prepared(&self, detach: bool) -> Self {
        Self {
            weight: super::maybe_detach(&self.weight, detach),
            bias: self.bias.as_ref().map(|b| super::maybe_detach(b, detach)),
            stride: self.stride,
        }
    }
}
