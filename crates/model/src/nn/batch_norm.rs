//! BatchNorm2d with PyTorch's train/eval semantics and running statistics.

use crate::params::{Init, ParamBuilder};
use candle_core::{DType, Result, Tensor, Var};

/// BatchNorm2d(c), eps 1e-5, optional affine; running statistics are buffers.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    affine: Option<(Tensor, Tensor)>,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    momentum: f64,
    eps: f64,
}

impl BatchNorm2d {
    /// Registers the official keys: `weight`, `bias` (if affine), `running_mean`, `running_var`,
    /// `num_batches_tracked`.
    pub fn new(
        pb: &mut ParamBuilder,
        channels: usize,
        affine: bool,
        momentum: f64,
    ) -> Result<Self> {
        let affine = if affine {
            Some((
                pb.param("weight", channels, Init::Const(1.0))?,
                pb.param("bias", channels, Init::Const(0.0))?,
            ))
        } else {
            None
        };
        Ok(Self {
            affine,
            running_mean: pb.buffer("running_mean", channels, Init::Const(0.0))?,
            running_var: pb.buffer("running_var", channels, Init::Const(1.0))?,
            num_batches_tracked: pb.counter("num_batches_tracked")?,
            momentum,
            eps: 1e-5,
        })
    }

    /// Eval mode uses the running statistics; train mode normalises with this batch's statistics
    /// (biased variance) and updates the running ones (unbiased variance), as PyTorch does.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (mean, var) = if train {
            let mean = x.mean_keepdim((0, 2, 3))?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
            let n = (b * h * w) as f64;
            let unbiased = (var.detach() * (n / (n - 1.0).max(1.0)))?.flatten_all()?;
            let m = self.momentum;
            let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))?
                + (mean.detach().flatten_all()? * m)?)?;
            let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
            self.running_mean.set(&new_mean)?;
            self.running_var.set(&new_var)?;
            let count = (self.num_batches_tracked.as_tensor().to_dtype(DType::I64)? + 1.0)?;
            self.num_batches_tracked.set(&count)?;
            (mean, var)
        } else {
            (
                self.running_mean
                    .as_tensor()
                    .detach()
                    .reshape((1, c, 1, 1))?,
                self.running_var
                    .as_tensor()
                    .detach()
                    .reshape((1, c, 1, 1))?,
            )
        };
        let normed = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?;
        match &self.affine {
            None => Ok(normed),
            Some((gamma, beta)) => normed
                .broadcast_mul(&gamma.reshape((1, c, 1, 1))?)?
                .broadcast_add(&beta.reshape((1, c, 1, 1))?),
        }
    }
}
