//! The segmentation head of MDEQSegNet (reference §2.2).

use crate::nn::Relu0;
use crate::nn::{bilinear_resize, BatchNorm2d, Conv2d};
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};

/// Upsample every branch to branch 0 (bilinear, align_corners = true), concatenate, then
/// `last_layer`: 1×1 conv + BN + ReLU + k×k conv to the class scores.
#[derive(Debug, Clone)]
pub struct SegmentationHead {
    conv1: Conv2d,
    bn: BatchNorm2d,
    conv2: Conv2d,
}

impl SegmentationHead {
    /// Registers `last_layer.{0,1,3}`.
    pub fn new(
        pb: &mut ParamBuilder,
        channels: &[usize],
        classes: usize,
        kernel: usize,
        m: f64,
    ) -> Result<Self> {
        let s: usize = channels.iter().sum();
        let mut ll = pb.pp("last_layer");
        Ok(Self {
            conv1: Conv2d::new(&mut ll.pp(0), s, s, 1, 1, true)?,
            bn: BatchNorm2d::new(&mut ll.pp(1), s, true, m)?,
            conv2: Conv2d::new(&mut ll.pp(3), s, classes, kernel, 1, true)?,
        })
    }

    /// Logits at branch-0 resolution (1/4 of the input for the official configs).
    pub fn forward(&self, y: &[Tensor], train: bool) -> Result<Tensor> {
        let (_, _, h, w) = y[0].dims4()?;
        let mut parts = vec![y[0].clone()];
        for t in &y[1..] {
            parts.push(bilinear_resize(t, h, w, true)?);
        }
        let x = Tensor::cat(&parts, 1)?;
        let x = self.bn.forward(&self.conv1.forward(&x)?, train)?.relu0()?;
        self.conv2.forward(&x)
    }
}
