//! The per-branch residual block of the MDEQ cell (reference §1.3 step A).

use crate::nn::Relu0;
use crate::nn::{CellConv, GroupNorm};
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

/// conv → GN → ReLU → conv → dropout mask → + injection → GN → + z → ReLU → GN.
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    conv1: CellConv,
    gn1: GroupNorm,
    conv2: CellConv,
    gn2: GroupNorm,
    gn3: GroupNorm,
}

/// The intermediate values of one block application that its VJP reads.
#[derive(Debug, Clone)]
pub struct BlockTape {
    z_dims: Vec<usize>,
    /// conv1 output (GN1 input).
    a1: Tensor,
    /// ReLU(GN1 output), conv2's input.
    r1: Tensor,
    /// GN2 input.
    a2: Tensor,
    /// ReLU(GN2 output + z), GN3's input.
    r3: Tensor,
    mask: Option<Tensor>,
}

/// Shape settings of one residual block.
#[derive(Debug, Clone, Copy)]
pub struct BlockShape {
    /// Branch channels C_i.
    pub channels: usize,
    /// Expansion factor E.
    pub expansion: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// 0, 1 or 2 (5×5 kernels).
    pub big_kernel: usize,
    /// Affine GroupNorms.
    pub affine: bool,
    /// Weight normalisation.
    pub wnorm: bool,
}

impl ResidualBlock {
    /// Registers conv1, gn1, conv2, gn2, gn3 under the builder's prefix.
    pub fn new(pb: &mut ParamBuilder, s: BlockShape) -> Result<Self> {
        let wide = s.channels * s.expansion;
        let k1 = if s.big_kernel >= 1 { 5 } else { 3 };
        let k2 = if s.big_kernel >= 2 { 5 } else { 3 };
        Ok(Self {
            conv1: CellConv::new(&mut pb.pp("conv1"), s.channels, wide, k1, s.wnorm)?,
            gn1: GroupNorm::new(&mut pb.pp("gn1"), s.groups, wide, s.affine)?,
            conv2: CellConv::new(&mut pb.pp("conv2"), wide, s.channels, k2, s.wnorm)?,
            gn2: GroupNorm::new(&mut pb.pp("gn2"), s.groups, s.channels, s.affine)?,
            gn3: GroupNorm::new(&mut pb.pp("gn3"), s.groups, s.channels, s.affine)?,
        })
    }

    /// Applies the block to `z`; `injection` enters after conv2 and the dropout mask, before GN2.
    pub fn forward(
        &self,
        z: &Tensor,
        injection: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self.forward_taped(z, injection, mask)?.0)
    }

    /// [`Self::forward`], also returning what [`Self::vjp`] needs.
    pub fn forward_taped(
        &self,
        z: &Tensor,
        injection: Option<&Tensor>,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, BlockTape)> {
        let a1 = self.conv1.forward(z)?;
        let r1 = self.gn1.forward_relu(&a1)?;
        let mut a2 = self.conv2.forward(&r1)?;
        if let Some(m) = mask {
            a2 = a2.broadcast_mul(m)?;
        }
        if let Some(x) = injection {
            a2 = (a2 + x)?;
        }
        let s = (self.gn2.forward(&a2)? + z)?;
        let r3 = s.relu0()?;
        let out = self.gn3.forward(&r3)?;
        let tape = BlockTape {
            z_dims: z.dims().to_vec(),
            a1,
            r1,
            a2,
            r3,
            mask: mask.cloned(),
        };
        Ok((out, tape))
    }

    /// dL/dz given dL/d(out) at the taped point, with weights and injection held fixed.
    pub fn vjp(&self, tape: &BlockTape, d_out: &Tensor) -> Result<Tensor> {
        // A ReLU's output is positive exactly where its input is, so r3 and r1 carry the masks.
        let ds = self.gn3.input_grad_after_relu(&tape.r3, d_out)?;
        let mut da2 = self.gn2.input_grad(&tape.a2, &ds)?;
        if let Some(m) = &tape.mask {
            da2 = da2.broadcast_mul(m)?;
        }
        let dr1 = self.conv2.input_grad(&da2, tape.r1.dims())?;
        let da1 = self.gn1.input_grad_relu(&tape.a1, &tape.r1, &dr1)?;
        self.conv1.input_grad_plus(&da1, &tape.z_dims, &ds)
    }

    /// Weight norm computed once, optionally detached (see [`CellConv::prepared`]).
    pub fn prepared(&self, detach: bool) -> Result<Self> {
        Ok(Self {
            conv1: self.conv1.prepared(detach)?,
            gn1: self.gn1.prepared(detach),
            conv2: self.conv2.prepared(detach)?,
            gn2: self.gn2.prepared(detach),
            gn3: self.gn3.prepared(detach),
        })
    }
}
