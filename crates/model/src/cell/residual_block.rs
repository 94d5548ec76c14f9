//! The per-branch residual block of the MDEQ cell (spec §1.3 step A).

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
        let mut t = self.gn1.forward(&self.conv1.forward(z)?)?.relu0()?;
        t = self.conv2.forward(&t)?;
        if let Some(m) = mask {
            t = t.broadcast_mul(m)?;
        }
        if let Some(x) = injection {
            t = (t + x)?;
        }
        let t = (self.gn2.forward(&t)? + z)?;
        self.gn3.forward(&t.relu0()?)
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
