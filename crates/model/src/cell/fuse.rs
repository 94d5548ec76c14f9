//! Multiscale fusion layers T_ij (reference §1.3 step B).

use crate::nn::{nearest_upsample, nearest_upsample_grad, Conv2d, GroupNorm};
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

/// One stage of a fuse layer as its VJP reads it.
#[derive(Debug, Clone)]
struct StageTape {
    input_dims: Vec<usize>,
    conv_out: Tensor,
    /// ReLU(GroupNorm output) where a ReLU follows the norm (positive exactly where the norm
    /// output is, so it carries the ReLU's mask).
    relu_out: Option<Tensor>,
}

/// The intermediate values of one fuse-layer application that its VJP reads.
#[derive(Debug, Clone)]
pub struct FuseTape(Vec<StageTape>);

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
        Ok(self.forward_taped(x)?.0)
    }

    /// [`Self::forward`], also returning what [`Self::vjp`] needs: per stage its input and the
    /// convolution output (the GroupNorm input).
    pub fn forward_taped(&self, x: &Tensor) -> Result<(Tensor, FuseTape)> {
        let mut tape = Vec::new();
        let out = match self {
            Self::Upsample { conv, norm, factor } => {
                let c = conv.forward(x)?;
                let n = norm.forward(&c)?;
                tape.push(StageTape {
                    input_dims: x.dims().to_vec(),
                    conv_out: c,
                    relu_out: None,
                });
                nearest_upsample(&n, *factor)?
            }
            Self::Downsample { stages } => {
                let mut t = x.clone();
                for (s, (conv, norm)) in stages.iter().enumerate() {
                    let c = conv.forward(&t)?;
                    let last = s + 1 == stages.len();
                    let next = if last {
                        norm.forward(&c)?
                    } else {
                        norm.forward_relu(&c)?
                    };
                    tape.push(StageTape {
                        input_dims: t.dims().to_vec(),
                        conv_out: c,
                        relu_out: (!last).then(|| next.clone()),
                    });
                    t = next;
                }
                t
            }
        };
        Ok((out, FuseTape(tape)))
    }

    /// dL/dx given dL/d(out) at the taped point, with the weights held fixed.
    pub fn vjp(&self, tape: &FuseTape, d_out: &Tensor) -> Result<Tensor> {
        match self {
            Self::Upsample { conv, norm, factor } => {
                let st = &tape.0[0];
                let dn = nearest_upsample_grad(d_out, *factor)?;
                conv.input_grad(&norm.input_grad(&st.conv_out, &dn)?, &st.input_dims)
            }
            Self::Downsample { stages } => {
                let mut d = d_out.clone();
                for ((conv, norm), st) in stages.iter().zip(&tape.0).rev() {
                    let dc = match &st.relu_out {
                        Some(r) => norm.input_grad_relu(&st.conv_out, r, &d)?,
                        None => norm.input_grad(&st.conv_out, &d)?,
                    };
                    d = conv.input_grad(&dc, &st.input_dims)?;
                }
                Ok(d)
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
