//! Weight-normalised convolution w = g · v / ‖v‖ (per output channel, no epsilon; reference §1.5).
//!
//! The effective weight is computed once per forward by [`CellConv::prepared`] and shared by every
//! evaluation of f in that forward, so gradients reach g and v through one computation.

use super::maybe_detach;
use crate::params::{Init, ParamBuilder};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
enum Source {
    Normalised { g: Tensor, v: Tensor },
    Plain { w: Tensor },
}

/// A bias-free convolution of the equilibrium cell, weight-normalised when the config says so.
#[derive(Debug, Clone)]
pub struct CellConv {
    source: Source,
    effective: Option<Tensor>,
}

impl CellConv {
    /// Registers `weight_g`/`weight_v` (or `weight` without weight norm). v keeps PyTorch's default
    /// kaiming-uniform init and g = ‖v‖, as the official init leaves them (reference §1.7).
    pub fn new(
        pb: &mut ParamBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        wnorm: bool,
    ) -> Result<Self> {
        let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
        let v = pb.tensor((c_out, c_in, k, k), Init::Uniform(bound))?;
        let source = if wnorm {
            let g = pb.param_from("weight_g", row_norms(&v)?)?;
            let v = pb.param_from("weight_v", v)?;
            Source::Normalised { g, v }
        } else {
            Source::Plain {
                w: pb.param_from("weight", v)?,
            }
        };
        Ok(Self {
            source,
            effective: None,
        })
    }

    /// Computes the effective weight once; with `detach` the result carries no graph.
    pub fn prepared(&self, detach: bool) -> Result<Self> {
        let w = match &self.source {
            Source::Normalised { g, v } => {
                let w = v.broadcast_mul(&g.broadcast_div(&row_norms(v)?)?)?;
                maybe_detach(&w, detach)
            }
            Source::Plain { w } => maybe_detach(w, detach),
        };
        Ok(Self {
            source: self.source.clone(),
            effective: Some(w),
        })
    }

    fn weight(&self) -> Result<&Tensor> {
        self.effective
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("CellConv used before prepared()".into()))
    }

    /// Applies the convolution (stride 1, same padding). Call [`Self::prepared`] first.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight()?;
        mdeq_kernels::conv2d(x, w, 1, w.dim(2)? / 2)
    }

    /// dL/dx for an input of `x_dims` given dL/dy, with the weights held fixed.
    pub fn input_grad(&self, dy: &Tensor, x_dims: &[usize]) -> Result<Tensor> {
        let w = self.weight()?;
        mdeq_kernels::conv2d_input_grad(dy, w, 1, w.dim(2)? / 2, x_dims)
    }

    /// `skip` + dL/dx for an input of `x_dims` given dL/dy, summed as the gradient is written
    /// (the convolution's input also feeds a skip connection whose gradient is `skip`).
    pub fn input_grad_plus(&self, dy: &Tensor, x_dims: &[usize], skip: &Tensor) -> Result<Tensor> {
        let w = self.weight()?;
        mdeq_kernels::conv2d_input_grad_plus(dy, w, 1, w.dim(2)? / 2, x_dims, Some(skip))
    }
}

/// ‖v‖ over (C_in, kh, kw) for each output channel, shaped (O, 1, 1, 1).
pub fn row_norms(v: &Tensor) -> Result<Tensor> {
    v.sqr()?.sum_keepdim((1, 2, 3))?.sqrt()
}
