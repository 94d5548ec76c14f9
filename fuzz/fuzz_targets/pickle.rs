//! The restricted pickle reader on arbitrary bytes: errors are fine, panics, aborts and
//! runaway memory are not.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut pos = 0;
    while pos < data.len() {
        let before = pos;
        if mdeq_checkpoint::pickle::load(data, &mut pos).is_err() || pos == before {
            break;
        }
    }
});
