//! Multiscale fusion layers T_ij (spec §1.3 step B).

use crate::nn::Relu0;
use crate::nn::{nearest_upsample, Conv2d, GroupNorm};
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

/// Moves branch j's features to branch i's resolution and width.
#[derive(Debug, Clone)]
pub enum FuseLayer {
    /// j > i: 1×1 conv + GN at the low resolution, then nearest upsampling by 2^(j−i).
    Upsample {
        conv: Conv2d,
        norm: GroupNorm,
        factor: usize,
    },
    /// j < i: i−j strided 3×3 conv + GN stages, ReLU between stages but not after the last.
    Downsample { stages: Vec<(Conv2d, GroupNorm)> },
}

impl FuseLayer {
    /// Registers the layer from branch `j` (c_j channels) to branch `i` (c_i channels).
    pub fn new(
        pb: &mut ParamBuilder,
        i: usize,
        j: usize,
        c_i: usize,
        c_j: usize,
        groups: usize,
        affine: bool,
    ) -> Result<Self> {
        let mut net = pb.pp("net");
        if j > i {
            Ok(Self::Upsample {
                conv: Conv2d::new(&mut net.pp("conv"), c_j, c_i, 1, 1, false)?,
                norm: GroupNorm::new(&mut net.pp("gnorm"), groups, c_i, affine)?,
                factor: 1 << (j - i),
            })
        } else {
            let k = i - j;
            let mut stages = Vec::with_capacity(k);
            for s in 0..k {
                let out = if s + 1 < k { c_j } else { c_i };
                let mut st = net.pp(s);
                stages.push((
                    Conv2d::new(&mut st.pp("conv"), c_j, out, 3, 2, false)?,
                    GroupNorm::new(&mut st.pp("gnorm"), groups, out, affine)?,
                ));
            }
            Ok(Self::Downsample { stages })
        }
    }

    /// Applies the transform.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Upsample { conv, norm, factor } => {
                nearest_upsample(&norm.forward(&conv.forward(x)?)?, *factor)
            }
            Self::Downsample { stages } => {
                let mut t = x.clone();
                for (s, (conv, norm)) in stages.iter().enumerate() {
                    t = norm.forward(&conv.forward(&t)?)?;
                    if s + 1 < stages.len() {
                        t = t.relu0()?;
                    }
                }
                Ok(t)
            }
        }
    }

    /// The same layer, optionally cut from the autodiff graph.
    pub fn prepared(&self, detach: bool) -> Self {
        match self {
            Self::Upsample { conv, norm, factor } => Self::Upsample {
                conv: conv.prepared(detach),
                norm: norm.prepared(detach),
                factor: *factor,
            },
            Self::Downsample { stages } => Self::Downsample {
                stages: stages
                    .iter()
                    .map(|(c, n)| (c.prepared(detach), n.prepared(detach)))
                    .collect(),
            },
        }
    }
}
