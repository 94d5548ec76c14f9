//! Our checkpoint format: the embedded config, and the model it describes when it is small
//! enough to build here (the model-size guard itself is what keeps larger ones out).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = mdeq_checkpoint::format::read_config(data, "fuzz") else {
        return;
    };
    if config.model.parameter_bound().is_some_and(|p| p < 200_000) {
        if let Ok(model) = mdeq_model::Mdeq::new(
            &config.model,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
            0,
        ) {
            if let Ok(weights) = mdeq_checkpoint::official::read_state_dict_bytes(data, "fuzz") {
                let _ = mdeq_checkpoint::import::load_into(&model, weights, "fuzz");
            }
        }
    }
});
