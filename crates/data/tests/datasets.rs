//! CIFAR binary, ImageFolder, Cityscapes and fashion-scene loaders on small datasets this test
//! writes in the real on-disk layouts, and their errors on bad files.

mod common;

use common::scratch;
use mdeq_data::cifar::CifarDataset;
use mdeq_data::cityscapes::{self, Cityscapes};
use mdeq_data::fashion_scenes::{FashionScenes, RIM};
use mdeq_data::image_folder::ImageFolder;
use mdeq_data::{Dataset, Split, Target, IGNORE_LABEL};
use std::path::Path;

/// A CIFAR record: label bytes then three 32×32 planes whose values encode (record, channel).
fn cifar_record(labels: &[u8], r: u8) -> Vec<u8> {
    let mut rec = labels.to_vec();
    for c in 0..3u8 {
        rec.extend((0..1024).map(|p| {
            r.wrapping_mul(7)
                .wrapping_add(c * 50)
                .wrapping_add((p % 5) as u8)
        }));
    }
    rec
}

#[test]
fn cifar10_and_100_binary_layouts() -> mdeq_testkit::Result {
    let root = scratch("cifar");
    let dir10 = root.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir10)?;
    for b in 1..=5u8 {
        let bytes: Vec<u8> = (0..2u8)
            .flat_map(|r| cifar_record(&[(b + r) % 10], b * 2 + r))
            .collect();
        std::fs::write(dir10.join(format!("data_batch_{b}.bin")), bytes)?;
    }
    std::fs::write(dir10.join("test_batch.bin"), cifar_record(&[9], 1))?;
    // The root or the batches directory itself both work.
    for dir in [&root, &dir10] {
        let train = CifarDataset::open(dir, Split::Train, 10)?;
        assert_eq!(
            (train.len(), train.channels(), train.num_classes()),
            (10, 3, 10)
        );
        let s = train.get(3)?; // batch 2, record 1
        assert_eq!(s.target, Target::Class(3));
        assert_eq!((s.image.height, s.image.width), (32, 32));
        // Planes become interleaved RGB: pixel 6 of channel 2.
        assert_eq!(s.image.pixels[6 * 3 + 2], 5u8.wrapping_mul(7) + 100 + 1);
    }
    assert_eq!(CifarDataset::open(&root, Split::Test, 10)?.len(), 1);

    let dir100 = root.join("cifar-100-binary");
    std::fs::create_dir_all(&dir100)?;
    std::fs::write(dir100.join("train.bin"), cifar_record(&[3, 77], 0))?;
    std::fs::write(dir100.join("test.bin"), cifar_record(&[3, 99], 0))?;
    let c100 = CifarDataset::open(&root, Split::Train, 100)?;
    assert_eq!(c100.get(0)?.target, Target::Class(77), "fine label");

    let bad = dir10.join("data_batch_3.bin");
    std::fs::write(&bad, &cifar_record(&[1], 0)[..2000])?;
    let err = CifarDataset::open(&root, Split::Train, 10)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data_batch_3.bin") && err.contains("3073"),
        "{err}"
    );
    std::fs::write(&bad, cifar_record(&[10], 0))?;
    let err = CifarDataset::open(&root, Split::Train, 10)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data_batch_3.bin") && err.contains("label 10"),
        "{err}"
    );
    std::fs::remove_file(&bad)?;
    let err = CifarDataset::open(&root, Split::Train, 10)
        .unwrap_err()
        .to_string();
    assert!(err.contains("data_batch_3.bin"), "{err}");
    std::fs::remove_dir_all(root)?;
    Ok(())
}

fn save_rgb(path: &Path, w: u32, h: u32, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([seed, x as u8, y as u8]))
        .save(path)
        .unwrap();
}

#[test]
fn image_folder_reads_png_and_jpeg_by_sorted_class() -> mdeq_testkit::Result {
    let root = scratch("imagefolder");
    save_rgb(&root.join("train/n02/b.png"), 5, 4, 1);
    save_rgb(&root.join("train/n01/a.JPEG"), 8, 6, 2);
    save_rgb(&root.join("train/n01/c.png"), 3, 3, 3);
    std::fs::write(root.join("train/n01/notes.txt"), "not an image")?;
    save_rgb(&root.join("val/n01/v.png"), 4, 4, 4);
    let ds = ImageFolder::open(&root, Split::Train)?;
    assert_eq!(ds.classes(), ["n01", "n02"]);
    assert_eq!(ds.len(), 3, "the .txt file is not a sample");
    let jpeg = ds.get(0)?;
    assert_eq!(
        (jpeg.target.clone(), jpeg.image.width, jpeg.image.height),
        (Target::Class(0), 8, 6)
    );
    let png = ds.get(2)?;
    assert_eq!(png.target, Target::Class(1));
    assert_eq!(
        &png.image.pixels[..6],
        &[1, 0, 0, 1, 1, 0],
        "exact PNG pixels"
    );
    assert_eq!(ImageFolder::open(&root, Split::Test)?.len(), 1);

    std::fs::write(root.join("train/n02/b.png"), b"\x89PNG\r\n\x1a\n truncated")?;
    let err = ds.get(2).unwrap_err().to_string();
    assert!(err.contains("b.png"), "{err}");
    let err = ImageFolder::open(&root.join("nowhere"), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nowhere"), "{err}");
    std::fs::remove_dir_all(root)?;
    Ok(())
}

fn save_grey(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]))
        .save(path)
        .unwrap();
}

#[test]
fn cityscapes_maps_label_ids_to_train_ids() -> mdeq_testkit::Result {
    let root = scratch("cityscapes");
    let ids = [7u8, 26, 0, 33, 5, 24, 255, 11];
    for (city, stem) in [
        ("aachen", "aachen_000000_000019"),
        ("bremen", "bremen_000001_000019"),
    ] {
        save_rgb(
            &root.join(format!("leftImg8bit/train/{city}/{stem}_leftImg8bit.png")),
            4,
            2,
            9,
        );
        save_grey(
            &root.join(format!("gtFine/train/{city}/{stem}_gtFine_labelIds.png")),
            4,
            2,
            |x, y| ids[(y * 4 + x) as usize],
        );
    }
    let ds = Cityscapes::open(&root, Split::Train)?;
    assert_eq!((ds.len(), ds.num_classes()), (2, 19));
    assert!(ds.describe(1).contains("bremen"));
    let Target::Mask(m) = ds.get(0)?.target else {
        panic!("segmentation samples carry masks")
    };
    let ign = IGNORE_LABEL;
    assert_eq!(m.pixels, [0, 13, ign, 18, ign, 11, ign, 2]);
    assert_eq!(cityscapes::train_id(31), 16);

    // A label map of the wrong size, then a missing one.
    let label = root.join("gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png");
    save_grey(&label, 3, 2, |_, _| 7);
    let err = ds.get(1).unwrap_err().to_string();
    assert!(
        err.contains("bremen_000001_000019_gtFine_labelIds.png") && err.contains("is 2x3"),
        "{err}"
    );
    std::fs::remove_file(&label)?;
    let err = Cityscapes::open(&root, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bremen_000001_000019_leftImg8bit.png") && err.contains("missing"),
        "{err}"
    );
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn fashion_scenes_label_every_pixel_by_its_item() -> mdeq_testkit::Result {
    let dir = scratch("scenes");
    // 6 items of 28×28: a solid 10×10 block of 200 ringed by a faint rim of 20.
    let n = 6;
    let mut pixels = Vec::new();
    for _ in 0..n {
        for y in 0..28 {
            for x in 0..28 {
                let inside = |lo: usize, hi: usize| (lo..hi).contains(&y) && (lo..hi).contains(&x);
                pixels.push(if inside(9, 19) {
                    200
                } else if inside(8, 20) {
                    20
                } else {
                    0
                });
            }
        }
    }
    let labels: Vec<u8> = (0..n as u8).map(|i| (i * 3) % 10).collect();
    for split in [Split::Train, Split::Test] {
        mdeq_data::idx::write_split(&dir, split, (28, 28), &pixels, &labels)?;
    }
    let ds = FashionScenes::open(&dir, Split::Train, 48)?;
    assert_eq!((ds.len(), ds.num_classes(), ds.channels()), (6, 11, 1));
    for (i, label) in labels.iter().enumerate() {
        let s = ds.get(i)?;
        assert_eq!(s, ds.get(i)?, "a scene is a function of its index");
        let Target::Mask(m) = &s.target else {
            panic!("masks")
        };
        assert_eq!((s.image.height, s.image.width, m.height), (48, 48, 48));
        let mut classes = std::collections::BTreeSet::new();
        for (&v, &l) in s.image.pixels.iter().zip(&m.pixels) {
            match v {
                0 => assert_eq!(l, 0, "black is background"),
                v if v < RIM => assert_eq!(l, IGNORE_LABEL, "rims are ignored"),
                _ => {
                    assert!((1..=10).contains(&l), "items are classes 1..=10");
                    classes.insert(l);
                }
            }
        }
        assert!(classes.contains(&(label + 1)), "scene {i} shows item {i}");
    }
    assert!(
        FashionScenes::open(&dir, Split::Train, 20).is_err(),
        "canvas smaller than an item"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Found by the `image` fuzz target: this 644-byte JPEG makes the JPEG decoder (zune-jpeg
/// 0.5.15) panic in its IDCT. Decoding it is an error naming the file, in every channel count,
/// and the process carries on.
#[test]
fn a_jpeg_that_crashes_the_decoder_is_an_error_naming_the_file() -> mdeq_testkit::Result {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/zune-jpeg-idct-panic.jpg");
    for channels in [1, 3] {
        let e = mdeq_data::image_folder::decode_image(&path, channels)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("zune-jpeg-idct-panic.jpg") && e.contains("the decoder failed on this file"),
            "{e}"
        );
    }
    Ok(())
}

/// A 1×1 PNG whose header is rewritten to claim 20,000 × 20,000 pixels (CRC fixed, so only the
/// size lies): a few dozen bytes that would have the decoder allocate 400 MB before finding the
/// data missing. It is refused within what the file can hold, naming the file.
#[test]
fn an_image_claiming_far_more_pixels_than_its_file_holds_is_refused() -> mdeq_testkit::Result {
    let dir = scratch("image-size-lie");
    let path = dir.join("liar.png");
    image::GrayImage::from_pixel(1, 1, image::Luma([7])).save(&path)?;
    let mut png = std::fs::read(&path)?;
    // Signature (8), IHDR length (4), "IHDR" (4), then width and height; the CRC covers the
    // chunk type and data (17 bytes) and follows them.
    png[16..20].copy_from_slice(&20_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&20_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    std::fs::write(&path, &png)?;
    let e = mdeq_data::image_folder::decode_image(&path, 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("liar.png") && e.contains("cannot decode image"),
        "{e}"
    );
    assert!(
        e.to_lowercase().contains("limit"),
        "refused by the size limit: {e}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
