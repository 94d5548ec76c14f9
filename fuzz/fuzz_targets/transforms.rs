//! Every sample transform on any image (0 to 48 pixels a side, 1 or 3 channels), with or
//! without a label map, with any parameters in their configurable range: each either refuses
//! the sample or returns an image and mask of the size it promises, never panics, never
//! allocates far beyond its output.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mdeq_data::{Image, Sample, Target, Transform};
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (head, pixels) = data.split_at(9);
    let side = |b: u8| (b % 49) as usize; // 0..=48, zero included: an IDX header can say 0
    let param = |b: u8| 1 + (b % 64) as usize;
    let (h, w) = (side(head[1]), side(head[2]));
    let channels = if head[3] & 1 == 0 { 1 } else { 3 };
    let with_mask = head[3] & 2 != 0;
    let transform = match head[0] % 6 {
        0 => Transform::Identity,
        1 => Transform::PadCropFlip {
            pad: (head[4] % 9) as usize,
        },
        2 => Transform::RandomResizedCropFlip {
            size: param(head[4]),
        },
        3 => Transform::ResizeCenterCrop {
            resize: param(head[4]),
            crop: param(head[5]),
        },
        4 => Transform::ScaleCropFlip {
            base_long: param(head[4]) * 2,
            crop: (param(head[5]), param(head[6])),
        },
        _ => Transform::Resize {
            height: param(head[4]),
            width: param(head[5]),
        },
    };
    let fill = |n: usize, salt: u8| -> Vec<u8> {
        (0..n)
            .map(|i| pixels.get(i % pixels.len().max(1)).copied().unwrap_or(0) ^ salt)
            .collect()
    };
    let image = Image {
        channels,
        height: h,
        width: w,
        pixels: fill(h * w * channels, 0),
    };
    let target = if with_mask {
        Target::Mask(Image {
            channels: 1,
            height: h,
            width: w,
            pixels: fill(h * w, 0x5a),
        })
    } else {
        Target::Class(3)
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(head[7]) << 8 | u64::from(head[8]));
    let Ok(out) = transform.apply(Sample { image, target }, &mut rng) else {
        return;
    };
    assert!(h > 0 && w > 0, "an image without pixels is refused");
    let img = &out.image;
    assert_eq!(img.channels, channels);
    assert_eq!(img.pixels.len(), img.height * img.width * channels);
    let promised = match transform {
        Transform::Identity | Transform::PadCropFlip { .. } => Some((h, w)),
        Transform::RandomResizedCropFlip { size } => Some((size, size)),
        Transform::ResizeCenterCrop { crop, .. } => Some((crop, crop)),
        Transform::ScaleCropFlip { crop, .. } => Some(crop),
        Transform::Resize { height, width } => Some((height, width)),
    };
    if let Some(dims) = promised {
        assert_eq!((img.height, img.width), dims, "{transform:?} on {h}x{w}");
    }
    if let Target::Mask(m) = &out.target {
        assert_eq!((m.channels, m.height, m.width), (1, img.height, img.width));
        assert_eq!(m.pixels.len(), m.height * m.width);
    }
});
