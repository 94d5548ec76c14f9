//! Generators of hostile and corrupt input files, one per class of attack or accident the
//! readers must refuse: the library tests check each reader on them, the CLI tests run them
//! through the commands a user would.

use std::io::{Read, Write};

/// PROTO 2, `body`, STOP.
pub fn pickle(body: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend_from_slice(body);
    p.push(b'.');
    p
}

/// `None` wrapped in `levels` TUPLE1s: one nesting level per byte.
pub fn deep_tuples(levels: usize) -> Vec<u8> {
    let mut body = vec![b'N'];
    body.extend(std::iter::repeat_n(0x85, levels));
    pickle(&body)
}

/// One 1 MiB string, memoized, fetched `copies` times into a list (memo amplification).
pub fn memo_bomb(copies: usize) -> Vec<u8> {
    let mut body = vec![b'(', b'X'];
    body.extend((1u32 << 20).to_le_bytes());
    body.extend(std::iter::repeat_n(b'x', 1 << 20));
    body.extend([b'q', 0]);
    for _ in 0..copies {
        body.extend([b'h', 0]);
    }
    body.push(b'l');
    pickle(&body)
}

/// "Billion laughs": each of `levels` lists holds ten memo copies of the one below (< 600
/// bytes for 12 levels, 10^12 nodes if copied).
pub fn billion_laughs(levels: u8) -> Vec<u8> {
    let mut body = vec![b']', b'q', 0];
    for level in 1..=levels {
        body.push(b'(');
        for _ in 0..10 {
            body.extend([b'h', level - 1]);
        }
        body.extend([b'l', b'q', level]);
    }
    pickle(&body)
}

/// A legacy (pre-1.6) torch file holding `{"w": tensor}`, the tensor a view with `shape` and
/// `stride` of a one-element float storage holding 1.5.
pub fn legacy_view(shape: &[u64], stride: &[u64]) -> Vec<u8> {
    let mut f = Vec::new();
    // The legacy magic number as LONG1, the protocol version 1001, an empty sys-info dict.
    let mut magic = vec![0x8a, 10];
    magic.extend([0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]);
    f.extend(pickle(&magic));
    f.extend(pickle(&[b'M', 0xe9, 0x03]));
    f.extend(pickle(b"}"));
    // LONG1 with 8 bytes: any non-negative i64.
    let tuple = |xs: &[u64]| -> Vec<u8> {
        let mut t = vec![b'('];
        for &x in xs {
            t.extend([0x8a, 8]);
            t.extend(x.to_le_bytes());
        }
        t.push(b't');
        t
    };
    let mut body = b"}X\x01\x00\x00\x00w".to_vec();
    body.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    body.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01NtQ");
    body.extend([b'K', 0]);
    body.extend(tuple(shape));
    body.extend(tuple(stride));
    body.extend(b"\x89}tRs");
    f.extend(pickle(&body));
    f.extend(pickle(b"(X\x01\x00\x00\x000l"));
    f.extend(1u64.to_le_bytes());
    f.extend(1.5f32.to_le_bytes());
    f
}

/// A copy of the zip archive `src` whose entry ending in `entry_suffix` is replaced by `mib`
/// MiB of deflated zeros (about 1 KB on disk per MiB).
pub fn zip_with_bomb(src: &[u8], entry_suffix: &str, mib: usize) -> crate::Result<Vec<u8>> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(src))?;
    let mut out = Vec::new();
    {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(&mut out));
        let deflate = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for i in 0..archive.len() {
            let mut entry = archive.by_index(i)?;
            let name = entry.name()?.to_string();
            w.start_file(&name, deflate)?;
            if name.ends_with(entry_suffix) {
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..mib {
                    w.write_all(&zeros)?;
                }
            } else {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes)?;
                w.write_all(&bytes)?;
            }
        }
        w.finish()?;
    }
    Ok(out)
}

/// A gzipped IDX image file whose header claims `n` images of 8×8 and whose payload is those
/// images followed by `extra_mib` MiB of zeros.
pub fn gz_idx_bomb(n: u32, extra_mib: usize) -> crate::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&[0, 0, 8, 3])?;
    for d in [n, 8, 8] {
        gz.write_all(&d.to_be_bytes())?;
    }
    gz.write_all(&vec![7u8; n as usize * 64])?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..extra_mib {
        gz.write_all(&zeros)?;
    }
    Ok(gz.finish()?)
}

/// An official-style YAML whose one value is `depth` nested flow sequences.
pub fn deep_yaml(depth: usize) -> String {
    format!("A: {}{}\n", "[".repeat(depth), "]".repeat(depth))
}
