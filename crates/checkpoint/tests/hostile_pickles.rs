//! Pickles and archives built to crash or exhaust the reader (`mdeq_testkit::hostile`): every
//! one is refused with an error, quickly and within memory, instead of overflowing the stack,
//! copying gigabytes or inflating everything.

use mdeq_checkpoint::official::read_state_dict_bytes;
use mdeq_checkpoint::pickle::{load, MAX_DEPTH};
use mdeq_checkpoint::read_state_dict;
use mdeq_testkit::error_text;
use mdeq_testkit::hostile::{
    billion_laughs, deep_tuples, legacy_view, memo_bomb, pickle, zip_with_bomb,
};

fn refusal(bytes: &[u8]) -> mdeq_testkit::Result<String> {
    let what = format!("a hostile pickle of {} bytes", bytes.len());
    error_text(&what, load(bytes, &mut 0))
}

#[test]
fn nesting_one_level_per_byte_is_refused_at_the_depth_limit() -> mdeq_testkit::Result {
    // Two hundred thousand nested TUPLE1s: dropping such a value recursed once per level and
    // overflowed the stack.
    let err = refusal(&deep_tuples(200_000))?;
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
    assert!(load(&deep_tuples(MAX_DEPTH), &mut 0).is_ok());
    Ok(())
}

#[test]
fn memo_amplification_is_refused() -> mdeq_testkit::Result {
    // 20,000 copies of a 1 MiB string: 20 GB from 1.1 MB.
    let err = refusal(&memo_bomb(20_000))?;
    assert!(err.contains("memo amplification"), "{err}");
    let laughs = billion_laughs(12);
    assert!(laughs.len() < 600, "{} bytes", laughs.len());
    let err = refusal(&laughs)?;
    assert!(err.contains("memo amplification"), "{err}");
    Ok(())
}

#[test]
fn a_hostile_legacy_file_is_an_error_naming_it() -> mdeq_testkit::Result {
    let dir = mdeq_testkit::scratch_dir("hostile-pickle")?;
    let path = dir.join("deep.pth");
    std::fs::write(&path, deep_tuples(200_000))?;
    let err = error_text("deep.pth", read_state_dict(&path.display().to_string()))?;
    assert!(
        err.contains("deep.pth") && err.contains("nested deeper"),
        "{err}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn tensor_views_larger_than_their_storage_are_refused() -> mdeq_testkit::Result {
    // The honest one-element tensor loads.
    let ok = read_state_dict_bytes(&legacy_view(&[1], &[1]), "one.pth")?;
    assert_eq!(ok[0].1.flatten_all()?.to_vec1::<f32>()?, vec![1.5]);
    // A stride-0 view of 2^31 elements of that storage (8.6 GB as float32; 77 s before).
    let wide = read_state_dict_bytes(&legacy_view(&[1 << 16, 1 << 15], &[0, 0]), "wide.pth");
    let err = error_text("a stride-0 view", wide)?;
    assert!(
        err.contains("wide.pth") && err.contains("more than its storage"),
        "{err}"
    );
    // Shapes whose element count overflows 64 bits: refused, not wrapped.
    let huge = legacy_view(&[1 << 32, 1 << 32, 1 << 32], &[0, 0, 0]);
    let err = error_text(
        "an overflowing shape",
        read_state_dict_bytes(&huge, "huge.pth"),
    )?;
    assert!(
        err.contains("huge.pth") && err.contains("overflows"),
        "{err}"
    );
    Ok(())
}

#[test]
fn zip_entries_are_inflated_only_to_what_they_must_hold() -> mdeq_testkit::Result {
    // The official zip fixture with one storage replaced by 64 MiB of deflated zeros: the
    // reader stops a byte past the storage's 2,592 bytes.
    let src = std::fs::read(mdeq_testkit::fixture("cls-tiny/state_dict.pth"))?;
    let bomb = zip_with_bomb(&src, "data/0", 64)?;
    assert!(
        bomb.len() < 1 << 20,
        "the archive is small: {} bytes",
        bomb.len()
    );
    let err = error_text("a zip bomb", read_state_dict_bytes(&bomb, "bomb.pth"))?;
    assert!(
        err.contains("bomb.pth")
            && err.contains("data/0")
            && err.contains("more than the 2592 bytes"),
        "{err}"
    );
    Ok(())
}
