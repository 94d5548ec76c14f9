//! BatchNorm2d with PyTorch's train/eval semantics and running statistics.

use super::affine_parameters;
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
        let affine = affine_parameters(pb, channels, affine)?;
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
        if !train {
            let c = x.dim(1)?;
            let mean = self
                .running_mean
                .as_tensor()
                .detach()
                .reshape((1, c, 1, 1))?;
            let var = self
                .running_var
                .as_tensor()
                .detach()
                .reshape((1, c, 1, 1))?;
            return self.normalise(x, &mean, &var);
        }
        let (b, _, h, w) = x.dims4()?;
        if b * h * w < 2 {
            // As PyTorch: one value per channel has no batch statistics to normalise with.
            candle_core::bail!(
                "BatchNorm in train mode needs more than one value per channel, got input {:?}",
                x.dims()
            );
        }
        if mdeq_kernels::fast_path(x) {
            let (mean, var) = mdeq_kernels::batch_norm::channel_moments(x)?;
            let c = x.dim(1)?;
            let stats = |v: Vec<f64>| Tensor::from_vec(v, c, x.device());
            self.update_running(&stats(mean)?, &stats(var)?, b * h * w)?;
            let affine = self.affine.as_ref().map(|(g, b)| (g, b));
            return mdeq_kernels::batch_norm::batch_norm_train(x, affine, self.eps);
        }
        if x.dtype() == DType::F64 {
            return self.forward_batch_stats(x);
        }
        // candle reduces float32 sequentially; batch statistics over B·H·W values then drift
        // ~1e-5 from PyTorch's, so train-mode statistics (stem and heads only) use float64.
        self.forward_batch_stats(&x.to_dtype(DType::F64)?)?
            .to_dtype(x.dtype())
    }

    fn forward_batch_stats(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let mean = x.mean_keepdim((0, 2, 3))?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
        self.update_running(
            &mean.detach().flatten_all()?,
            &var.detach().flatten_all()?,
            b * h * w,
        )?;
        self.normalise(x, &mean, &var)
    }

    /// PyTorch's momentum update from a batch's per-channel mean and biased variance over `n`
    /// values (the running variance takes the unbiased one).
    fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        let stats_dtype = self.running_mean.dtype();
        let n = n as f64;
        let m = self.momentum;
        let batch_mean = mean.to_dtype(stats_dtype)?;
        let unbiased = (var.to_dtype(stats_dtype)? * (n / (n - 1.0).max(1.0)))?;
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - m))? + (batch_mean * m)?)?)?;
        self.running_var
            .set(&((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
        self.num_batches_tracked
            .set(&(self.num_batches_tracked.as_tensor() + 1.0)?)
    }

    fn normalise(&self, x: &Tensor, mean: &Tensor, var: &Tensor) -> Result<Tensor> {
        let c = x.dim(1)?;
        let (mean, var) = (mean.to_dtype(x.dtype())?, var.to_dtype(x.dtype())?);
        let normed = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?;
        match &self.affine {
            None => Ok(normed),
            Some((gamma, beta)) => normed
                .broadcast_mul(&gamma.reshape((1, c, 1, 1))?.to_dtype(x.dtype())?)?
                .broadcast_add(&beta.reshape((1, c, 1, 1))?.to_dtype(x.dtype())?),
        }
    }
}
