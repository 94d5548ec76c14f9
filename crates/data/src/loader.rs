//! Seeded, reproducible batching: epoch e shuffles with seed (seed, e) and sample j of the dataset
//! is augmented with its own generator seeded by (seed, e, j), so a resumed run sees the same
//! batches as one that never stopped, whichever thread decodes them. Samples of a batch are
//! decoded in parallel; [`BatchLoader::prefetch`] keeps a bounded queue of batches ready on a
//! background thread.

use crate::{DataError, Dataset, Normalization, Target, Transform};
use candle_core::{Device, Tensor};
use mdeq_distributed::Shard;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Images (B, C, H, W) float32 and labels int64: (B) classes or (B, H, W) label maps.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Normalised images.
    pub images: Tensor,
    /// Class indices or per-pixel classes (255 = ignore).
    pub labels: Tensor,
}

/// Splits a dataset into transformed, normalised batches, shuffled per epoch from a seed.
#[derive(Clone)]
pub struct BatchLoader {
    dataset: Arc<dyn Dataset>,
    transform: Transform,
    normalization: Normalization,
    batch_size: usize,
    order: Vec<usize>,
    seed: u64,
    epoch: u64,
    shard: Shard,
}

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(23)
}

impl BatchLoader {
    /// Batches of epoch `epoch`; `shuffle = false` keeps dataset order (evaluation).
    pub fn new(
        dataset: Arc<dyn Dataset>,
        transform: Transform,
        normalization: Normalization,
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
            transform,
            normalization,
            batch_size: batch_size.max(1),
            order,
            seed,
            epoch,
            shard: Shard::WHOLE,
        }
    }

    /// This loader's batches cut to `shard`'s rows: in a data-parallel job each rank decodes
    /// only its own part of every global batch, the same samples with the same augmentation
    /// as one process would give those rows.
    pub fn sharded(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// Rows of batch `i` before sharding.
    pub fn global_rows(&self, i: usize) -> usize {
        let start = i.saturating_mul(self.batch_size).min(self.order.len());
        (self.order.len() - start).min(self.batch_size)
    }

    /// Number of batches (the last may be short).
    pub fn len(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// True when there are no batches.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Batch `i`, on `device`.
    pub fn batch(&self, i: usize, device: &Device) -> Result<Batch, DataError> {
        self.host_batch(i)?.into_batch(device)
    }

    /// Batch `i` in host vectors: what the prefetch thread prepares, so that tensors are made on
    /// the consumer's device in one copy and no other thread touches a device.
    fn host_batch(&self, i: usize) -> Result<HostBatch, DataError> {
        let start = i.saturating_mul(self.batch_size).min(self.order.len());
        let idx = &self.order[start..start.saturating_add(self.batch_size).min(self.order.len())];
        if idx.is_empty() {
            return Err(DataError::format(
                format!("batch {i}"),
                format!("past the end of the {} samples", self.order.len()),
            ));
        }
        let rows = self
            .shard
            .rows(idx.len())
            .map_err(|e| DataError::format(format!("batch {i}"), e))?;
        let idx = &idx[rows];
        let samples: Vec<_> = idx
            .par_iter()
            .map(|&j| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(mix(
                    mix(self.seed, self.epoch),
                    j as u64 + 1,
                ));
                let s = self.dataset.get(j)?;
                // A transform knows no file: its errors are about sample j.
                let s = self.transform.apply(s, &mut rng).map_err(|e| match e {
                    DataError::Format { message, .. } => {
                        DataError::format(self.dataset.describe(j), message)
                    }
                    e => e,
                })?;
                Ok((j, s))
            })
            .collect::<Result<_, DataError>>()?;
        let first = &samples[0].1.image;
        let (c, h, w) = (first.channels, first.height, first.width);
        let mut pixels = Vec::with_capacity(idx.len() * c * h * w);
        let mut labels = Vec::with_capacity(idx.len());
        for (j, s) in &samples {
            if (s.image.channels, s.image.height, s.image.width) != (c, h, w) {
                return Err(DataError::format(
                    self.dataset.describe(*j),
                    format!(
                        "image is {}x{}x{} after its transform, the batch's first {c}x{h}x{w} \
                         (give the recipe a resizing transform or batch size 1)",
                        s.image.channels, s.image.height, s.image.width
                    ),
                ));
            }
            pixels.extend(self.normalization.apply(&s.image));
            match &s.target {
                Target::Class(k) => labels.push(*k as i64),
                Target::Mask(m) => labels.extend(m.pixels.iter().map(|&v| v as i64)),
            }
        }
        let n = idx.len();
        let label_shape = if labels.len() == n {
            vec![n]
        } else {
            vec![n, h, w]
        };
        Ok(HostBatch {
            pixels,
            image_shape: [n, c, h, w],
            labels,
            label_shape,
        })
    }

    /// The batches numbered by `batches`, in that order, prepared on a background thread at
    /// most `depth` ahead. A panic while preparing a batch (a decoder's or a transform's bug)
    /// arrives as that batch's error, and so does a producer that ends early: the consumer
    /// never sees a silently short epoch.
    pub fn prefetch(
        &self,
        batches: impl IntoIterator<Item = usize>,
        depth: usize,
        device: &Device,
    ) -> impl Iterator<Item = Result<Batch, DataError>> {
        let batches: Vec<usize> = batches.into_iter().collect();
        let (tx, rx) = sync_channel(depth.max(1));
        let me = self.clone();
        let produce = batches.clone();
        std::thread::spawn(move || {
            for i in produce {
                let batch =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.host_batch(i)))
                        .unwrap_or_else(|panic| Err(me.panicked(i, panic.as_ref())));
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    break;
                }
            }
        });
        Prefetched {
            rx,
            pending: batches.into_iter(),
            failed: false,
            device: device.clone(),
        }
    }

    /// The error for a panic while preparing batch `i`.
    fn panicked(&self, i: usize, panic: &(dyn std::any::Any + Send)) -> DataError {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        let first = i * self.batch_size;
        let last = ((i + 1) * self.batch_size).min(self.order.len());
        DataError::format(
            format!("batch {i} (samples {first}..{last} of the epoch's order)"),
            format!("preparing it panicked: {what}"),
        )
    }
}

/// A batch as plain vectors, before it becomes tensors on a device.
struct HostBatch {
    pixels: Vec<f32>,
    image_shape: [usize; 4],
    labels: Vec<i64>,
    label_shape: Vec<usize>,
}

impl HostBatch {
    fn into_batch(self, device: &Device) -> Result<Batch, DataError> {
        let err = |e: candle_core::Error| DataError::format("<batch>", e.to_string());
        Ok(Batch {
            images: Tensor::from_vec(self.pixels, &self.image_shape[..], device).map_err(err)?,
            labels: Tensor::from_vec(self.labels, self.label_shape, device).map_err(err)?,
        })
    }
}

struct Prefetched {
    rx: Receiver<Result<HostBatch, DataError>>,
    device: Device,
    /// The batch indices still expected, in order.
    pending: std::vec::IntoIter<usize>,
    /// After an error the producer stops; so does the iteration.
    failed: bool,
}

impl Iterator for Prefetched {
    type Item = Result<Batch, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let i = self.pending.next()?;
        match self.rx.recv() {
            Ok(batch) => {
                self.failed = batch.is_err();
                Some(batch.and_then(|b| b.into_batch(&self.device)))
            }
            Err(_) => {
                self.failed = true;
                Some(Err(DataError::format(
                    format!("batch {i}"),
                    "the loader thread ended before producing it",
                )))
            }
        }
    }
}
