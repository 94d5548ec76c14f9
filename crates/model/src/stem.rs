//! The stem (`downsample.*`) and the injection transform (`stage0.*`) (reference §1.2).

use crate::config::ModelConfig;
use crate::nn::Relu0;
use crate::nn::{BatchNorm2d, Conv2d};
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

/// conv-BN-ReLU ×2 (stride 2 per DOWNSAMPLE_TIMES), then the optional 1×1 conv-BN-ReLU stage0.
#[derive(Debug, Clone)]
pub struct Stem {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    stage0: Option<(Conv2d, BatchNorm2d)>,
}

impl Stem {
    /// Registers `downsample.{0,1,3,4}` and, by the official rule, `stage0.{0,1}`.
    pub fn new(pb: &mut ParamBuilder, cfg: &ModelConfig) -> Result<Self> {
        let c = cfg.num_channels[0];
        let m = cfg.bn_momentum();
        let s1 = if cfg.downsample_times >= 1 { 2 } else { 1 };
        let s2 = if cfg.downsample_times >= 2 { 2 } else { 1 };
        let mut ds = pb.pp("downsample");
        let conv1 = Conv2d::new(&mut ds.pp(0), cfg.in_channels, c, 3, s1, false)?;
        let bn1 = BatchNorm2d::new(&mut ds.pp(1), c, true, m)?;
        let conv2 = Conv2d::new(&mut ds.pp(3), c, c, 3, s2, false)?;
        let bn2 = BatchNorm2d::new(&mut ds.pp(4), c, true, m)?;
        let stage0 = if cfg.has_stage0() {
            let mut s0 = pb.pp("stage0");
            Some((
                Conv2d::new(&mut s0.pp(0), c, c, 1, 1, false)?,
                BatchNorm2d::new(&mut s0.pp(1), c, true, m)?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            stage0,
        })
    }

    /// The branch-0 injection x_0 for an image batch.
    pub fn forward(&self, image: &Tensor, train: bool) -> Result<Tensor> {
        let x = self
            .bn1
            .forward(&self.conv1.forward(image)?, train)?
            .relu0()?;
        let x = self.bn2.forward(&self.conv2.forward(&x)?, train)?.relu0()?;
        match &self.stage0 {
            None => Ok(x),
            Some((conv, bn)) => bn.forward(&conv.forward(&x)?, train)?.relu0(),
        }
    }
}
