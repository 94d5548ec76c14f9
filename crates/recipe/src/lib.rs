//! The experiment config of an MDEQ run — model, equilibrium solver, training recipe, data —
//! typed and validated end to end.
//!
//! Our own files are TOML and strict (unknown keys are errors); the official yacs YAML files are
//! read by [`official_yaml`]; named presets of the official experiments live in [`presets`].

pub mod data;
pub mod deq;
pub mod official_yaml;
pub mod presets;
pub mod train;

pub use data::DataConfig;
pub use deq::DeqConfig;
pub use mdeq_deq::{BackwardMode, Coupling, SolverKind, StopMode};
pub use mdeq_model::config::{
    ClassificationHeadConfig, InvalidModelConfig, ModelConfig, SegmentationHeadConfig, Task,
};
pub use train::{BatchNormStatistics, LrSchedule, OptimizerKind, TrainConfig};

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The largest config file read (ours and the official ones are a few KB).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Errors raised while reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("invalid TOML config {path}: {message}")]
    Toml { path: String, message: String },
    #[error("invalid YAML config {path}: {message}")]
    Yaml { path: String, message: String },
    #[error("config {path}: key {key}: {message}")]
    Key {
        path: String,
        key: String,
        message: String,
    },
    #[error("invalid config {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("unknown preset '{0}'; known presets: {1}")]
    UnknownPreset(String, String),
}

/// A whole experiment: model, equilibrium solver, training recipe, data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Experiment name (the preset name for presets).
    pub name: String,
    /// Architecture.
    pub model: ModelConfig,
    /// Solver settings.
    #[serde(default)]
    pub deq: DeqConfig,
    /// Training recipe.
    #[serde(default)]
    pub train: TrainConfig,
    /// Data.
    pub data: DataConfig,
}

impl ExperimentConfig {
    /// Parses and validates our TOML format.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: ExperimentConfig = toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        cfg.validate_in(origin)?;
        Ok(cfg)
    }

    /// Serialises to our TOML format.
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises to TOML")
    }

    /// Loads a config from a `.toml` file, an official `.yaml`/`.yml` file, or a preset name.
    pub fn load(spec: &str) -> Result<Self, ConfigError> {
        let path = Path::new(spec);
        if !path.exists() {
            if let Some(cfg) = presets::preset(spec) {
                return cfg;
            }
        }
        let io = |source| ConfigError::Io {
            path: spec.to_string(),
            cause: source,
        };
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(
                std::fs::File::open(path).map_err(io)?,
                MAX_CONFIG_BYTES as u64 + 1,
            ),
            &mut text,
        )
        .map_err(io)?;
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid {
                path: spec.to_string(),
                message: format!("more than {MAX_CONFIG_BYTES} bytes; not a config file"),
            });
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml") | Some("yml") => official_yaml::from_yaml_str(&text, spec),
            _ => Self::from_toml_str(&text, spec),
        }
    }

    /// Validates every component; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        self.model.validate().map_err(|e| e.to_string())?;
        self.deq.validate()?;
        self.train.validate()
    }

    /// [`Self::validate`], the error naming `origin` (the file the config came from).
    pub fn validate_in(&self, origin: &str) -> Result<(), ConfigError> {
        self.validate().map_err(|message| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        })
    }
}
