//! The whole network: stem → equilibrium cell → head (MDEQClsNet / MDEQSegNet).

use crate::cell::MultiscaleCell;
use crate::config::{ModelConfig, Task};
use crate::head::{ClassificationHead, SegmentationHead};
use crate::nn::variational_dropout_mask;
use crate::params::{init_rng, ParamBuilder, ParamStore};
use crate::state::StateLayout;
use crate::stem::Stem;
use candle_core::{DType, Device, Result, Tensor};
use mdeq_distributed::World;
use rand::Rng;

#[derive(Debug, Clone)]
enum Head {
    Classification(ClassificationHead),
    Segmentation(SegmentationHead),
}

/// A Multiscale Deep Equilibrium Model with its parameters.
#[derive(Debug, Clone)]
pub struct Mdeq {
    config: ModelConfig,
    store: ParamStore,
    stem: Stem,
    cell: MultiscaleCell,
    head: Head,
}

impl Mdeq {
    /// Builds the model with the official initialisation, drawn from `seed`. The key set and order
    /// of [`Self::store`] are those of the official `state_dict`.
    pub fn new(config: &ModelConfig, dtype: DType, device: &Device, seed: u64) -> Result<Self> {
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut store = ParamStore::new(dtype, device);
        let mut rng = init_rng(seed);
        let mut pb = ParamBuilder::new(&mut store, &mut rng);
        let stem = Stem::new(&mut pb, config)?;
        let cell = MultiscaleCell::new(&mut pb.pp("fullstage"), config)?;
        let m = config.bn_momentum();
        let head = match config.task {
            Task::Classification => {
                let h = config.classification_head.as_ref().expect("validated");
                Head::Classification(ClassificationHead::new(
                    &mut pb,
                    &config.num_channels,
                    h,
                    config.num_classes,
                    m,
                )?)
            }
            Task::Segmentation => {
                let h = config.segmentation_head.as_ref().expect("validated");
                Head::Segmentation(SegmentationHead::new(
                    &mut pb,
                    &config.num_channels,
                    config.num_classes,
                    h.final_conv_kernel,
                    m,
                )?)
            }
        };
        Ok(Self {
            config: config.clone(),
            store,
            stem,
            cell,
            head,
        })
    }

    /// Makes every BatchNorm layer take its train-mode statistics over the global batch of
    /// `world` (synchronised BatchNorm); None returns to each process's own batch.
    pub fn synchronise_batch_norm(&self, world: Option<World>) {
        self.store.batch_norm_group().set(world);
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Every parameter and buffer under its official name.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Float dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.store.dtype()
    }

    /// Device of the parameters.
    pub fn device(&self) -> &Device {
        self.store.device()
    }

    /// Layout of the equilibrium state for images of `height`×`width`.
    pub fn layout(&self, height: usize, width: usize) -> StateLayout {
        let sizes = self.config.branch_sizes(height, width);
        StateLayout {
            branches: self
                .config
                .num_channels
                .iter()
                .zip(sizes)
                .map(|(&c, (h, w))| (c, h, w))
                .collect(),
        }
    }

    /// The injection list: branch 0 is stage0(stem(image)), the others are zeros (reference §1.1).
    pub fn injection(&self, image: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let (b, _, h, w) = image.dims4()?;
        self.config
            .check_input_size(h, w)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let x0 = self.stem.forward(image, train)?;
        let layout = self.layout(h, w);
        let mut out = vec![x0];
        for &(c, hh, ww) in &layout.branches[1..] {
            out.push(Tensor::zeros((b, c, hh, ww), self.dtype(), self.device())?);
        }
        Ok(out)
    }

    /// The equilibrium cell (call `prepared` before evaluating it).
    pub fn cell(&self) -> &MultiscaleCell {
        &self.cell
    }

    /// Dropout masks for one forward: `None` per branch in eval mode or when p = 0.
    pub fn dropout_masks(
        &self,
        batch: usize,
        train: bool,
        rng: &mut impl Rng,
    ) -> Result<Vec<Option<Tensor>>> {
        let p = self.config.dropout;
        self.config
            .num_channels
            .iter()
            .map(|&c| {
                if train && p > 0.0 {
                    variational_dropout_mask(rng, batch, c, p, self.dtype(), self.device())
                        .map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect()
    }

    /// Head output from the per-branch equilibrium states: (B, classes) logits, or (B, classes,
    /// H_0, W_0) segmentation logits.
    pub fn head(&self, z: &[Tensor], train: bool) -> Result<Tensor> {
        match &self.head {
            Head::Classification(h) => h.forward(z, train),
            Head::Segmentation(h) => h.forward(z, train),
        }
    }
}
