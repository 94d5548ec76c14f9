//! The IDX loader on files this test writes in the canonical layout (raw and gzip), and its errors.

mod common;

use common::{idx_bytes, make, write};
use mdeq_data::{
    BatchLoader, DataError, Dataset, IdxDataset, Normalization, Split, Target, Transform,
};
use std::sync::Arc;

#[test]
fn reads_raw_and_gzip_files_with_normalisation() -> mdeq_testkit::Result {
    for gz in [false, true] {
        let dir = make(7, gz, if gz { "gz" } else { "raw" });
        let ds = IdxDataset::open(&dir, Split::Train)?;
        assert_eq!((ds.len(), ds.channels(), ds.num_classes()), (7, 1, 10));
        let s = ds.get(3)?;
        assert_eq!(s.target, Target::Class(3));
        assert_eq!((s.image.height, s.image.width), (4, 3));
        assert_eq!(s.image.pixels[5], 35);
        let norm = Normalization {
            mean: vec![0.5],
            std: vec![0.25],
        };
        let expected = ((30.0 + 5.0) / 255.0 - 0.5) / 0.25;
        assert!((norm.apply(&s.image)[5] - expected).abs() < 1e-6);
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

#[test]
fn batches_are_seeded_and_cover_every_sample_once() -> mdeq_testkit::Result {
    let dir = make(10, false, "batches");
    let ds: Arc<dyn Dataset> = Arc::new(IdxDataset::open(&dir, Split::Test)?);
    let unit = Normalization {
        mean: vec![0.0],
        std: vec![1.0],
    };
    let collect = |seed: u64, epoch: u64| -> Vec<i64> {
        let l = BatchLoader::new(
            ds.clone(),
            Transform::Identity,
            unit.clone(),
            4,
            true,
            seed,
            epoch,
        );
        assert_eq!(l.len(), 3);
        (0..l.len())
            .flat_map(|i| {
                l.batch(i, &candle_core::Device::Cpu)
                    .unwrap()
                    .labels
                    .to_vec1::<i64>()
                    .unwrap()
            })
            .collect()
    };
    let a = collect(1, 0);
    assert_eq!(a, collect(1, 0), "same seed and epoch, same order");
    assert_ne!(a, collect(1, 1), "another epoch reshuffles");
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<i64>>());
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn bad_files_give_errors_naming_the_file() -> mdeq_testkit::Result {
    let dir = make(5, false, "bad");
    let path = dir.join("train-images-idx3-ubyte");
    let good = std::fs::read(&path)?;
    std::fs::write(&path, &good[..good.len() - 3])?;
    let err = IdxDataset::open(&dir, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("promises"),
        "{err}"
    );
    std::fs::write(&path, b"\x00\x00\x0d\x03garbage and more bytes")?;
    let err = IdxDataset::open(&dir, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an IDX file"), "{err}");
    std::fs::write(&path, &good)?;
    write(
        &dir,
        "train-labels-idx1-ubyte",
        &idx_bytes(&[5], &[0, 1, 2, 12, 4]),
        false,
    );
    let err = IdxDataset::open(&dir, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("label 12"), "{err}");
    std::fs::write(dir.join("train-images-idx3-ubyte.gz"), b"not gzip")?;
    std::fs::remove_file(&path)?;
    let err = IdxDataset::open(&dir, Split::Train).unwrap_err();
    assert!(
        matches!(err, DataError::Format { .. }) && err.to_string().contains(".gz"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir)?;
    let err = IdxDataset::open(&dir, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("train-images-idx3-ubyte"), "{err}");
    Ok(())
}

#[test]
fn headers_cannot_make_the_reader_inflate_or_allocate_more_than_the_file_holds(
) -> mdeq_testkit::Result {
    let dir = mdeq_testkit::scratch_dir("idx-hostile")?;
    let labels = idx_bytes(&[2], &[0, 1]);
    write(&dir, "train-labels-idx1-ubyte", &labels, false);
    let images = dir.join("train-images-idx3-ubyte");
    let open_err = || {
        IdxDataset::open(&dir, Split::Train)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // Dimensions whose product wraps to 0 in 64-bit arithmetic: 2^32 · 2^32 · 2 (the u32
    // fields hold at most 2^32 − 1, so use 2^32 − 1 three times: ≈ 8e28 > the cap).
    let mut huge = vec![0, 0, 8, 3];
    for _ in 0..3 {
        huge.extend(u32::MAX.to_be_bytes());
    }
    std::fs::write(&images, &huge)?;
    let err = open_err();
    assert!(
        err.contains("header claims") && err.contains("train-images"),
        "{err}"
    );
    // Zero-sized images are refused, not handed to the transforms.
    std::fs::write(&images, idx_bytes(&[2, 0, 5], &[]))?;
    assert!(
        open_err().contains("images of 0x5 pixels"),
        "{}",
        open_err()
    );
    // A gzip bomb: a small header claiming 2 images of 8×8, then 64 MiB of zeros. The reader
    // stops one byte past the claim instead of inflating everything.
    std::fs::remove_file(&images)?;
    let bomb = mdeq_testkit::hostile::gz_idx_bomb(2, 64)?;
    assert!(
        bomb.len() < 1 << 20,
        "the bomb is small: {} bytes",
        bomb.len()
    );
    std::fs::write(dir.join("train-images-idx3-ubyte.gz"), &bomb)?;
    let err = open_err();
    assert!(
        err.contains("promises 128 bytes") && err.contains("or more"),
        "{err}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
