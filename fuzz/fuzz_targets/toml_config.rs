//! Our TOML recipes: parsed and validated, model-size guard included.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = mdeq_recipe::ExperimentConfig::from_toml_str(text, "fuzz") {
            let _ = cfg.to_toml_string();
            let _ = cfg.deq.runtime();
        }
    }
});
