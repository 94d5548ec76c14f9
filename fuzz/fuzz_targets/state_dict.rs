//! State-dict files (torch zip, legacy pickle, safetensors), detected from their bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mdeq_checkpoint::official::read_state_dict_bytes(data, "fuzz");
});
