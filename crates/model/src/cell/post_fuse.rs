//! Post-fusion layer per branch: ReLU → weight-normalised 1×1 conv → GroupNorm(G/2) (reference §1.3 C).

use crate::nn::Relu0;
use crate::nn::{CellConv, GroupNorm};
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

/// The last layer of f for one branch; no activation after the norm.
#[derive(Debug, Clone)]
pub struct PostFuse {
    conv: CellConv,
    norm: GroupNorm,
}

impl PostFuse {
    /// Registers `conv.weight_g/v` and (if affine) `gnorm.*`.
    pub fn new(
        pb: &mut ParamBuilder,
        channels: usize,
        groups: usize,
        affine: bool,
        wnorm: bool,
    ) -> Result<Self> {
        Ok(Self {
            conv: CellConv::new(&mut pb.pp("conv"), channels, channels, 1, wnorm)?,
            norm: GroupNorm::new(&mut pb.pp("gnorm"), (groups / 2).max(1), channels, affine)?,
        })
    }

    /// Applies the layer to the fused sum y_i.
    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        Ok(self.forward_taped(y)?.0)
    }

    /// [`Self::forward`], also returning what [`Self::vjp`] needs: the input and the
    /// convolution output.
    pub fn forward_taped(&self, y: &Tensor) -> Result<(Tensor, (Tensor, Tensor))> {
        let c = self.conv.forward(&y.relu0()?)?;
        Ok((self.norm.forward(&c)?, (y.clone(), c)))
    }

    /// dL/dy given dL/d(out) at the taped point, with the weights held fixed.
    pub fn vjp(&self, (y, c): &(Tensor, Tensor), d_out: &Tensor) -> Result<Tensor> {
        let dr = self
            .conv
            .input_grad(&self.norm.input_grad(c, d_out)?, y.dims())?;
        mdeq_kernels::relu_grad(y, &dr)
    }

    /// Weight norm computed once, optionally detached.
    pub fn prepared(&self, detach: bool) -> Result<Self> {
        Ok(Self {
            conv: self.conv.prepared(detach)?,
            norm: self.norm.prepared(detach),
        })
    }
}
