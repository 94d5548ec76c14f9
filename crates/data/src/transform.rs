//! The recipes' augmentations (reference §5.2–5.3) on raw 8-bit samples, and normalisation.
//!
//! Every random choice is drawn from the generator the loader passes in, which is seeded per
//! (seed, epoch, sample), so a batch is the same whichever thread decodes it and whether or not
//! the run was resumed.

use crate::{DataError, Image, Sample, Target, IGNORE_LABEL};
use image::imageops::FilterType;
use rand::Rng;

/// Per-channel normalisation `(x / 255 - mean) / std`.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalization {
    /// Mean per channel, on the 0..1 scale.
    pub mean: Vec<f32>,
    /// Standard deviation per channel, on the 0..1 scale.
    pub std: Vec<f32>,
}

impl Normalization {
    /// Normalised channel-major (C, H, W) values of `image`.
    pub fn apply(&self, image: &Image) -> Vec<f32> {
        let (c, hw) = (image.channels, image.height * image.width);
        let mut out = vec![0f32; c * hw];
        for ch in 0..c {
            let (m, s) = (
                self.mean[ch % self.mean.len()],
                self.std[ch % self.std.len()],
            );
            for (p, o) in out[ch * hw..(ch + 1) * hw].iter_mut().enumerate() {
                *o = (image.pixels[p * c + ch] as f32 / 255.0 - m) / s;
            }
        }
        out
    }
}

/// A sample transform: augmentation for training, deterministic resizing for evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// Leave the sample as it is.
    Identity,
    /// CIFAR: zero-pad by `pad` pixels, crop back to the original size at a random offset,
    /// flip horizontally with probability ½.
    PadCropFlip {
        /// Padding on every side.
        pad: usize,
    },
    /// ImageNet training: RandomResizedCrop(`size`) with scale 0.08..1 and aspect ratio 3/4..4/3,
    /// bilinear, then a horizontal flip with probability ½.
    RandomResizedCropFlip {
        /// Output side.
        size: usize,
    },
    /// ImageNet validation: shorter side to `resize`, then the central `crop` × `crop`.
    ResizeCenterCrop {
        /// Shorter side after resizing.
        resize: usize,
        /// Output side.
        crop: usize,
    },
    /// Cityscapes training: long side to `base_long`·s with s = 0.5 + k/10, k uniform in 0..=16
    /// (image bilinear, labels nearest), pad bottom/right to the crop (image 0, labels ignore),
    /// random crop of `crop` = (height, width), horizontal flip with probability ½.
    ScaleCropFlip {
        /// Long side at scale 1.
        base_long: usize,
        /// Crop (height, width).
        crop: (usize, usize),
    },
    /// Resize to exactly (height, width) (image bilinear, labels nearest).
    Resize {
        /// Output rows.
        height: usize,
        /// Output columns.
        width: usize,
    },
}

impl Transform {
    /// Applies the transform, drawing random choices from `rng`.
    pub fn apply(&self, sample: Sample, rng: &mut impl Rng) -> Result<Sample, DataError> {
        let Sample { image, target } = sample;
        refuse_empty(&image)?;
        if let Target::Mask(m) = &target {
            if (m.height, m.width, m.channels) != (image.height, image.width, 1) {
                return Err(DataError::format(
                    "<sample>",
                    format!(
                        "label map is {}x{}x{}, the image {}x{}",
                        m.height, m.width, m.channels, image.height, image.width
                    ),
                ));
            }
        }
        let (image, target) = match *self {
            Transform::Identity => (image, target),
            Transform::PadCropFlip { pad } => {
                let (h, w) = (image.height, image.width);
                let (top, left) = (rng.gen_range(0..=2 * pad), rng.gen_range(0..=2 * pad));
                let flip = rng.gen_bool(0.5);
                let both = |img: &Image, fill: u8| {
                    let padded = pad_to(img, h + 2 * pad, w + 2 * pad, pad, pad, fill);
                    let c = crop(&padded, top, left, h, w);
                    flipped_if(flip, c)
                };
                map_pair(&image, target, both)
            }
            Transform::RandomResizedCropFlip { size } => {
                let (top, left, ch, cw) = random_resized_box(image.height, image.width, rng);
                let flip = rng.gen_bool(0.5);
                let f = |img: &Image, fill: u8| {
                    let filter = filter_for(fill);
                    let c = resize(&crop(img, top, left, ch, cw), size, size, filter);
                    flipped_if(flip, c)
                };
                map_pair(&image, target, f)
            }
            Transform::ResizeCenterCrop {
                resize: short,
                crop: side,
            } => map_pair(&image, target, |img, fill| {
                resize_center_crop(img, short, side, filter_for(fill))
            }),
            Transform::ScaleCropFlip {
                base_long,
                crop: (ch, cw),
            } => {
                let s = 0.5 + rng.gen_range(0..=16) as f64 / 10.0;
                let long = (base_long as f64 * s + 0.5) as usize;
                let (h, w) = (image.height, image.width);
                let (nh, nw) = if w >= h {
                    (((h * long) as f64 / w as f64 + 0.5) as usize, long)
                } else {
                    (long, ((w * long) as f64 / h as f64 + 0.5) as usize)
                };
                let (ph, pw) = (nh.max(ch), nw.max(cw));
                let (top, left) = (rng.gen_range(0..=ph - ch), rng.gen_range(0..=pw - cw));
                let flip = rng.gen_bool(0.5);
                let f = |img: &Image, fill: u8| {
                    let r = resize(img, nh.max(1), nw.max(1), filter_for(fill));
                    let c = crop(&pad_to(&r, ph, pw, 0, 0, fill), top, left, ch, cw);
                    flipped_if(flip, c)
                };
                map_pair(&image, target, f)
            }
            Transform::Resize { height, width } => {
                let f = |img: &Image, fill: u8| resize(img, height, width, filter_for(fill));
                map_pair(&image, target, f)
            }
        };
        Ok(Sample { image, target })
    }

    /// Applies a deterministic (evaluation) transform to an image alone; a random training
    /// augmentation is an error.
    pub fn apply_to_image(&self, image: Image) -> Result<Image, DataError> {
        refuse_empty(&image)?;
        let filter = filter_for(0);
        match *self {
            Transform::Identity => Ok(image),
            Transform::Resize { height, width } => Ok(resize(&image, height, width, filter)),
            Transform::ResizeCenterCrop {
                resize: short,
                crop: side,
            } => Ok(resize_center_crop(&image, short, side, filter)),
            Transform::PadCropFlip { .. }
            | Transform::RandomResizedCropFlip { .. }
            | Transform::ScaleCropFlip { .. } => Err(DataError::format(
                "<transform>",
                format!("{self:?} is a random training augmentation, not an evaluation transform"),
            )),
        }
    }
}

/// An image without pixels (a dataset header can say 0 rows) cannot be resized, cropped or
/// learned from; every transform refuses it rather than dividing by its size.
fn refuse_empty(image: &Image) -> Result<(), DataError> {
    if image.height == 0 || image.width == 0 || image.channels == 0 {
        return Err(DataError::format(
            "<sample>",
            format!(
                "image is {}x{}x{}: it has no pixels",
                image.height, image.width, image.channels
            ),
        ));
    }
    Ok(())
}

/// The shorter side resized to `short`, then the central `side` × `side`.
fn resize_center_crop(img: &Image, short: usize, side: usize, filter: FilterType) -> Image {
    let (h, w) = (img.height, img.width);
    let (nh, nw) = if h <= w {
        (short, (w * short).div_ceil(h).max(side))
    } else {
        ((h * short).div_ceil(w).max(side), short)
    };
    let r = resize(img, nh.max(side), nw.max(side), filter);
    let (top, left) = ((r.height - side) / 2, (r.width - side) / 2);
    crop(&r, top, left, side, side)
}

/// Applies `f` to the image (fill 0) and, for masks, to the label map (fill [`IGNORE_LABEL`]).
fn map_pair(image: &Image, target: Target, f: impl Fn(&Image, u8) -> Image) -> (Image, Target) {
    let target = match target {
        Target::Class(c) => Target::Class(c),
        Target::Mask(m) => Target::Mask(f(&m, IGNORE_LABEL)),
    };
    (f(image, 0), target)
}

/// Label maps (filled with the ignore label) are resized nearest, images bilinear.
fn filter_for(fill: u8) -> FilterType {
    if fill == IGNORE_LABEL {
        FilterType::Nearest
    } else {
        FilterType::Triangle
    }
}

/// torchvision's RandomResizedCrop box: (top, left, height, width).
fn random_resized_box(h: usize, w: usize, rng: &mut impl Rng) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lo, hi) = ((3f64 / 4.0).ln(), (4f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(0.08..1.0);
        let ratio = rng.gen_range(lo..hi).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            return (rng.gen_range(0..=h - ch), rng.gen_range(0..=w - cw), ch, cw);
        }
    }
    // Fallback: the whole image's central crop with the ratio clamped into range.
    let ratio = w as f64 / h as f64;
    let (ch, cw) = if ratio < 3.0 / 4.0 {
        ((w as f64 / (3.0 / 4.0)).round() as usize, w)
    } else if ratio > 4.0 / 3.0 {
        (h, (h as f64 * 4.0 / 3.0).round() as usize)
    } else {
        (h, w)
    };
    let (ch, cw) = (ch.min(h), cw.min(w));
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// The `height` × `width` window of `img` at (`top`, `left`); the window must fit.
pub fn crop(img: &Image, top: usize, left: usize, height: usize, width: usize) -> Image {
    let c = img.channels;
    let mut pixels = Vec::with_capacity(height * width * c);
    for y in top..top + height {
        let row = (y * img.width + left) * c;
        pixels.extend_from_slice(&img.pixels[row..row + width * c]);
    }
    Image {
        channels: c,
        height,
        width,
        pixels,
    }
}

/// `img` placed at (`top`, `left`) on a `height` × `width` canvas of `fill`.
pub fn pad_to(
    img: &Image,
    height: usize,
    width: usize,
    top: usize,
    left: usize,
    fill: u8,
) -> Image {
    let c = img.channels;
    let mut out = Image::filled(c, height, width, fill);
    for y in 0..img.height.min(height.saturating_sub(top)) {
        let n = img.width.min(width.saturating_sub(left)) * c;
        let src = y * img.width * c;
        let dst = ((y + top) * width + left) * c;
        out.pixels[dst..dst + n].copy_from_slice(&img.pixels[src..src + n]);
    }
    out
}

/// `img` mirrored when `flip`, as it is otherwise.
fn flipped_if(flip: bool, img: Image) -> Image {
    if flip {
        flip_horizontal(&img)
    } else {
        img
    }
}

/// Mirror image left ↔ right.
pub fn flip_horizontal(img: &Image) -> Image {
    let c = img.channels;
    let mut out = img.clone();
    for y in 0..img.height {
        for x in 0..img.width {
            let (s, d) = (
                (y * img.width + x) * c,
                (y * img.width + img.width - 1 - x) * c,
            );
            out.pixels[d..d + c].copy_from_slice(&img.pixels[s..s + c]);
        }
    }
    out
}

/// Resized to `height` × `width` with `filter` (any channel count).
pub fn resize(img: &Image, height: usize, width: usize, filter: FilterType) -> Image {
    if (img.height, img.width) == (height, width) {
        return img.clone();
    }
    let c = img.channels;
    let mut out = Image::filled(c, height, width, 0);
    // One channel at a time as a grey image: the decoders' buffers only know 1, 2, 3, 4 channels.
    for ch in 0..c {
        let plane: Vec<u8> = img.pixels.iter().skip(ch).step_by(c).copied().collect();
        let buf = image::GrayImage::from_raw(img.width as u32, img.height as u32, plane)
            .expect("plane has width*height pixels");
        let r = image::imageops::resize(&buf, width as u32, height as u32, filter);
        for (i, &v) in r.as_raw().iter().enumerate() {
            out.pixels[i * c + ch] = v;
        }
    }
    out
}
