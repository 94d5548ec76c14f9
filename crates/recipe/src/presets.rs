//! Presets named after the official MDEQ-Vision experiments (`configs/presets/*.toml`).

use crate::{ConfigError, ExperimentConfig};

/// (name, TOML text) of every built-in preset.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "cifar-tiny",
        include_str!("../../../configs/presets/cifar-tiny.toml"),
    ),
    (
        "cifar-large",
        include_str!("../../../configs/presets/cifar-large.toml"),
    ),
    (
        "cifar-large-reg",
        include_str!("../../../configs/presets/cifar-large-reg.toml"),
    ),
    (
        "imagenet-small",
        include_str!("../../../configs/presets/imagenet-small.toml"),
    ),
    (
        "imagenet-small-reg",
        include_str!("../../../configs/presets/imagenet-small-reg.toml"),
    ),
    (
        "imagenet-large",
        include_str!("../../../configs/presets/imagenet-large.toml"),
    ),
    (
        "imagenet-large-reg",
        include_str!("../../../configs/presets/imagenet-large-reg.toml"),
    ),
    (
        "imagenet-xl",
        include_str!("../../../configs/presets/imagenet-xl.toml"),
    ),
    (
        "cityscapes-small",
        include_str!("../../../configs/presets/cityscapes-small.toml"),
    ),
    (
        "cityscapes-large",
        include_str!("../../../configs/presets/cityscapes-large.toml"),
    ),
    (
        "cityscapes-xl",
        include_str!("../../../configs/presets/cityscapes-xl.toml"),
    ),
];

/// The preset called `name`, if there is one.
pub fn preset(name: &str) -> Option<Result<ExperimentConfig, ConfigError>> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, text)| ExperimentConfig::from_toml_str(text, &format!("preset {n}")))
}

/// The preset called `name`, or an error listing the known ones.
pub fn preset_or_error(name: &str) -> Result<ExperimentConfig, ConfigError> {
    preset(name).unwrap_or_else(|| {
        let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        Err(ConfigError::UnknownPreset(
            name.to_string(),
            known.join(", "),
        ))
    })
}
