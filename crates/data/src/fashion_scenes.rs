//! Fashion scenes: a segmentation task on real images that trains on a CPU. Each scene places one
//! to three Fashion-MNIST items at random positions on a dark square canvas (later items on top);
//! every pixel is labelled with the class of the item it shows (1..=10) or background (0), and
//! the faint anti-aliased rim of an item (grey level 1..[`RIM`]) with the ignore label, since
//! neither answer is right there. Scene `i` of a split is a pure function of `i`.

use crate::{DataError, Dataset, IdxDataset, Image, Sample, Split, Target, IGNORE_LABEL};
use rand::{Rng, SeedableRng};
use std::path::Path;

/// Item pixels darker than this (but not black) are labelled ignore.
pub const RIM: u8 = 40;

/// Classes: background, then the ten Fashion-MNIST classes.
pub const NUM_CLASSES: usize = 11;

/// Class names by label: background, then Fashion-MNIST's.
pub fn class_names() -> Vec<String> {
    std::iter::once("background")
        .chain(crate::idx::FASHION_MNIST_CLASSES)
        .map(String::from)
        .collect()
}

/// Scenes composed from one split of Fashion-MNIST.
#[derive(Debug, Clone)]
pub struct FashionScenes {
    items: IdxDataset,
    canvas: usize,
    seed: u64,
}

impl FashionScenes {
    /// Scenes of `canvas` × `canvas` pixels from the IDX files in `dir`; as many scenes as the
    /// split has items (scene `i` always contains item `i`).
    pub fn open(dir: &Path, split: Split, canvas: usize) -> Result<Self, DataError> {
        let items = IdxDataset::open(dir, split)?;
        let (h, w) = items.image_size();
        if canvas < h.max(w) {
            return Err(DataError::format(
                dir.display(),
                format!("a {canvas}-pixel canvas cannot hold {h}x{w} items"),
            ));
        }
        let seed = match split {
            Split::Train => 0x5EED_0001,
            Split::Test => 0x5EED_0002,
        };
        Ok(Self {
            items,
            canvas,
            seed,
        })
    }
}

impl Dataset for FashionScenes {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn channels(&self) -> usize {
        1
    }
    fn num_classes(&self) -> usize {
        NUM_CLASSES
    }
    fn get(&self, i: usize) -> Result<Sample, DataError> {
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(self.seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        let n = self.canvas;
        let mut image = Image::filled(1, n, n, 0);
        let mut mask = Image::filled(1, n, n, 0);
        let count = rng.gen_range(1..=3);
        let (h, w) = self.items.image_size();
        for k in 0..count {
            let item = if k == 0 {
                i
            } else {
                rng.gen_range(0..self.items.len())
            };
            let (top, left) = (rng.gen_range(0..=n - h), rng.gen_range(0..=n - w));
            let class = self.items.label(item) as u8 + 1;
            for (p, &v) in self.items.pixels(item).iter().enumerate() {
                if v == 0 {
                    continue;
                }
                let at = (top + p / w) * n + left + p % w;
                image.pixels[at] = v;
                mask.pixels[at] = if v < RIM { IGNORE_LABEL } else { class };
            }
        }
        Ok(Sample {
            image,
            target: Target::Mask(mask),
        })
    }
    fn describe(&self, i: usize) -> String {
        format!("fashion scene {i}")
    }
}
