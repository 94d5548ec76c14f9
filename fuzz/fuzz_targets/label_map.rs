//! Cityscapes label maps (`*_gtFine_labelIds.png`): decoded as the loader does, then every
//! pixel mapped labelId → trainId; an accepted map is single-channel, exactly height × width,
//! and maps into the 19 training classes or the ignore label.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mdeq_data::cityscapes::{decode_label_map, train_id};

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("mdeq-fuzz-labels-{}.png", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(map) = decode_label_map(&path) {
        assert_eq!(map.channels, 1);
        assert_eq!(map.pixels.len(), map.height * map.width);
        for &p in &map.pixels {
            let t = train_id(p);
            assert!(t < 19 || t == mdeq_data::IGNORE_LABEL, "labelId {p} -> {t}");
        }
    }
});
