//! CIFAR binary batches (CIFAR-10 `test_batch.bin` or CIFAR-100 `test.bin`, the first input byte
//! chooses) read from a dataset folder as a user's holds them; every sample of an accepted file
//! is fetched and must be a 32×32 RGB image with a label in range.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mdeq_data::cifar::CifarDataset;
use mdeq_data::{Dataset, Split, Target};

fuzz_target!(|data: &[u8]| {
    let Some((&choice, bytes)) = data.split_first() else {
        return;
    };
    let (classes, name) = if choice & 1 == 0 {
        (10, "test_batch.bin")
    } else {
        (100, "test.bin")
    };
    let dir = std::env::temp_dir().join(format!("mdeq-fuzz-cifar-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    for n in ["test_batch.bin", "test.bin"] {
        let _ = std::fs::remove_file(dir.join(n));
    }
    let _ = std::fs::write(dir.join(name), bytes);
    if let Ok(ds) = CifarDataset::open(&dir, Split::Test, classes) {
        for i in 0..ds.len() {
            let s = ds.get(i).expect("an accepted file yields every sample");
            assert_eq!(
                (s.image.channels, s.image.height, s.image.width),
                (3, 32, 32)
            );
            assert_eq!(s.image.pixels.len(), 3 * 32 * 32);
            match s.target {
                Target::Class(c) => assert!((c as usize) < classes),
                Target::Mask(_) => panic!("CIFAR labels are classes"),
            }
        }
    }
});
