//! IDX files (MNIST, Fashion-MNIST): `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.

use crate::{DataError, Dataset, Image, Sample, Split, Target};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Fashion-MNIST class names by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// The bytes of an IDX file of unsigned bytes with dimensions `dims` (the inverse of the
/// loader, for writing small datasets).
pub fn encode(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// Writes `images` (n × rows × cols bytes) and their `labels` as the raw canonical IDX pair of
/// `split` in `dir` (for small test and demo datasets).
pub fn write_split(
    dir: &Path,
    split: Split,
    (rows, cols): (usize, usize),
    images: &[u8],
    labels: &[u8],
) -> Result<(), DataError> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let n = labels.len() as u32;
    for (name, bytes) in [
        (
            "images-idx3",
            encode(&[n, rows as u32, cols as u32], images),
        ),
        ("labels-idx1", encode(&[n], labels)),
    ] {
        let path = dir.join(format!("{prefix}-{name}-ubyte"));
        std::fs::write(&path, bytes).map_err(|e| DataError::io(path.display(), e))?;
    }
    Ok(())
}

/// An IDX image/label pair held in memory.
#[derive(Debug, Clone)]
pub struct IdxDataset {
    images: Vec<u8>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
}

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
    /// Opens the `split` of the IDX dataset in `dir`.
    pub fn open(dir: &Path, split: Split) -> Result<Self, DataError> {
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
        })
    }

    /// (rows, columns) of every image.
    pub fn image_size(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The raw pixels of image `i`, row-major.
    pub fn pixels(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.images[i * n..(i + 1) * n]
    }

    /// The class of sample `i`.
    pub fn label(&self, i: usize) -> u32 {
        self.labels[i] as u32
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn channels(&self) -> usize {
        1
    }
    fn num_classes(&self) -> usize {
        10
    }
    fn get(&self, i: usize) -> Result<Sample, DataError> {
        Ok(Sample {
            image: Image {
                channels: 1,
                height: self.rows,
                width: self.cols,
                pixels: self.pixels(i).to_vec(),
            },
            target: Target::Class(self.label(i)),
        })
    }
}
