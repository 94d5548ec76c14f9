//! The datasets, transforms and loaders a recipe names, checked against its model.

use anyhow::{bail, Result};
use mdeq_data::{holdout, open_dataset, BatchLoader, Dataset, DatasetKind, Split, Subset};
use mdeq_model::Task;
use mdeq_recipe::ExperimentConfig;
use std::path::Path;
use std::sync::Arc;

/// One split of the recipe's dataset, with the kind that decides its transforms.
#[derive(Clone)]
pub struct RecipeSplit {
    /// Which dataset.
    pub kind: DatasetKind,
    /// How the samples are used: `Train` shuffled and augmented, `Test` in order with the
    /// evaluation transform (a validation part of the training files is used as `Test`).
    pub split: Split,
    /// The samples.
    pub dataset: Arc<dyn Dataset>,
}

/// What a training run trains on and validates with.
pub struct TrainingData {
    /// The samples trained on.
    pub train: RecipeSplit,
    /// The samples of the epoch-end evaluations and of the best checkpoint.
    pub eval: RecipeSplit,
    /// "validation" (held out of the training files) or "test".
    pub eval_name: &'static str,
}

impl TrainingData {
    /// The recipe's training split and its evaluation split: `data.validation` samples held out
    /// of the training files when the recipe asks for them, else the test split.
    pub fn open(cfg: &ExperimentConfig, dir: &Path) -> Result<Self> {
        let train = RecipeSplit::open(cfg, dir, Split::Train)?;
        let held_out = cfg.data.validation;
        if held_out == 0 {
            let eval = RecipeSplit::open(cfg, dir, Split::Test)?;
            return Ok(Self {
                train,
                eval,
                eval_name: "test",
            });
        }
        let n = train.dataset.len();
        if held_out >= n {
            bail!(
                "data.validation = {held_out}: {} holds only {n} training samples",
                dir.display()
            );
        }
        let (kept, held) = holdout(n, held_out);
        let part = |indices: Vec<usize>, split: Split| RecipeSplit {
            kind: train.kind,
            split,
            dataset: Arc::new(Subset::new(train.dataset.clone(), indices)),
        };
        Ok(Self {
            eval: part(held, Split::Test),
            train: part(kept, Split::Train),
            eval_name: "validation",
        })
    }
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
