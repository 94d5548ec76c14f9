//! Our checkpoint format: safetensors holding the official state-dict keys, with the whole
//! experiment config embedded as metadata, so a checkpoint alone rebuilds the model. Writes are
//! atomic: a crash mid-write leaves the previous file intact.

use crate::error::CheckpointError;
use crate::import::load_into;
use crate::official::read_state_dict_bytes;
use candle_core::{DType, Device, Tensor};
use mdeq_model::{ExperimentConfig, Mdeq};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Metadata key holding the TOML experiment config.
pub const CONFIG_KEY: &str = "mdeq.config";
/// Metadata key holding the format version.
pub const FORMAT_KEY: &str = "mdeq.format";
/// Prefix of the optimizer state that training checkpoints carry beside the weights.
pub const OPTIMIZER_PREFIX: &str = "optim.";
/// Current format version.
pub const FORMAT_VERSION: &str = "1";

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let p = path.display().to_string();
    let io = |source| CheckpointError::Io {
        path: p.clone(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| CheckpointError::format(&p, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Serialises the model's state dict with `config` embedded.
pub fn checkpoint_bytes(
    model: &Mdeq,
    config: &ExperimentConfig,
    extra: &HashMap<String, String>,
) -> Result<Vec<u8>, CheckpointError> {
    let mut metadata = extra.clone();
    metadata.insert(CONFIG_KEY.into(), config.to_toml_string());
    metadata.insert(FORMAT_KEY.into(), FORMAT_VERSION.into());
    let tensors: Vec<(String, Tensor)> = model
        .store()
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.var.as_tensor().clone()))
        .collect();
    safetensors::tensor::serialize(tensors, Some(metadata))
        .map_err(|e| CheckpointError::format("<memory>", e.to_string()))
}

/// Saves a checkpoint atomically.
pub fn save(path: &Path, model: &Mdeq, config: &ExperimentConfig) -> Result<(), CheckpointError> {
    write_atomic(path, &checkpoint_bytes(model, config, &HashMap::new())?)
}

/// Reads the embedded config of a checkpoint.
pub fn read_config(bytes: &[u8], path: &str) -> Result<ExperimentConfig, CheckpointError> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        CheckpointError::format(
            path,
            format!("not an mdeq checkpoint (invalid safetensors: {e})"),
        )
    })?;
    let md = meta.metadata().as_ref();
    let text = md
        .and_then(|m| m.get(CONFIG_KEY))
        .ok_or_else(|| CheckpointError::format(path, format!("no '{CONFIG_KEY}' metadata: not an mdeq checkpoint (use `mdeq import` for official files)")))?;
    ExperimentConfig::from_toml_str(text, &format!("{path} [{CONFIG_KEY}]"))
        .map_err(|e| CheckpointError::format(path, e.to_string()))
}

/// Loads a checkpoint: rebuilds the model from its embedded config and loads every tensor.
pub fn load(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(ExperimentConfig, Mdeq), CheckpointError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: p.clone(),
        source,
    })?;
    let config = read_config(&bytes, &p)?;
    let model = Mdeq::new(&config.model, dtype, device, 0)
        .map_err(|e| CheckpointError::format(&p, e.to_string()))?;
    let weights = read_state_dict_bytes(&bytes, &p)?
        .into_iter()
        .filter(|(k, _)| !k.starts_with(OPTIMIZER_PREFIX))
        .collect();
    load_into(&model, weights, &p)?;
    Ok((config, model))
}
