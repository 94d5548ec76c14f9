//! Our checkpoint format: safetensors holding the official state-dict keys, with the whole
//! experiment config embedded as metadata, so a checkpoint alone rebuilds the model. Writes are
//! atomic: a crash mid-write leaves the previous file intact.

use crate::error::CheckpointError;
use crate::import::load_into;
use crate::official::read_state_dict_bytes;
use candle_core::{DType, Device, Tensor};
use mdeq_model::params::all_finite;
use mdeq_model::{Mdeq, HOST};
use mdeq_recipe::ExperimentConfig;
use serde::{Deserialize, Serialize};
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
/// Metadata key holding a training checkpoint's [`TrainingState`] (JSON).
pub const TRAINING_STATE_KEY: &str = "mdeq.train_state";

/// Where a training run stood when it wrote a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingState {
    /// Optimizer steps taken (the next step's index).
    pub step: usize,
    /// The optimizer's own step count (Adam's bias correction).
    pub optimizer_steps: u64,
    /// Best evaluation score so far.
    pub best_score: f64,
}

/// What a training checkpoint holds beside the weights.
pub struct TrainingCheckpoint {
    /// Where the run stood.
    pub state: TrainingState,
    /// The optimizer's tensors, named with [`OPTIMIZER_PREFIX`].
    pub optimizer: Vec<(String, Tensor)>,
}

/// Writes `bytes` to `path` atomically: a fresh temporary file in the same directory (a random
/// name, created exclusively, so nobody can plant a file or a symlink for us to write through),
/// fsync, rename. Temporaries that dead processes left for the same target are removed first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    use std::hash::{BuildHasher, Hasher};
    let p = path.display().to_string();
    let io = |source| CheckpointError::Io {
        path: p.clone(),
        cause: source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| CheckpointError::format(&p, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let prefix = format!(".{name}.tmp-");
    remove_stale_temporaries(dir, &prefix);
    // RandomState is seeded from the OS per process: an unpredictable name.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let tmp = dir.join(format!("{prefix}{}-{random:016x}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
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

/// Removes `<dir>/<prefix><pid>-*` files whose process no longer runs (a `kill -9` during a
/// write leaves a model-sized temporary behind). Best effort: where process liveness cannot be
/// told (no /proc), nothing is removed.
fn remove_stale_temporaries(dir: &Path, prefix: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Serialises the model's state dict with `config` embedded, and the training state when given.
pub fn checkpoint_bytes(
    model: &Mdeq,
    config: &ExperimentConfig,
    training: Option<&TrainingCheckpoint>,
) -> Result<Vec<u8>, CheckpointError> {
    let mut metadata = HashMap::new();
    metadata.insert(CONFIG_KEY.to_string(), config.to_toml_string());
    metadata.insert(FORMAT_KEY.to_string(), FORMAT_VERSION.to_string());
    let mut tensors: Vec<(String, Tensor)> = model
        .store()
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.var.as_tensor().clone()))
        .collect();
    if let Some(t) = training {
        let state = serde_json::to_string(&t.state).expect("training state serialises");
        metadata.insert(TRAINING_STATE_KEY.to_string(), state);
        tensors.extend(t.optimizer.iter().cloned());
    }
    // A checkpoint never holds NaN or ∞: it would evaluate, resume and overwrite good ones.
    for (name, t) in &tensors {
        let finite = all_finite(t).map_err(|e| CheckpointError::format(name, e.to_string()))?;
        if !finite {
            return Err(CheckpointError::NonFinite(name.clone()));
        }
    }
    safetensors::tensor::serialize(tensors, Some(metadata))
        .map_err(|e| CheckpointError::format("<memory>", e.to_string()))
}

/// Saves a checkpoint atomically: the weights and config, and for training runs where they
/// stood (what `--resume` continues from).
pub fn save(
    path: &Path,
    model: &Mdeq,
    config: &ExperimentConfig,
    training: Option<&TrainingCheckpoint>,
) -> Result<(), CheckpointError> {
    let bytes = checkpoint_bytes(model, config, training).map_err(|e| match e {
        CheckpointError::NonFinite(_) => {
            CheckpointError::format(&path.display().to_string(), e.to_string())
        }
        other => other,
    })?;
    write_atomic(path, &bytes)
}

/// Loads a training checkpoint of the run `config` describes into `model` and returns where
/// the run stood, with the optimizer's tensors. A checkpoint that `mdeq train` did not write,
/// or that a different recipe wrote, is an error naming the file (and the settings that differ).
pub fn load_training(
    path: &Path,
    model: &Mdeq,
    config: &ExperimentConfig,
) -> Result<TrainingCheckpoint, CheckpointError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: p.clone(),
        cause: source,
    })?;
    let written_by = read_config(&bytes, &p)?;
    if written_by != *config {
        return Err(CheckpointError::format(
            &p,
            format!(
                "written by another recipe; resuming it with this one would mix two runs \
                 (settings in the checkpoint / in the recipe):\n{}",
                config_difference(&written_by, config)
            ),
        ));
    }
    let state = training_state(&bytes, &p)?.ok_or_else(|| {
        CheckpointError::format(&p, "no training state: not written by `mdeq train`")
    })?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &HOST)
        .map_err(|e| CheckpointError::format(&p, e.to_string()))?;
    let (optimizer, weights): (Vec<_>, Vec<_>) = tensors
        .into_iter()
        .partition(|(k, _)| k.starts_with(OPTIMIZER_PREFIX));
    load_into(model, weights, &p)?;
    Ok(TrainingCheckpoint { state, optimizer })
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
    let (config, model, _) = load_with_state(path, dtype, device)?;
    Ok((config, model))
}

/// [`load`], with where the training run stood when it wrote the checkpoint (None for an
/// imported one).
pub fn load_with_state(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(ExperimentConfig, Mdeq, Option<TrainingState>), CheckpointError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: p.clone(),
        cause: source,
    })?;
    let config = read_config(&bytes, &p)?;
    let model = Mdeq::new(&config.model, dtype, device, 0)
        .map_err(|e| CheckpointError::format(&p, e.to_string()))?;
    let weights = read_state_dict_bytes(&bytes, &p)?
        .into_iter()
        .filter(|(k, _)| !k.starts_with(OPTIMIZER_PREFIX))
        .collect();
    load_into(&model, weights, &p)?;
    let state = training_state(&bytes, &p)?;
    Ok((config, model, state))
}

/// The training state a checkpoint's metadata holds, if any.
fn training_state(bytes: &[u8], path: &str) -> Result<Option<TrainingState>, CheckpointError> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        CheckpointError::format(
            path,
            format!("not an mdeq checkpoint (invalid safetensors: {e})"),
        )
    })?;
    meta.metadata()
        .as_ref()
        .and_then(|m| m.get(TRAINING_STATE_KEY))
        .map(|text| {
            serde_json::from_str(text).map_err(|e| {
                CheckpointError::format(
                    path,
                    format!("training state ('{TRAINING_STATE_KEY}'): {e}"),
                )
            })
        })
        .transpose()
}

/// The TOML lines in which two configs differ, `-` for `a`'s and `+` for `b`'s.
fn config_difference(a: &ExperimentConfig, b: &ExperimentConfig) -> String {
    let (ta, tb) = (a.to_toml_string(), b.to_toml_string());
    let (la, lb): (Vec<&str>, Vec<&str>) = (ta.lines().collect(), tb.lines().collect());
    let mut out = String::new();
    for line in la.iter().filter(|l| !lb.contains(l)) {
        out.push_str(&format!("  - {line}\n"));
    }
    for line in lb.iter().filter(|l| !la.contains(l)) {
        out.push_str(&format!("  + {line}\n"));
    }
    out
}
