//! Cityscapes: `leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` with
//! `gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`; labelIds map to the 19 train ids, every
//! other id to the ignore label (reference §5.3).

use crate::image_folder::{decode_rgb, sorted_entries};
use crate::{DataError, Dataset, Image, Sample, Split, Target, IGNORE_LABEL};
use std::path::{Path, PathBuf};

/// Number of evaluated classes.
pub const NUM_CLASSES: usize = 19;

/// Class names by train id.
pub const CLASS_NAMES: [&str; NUM_CLASSES] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

/// The official per-class loss weights by train id.
pub const CLASS_WEIGHTS: [f32; NUM_CLASSES] = [
    0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539, 0.9843,
    1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507,
];

/// Cityscapes colour of each train id (the benchmark's palette).
pub const PALETTE: [[u8; 3]; NUM_CLASSES] = [
    [128, 64, 128],
    [244, 35, 232],
    [70, 70, 70],
    [102, 102, 156],
    [190, 153, 153],
    [153, 153, 153],
    [250, 170, 30],
    [220, 220, 0],
    [107, 142, 35],
    [152, 251, 152],
    [70, 130, 180],
    [220, 20, 60],
    [255, 0, 0],
    [0, 0, 142],
    [0, 0, 70],
    [0, 60, 100],
    [0, 80, 100],
    [0, 0, 230],
    [119, 11, 32],
];

/// labelId → trainId (255 = ignore).
pub fn train_id(label_id: u8) -> u8 {
    match label_id {
        7 => 0,
        8 => 1,
        11 => 2,
        12 => 3,
        13 => 4,
        17 => 5,
        19 => 6,
        20 => 7,
        21 => 8,
        22 => 9,
        23 => 10,
        24 => 11,
        25 => 12,
        26 => 13,
        27 => 14,
        28 => 15,
        31 => 16,
        32 => 17,
        33 => 18,
        _ => IGNORE_LABEL,
    }
}

/// Image/label file pairs of one split, decoded when asked for.
#[derive(Debug, Clone)]
pub struct Cityscapes {
    pairs: Vec<(PathBuf, PathBuf)>,
}

impl Cityscapes {
    /// Lists `split` (`train` or `val`) under `root`; every image must have its label file.
    pub fn open(root: &Path, split: Split) -> Result<Self, DataError> {
        let split_name = match split {
            Split::Train => "train",
            Split::Test => "val",
        };
        let image_root = root.join("leftImg8bit").join(split_name);
        let cities = sorted_entries(&image_root)?
            .into_iter()
            .filter(|p| p.is_dir());
        let mut pairs = Vec::new();
        for city in cities {
            let images = sorted_entries(&city)?.into_iter().filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with("_leftImg8bit.png"))
            });
            let city_name = city.file_name().expect("read_dir entries have names");
            for image in images {
                let name = image
                    .file_name()
                    .expect("filtered by name")
                    .to_string_lossy();
                let stem = name.trim_end_matches("_leftImg8bit.png");
                let label = root
                    .join("gtFine")
                    .join(split_name)
                    .join(city_name)
                    .join(format!("{stem}_gtFine_labelIds.png"));
                if !label.exists() {
                    return Err(DataError::format(
                        image.display(),
                        format!("its label file {} is missing", label.display()),
                    ));
                }
                pairs.push((image, label));
            }
        }
        if pairs.is_empty() {
            return Err(DataError::format(
                image_root.display(),
                "no <city>/*_leftImg8bit.png images",
            ));
        }
        Ok(Self { pairs })
    }
}

/// Reads a single-channel 8-bit label PNG, naming the file on failure.
pub fn decode_label_map(path: &Path) -> Result<Image, DataError> {
    let img = crate::decode::decode_file(path, "label map")?;
    if img.color() != image::ColorType::L8 {
        return Err(DataError::format(
            path.display(),
            format!(
                "label maps are 8-bit grey PNGs, this one is {:?}",
                img.color()
            ),
        ));
    }
    let grey = img.into_luma8();
    Ok(Image {
        channels: 1,
        height: grey.height() as usize,
        width: grey.width() as usize,
        pixels: grey.into_raw(),
    })
}

impl Dataset for Cityscapes {
    fn len(&self) -> usize {
        self.pairs.len()
    }
    fn channels(&self) -> usize {
        3
    }
    fn num_classes(&self) -> usize {
        NUM_CLASSES
    }
    fn get(&self, i: usize) -> Result<Sample, DataError> {
        let (image_path, label_path) = &self.pairs[i];
        let image = decode_rgb(image_path)?;
        let mut label = decode_label_map(label_path)?;
        if (label.height, label.width) != (image.height, image.width) {
            return Err(DataError::format(
                label_path.display(),
                format!(
                    "label map is {}x{}, its image {} is {}x{}",
                    label.height,
                    label.width,
                    image_path.display(),
                    image.height,
                    image.width
                ),
            ));
        }
        for p in &mut label.pixels {
            *p = train_id(*p);
        }
        Ok(Sample {
            image,
            target: Target::Mask(label),
        })
    }
    fn describe(&self, i: usize) -> String {
        self.pairs[i].0.display().to_string()
    }
}
