//! Official yacs YAML files: pre-check, parse, validation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mdeq_recipe::official_yaml::from_yaml_str(text, "fuzz");
    }
});
