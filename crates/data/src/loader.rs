//! Seeded, reproducible batching: epoch e shuffles with seed (seed, e), so a resumed run sees the
//! same batches as one that never stopped.

use crate::{DataError, Dataset};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Images (B, C, H, W) float32 and labels (B) int64.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Normalised images.
    pub images: Tensor,
    /// Class indices.
    pub labels: Tensor,
}

/// Splits a dataset into batches, shuffled per epoch from a seed.
pub struct BatchLoader<'a> {
    dataset: &'a dyn Dataset,
    batch_size: usize,
    order: Vec<usize>,
}

impl<'a> BatchLoader<'a> {
    /// Batches of epoch `epoch`; `shuffle = false` keeps dataset order (evaluation).
    pub fn new(
        dataset: &'a dyn Dataset,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
        epoch: u64,
    ) -> Self {
        let mut order: Vec<usize> = (0..dataset.len()).collect();
        if shuffle {
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            order.shuffle(&mut rng);
        }
        Self {
            dataset,
            batch_size: batch_size.max(1),
            order,
        }
    }

    /// Number of batches (the last may be short).
    pub fn len(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// True when there are no batches.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Batch `i`.
    pub fn batch(&self, i: usize, device: &Device) -> Result<Batch, DataError> {
        let idx =
            &self.order[i * self.batch_size..((i + 1) * self.batch_size).min(self.order.len())];
        let (c, h, w) = self.dataset.image_shape();
        let mut pixels = Vec::with_capacity(idx.len() * c * h * w);
        let mut labels = Vec::with_capacity(idx.len());
        for &j in idx {
            let s = self.dataset.get(j)?;
            pixels.extend_from_slice(&s.image);
            labels.push(s.label as i64);
        }
        let err = |e: candle_core::Error| DataError::Format {
            path: "<batch>".into(),
            message: e.to_string(),
        };
        Ok(Batch {
            images: Tensor::from_vec(pixels, (idx.len(), c, h, w), device).map_err(err)?,
            labels: Tensor::from_vec(labels, idx.len(), device).map_err(err)?,
        })
    }
}
