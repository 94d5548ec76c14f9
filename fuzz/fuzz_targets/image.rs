//! Image files as `predict` and the ImageNet loader decode them (PNG or JPEG, format guessed
//! from the bytes), as grey or RGB (the first input byte chooses); an accepted image must hold
//! exactly height × width × channels pixels.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mdeq_data::image_folder::decode_image;

fuzz_target!(|data: &[u8]| {
    let Some((&choice, bytes)) = data.split_first() else {
        return;
    };
    let channels = if choice & 1 == 0 { 1 } else { 3 };
    let path = std::env::temp_dir().join(format!("mdeq-fuzz-image-{}.img", std::process::id()));
    if std::fs::write(&path, bytes).is_err() {
        return;
    }
    if let Ok(img) = decode_image(&path, channels) {
        assert_eq!(img.channels, channels);
        assert_eq!(img.pixels.len(), img.height * img.width * channels);
    }
});
