//! The datasets, transforms and loaders a recipe names, checked against its model.

use anyhow::{bail, Result};
use mdeq_data::{open_dataset, BatchLoader, Dataset, DatasetKind, Split};
use mdeq_model::Task;
use mdeq_recipe::ExperimentConfig;
use std::path::Path;
use std::sync::Arc;

/// One split of the recipe's dataset, with the kind that decides its transforms.
#[derive(Clone)]
pub struct RecipeSplit {
    /// Which dataset.
    pub kind: DatasetKind,
    /// Which part.
    pub split: Split,
    /// The samples.
    pub dataset: Arc<dyn Dataset>,
}

impl RecipeSplit {
    /// Opens `split` of the recipe's dataset under `dir` and checks it fits the model.
    pub fn open(cfg: &ExperimentConfig, dir: &Path, split: Split) -> Result<Self> {
        let kind = DatasetKind::parse(&cfg.data.dataset)?;
        let m = &cfg.model;
        if kind.is_segmentation() != (m.task == Task::Segmentation) {
            bail!(
                "data.dataset '{}' is a {} dataset but model.task is {:?}",
                cfg.data.dataset,
                if kind.is_segmentation() {
                    "segmentation"
                } else {
                    "classification"
                },
                m.task
            );
        }
        let dataset = open_dataset(kind, dir, split, m.image_size)?;
        if dataset.is_empty() {
            bail!("{}: the {split:?} split holds no samples", dir.display());
        }
        if dataset.channels() != m.in_channels {
            bail!(
                "{}: images have {} channels, the config expects model.in_channels = {}",
                dir.display(),
                dataset.channels(),
                m.in_channels
            );
        }
        if dataset.num_classes() != m.num_classes {
            bail!(
                "{}: the dataset has {} classes, the config expects model.num_classes = {}",
                dir.display(),
                dataset.num_classes(),
                m.num_classes
            );
        }
        m.check_input_size(m.image_size[0], m.image_size[1])?;
        Ok(Self {
            kind,
            split,
            dataset,
        })
    }

    /// Batches of `epoch`: shuffled and augmented for training, in order for evaluation.
    pub fn loader(
        &self,
        cfg: &ExperimentConfig,
        batch_size: usize,
        seed: u64,
        epoch: u64,
    ) -> BatchLoader {
        let transform = self.kind.transform(
            self.split,
            cfg.train.augment,
            cfg.model.image_size,
            cfg.data.eval_size,
        );
        BatchLoader::new(
            self.dataset.clone(),
            transform,
            self.kind.normalization(),
            batch_size,
            self.split == Split::Train,
            seed,
            epoch,
        )
    }
}
