//! Presets, strict TOML, official YAML files and the parameter counts of reference §1.8.

use candle_core::{DType, Device};
use mdeq_model::Mdeq;
use mdeq_recipe::presets::{preset_or_error, PRESETS};
use mdeq_recipe::ExperimentConfig;
use mdeq_testkit::{fixture, fixture_str, Context};

/// Trainable parameters of every official config (reference §1.8, computed from the module structure).
const COUNTS: &[(&str, usize, usize)] = &[
    ("cifar-tiny", 158_890, 111_696),
    ("cifar-large", 11_097_438, 8_715_232),
    ("cifar-large-reg", 11_097_438, 8_715_232),
    ("imagenet-small", 16_808_936, 8_716_192),
    ("imagenet-small-reg", 18_613_496, 8_715_232),
    ("imagenet-large", 67_063_624, 54_422_800),
    ("imagenet-large-reg", 67_061_224, 54_420_400),
    ("imagenet-xl", 90_463_280, 77_699_952),
    ("cityscapes-small", 8_968_467, 8_716_192),
    ("cityscapes-large", 55_955_859, 54_422_800),
    ("cityscapes-xl", 79_551_755, 77_699_952),
];

#[test]
fn every_preset_has_the_official_parameter_count() -> mdeq_testkit::Result {
    assert_eq!(COUNTS.len(), PRESETS.len());
    for &(name, total, in_cell) in COUNTS {
        let cfg = preset_or_error(name)?;
        let model = Mdeq::new(&cfg.model, DType::F32, &Device::Cpu, 0)?;
        let cell: usize = model
            .store()
            .parameters()
            .filter(|e| e.name.starts_with("fullstage."))
            .map(|e| e.var.elem_count())
            .sum();
        assert_eq!(
            (model.store().parameter_count(), cell),
            (total, in_cell),
            "{name}"
        );
        // The bound checked before allocating is a true upper bound, and not a loose one.
        let bound = cfg.model.parameter_bound().context("bound")? as f64;
        let ratio = bound / total as f64;
        assert!(
            (1.0..6.0).contains(&ratio),
            "{name}: bound {bound} for {total}"
        );
    }
    Ok(())
}

#[test]
fn models_too_large_to_allocate_are_refused_before_anything_is_allocated() -> mdeq_testkit::Result {
    // A million channels per branch: about 10^14 parameters (the old behaviour was a 72 TB
    // allocation abort); 300 branches overflowed a shift.
    let text = PRESETS[0].1.replace(
        "num_channels = [24, 24]",
        "num_channels = [1000000, 1000000]",
    );
    let err = ExperimentConfig::from_toml_str(&text, "x.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("above the limit") && err.contains("MDEQ_MAX_PARAMETERS"),
        "{err}"
    );
    let many = vec!["24"; 300].join(", ");
    let text = PRESETS[0].1.replace(
        "num_channels = [24, 24]",
        &format!("num_channels = [{many}]"),
    );
    let err = ExperimentConfig::from_toml_str(&text, "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("300 branches"), "{err}");
    // Sizes whose bound overflows 64 bits are refused too.
    let text = PRESETS[0].1.replace(
        "num_channels = [24, 24]",
        "num_channels = [4294967296, 4294967296]",
    );
    let err = ExperimentConfig::from_toml_str(&text, "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than 2^64"), "{err}");
    Ok(())
}

#[test]
fn state_sizes_match_the_spec() -> mdeq_testkit::Result {
    let d = |n: &str, h: usize, w: usize| preset_or_error(n).unwrap().model.state_size(h, w);
    assert_eq!(d("cifar-tiny", 32, 32), 30_720);
    assert_eq!(d("cifar-large", 32, 32), 61_440);
    assert_eq!(d("imagenet-small", 224, 224), 188_160);
    assert_eq!(d("cityscapes-small", 512, 1024), 1_966_080);
    assert_eq!(d("cityscapes-small", 1024, 2048), 7_864_320);
    Ok(())
}

#[test]
fn presets_round_trip_through_toml() -> mdeq_testkit::Result {
    for (name, _) in PRESETS {
        let cfg = preset_or_error(name)?;
        let again = ExperimentConfig::from_toml_str(&cfg.to_toml_string(), name)?;
        assert_eq!(cfg, again, "{name}");
    }
    Ok(())
}

#[test]
fn unknown_toml_keys_are_errors_that_name_the_key() -> mdeq_testkit::Result {
    let text = PRESETS[0].1.replace(
        "expansion_factor = 5",
        "expansion_factor = 5\nexpansion_factr = 4",
    );
    let err = ExperimentConfig::from_toml_str(&text, "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("expansion_factr"), "{err}");
    Ok(())
}

#[test]
fn inconsistent_configs_are_rejected_with_the_field_named() -> mdeq_testkit::Result {
    let text = PRESETS[0]
        .1
        .replace("head_channels = [8, 16]", "head_channels = [8]");
    let err = ExperimentConfig::from_toml_str(&text, "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("head_channels"), "{err}");
    let text = PRESETS[0]
        .1
        .replace("num_channels = [24, 24]", "num_channels = [24, 20]");
    let err = ExperimentConfig::from_toml_str(&text, "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_channels[1]"), "{err}");
    Ok(())
}

#[test]
fn unknown_preset_lists_the_known_ones() -> mdeq_testkit::Result {
    let err = preset_or_error("cifar-huge").unwrap_err().to_string();
    assert!(
        err.contains("cifar-tiny") && err.contains("cityscapes-xl"),
        "{err}"
    );
    Ok(())
}

#[test]
fn official_yaml_fixtures_read_as_their_meta_says() -> mdeq_testkit::Result {
    for name in ["cls-tiny", "seg-tiny"] {
        let cfg = ExperimentConfig::load(&fixture_str(&format!("{name}/config.yaml")))?;
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(
            &format!("{name}/meta.json"),
        ))?)?;
        let m = &meta["config"];
        let usizes = |k: &str| {
            m[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect::<Vec<_>>()
        };
        assert_eq!(cfg.model.num_channels, usizes("num_channels"), "{name}");
        assert_eq!(
            cfg.model.num_groups as u64,
            m["num_groups"].as_u64().unwrap()
        );
        assert_eq!(
            cfg.model.expansion_factor as u64,
            m["expansion_factor"].as_u64().unwrap()
        );
        assert_eq!(
            cfg.model.downsample_times as u64,
            m["downsample_times"].as_u64().unwrap()
        );
        assert_eq!(
            cfg.model.post_gn_affine,
            m["post_gn_affine"].as_bool().unwrap()
        );
        assert_eq!(
            cfg.model.num_classes as u64,
            m["num_classes"].as_u64().unwrap()
        );
        assert_eq!(cfg.deq.f_thres as u64, m["yaml_f_thres"].as_u64().unwrap());
        assert_eq!(cfg.deq.b_thres as u64, m["yaml_b_thres"].as_u64().unwrap());
        assert_eq!(
            format!("{:?}", cfg.deq.stop_mode).to_lowercase(),
            m["stop_mode"].as_str().unwrap()
        );
    }
    Ok(())
}

#[test]
fn yaml_type_errors_name_the_key() -> mdeq_testkit::Result {
    let err =
        mdeq_recipe::official_yaml::from_yaml_str("MODEL:\n  NUM_GROUPS: eight\n", "bad.yaml")
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("MODEL.NUM_GROUPS") && err.contains("bad.yaml"),
        "{err}"
    );
    Ok(())
}

#[test]
fn yaml_too_deep_or_too_large_is_refused_before_parsing() -> mdeq_testkit::Result {
    use mdeq_recipe::official_yaml::{from_yaml_str, MAX_YAML_FLOW_DEPTH};
    // 100,000 nested flow sequences took the parser 43 s; the pre-check refuses them at once.
    let deep = format!("A: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let started = std::time::Instant::now();
    let err = from_yaml_str(&deep, "deep.yaml").unwrap_err().to_string();
    assert!(
        err.contains("deep.yaml") && err.contains("nested deeper"),
        "{err}"
    );
    assert!(
        started.elapsed().as_secs_f64() < 1.0,
        "{:?}",
        started.elapsed()
    );
    // Brackets inside quotes and comments do not count; real nesting within the limit parses.
    let fine = format!(
        "DATASET:\n  ROOT: '[[[['  # {}\nMODEL:\n  EXTRA:\n    FULL_STAGE:\n      NUM_CHANNELS: {}24, 24{}\n",
        "{".repeat(100),
        "[".repeat(MAX_YAML_FLOW_DEPTH),
        "]".repeat(MAX_YAML_FLOW_DEPTH)
    );
    let err = from_yaml_str(&fine, "fine.yaml")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(!err.contains("nested deeper"), "{err}");
    // Files above the size limit are not read whole.
    let dir = mdeq_testkit::scratch_dir("big-yaml")?;
    let big = dir.join("big.yaml");
    std::fs::write(&big, vec![b'#'; (1 << 20) + 10])?;
    let err = ExperimentConfig::load(&big.display().to_string())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("big.yaml") && err.contains("not a config file"),
        "{err}"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
