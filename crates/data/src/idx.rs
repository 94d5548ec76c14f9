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
        cause: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "neither the file nor its .gz exists",
        ),
    })
}

/// The largest IDX payload a file may claim (Fashion-MNIST's training images are 47 MB):
/// a header cannot make the loader inflate or allocate more than this.
pub const MAX_IDX_BYTES: u64 = 8 << 30;

/// Reads an IDX file of `dims` dimensions, raw or gzip-compressed, inflating only as much as
/// its header says it holds (and at most [`MAX_IDX_BYTES`]); returns (dimensions, payload).
fn read(path: &Path, dims: usize) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: p.clone(),
        cause: source,
    })?;
    let mut input: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let io = |e: std::io::Error| DataError::Format {
        path: p.clone(),
        message: format!("reading: {e}"),
    };
    let mut header = vec![0u8; 4 + 4 * dims];
    let got = read_up_to(&mut input, &mut header).map_err(io)?;
    let shape = parse_header(&header[..got], dims, path)?;
    let n = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&n| n <= MAX_IDX_BYTES)
        .ok_or_else(|| DataError::Format {
            path: p.clone(),
            message: format!("header claims {shape:?} = more than {MAX_IDX_BYTES} bytes of data"),
        })?;
    // One byte past the claim tells a file that holds more than it says.
    let mut payload = Vec::new();
    input.take(n + 1).read_to_end(&mut payload).map_err(io)?;
    if payload.len() as u64 != n {
        return Err(DataError::Format {
            path: p,
            message: format!(
                "header promises {n} bytes of data ({shape:?}), file has {}{}",
                payload.len(),
                if payload.len() as u64 > n {
                    " or more"
                } else {
                    ""
                }
            ),
        });
    }
    Ok((shape, payload))
}

/// Fills as much of `buf` as the stream holds; returns how much.
fn read_up_to(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..])? {
            0 => break,
            k => filled += k,
        }
    }
    Ok(filled)
}

/// The dimensions in an IDX header of `dims`-D unsigned bytes.
fn parse_header(bytes: &[u8], dims: usize, path: &Path) -> Result<Vec<usize>, DataError> {
    let bad = |m: String| DataError::Format {
        path: path.display().to_string(),
        message: m,
    };
    if bytes.len() < 4 + 4 * dims {
        return Err(bad(format!("truncated header: {} bytes", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != dims {
        return Err(bad(format!(
            "not an IDX file of {dims}-D unsigned bytes (magic {:02x?})",
            &bytes[..4]
        )));
    }
    Ok(bytes[4..4 + 4 * dims]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect())
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
        let (ishape, images) = read(&image_path, 3)?;
        let (lshape, labels) = read(&label_path, 1)?;
        if ishape[1] == 0 || ishape[2] == 0 {
            return Err(DataError::Format {
                path: image_path.display().to_string(),
                message: format!("images of {}x{} pixels", ishape[1], ishape[2]),
            });
        }
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
