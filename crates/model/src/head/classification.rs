//! The classification head of MDEQClsNet (reference §2.1).

use crate::config::ClassificationHeadConfig;
use crate::nn::Relu0;
use crate::nn::{BatchNorm2d, Conv2d};
use crate::params::{Init, ParamBuilder};
use candle_core::{Result, Tensor};

/// Bottleneck with non-affine BN1–3 and an affine projection BN (expansion 4, stride 1).
#[derive(Debug, Clone)]
struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    projection: Option<(Conv2d, BatchNorm2d)>,
}

impl Bottleneck {
    fn new(pb: &mut ParamBuilder, c_in: usize, h: usize, m: f64) -> Result<Self> {
        let out = 4 * h;
        let projection = if c_in != out {
            let mut d = pb.pp("downsample");
            Some((
                Conv2d::new(&mut d.pp(0), c_in, out, 1, 1, false)?,
                BatchNorm2d::new(&mut d.pp(1), out, true, m)?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: Conv2d::new(&mut pb.pp("conv1"), c_in, h, 1, 1, false)?,
            bn1: BatchNorm2d::new(&mut pb.pp("bn1"), h, false, m)?,
            conv2: Conv2d::new(&mut pb.pp("conv2"), h, h, 3, 1, false)?,
            bn2: BatchNorm2d::new(&mut pb.pp("bn2"), h, false, m)?,
            conv3: Conv2d::new(&mut pb.pp("conv3"), h, out, 1, 1, false)?,
            bn3: BatchNorm2d::new(&mut pb.pp("bn3"), out, false, m)?,
            projection,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let t = self.bn1.forward(&self.conv1.forward(x)?, train)?.relu0()?;
        let t = self.bn2.forward(&self.conv2.forward(&t)?, train)?.relu0()?;
        let t = self.bn3.forward(&self.conv3.forward(&t)?, train)?;
        let residual = match &self.projection {
            None => x.clone(),
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, train)?,
        };
        (t + residual)?.relu0()
    }
}

/// incre_modules → downsamp_modules → final_layer → global average pool → classifier.
#[derive(Debug, Clone)]
pub struct ClassificationHead {
    incre: Vec<Bottleneck>,
    downsamp: Vec<(Conv2d, BatchNorm2d)>,
    final_layer: (Conv2d, BatchNorm2d),
    classifier_weight: Tensor,
    classifier_bias: Tensor,
}

impl ClassificationHead {
    /// Registers `incre_modules.*`, `downsamp_modules.*`, `final_layer.*`, `classifier.*`.
    pub fn new(
        pb: &mut ParamBuilder,
        channels: &[usize],
        cfg: &ClassificationHeadConfig,
        classes: usize,
        m: f64,
    ) -> Result<Self> {
        let h = &cfg.head_channels;
        let incre = channels
            .iter()
            .zip(h)
            .enumerate()
            .map(|(i, (&c, &h))| {
                Bottleneck::new(&mut pb.pp(format!("incre_modules.{i}.0")), c, h, m)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut downsamp = Vec::new();
        for i in 0..channels.len() - 1 {
            let mut d = pb.pp(format!("downsamp_modules.{i}"));
            downsamp.push((
                Conv2d::new(&mut d.pp(0), 4 * h[i], 4 * h[i + 1], 3, 2, true)?,
                BatchNorm2d::new(&mut d.pp(1), 4 * h[i + 1], true, m)?,
            ));
        }
        let last = 4 * h[channels.len() - 1];
        let mut fl = pb.pp("final_layer");
        let final_layer = (
            Conv2d::new(&mut fl.pp(0), last, cfg.final_chansize, 1, 1, true)?,
            BatchNorm2d::new(&mut fl.pp(1), cfg.final_chansize, true, m)?,
        );
        let bound = 1.0 / (cfg.final_chansize as f64).sqrt();
        let mut cl = pb.pp("classifier");
        let classifier_weight = cl.param(
            "weight",
            (classes, cfg.final_chansize),
            Init::Uniform(bound),
        )?;
        let classifier_bias = cl.param("bias", classes, Init::Uniform(bound))?;
        Ok(Self {
            incre,
            downsamp,
            final_layer,
            classifier_weight,
            classifier_bias,
        })
    }

    /// Logits (B, classes) from the per-branch states.
    pub fn forward(&self, y: &[Tensor], train: bool) -> Result<Tensor> {
        let mut a = self.incre[0].forward(&y[0], train)?;
        for (i, (conv, bn)) in self.downsamp.iter().enumerate() {
            let down = bn.forward(&conv.forward(&a)?, train)?.relu0()?;
            a = (self.incre[i + 1].forward(&y[i + 1], train)? + down)?;
        }
        let a = self
            .final_layer
            .1
            .forward(&self.final_layer.0.forward(&a)?, train)?
            .relu0()?;
        let pooled = a.mean((2, 3))?;
        pooled
            .matmul(&self.classifier_weight.t()?)?
            .broadcast_add(&self.classifier_bias)
    }
}
