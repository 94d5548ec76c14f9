//! The recipes' augmentations on hand-made images, and the loader's seeded reproducibility
//! with augmentation, parallel decoding and prefetching.

use mdeq_data::transform::{crop, flip_horizontal, pad_to};
use mdeq_data::{
    BatchLoader, DataError, Dataset, Image, Normalization, Sample, Target, Transform, IGNORE_LABEL,
};
use rand::SeedableRng;
use std::sync::Arc;

fn ramp(c: usize, h: usize, w: usize) -> Image {
    Image {
        channels: c,
        height: h,
        width: w,
        pixels: (0..c * h * w).map(|i| (i % 251) as u8 + 1).collect(),
    }
}

fn labelled(h: usize, w: usize) -> Sample {
    let image = ramp(3, h, w);
    let mask = Image {
        channels: 1,
        height: h,
        width: w,
        pixels: (0..h * w).map(|i| ((i / w) % 5) as u8).collect(),
    };
    Sample {
        image,
        target: Target::Mask(mask),
    }
}

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[test]
fn crop_pad_and_flip_move_pixels_where_they_should() -> mdeq_testkit::Result {
    let img = ramp(2, 3, 4);
    let flipped = flip_horizontal(&img);
    assert_eq!(flip_horizontal(&flipped), img);
    assert_eq!(
        &flipped.pixels[0..2],
        &img.pixels[6..8],
        "first pixel of a row is its last"
    );
    let padded = pad_to(&img, 5, 6, 1, 1, 0);
    assert_eq!(crop(&padded, 1, 1, 3, 4), img);
    assert!(
        padded.pixels[..12].iter().all(|&v| v == 0),
        "top row is padding"
    );
    Ok(())
}

#[test]
fn pad_crop_flip_keeps_size_and_shifts_content() -> mdeq_testkit::Result {
    let img = ramp(1, 8, 8);
    let s = Sample {
        image: img.clone(),
        target: Target::Class(3),
    };
    for seed in 0..20 {
        let out = Transform::PadCropFlip { pad: 2 }.apply(s.clone(), &mut rng(seed))?;
        assert_eq!((out.image.height, out.image.width), (8, 8));
        assert_eq!(out.target, Target::Class(3));
        // Every non-zero output value is an input value (zeros come from padding).
        assert!(out
            .image
            .pixels
            .iter()
            .all(|v| *v == 0 || img.pixels.contains(v)));
    }
    Ok(())
}

#[test]
fn segmentation_transforms_keep_image_and_labels_aligned() -> mdeq_testkit::Result {
    let s = labelled(40, 80);
    for seed in 0..10 {
        let t = Transform::ScaleCropFlip {
            base_long: 80,
            crop: (24, 32),
        };
        let out = t.apply(s.clone(), &mut rng(seed))?;
        let Target::Mask(m) = &out.target else {
            panic!("mask")
        };
        assert_eq!(
            (out.image.height, out.image.width, m.height, m.width),
            (24, 32, 24, 32)
        );
        // Nearest resizing invents no label; padding is ignore.
        assert!(m.pixels.iter().all(|&l| l < 5 || l == IGNORE_LABEL));
        // Labels are constant along rows of the source, and rows are never mirrored: each
        // output row holds one label (or ignore where padded).
        for row in m.pixels.chunks(32) {
            let labels: std::collections::BTreeSet<_> =
                row.iter().filter(|&&l| l != IGNORE_LABEL).collect();
            assert!(labels.len() <= 1, "{row:?}");
        }
    }
    let out = Transform::Resize {
        height: 20,
        width: 40,
    }
    .apply(s.clone(), &mut rng(0))?;
    assert_eq!((out.image.height, out.image.width), (20, 40));
    let bad = Sample {
        image: ramp(3, 4, 4),
        target: Target::Mask(ramp(1, 4, 5)),
    };
    assert!(Transform::Identity.apply(bad, &mut rng(0)).is_err());
    Ok(())
}

#[test]
fn imagenet_crops_have_the_recipe_size() -> mdeq_testkit::Result {
    let s = Sample {
        image: ramp(3, 50, 70),
        target: Target::Class(1),
    };
    for seed in 0..10 {
        let out = Transform::RandomResizedCropFlip { size: 24 }.apply(s.clone(), &mut rng(seed))?;
        assert_eq!(
            (out.image.channels, out.image.height, out.image.width),
            (3, 24, 24)
        );
    }
    let out = Transform::ResizeCenterCrop {
        resize: 28,
        crop: 24,
    }
    .apply(s, &mut rng(0))?;
    assert_eq!((out.image.height, out.image.width), (24, 24));
    Ok(())
}

/// Eight 12×12 RGB images with masks, for loader tests.
struct Toy;
impl Dataset for Toy {
    fn len(&self) -> usize {
        8
    }
    fn channels(&self) -> usize {
        3
    }
    fn num_classes(&self) -> usize {
        5
    }
    fn get(&self, i: usize) -> Result<Sample, DataError> {
        let mut s = labelled(12, 12);
        s.image
            .pixels
            .iter_mut()
            .for_each(|p| *p = p.wrapping_add(i as u8));
        Ok(s)
    }
}

#[test]
fn augmented_batches_are_reproducible_and_prefetch_gives_the_same() -> mdeq_testkit::Result {
    let ds: Arc<dyn Dataset> = Arc::new(Toy);
    let norm = Normalization {
        mean: vec![0.5, 0.4, 0.3],
        std: vec![0.2, 0.2, 0.2],
    };
    let t = Transform::ScaleCropFlip {
        base_long: 12,
        crop: (8, 8),
    };
    let loader = |epoch| BatchLoader::new(ds.clone(), t.clone(), norm.clone(), 3, true, 7, epoch);
    let dev = candle_core::Device::Cpu;
    let flat = |b: mdeq_data::Batch| {
        (
            b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.labels.flatten_all().unwrap().to_vec1::<i64>().unwrap(),
        )
    };
    let a: Vec<_> = (0..3)
        .map(|i| flat(loader(0).batch(i, &dev).unwrap()))
        .collect();
    let b: Vec<_> = loader(0)
        .prefetch(0..3, 2, &dev)
        .map(|b| flat(b.unwrap()))
        .collect();
    assert_eq!(
        a, b,
        "same seed and epoch: same augmented batches, prefetched or not"
    );
    let c: Vec<_> = (0..3)
        .map(|i| flat(loader(1).batch(i, &dev).unwrap()))
        .collect();
    assert_ne!(a, c, "another epoch draws other augmentations");
    let batch = loader(0).batch(0, &dev)?;
    assert_eq!(batch.images.dims(), &[3, 3, 8, 8]);
    assert_eq!(batch.labels.dims(), &[3, 8, 8]);
    Ok(())
}

#[test]
fn a_single_image_is_prepared_as_its_dataset_evaluates() -> Result<(), DataError> {
    use mdeq_data::{transform::resize, DatasetKind, Split};
    let image = ramp(3, 50, 70);
    // ImageNet: the evaluation transform itself (resize + centre crop), as a dataset sample
    // gets it.
    let eval = DatasetKind::ImageNet.transform(Split::Test, false, [24, 24], None);
    let expected = eval
        .apply(
            Sample {
                image: image.clone(),
                target: Target::Class(0),
            },
            &mut rng(0),
        )?
        .image;
    let prepared = DatasetKind::ImageNet.prepare_image(image.clone(), false, [24, 24], None)?;
    assert_eq!(prepared, expected);
    assert_eq!((prepared.height, prepared.width), (24, 24));
    // CIFAR evaluates images at their own size; a classification image of another size is
    // brought to the recipe's, bilinearly.
    let prepared = DatasetKind::Cifar10.prepare_image(image.clone(), false, [32, 32], None)?;
    let bilinear = image::imageops::FilterType::Triangle;
    assert_eq!(prepared, resize(&image, 32, 32, bilinear));
    // Segmentation keeps the image's own size unless the recipe fixes one.
    let kept = DatasetKind::Cityscapes.prepare_image(image.clone(), true, [32, 64], None)?;
    assert_eq!(kept, image);
    // A random augmentation is not an evaluation transform.
    let err = Transform::PadCropFlip { pad: 4 }
        .apply_to_image(image)
        .expect_err("random augmentation applied to one image");
    assert!(
        err.to_string().contains("random training augmentation"),
        "{err}"
    );
    Ok(())
}

/// Eight samples; sample 5 makes its decoder panic.
struct PanicsAtFive;
impl Dataset for PanicsAtFive {
    fn len(&self) -> usize {
        8
    }
    fn channels(&self) -> usize {
        3
    }
    fn num_classes(&self) -> usize {
        5
    }
    fn get(&self, i: usize) -> Result<Sample, DataError> {
        if i == 5 {
            panic!("decoder bug on sample {i}");
        }
        Toy.get(i)
    }
}

#[test]
fn a_panic_while_loading_is_an_error_that_ends_the_epoch() -> mdeq_testkit::Result {
    let ds: Arc<dyn Dataset> = Arc::new(PanicsAtFive);
    let norm = Normalization {
        mean: vec![0.5; 3],
        std: vec![0.2; 3],
    };
    // In order (no shuffle), batches of 2: sample 5 is in batch 2.
    let loader = BatchLoader::new(ds, Transform::Identity, norm, 2, false, 0, 0);
    let results: Vec<_> = loader
        .prefetch(0..4, 2, &candle_core::Device::Cpu)
        .collect();
    assert_eq!(
        results.len(),
        3,
        "two good batches, then the error, then nothing"
    );
    assert!(results[0].is_ok() && results[1].is_ok());
    let err = match &results[2] {
        Ok(_) => mdeq_testkit::bail!("the panicking batch came out as a batch"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("batch 2") && err.contains("decoder bug on sample 5"),
        "{err}"
    );
    Ok(())
}

/// Found by the `transforms` fuzz target: an image with no rows or columns (an IDX header may
/// say 0) made ResizeCenterCrop divide by zero. Every transform refuses it, naming the size.
#[test]
fn every_transform_refuses_an_image_without_pixels() -> mdeq_testkit::Result {
    let transforms = [
        Transform::Identity,
        Transform::PadCropFlip { pad: 2 },
        Transform::RandomResizedCropFlip { size: 8 },
        Transform::ResizeCenterCrop { resize: 8, crop: 6 },
        Transform::ScaleCropFlip {
            base_long: 16,
            crop: (4, 4),
        },
        Transform::Resize {
            height: 4,
            width: 4,
        },
    ];
    for t in &transforms {
        for (h, w) in [(0, 5), (5, 0), (0, 0)] {
            let sample = Sample {
                image: Image::filled(3, h, w, 7),
                target: Target::Class(1),
            };
            let e = t.apply(sample, &mut rng(0)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{h}x{w}x3")) && e.contains("no pixels"),
                "{t:?}: {e}"
            );
            if !matches!(
                t,
                Transform::PadCropFlip { .. }
                    | Transform::RandomResizedCropFlip { .. }
                    | Transform::ScaleCropFlip { .. }
            ) {
                assert!(
                    t.apply_to_image(Image::filled(1, h, w, 0)).is_err(),
                    "{t:?}"
                );
            }
        }
    }
    Ok(())
}
