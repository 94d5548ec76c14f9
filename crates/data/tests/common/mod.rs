//! Writers of small datasets in their real on-disk layouts, shared by the loader tests.
#![allow(dead_code)]

use flate2::write::GzEncoder;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A fresh, empty scratch directory for one test.
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mdeq-data-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    mdeq_data::idx::encode(dims, data)
}

pub fn write(dir: &Path, name: &str, bytes: &[u8], gz: bool) {
    if gz {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        std::fs::write(dir.join(format!("{name}.gz")), e.finish().unwrap()).unwrap();
    } else {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// n images of 4×3 whose pixels encode (sample, position), labels i % 10.
pub fn make(n: usize, gz: bool, tag: &str) -> PathBuf {
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
