//! CIFAR-10 / CIFAR-100 in the "binary version" layout: `cifar-10-batches-bin/data_batch_{1..5}.bin`
//! and `test_batch.bin` (records of 1 label byte + 3072 pixel bytes), or `cifar-100-binary/train.bin`
//! and `test.bin` (coarse label byte, fine label byte, 3072 pixel bytes). Pixels are stored as
//! three 32×32 planes (R, G, B).

use crate::{DataError, Dataset, Image, Sample, Split, Target};
use std::path::{Path, PathBuf};

const PIXELS: usize = 3 * 32 * 32;

/// CIFAR-10 or CIFAR-100 held in memory.
#[derive(Debug, Clone)]
pub struct CifarDataset {
    /// Interleaved (H, W, C) pixels of every image.
    images: Vec<u8>,
    labels: Vec<u8>,
    classes: usize,
}

impl CifarDataset {
    /// Opens `split` of CIFAR-`classes` (10 or 100) from `root`: the batches directory itself or
    /// the directory that holds `cifar-10-batches-bin` / `cifar-100-binary`.
    pub fn open(root: &Path, split: Split, classes: usize) -> Result<Self, DataError> {
        let (sub, files, label_bytes): (&str, Vec<String>, usize) = match (classes, split) {
            (10, Split::Train) => (
                "cifar-10-batches-bin",
                (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
                1,
            ),
            (10, Split::Test) => ("cifar-10-batches-bin", vec!["test_batch.bin".into()], 1),
            (100, Split::Train) => ("cifar-100-binary", vec!["train.bin".into()], 2),
            (100, Split::Test) => ("cifar-100-binary", vec!["test.bin".into()], 2),
            _ => {
                return Err(DataError::format(
                    root.display(),
                    format!("CIFAR has 10 or 100 classes, not {classes}"),
                ))
            }
        };
        let dir: PathBuf = if root.join(&files[0]).exists() {
            root.to_path_buf()
        } else {
            root.join(sub)
        };
        let record = label_bytes + PIXELS;
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        for name in &files {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| DataError::io(path.display(), e))?;
            if bytes.is_empty() || bytes.len() % record != 0 {
                return Err(DataError::format(
                    path.display(),
                    format!(
                        "{} bytes is not a whole number of {record}-byte CIFAR-{classes} records \
                         (truncated or not a CIFAR binary file)",
                        bytes.len()
                    ),
                ));
            }
            for (r, rec) in bytes.chunks_exact(record).enumerate() {
                let label = rec[label_bytes - 1];
                if label as usize >= classes {
                    return Err(DataError::format(
                        path.display(),
                        format!("record {r}: label {label} is not in 0..{classes}"),
                    ));
                }
                labels.push(label);
                let planes = &rec[label_bytes..];
                images.extend((0..1024).flat_map(|p| (0..3).map(move |c| planes[c * 1024 + p])));
            }
        }
        Ok(Self {
            images,
            labels,
            classes,
        })
    }
}

impl Dataset for CifarDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn channels(&self) -> usize {
        3
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn get(&self, i: usize) -> Result<Sample, DataError> {
        Ok(Sample {
            image: Image {
                channels: 3,
                height: 32,
                width: 32,
                pixels: self.images[i * PIXELS..(i + 1) * PIXELS].to_vec(),
            },
            target: Target::Class(self.labels[i] as u32),
        })
    }
}
