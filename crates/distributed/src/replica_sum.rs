//! The sum of a tensor over all ranks as a differentiable op: the forward all-reduces the
//! values, and so does the backward with the gradient, because every rank's loss depends on
//! the sum (∂(Σ_r L_r)/∂x_r = Σ_r' ∂L_r'/∂s). Synchronised BatchNorm builds its batch
//! statistics from it, so the statistics and their gradients are those of the global batch.

use crate::collective::Reduce;
use crate::world::World;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

/// Σ over ranks of `t` (any device; the reduction runs on host float64 values — the
/// per-channel statistics it is made for are small).
pub fn replica_sum(world: &World, t: &Tensor) -> Result<Tensor> {
    if !world.is_distributed() {
        return Ok(t.clone());
    }
    let (device, dtype) = (t.device().clone(), t.dtype());
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .contiguous()?
        .apply_op1(ReplicaSum {
            world: world.clone(),
        })?
        .to_dtype(dtype)?
        .to_device(&device)
}

struct ReplicaSum {
    world: World,
}

impl CustomOp1 for ReplicaSum {
    fn name(&self) -> &'static str {
        "replica-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F64(values) = storage else {
            candle_core::bail!("replica-sum takes float64 values");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("replica-sum takes a contiguous tensor");
        };
        let summed = self
            .world
            .all_reduce_host(&values[start..end], Reduce::Sum)?;
        Ok((CpuStorage::F64(summed), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.world.all_reduce(grad_res, Reduce::Sum)?))
    }
}

#[cfg(test)]
mod tests {
    use super::replica_sum;
    use crate::testing::Copies;
    use crate::World;
    use candle_core::{Device, Tensor, Var};
    use std::sync::Arc;

    // k ranks holding the same x: s = k·x, and with every rank's loss L_r = Σ w·s the global
    // loss's gradient at one rank's x is Σ_r k·w = k²·w — the backward's all-reduce gives the
    // second factor k, the forward's the first.
    #[test]
    fn forward_and_backward_both_sum_over_ranks() -> mdeq_testkit::Result {
        let copies = Arc::new(Copies::new(2));
        let world = World::new(1, 2, 0, copies.clone());
        let x = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu)?;
        let w = Tensor::new(&[3.0f32, 1.0, -1.0], &Device::Cpu)?;
        let s = replica_sum(&world, x.as_tensor())?;
        assert_eq!(s.to_vec1::<f32>()?, vec![2.0, -4.0, 1.0]);
        let grads = (s * &w)?.sum_all()?.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("a gradient")
            .to_vec1::<f32>()?;
        assert_eq!(g, vec![6.0, 2.0, -2.0]);
        assert_eq!(copies.calls(), 2, "one all-reduce forward, one backward");
        Ok(())
    }
}
