//! Datasets in their standard on-disk layouts behind one trait, and a seeded batch loader.

pub mod idx;
pub mod loader;

pub use idx::IdxDataset;
pub use loader::{Batch, BatchLoader};

/// Errors while reading a dataset; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// Malformed content.
    #[error("{path}: {message}")]
    Format { path: String, message: String },
}

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training set.
    Train,
    /// Held-out evaluation set.
    Test,
}

/// One labelled image, normalised, in (C, H, W) order.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Pixel values after normalisation.
    pub image: Vec<f32>,
    /// Class index.
    pub label: u32,
}

/// A labelled image dataset held in memory or read on demand.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// (channels, height, width) of every image.
    fn image_shape(&self) -> (usize, usize, usize);
    /// Number of classes.
    fn num_classes(&self) -> usize;
    /// Sample `i`.
    fn get(&self, i: usize) -> Result<Sample, DataError>;
}
