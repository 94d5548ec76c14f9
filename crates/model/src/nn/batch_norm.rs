//! BatchNorm2d with PyTorch's train/eval semantics and running statistics; in a data-parallel
//! job, synchronised over the ranks (the statistics of the global batch, as one process with
//! the whole batch computes them).

use super::affine_parameters;
use crate::params::{Init, ParamBuilder};
use candle_core::{DType, Result, Tensor, Var};
use mdeq_distributed::{replica_sum, Reduce, World};
use mdeq_kernels::batch_norm::{batch_norm_train_synchronised, ChannelAllReduce};
use std::sync::{Arc, RwLock};

/// The ranks whose batches a model's BatchNorm layers normalise together; unset (the default),
/// each process normalises its own batch — the official per-replica behaviour. One group is
/// shared by every BatchNorm of a model.
#[derive(Debug, Clone, Default)]
pub struct BatchNormGroup(Arc<RwLock<Option<World>>>);

impl BatchNormGroup {
    /// Synchronises over `world` from now on (None: per process again).
    pub fn set(&self, world: Option<World>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = world.filter(World::is_distributed);
    }

    /// The world statistics are taken over, when there is more than one rank.
    pub fn world(&self) -> Option<World> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// BatchNorm2d(c), eps 1e-5, optional affine; running statistics are buffers.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    affine: Option<(Tensor, Tensor)>,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    momentum: f64,
    eps: f64,
    group: BatchNormGroup,
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
            group: pb.batch_norm_group(),
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
        if let Some(world) = self.group.world() {
            return self.forward_synchronised(x, &world);
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

    /// Train mode over the global batch of `world`: per-channel sums of x, then of (x − μ)²,
    /// summed over the ranks by a differentiable all-reduce, so that values and gradients are
    /// those of one BatchNorm over every rank's samples (PyTorch's SyncBatchNorm), in float64.
    fn forward_synchronised(&self, x: &Tensor, world: &World) -> Result<Tensor> {
        if mdeq_kernels::fast_path(x) {
            let group = world.clone();
            let reduce: ChannelAllReduce = Arc::new(move |values: &mut [f64]| {
                let summed = group.all_reduce_host(values, Reduce::Sum)?;
                values.copy_from_slice(&summed);
                Ok(())
            });
            let affine = self.affine.as_ref().map(|(g, b)| (g, b));
            let (y, moments) = batch_norm_train_synchronised(x, affine, self.eps, &reduce)?;
            let c = moments.mean.len();
            let stats = |v: Vec<f64>| Tensor::from_vec(v, c, x.device());
            let n = moments.count as usize;
            self.update_running(&stats(moments.mean)?, &stats(moments.var)?, n)?;
            return Ok(y);
        }
        // Any other device or the portable kernels: the same statistics from candle's ops.
        let (b, c, h, w) = x.dims4()?;
        let n = world.all_reduce_host(&[(b * h * w) as f64], Reduce::Sum)?[0];
        if n < 2.0 {
            candle_core::bail!(
                "BatchNorm in train mode needs more than one value per channel, got {n} over {}",
                world.describe()
            );
        }
        let x64 = x.to_dtype(DType::F64)?;
        let channel_sum = |t: &Tensor| -> Result<Tensor> { replica_sum(world, &t.sum((0, 2, 3))?) };
        let mean = (channel_sum(&x64)? / n)?;
        let centred = x64.broadcast_sub(&mean.reshape((1, c, 1, 1))?)?;
        let var = (channel_sum(&centred.sqr()?)? / n)?;
        self.update_running(&mean.detach(), &var.detach(), n as usize)?;
        self.normalise(x, &mean.reshape((1, c, 1, 1))?, &var.reshape((1, c, 1, 1))?)
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

#[cfg(test)]
mod tests {
    use super::BatchNorm2d;
    use crate::params::{init_rng, ParamBuilder, ParamStore};
    use candle_core::{DType, Device, Tensor, Var};
    use mdeq_distributed::testing::Copies;
    use mdeq_distributed::World;
    use std::sync::Arc;

    fn layer(store: &mut ParamStore) -> candle_core::Result<BatchNorm2d> {
        let mut rng = init_rng(0);
        let mut pb = ParamBuilder::new(store, &mut rng);
        BatchNorm2d::new(&mut pb.pp("bn"), 3, true, 0.1)
    }

    // Two ranks holding the same x are one global batch [x; x]. Synchronised BatchNorm on one
    // rank must give that rank's rows of a plain BatchNorm over [x; x]: the same outputs, the
    // same running statistics, and — with each rank's loss Σ w·y — the gradient of the global
    // loss Σ [w; w]·y at the rank's rows, which includes the other rank's dependence on the
    // shared statistics (a per-rank BatchNorm would miss it).
    mdeq_testkit::on_every_kernel!(synchronised_batch_norm_equals_one_batch_norm_over_every_rank);

    fn synchronised_batch_norm_equals_one_batch_norm_over_every_rank() -> mdeq_testkit::Result {
        let dev = Device::Cpu;
        let x = mdeq_testkit::hashed((2, 3, 2, 2), 7)?.to_dtype(DType::F32)?;
        let w = mdeq_testkit::hashed((2, 3, 2, 2), 8)?.to_dtype(DType::F32)?;

        let mut reference_store = ParamStore::new(DType::F32, &dev);
        let reference = layer(&mut reference_store)?;
        let both = Var::from_tensor(&Tensor::cat(&[&x, &x], 0)?)?;
        let y_both = reference.forward(both.as_tensor(), true)?;
        let g_both = (&y_both * Tensor::cat(&[&w, &w], 0)?)?
            .sum_all()?
            .backward()?;
        let g_both = g_both
            .get(both.as_tensor())
            .expect("gradient")
            .narrow(0, 0, 2)?;

        let mut store = ParamStore::new(DType::F32, &dev);
        let synced = layer(&mut store)?;
        store
            .batch_norm_group()
            .set(Some(World::new(0, 2, 0, Arc::new(Copies::new(2)))));
        let x_var = Var::from_tensor(&x)?;
        let y = synced.forward(x_var.as_tensor(), true)?;
        let g = (&y * &w)?.sum_all()?.backward()?;
        let g = g.get(x_var.as_tensor()).expect("gradient");

        assert!(mdeq_testkit::max_rel(&y, &y_both.narrow(0, 0, 2)?)? < 1e-5);
        assert!(mdeq_testkit::max_rel(g, &g_both)? < 1e-5);
        for key in [
            "bn.running_mean",
            "bn.running_var",
            "bn.num_batches_tracked",
        ] {
            let (a, b) = (store.get(key), reference_store.get(key));
            let (a, b) = (a.expect(key).var.as_tensor(), b.expect(key).var.as_tensor());
            assert!(mdeq_testkit::max_rel(a, b)? < 1e-6, "{key}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod threaded_tests {
    use super::BatchNorm2d;
    use crate::params::{init_rng, ParamBuilder, ParamStore};
    use candle_core::{DType, Device, Tensor, Var};
    use mdeq_distributed::testing::Threads;

    fn layer(store: &mut ParamStore) -> candle_core::Result<BatchNorm2d> {
        let mut rng = init_rng(0);
        let mut pb = ParamBuilder::new(store, &mut rng);
        BatchNorm2d::new(&mut pb.pp("bn"), 3, true, 0.1)
    }

    // Two thread ranks with different halves of a batch X: each rank's outputs and input
    // gradients (its loss Σ w_r·y_r) are its rows of one BatchNorm over X with loss Σ w·y.
    mdeq_testkit::on_every_kernel!(synchronised_batch_norm_over_distinct_halves);

    fn synchronised_batch_norm_over_distinct_halves() -> mdeq_testkit::Result {
        let dev = Device::Cpu;
        let x = (mdeq_testkit::hashed((4, 3, 2, 2), 7)? * 3.0)?.to_dtype(DType::F32)?;
        let w = mdeq_testkit::hashed((4, 3, 2, 2), 8)?.to_dtype(DType::F32)?;
        let mut reference_store = ParamStore::new(DType::F32, &dev);
        let reference = layer(&mut reference_store)?;
        let all = Var::from_tensor(&x)?;
        let y_all = reference.forward(all.as_tensor(), true)?;
        let g_all = (&y_all * &w)?.sum_all()?.backward()?;
        let g_all = g_all.get(all.as_tensor()).expect("gradient").clone();

        let group = Threads::new(2);
        // The kernel choice belongs to the thread; each rank's thread takes this one's.
        let kernels = mdeq_kernels::active_kernels();
        let results: Vec<(Tensor, Tensor)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|r| {
                    let (group, x, w) = (group.clone(), x.clone(), w.clone());
                    s.spawn(move || {
                        mdeq_kernels::with_kernels(
                            kernels,
                            || -> candle_core::Result<(Tensor, Tensor)> {
                                let mut store = ParamStore::new(DType::F32, &Device::Cpu);
                                let bn = layer(&mut store)?;
                                store.batch_norm_group().set(Some(group.rank(r)));
                                let xr = Var::from_tensor(&x.narrow(0, 2 * r, 2)?)?;
                                let y = bn.forward(xr.as_tensor(), true)?;
                                let g = (&y * w.narrow(0, 2 * r, 2)?)?.sum_all()?.backward()?;
                                Ok((y, g.get(xr.as_tensor()).expect("gradient").clone()))
                            },
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect::<candle_core::Result<_>>()
        })?;
        for (r, (y, g)) in results.iter().enumerate() {
            let dy = mdeq_testkit::max_rel(y, &y_all.narrow(0, 2 * r, 2)?)?;
            let dg = mdeq_testkit::max_rel(g, &g_all.narrow(0, 2 * r, 2)?)?;
            assert!(dy < 1e-6 && dg < 1e-5, "rank {r}: y {dy:e} g {dg:e}");
        }
        Ok(())
    }
}
