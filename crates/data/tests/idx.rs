//! The IDX loader on files this test writes in the canonical layout (raw and gzip), and its errors.

use flate2::write::GzEncoder;
use mdeq_data::{BatchLoader, DataError, Dataset, IdxDataset, Split};
use std::io::Write;
use std::path::{Path, PathBuf};

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8], gz: bool) {
    if gz {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        std::fs::write(dir.join(format!("{name}.gz")), e.finish().unwrap()).unwrap();
    } else {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// n images of 4×3 whose pixels encode (sample, position), labels i % 10.
fn make(n: usize, gz: bool, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mdeq-idx-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pixels: Vec<u8> = (0..n * 12)
        .map(|i| ((i / 12) * 10 + i % 12) as u8)
        .collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    for prefix in ["train", "t10k"] {
        write(
            &dir,
            &format!("{prefix}-images-idx3-ubyte"),
            &idx_bytes(&[n as u32, 4, 3], &pixels),
            gz,
        );
        write(
            &dir,
            &format!("{prefix}-labels-idx1-ubyte"),
            &idx_bytes(&[n as u32], &labels),
            gz,
        );
    }
    dir
}

#[test]
fn reads_raw_and_gzip_files_with_normalisation() {
    for gz in [false, true] {
        let dir = make(7, gz, if gz { "gz" } else { "raw" });
        let ds = IdxDataset::open(&dir, Split::Train, (0.5, 0.25)).unwrap();
        assert_eq!(
            (ds.len(), ds.image_shape(), ds.num_classes()),
            (7, (1, 4, 3), 10)
        );
        let s = ds.get(3).unwrap();
        assert_eq!(s.label, 3);
        assert_eq!(s.image.len(), 12);
        let expected = ((30.0 + 5.0) / 255.0 - 0.5) / 0.25;
        assert!((s.image[5] - expected).abs() < 1e-6);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn batches_are_seeded_and_cover_every_sample_once() {
    let dir = make(10, false, "batches");
    let ds = IdxDataset::open(&dir, Split::Test, (0.0, 1.0)).unwrap();
    let collect = |seed: u64, epoch: u64| -> Vec<i64> {
        let l = BatchLoader::new(&ds, 4, true, seed, epoch);
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
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dir = make(5, false, "bad");
    let path = dir.join("train-images-idx3-ubyte");
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() - 3]).unwrap();
    let err = IdxDataset::open(&dir, Split::Train, (0.0, 1.0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("promises"),
        "{err}"
    );
    std::fs::write(&path, b"\x00\x00\x0d\x03garbage and more bytes").unwrap();
    let err = IdxDataset::open(&dir, Split::Train, (0.0, 1.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an IDX file"), "{err}");
    std::fs::write(&path, &good).unwrap();
    write(
        &dir,
        "train-labels-idx1-ubyte",
        &idx_bytes(&[5], &[0, 1, 2, 12, 4]),
        false,
    );
    let err = IdxDataset::open(&dir, Split::Train, (0.0, 1.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("label 12"), "{err}");
    std::fs::write(dir.join("train-images-idx3-ubyte.gz"), b"not gzip").unwrap();
    std::fs::remove_file(&path).unwrap();
    let err = IdxDataset::open(&dir, Split::Train, (0.0, 1.0)).unwrap_err();
    assert!(
        matches!(err, DataError::Format { .. }) && err.to_string().contains(".gz"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let err = IdxDataset::open(&dir, Split::Train, (0.0, 1.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("train-images-idx3-ubyte"), "{err}");
}
