//! IDX files (MNIST, Fashion-MNIST): `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.

use crate::{DataError, Dataset, Sample, Split};
use std::io::Read;
use std::path::{Path, PathBuf};

/// An IDX image/label pair held in memory.
#[derive(Debug, Clone)]
pub struct IdxDataset {
    images: Vec<u8>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
    mean: f32,
    std: f32,
}

/// Normalisation constants (mean, std) of the training images: Fashion-MNIST.
pub const FASHION_MNIST_MEAN_STD: (f32, f32) = (0.2860, 0.3530);
/// Normalisation constants (mean, std) of the training images: MNIST.
pub const MNIST_MEAN_STD: (f32, f32) = (0.1307, 0.3081);

fn find(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    for name in [stem.to_string(), format!("{stem}.gz")] {
        let p = dir.join(&name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(DataError::Io {
        path: dir.join(stem).display().to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "neither the file nor its .gz exists",
        ),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    let p = path.display().to_string();
    let raw = std::fs::read(path).map_err(|source| DataError::Io {
        path: p.clone(),
        source,
    })?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format {
                path: p,
                message: format!("corrupt gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file with `dims` dimensions of u8 data; returns (dimensions, payload).
fn parse(bytes: &[u8], dims: usize, path: &Path) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let bad = |m: String| DataError::Format {
        path: path.display().to_string(),
        message: m,
    };
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(bad(format!("truncated header: {} bytes", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != dims {
        return Err(bad(format!(
            "not an IDX file of {dims}-D unsigned bytes (magic {:02x?})",
            &bytes[..4]
        )));
    }
    let shape: Vec<usize> = (0..dims)
        .map(|d| u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().unwrap()) as usize)
        .collect();
    let n: usize = shape.iter().product();
    if bytes.len() != header + n {
        return Err(bad(format!(
            "header promises {n} bytes of data ({shape:?}), file has {}",
            bytes.len() - header
        )));
    }
    Ok((shape, bytes[header..].to_vec()))
}

impl IdxDataset {
    /// Opens the `split` of the IDX dataset in `dir`, normalised with `(mean, std)`.
    pub fn open(dir: &Path, split: Split, mean_std: (f32, f32)) -> Result<Self, DataError> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let image_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let label_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let (ishape, images) = parse(&read(&image_path)?, 3, &image_path)?;
        let (lshape, labels) = parse(&read(&label_path)?, 1, &label_path)?;
        if ishape[0] != lshape[0] {
            return Err(DataError::Format {
                path: label_path.display().to_string(),
                message: format!(
                    "{} labels for {} images in {}",
                    lshape[0],
                    ishape[0],
                    image_path.display()
                ),
            });
        }
        if let Some(i) = labels.iter().position(|&l| l >= 10) {
            return Err(DataError::Format {
                path: label_path.display().to_string(),
                message: format!("label {} of sample {i} is not in 0..10", labels[i]),
            });
        }
        Ok(Self {
            images,
            labels,
            rows: ishape[1],
            cols: ishape[2],
            mean: mean_std.0,
            std: mean_std.1,
        })
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        (1, self.rows, self.cols)
    }
    fn num_classes(&self) -> usize {
        10
    }
    fn get(&self, i: usize) -> Result<Sample, DataError> {
        let n = self.rows * self.cols;
        let px = &self.images[i * n..(i + 1) * n];
        Ok(Sample {
            image: px
                .iter()
                .map(|&p| (p as f32 / 255.0 - self.mean) / self.std)
                .collect(),
            label: self.labels[i] as u32,
        })
    }
}
