//! Image files decoded from untrusted bytes, for every loader and for `predict`.
//!
//! The decoders are third-party code that hostile files reach directly, and they have bugs of
//! their own: a 645-byte JPEG found by the `image` fuzz target makes zune-jpeg 0.5.15 (the
//! latest) unwrap a `None` in its AVX2 IDCT. A panic inside a decoder is therefore turned into an
//! error naming the file, and the panic's default report is kept off stderr for it, so that the
//! user sees one line about their file rather than a backtrace about a crate they never chose.
//! The decoders' own allocation limit (the `image` crate's default, 512 MiB) bounds what a
//! small file can make them allocate.

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

/// Decodes the image file at `path` (format guessed from its bytes); `what` names the kind of
/// file in errors ("image", "label map").
pub(crate) fn decode_file(path: &Path, what: &str) -> Result<image::DynamicImage, DataError> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path.display(), e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path.display(), e))?;
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
