//! Which loader, normalisation and augmentation each dataset named in a recipe uses.

use crate::cifar::CifarDataset;
use crate::cityscapes::{self, Cityscapes};
use crate::fashion_scenes::{self, FashionScenes};
use crate::image_folder::ImageFolder;
use crate::{idx, DataError, Dataset, IdxDataset, Image, Normalization, Split, Transform};
use std::path::Path;
use std::sync::Arc;

/// The datasets a recipe can name in `data.dataset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// Fashion-MNIST IDX files.
    FashionMnist,
    /// MNIST IDX files.
    Mnist,
    /// CIFAR-10 binary batches.
    Cifar10,
    /// CIFAR-100 binary files.
    Cifar100,
    /// ImageNet in the ImageFolder layout.
    ImageNet,
    /// Cityscapes fine annotations.
    Cityscapes,
    /// Segmentation scenes composed from Fashion-MNIST.
    FashionScenes,
}

impl DatasetKind {
    /// Parses a recipe's `data.dataset`.
    pub fn parse(name: &str) -> Result<Self, DataError> {
        Ok(match name {
            "fashion_mnist" => Self::FashionMnist,
            "mnist" => Self::Mnist,
            "cifar10" => Self::Cifar10,
            "cifar100" => Self::Cifar100,
            "imagenet" => Self::ImageNet,
            "cityscapes" => Self::Cityscapes,
            "fashion_scenes" => Self::FashionScenes,
            other => {
                return Err(DataError::format(
                    "data.dataset",
                    format!(
                        "unknown dataset '{other}' (known: fashion_mnist, mnist, cifar10, \
                         cifar100, imagenet, cityscapes, fashion_scenes)"
                    ),
                ))
            }
        })
    }

    /// True for per-pixel labelled datasets.
    pub fn is_segmentation(self) -> bool {
        matches!(self, Self::Cityscapes | Self::FashionScenes)
    }

    /// Normalisation of the recipe (training-set statistics as the official code uses them).
    pub fn normalization(self) -> Normalization {
        let (mean, std) = match self {
            Self::FashionMnist | Self::FashionScenes => (vec![0.2860], vec![0.3530]),
            Self::Mnist => (vec![0.1307], vec![0.3081]),
            Self::Cifar10 | Self::Cifar100 => {
                (vec![0.4914, 0.4822, 0.4465], vec![0.2023, 0.1994, 0.2010])
            }
            Self::ImageNet | Self::Cityscapes => {
                (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
            }
        };
        Normalization { mean, std }
    }

    /// The sample transform for `split`: the recipe's augmentation (when `augment`) for training,
    /// the deterministic evaluation transform otherwise. `image_size` is the model's input
    /// (the training crop for segmentation); `eval_size` overrides the evaluation resolution.
    pub fn transform(
        self,
        split: Split,
        augment: bool,
        image_size: [usize; 2],
        eval_size: Option<[usize; 2]>,
    ) -> Transform {
        let [h, w] = image_size;
        match (self, split) {
            (Self::ImageNet, Split::Train) => Transform::RandomResizedCropFlip { size: h },
            (Self::ImageNet, Split::Test) => Transform::ResizeCenterCrop {
                resize: (h * 256).div_ceil(224),
                crop: h,
            },
            (Self::Cityscapes, Split::Train) if augment => Transform::ScaleCropFlip {
                base_long: 2048,
                crop: (h, w),
            },
            (Self::Cifar10 | Self::Cifar100, Split::Train) if augment => {
                Transform::PadCropFlip { pad: 4 }
            }
            (Self::FashionMnist | Self::Mnist, Split::Train) if augment => {
                Transform::PadCropFlip { pad: 2 }
            }
            (_, Split::Test) => match eval_size {
                Some([eh, ew]) => Transform::Resize {
                    height: eh,
                    width: ew,
                },
                None => Transform::Identity,
            },
            _ => Transform::Identity,
        }
    }

    /// One image from outside any dataset (`mdeq predict`), prepared as the model's evaluation
    /// input: the evaluation transform, except that a classification image the evaluation
    /// transform would keep at its own size is resized to the recipe's `image_size`.
    pub fn prepare_image(
        self,
        image: Image,
        segmentation: bool,
        image_size: [usize; 2],
        eval_size: Option<[usize; 2]>,
    ) -> Result<Image, DataError> {
        let [height, width] = image_size;
        let transform = match (
            segmentation,
            self.transform(Split::Test, false, image_size, eval_size),
        ) {
            (false, Transform::Identity) => Transform::Resize { height, width },
            (_, t) => t,
        };
        transform.apply_to_image(image)
    }

    /// The name of each of `classes` labels: the dataset's names, or the label index itself
    /// where it defines none (MNIST, CIFAR-100, ImageNet).
    pub fn class_names(self, classes: usize) -> Vec<String> {
        let names: &[&str] = match self {
            Self::FashionMnist => &idx::FASHION_MNIST_CLASSES,
            Self::Cifar10 => &[
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ],
            Self::Cityscapes => &cityscapes::CLASS_NAMES,
            Self::FashionScenes => return fashion_scenes::class_names(),
            Self::Mnist | Self::Cifar100 | Self::ImageNet => &[],
        };
        (0..classes)
            .map(|c| {
                names
                    .get(c)
                    .map_or_else(|| c.to_string(), |n| n.to_string())
            })
            .collect()
    }

    /// Per-class loss weights (Cityscapes' official ones), if the recipe has any.
    pub fn class_weights(self) -> Option<Vec<f32>> {
        match self {
            Self::Cityscapes => Some(cityscapes::CLASS_WEIGHTS.to_vec()),
            _ => None,
        }
    }

    /// The colour of each class for segmentation maps.
    pub fn palette(self, classes: usize) -> Vec<[u8; 3]> {
        match self {
            Self::Cityscapes => cityscapes::PALETTE.to_vec(),
            _ => (0..classes)
                .map(|c| {
                    if c == 0 {
                        [0, 0, 0]
                    } else {
                        // Evenly spaced hues, full saturation.
                        let hue = (c - 1) as f32 / (classes - 1).max(1) as f32 * 6.0;
                        let x = (1.0 - (hue % 2.0 - 1.0).abs()) * 255.0;
                        let (r, g, b) = match hue as u32 {
                            0 => (255.0, x, 0.0),
                            1 => (x, 255.0, 0.0),
                            2 => (0.0, 255.0, x),
                            3 => (0.0, x, 255.0),
                            4 => (x, 0.0, 255.0),
                            _ => (255.0, 0.0, x),
                        };
                        [r as u8, g as u8, b as u8]
                    }
                })
                .collect(),
        }
    }
}

/// Opens `split` of `kind` under `root`; `image_size` is the model input (the canvas of
/// fashion scenes).
pub fn open_dataset(
    kind: DatasetKind,
    root: &Path,
    split: Split,
    image_size: [usize; 2],
) -> Result<Arc<dyn Dataset>, DataError> {
    Ok(match kind {
        DatasetKind::FashionMnist | DatasetKind::Mnist => Arc::new(IdxDataset::open(root, split)?),
        DatasetKind::Cifar10 => Arc::new(CifarDataset::open(root, split, 10)?),
        DatasetKind::Cifar100 => Arc::new(CifarDataset::open(root, split, 100)?),
        DatasetKind::ImageNet => Arc::new(ImageFolder::open(root, split)?),
        DatasetKind::Cityscapes => Arc::new(Cityscapes::open(root, split)?),
        DatasetKind::FashionScenes => Arc::new(FashionScenes::open(root, split, image_size[0])?),
    })
}
