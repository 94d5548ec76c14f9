//! Datasets in their standard on-disk layouts behind one trait, the recipes' augmentations, and a
//! seeded, parallel, prefetching batch loader.
//!
//! A dataset yields raw 8-bit images ([`Image`], height × width × channels) with a class or a
//! per-pixel label map ([`Target`]); the loader augments each sample with its own seeded random
//! stream ([`transform`]), normalises it and stacks the batch.

pub mod catalog;
pub mod cifar;
pub mod cityscapes;
mod decode;
pub mod fashion_scenes;
pub mod idx;
pub mod image_folder;
pub mod loader;
pub mod subset;
pub mod transform;

pub use catalog::{open_dataset, DatasetKind};
pub use idx::IdxDataset;
pub use loader::{Batch, BatchLoader};
pub use subset::{holdout, Subset};
pub use transform::{Normalization, Transform};

/// The label value that losses and metrics skip (Cityscapes convention).
pub const IGNORE_LABEL: u8 = 255;

/// Errors while reading a dataset; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// File system error.
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    /// Malformed content.
    #[error("{path}: {message}")]
    Format { path: String, message: String },
}

impl DataError {
    /// A [`DataError::Format`] for `path`.
    pub fn format(path: impl std::fmt::Display, message: impl Into<String>) -> Self {
        DataError::Format {
            path: path.to_string(),
            message: message.into(),
        }
    }

    /// A [`DataError::Io`] for `path`.
    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_string(),
            cause: source,
        }
    }
}

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training set.
    Train,
    /// Held-out evaluation set (`test`, `t10k` or `val`, as the layout names it).
    Test,
}

/// An 8-bit image, row-major height × width × channels (the layout image decoders produce).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Number of channels (1 grey, 3 RGB).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `height * width * channels` values.
    pub pixels: Vec<u8>,
}

impl Image {
    /// An image of `value` everywhere.
    pub fn filled(channels: usize, height: usize, width: usize, value: u8) -> Self {
        Self {
            channels,
            height,
            width,
            pixels: vec![value; channels * height * width],
        }
    }
}

/// What a sample is labelled with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One class index for the whole image.
    Class(u32),
    /// One class per pixel (a single-channel image the size of the sample's image);
    /// [`IGNORE_LABEL`] marks pixels without a label.
    Mask(Image),
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The raw image.
    pub image: Image,
    /// Its label.
    pub target: Target,
}

/// A labelled image dataset held in memory or read on demand.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Channels of every image.
    fn channels(&self) -> usize;
    /// Number of classes.
    fn num_classes(&self) -> usize;
    /// Sample `i` (decoded, not augmented).
    fn get(&self, i: usize) -> Result<Sample, DataError>;
    /// Where sample `i` comes from, for error messages and predictions.
    fn describe(&self, i: usize) -> String {
        format!("sample {i}")
    }
}
