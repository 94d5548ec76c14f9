//! Image files decoded from untrusted bytes, for every loader and for `predict`.
//!
//! The decoders are third-party code that hostile files reach directly, and they have bugs of
//! their own: a 645-byte JPEG found by the `image` fuzz target makes zune-jpeg 0.5.15 (the
//! latest) unwrap a `None` in its AVX2 IDCT. A panic inside a decoder is therefore turned into an
//! error naming the file, and the panic's default report is kept off stderr for it, so that the
//! user sees one line about their file rather than a backtrace about a crate they never chose.
//!
//! What a decoder may allocate is bounded by what the file can hold: deflate expands at most
//! 1032:1, and a JPEG's smallest 8×8 block costs about half a byte for 192 bytes of RGB, so no
//! genuine image decodes to more than about 1100 bytes per byte of file. A 4 KiB file that
//! claims 20,000 × 20,000 pixels is refused instead of making the decoder allocate 1.2 GB (the
//! `image` crate's default limit, 512 MiB, still caps everything).

use crate::DataError;
use std::cell::Cell;
use std::path::Path;
use std::sync::Once;

thread_local! {
    static IN_DECODER: Cell<bool> = const { Cell::new(false) };
}

/// Installs, once per process, a panic hook that stays silent for panics inside a decoder and
/// defers to the previous hook for everything else.
fn quiet_decoder_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_DECODER.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// The most a decoder may allocate for a file of `file_bytes`: [`EXPANSION`] per byte, at
/// least 16 MiB (headers and small images), at most 512 MiB.
pub(crate) fn max_decoded_bytes(file_bytes: u64) -> u64 {
    file_bytes
        .saturating_mul(EXPANSION)
        .clamp(16 << 20, 512 << 20)
}

/// Decoded bytes per file byte no genuine PNG or JPEG exceeds (see the module comment).
const EXPANSION: u64 = 1100;

/// Decodes the image file at `path` (format guessed from its bytes); `what` names the kind of
/// file in errors ("image", "label map").
pub(crate) fn decode_file(path: &Path, what: &str) -> Result<image::DynamicImage, DataError> {
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path.display(), e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path.display(), e))?;
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| DataError::io(path.display(), e))?
        .len();
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_decoded_bytes(file_bytes));
    reader.limits(limits);
    quiet_decoder_panics();
    IN_DECODER.with(|c| c.set(true));
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode()));
    IN_DECODER.with(|c| c.set(false));
    match decoded {
        Ok(Ok(img)) => Ok(img),
        Ok(Err(e)) => Err(DataError::format(
            path.display(),
            format!("cannot decode {what}: {e}"),
        )),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(DataError::format(
                path.display(),
                format!("cannot decode {what}: the decoder failed on this file ({why})"),
            ))
        }
    }
}
