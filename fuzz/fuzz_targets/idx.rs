//! IDX files, raw or gzip-compressed (the first input byte chooses), read from a file as a
//! user's dataset folder holds them; every sample of an accepted file is fetched.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mdeq_data::{Dataset, IdxDataset, Split};
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, bytes)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("mdeq-fuzz-idx-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let gz = choice & 1 == 1;
    let (images, labels) = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte");
    for name in [images, labels] {
        let _ = std::fs::remove_file(dir.join(name));
        let _ = std::fs::remove_file(dir.join(format!("{name}.gz")));
    }
    // The fuzzed file is the image file; labels are a valid file of as many samples as the
    // image header claims (when small), so that acceptance reaches the samples.
    let claimed = bytes
        .get(4..8)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
        .min(64);
    let mut label_file = vec![0, 0, 8, 1];
    label_file.extend(claimed.to_be_bytes());
    label_file.extend((0..claimed).map(|i| (i % 10) as u8));
    if gz {
        let mut enc = flate2_encoder();
        let _ = enc.write_all(bytes);
        let _ = std::fs::write(
            dir.join(format!("{images}.gz")),
            enc.finish().unwrap_or_default(),
        );
    } else {
        let _ = std::fs::write(dir.join(images), bytes);
    }
    let _ = std::fs::write(dir.join(labels), &label_file);
    if let Ok(ds) = IdxDataset::open(&dir, Split::Train) {
        for i in 0..ds.len() {
            let _ = ds.get(i);
        }
    }
});

fn flate2_encoder() -> flate2::write::GzEncoder<Vec<u8>> {
    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())
}
