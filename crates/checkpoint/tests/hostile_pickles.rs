//! Pickles built to crash or exhaust the reader: every one is refused with an error, quickly
//! and within memory, instead of overflowing the stack or copying gigabytes.

use mdeq_checkpoint::pickle::{load, MAX_DEPTH};
use mdeq_checkpoint::read_state_dict;

/// PROTO 2, `body`, STOP.
fn pickle(body: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend_from_slice(body);
    p.push(b'.');
    p
}

fn refusal(bytes: &[u8]) -> mdeq_testkit::Result<String> {
    let what = format!("a hostile pickle of {} bytes", bytes.len());
    mdeq_testkit::error_text(&what, load(bytes, &mut 0))
}

#[test]
fn nesting_one_level_per_byte_is_refused_at_the_depth_limit() -> mdeq_testkit::Result {
    // None wrapped in TUPLE1 two hundred thousand times: dropping such a value recursed once per
    // level and overflowed the stack.
    let mut body = vec![b'N'];
    body.extend(std::iter::repeat_n(0x85, 200_000));
    let err = refusal(&pickle(&body))?;
    assert!(
        err.contains(&format!("nested deeper than {MAX_DEPTH}")),
        "{err}"
    );
    // Lists filled by APPEND nest the same way.
    let mut body = vec![b']'];
    for _ in 0..100_000 {
        body.extend([b']', 0x94]); // a fresh list, memoized (cheap: it is empty)
    }
    body.extend(std::iter::repeat_n(b'a', 100_000));
    let err = refusal(&pickle(&body))?;
    assert!(err.contains("nested deeper"), "{err}");
    // Nesting within the limit still loads.
    let mut body = vec![b'N'];
    body.extend(std::iter::repeat_n(0x85, MAX_DEPTH));
    assert!(load(&pickle(&body), &mut 0).is_ok());
    Ok(())
}

#[test]
fn memo_amplification_is_refused() -> mdeq_testkit::Result {
    // One 1 MiB string, memoized, then fetched 20,000 times: 20 GB of copies from 1.1 MB.
    let mut body = vec![b'('];
    body.push(b'X');
    body.extend((1u32 << 20).to_le_bytes());
    body.extend(std::iter::repeat_n(b'x', 1 << 20));
    body.extend([b'q', 0]);
    for _ in 0..20_000 {
        body.extend([b'h', 0]);
    }
    body.push(b'l');
    let err = refusal(&pickle(&body))?;
    assert!(err.contains("memo amplification"), "{err}");
    // "Billion laughs": each level a list of ten copies of the level below, memoized.
    let mut body = vec![b']', b'q', 0];
    for level in 1..=12u8 {
        body.push(b'(');
        for _ in 0..10 {
            body.extend([b'h', level - 1]);
        }
        body.extend([b'l', b'q', level]);
    }
    assert!(body.len() < 600, "{} bytes", body.len());
    let err = refusal(&pickle(&body))?;
    assert!(err.contains("memo amplification"), "{err}");
    Ok(())
}

#[test]
fn a_hostile_legacy_file_is_an_error_naming_it() -> mdeq_testkit::Result {
    let dir = mdeq_testkit::scratch_dir("hostile-pickle")?;
    let path = dir.join("deep.pth");
    let mut body = vec![b'N'];
    body.extend(std::iter::repeat_n(0x85, 200_000));
    std::fs::write(&path, pickle(&body))?;
    let err = read_state_dict(&path.display().to_string())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("deep.pth") && err.contains("nested deeper"),
        "{err}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn tensor_views_larger_than_their_storage_are_refused() -> mdeq_testkit::Result {
    use mdeq_checkpoint::official::read_state_dict_bytes;
    // A legacy-format file: magic, protocol, sys info, then a dict {"w": tensor} whose tensor
    // views a one-element float storage through `shape` and `stride`, then the storage.
    let legacy = |shape: &[u64], stride: &[u64]| -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(pickle(
            &[
                &[0x8a, 10][..],
                &[0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19],
            ]
            .concat(),
        ));
        f.extend(pickle(&[b'M', 0xe9, 0x03])); // 1001
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
        body.push(b'K');
        body.push(0);
        body.extend(tuple(shape));
        body.extend(tuple(stride));
        body.extend(b"\x89}tRs");
        f.extend(pickle(&body));
        f.extend(pickle(b"(X\x01\x00\x00\x000l"));
        f.extend(1u64.to_le_bytes());
        f.extend(1.5f32.to_le_bytes());
        f
    };
    // The honest one-element tensor loads.
    let ok = read_state_dict_bytes(&legacy(&[1], &[1]), "one.pth")?;
    assert_eq!(ok[0].1.flatten_all()?.to_vec1::<f32>()?, vec![1.5]);
    // A stride-0 view of 2^31 elements over that storage (8.6 GB as float32): refused.
    let err = read_state_dict_bytes(&legacy(&[1 << 16, 1 << 15], &[0, 0]), "wide.pth")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wide.pth") && err.contains("more than its storage"),
        "{err}"
    );
    // Shapes whose element count overflows 64 bits: refused, not wrapped.
    let err = read_state_dict_bytes(
        &legacy(&[1 << 32, 1 << 32, 1 << 32], &[0, 0, 0]),
        "huge.pth",
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("huge.pth") && err.contains("overflows"),
        "{err}"
    );
    Ok(())
}

#[test]
fn zip_entries_are_inflated_only_to_what_they_must_hold() -> mdeq_testkit::Result {
    use std::io::{Read, Write};
    // The official zip fixture with one storage entry replaced by 64 MiB of deflated zeros
    // (64 KB on disk): the reader stops a byte past the storage's 2,592 bytes.
    let src = std::fs::read(mdeq_testkit::fixture("cls-tiny/state_dict.pth"))?;
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
            if name.ends_with("data/0") {
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..64 {
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
    assert!(
        out.len() < 1 << 20,
        "the archive is small: {} bytes",
        out.len()
    );
    let err = mdeq_checkpoint::official::read_state_dict_bytes(&out, "bomb.pth")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bomb.pth")
            && err.contains("data/0")
            && err.contains("more than the 2592 bytes"),
        "{err}"
    );
    Ok(())
}
