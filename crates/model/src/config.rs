//! Typed, validated configuration of an MDEQ experiment.
//!
//! Our own files are TOML and strict (unknown keys are errors); the official yacs YAML files are
//! read by [`official_yaml`]; named presets of the official experiments live in [`presets`].

pub mod official_yaml;
pub mod presets;

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Errors raised while reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
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
    #[error("invalid model config: {0}")]
    Invalid(String),
    #[error("unknown preset '{0}'; known presets: {1}")]
    UnknownPreset(String, String),
}

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Image classification (MDEQClsNet).
    Classification,
    /// Semantic segmentation (MDEQSegNet).
    Segmentation,
}

/// Architecture of the classification head (spec §2.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationHeadConfig {
    /// Bottleneck width h_i per branch; each incre module outputs 4·h_i channels.
    pub head_channels: Vec<usize>,
    /// Width of the final 1×1 layer before pooling.
    pub final_chansize: usize,
}

/// Architecture of the segmentation head (spec §2.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentationHeadConfig {
    /// Kernel size of the last convolution (1 in every official config).
    pub final_conv_kernel: usize,
}

/// The MDEQ architecture (spec §1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Classification or segmentation.
    pub task: Task,
    /// Channels C_i of each branch, highest resolution first; its length is the branch count n.
    pub num_channels: Vec<usize>,
    /// Residual blocks per branch (1 in every official config).
    #[serde(default)]
    pub num_blocks: Vec<usize>,
    /// 0: 3×3 convolutions; 1: conv1 is 5×5; 2: both are 5×5.
    #[serde(default)]
    pub big_kernels: Vec<usize>,
    /// Width multiplier E of the first convolution of each residual block.
    pub expansion_factor: usize,
    /// GroupNorm groups G (post-fuse layers use G/2).
    pub num_groups: usize,
    /// Stride-2 stages in the stem (0, 1 or 2).
    pub downsample_times: usize,
    /// Weight normalisation of the cell's block and post-fuse convolutions.
    #[serde(default = "default_true")]
    pub wnorm: bool,
    /// Variational dropout rate inside the cell.
    #[serde(default)]
    pub dropout: f64,
    /// Affine GroupNorms in the residual blocks.
    #[serde(default = "default_true")]
    pub block_gn_affine: bool,
    /// Affine GroupNorms in the fuse layers.
    #[serde(default = "default_true")]
    pub fuse_gn_affine: bool,
    /// Affine GroupNorms after fusion.
    #[serde(default = "default_true")]
    pub post_gn_affine: bool,
    /// Weight-tied unrolled applications of f during pretraining.
    pub num_layers: usize,
    /// Number of output classes.
    pub num_classes: usize,
    /// Input image size (height, width) the recipe trains at.
    pub image_size: [usize; 2],
    /// Input channels (3 for RGB, 1 for grey images).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// BatchNorm momentum; defaults to 0.1 (classification) or 0.01 (segmentation).
    #[serde(default)]
    pub bn_momentum: Option<f64>,
    /// Classification head; required when `task = "classification"`.
    #[serde(default)]
    pub classification_head: Option<ClassificationHeadConfig>,
    /// Segmentation head; required when `task = "segmentation"`.
    #[serde(default)]
    pub segmentation_head: Option<SegmentationHeadConfig>,
}

fn default_true() -> bool {
    true
}
fn default_in_channels() -> usize {
    3
}

impl ModelConfig {
    /// Number of branches (resolutions) n.
    pub fn num_branches(&self) -> usize {
        self.num_channels.len()
    }

    /// Residual blocks of branch `i`.
    pub fn blocks_of(&self, i: usize) -> usize {
        self.num_blocks.get(i).copied().unwrap_or(1)
    }

    /// Big-kernel level of branch `i`.
    pub fn big_kernel_of(&self, i: usize) -> usize {
        self.big_kernels.get(i).copied().unwrap_or(0)
    }

    /// The official stage0 presence rule (spec §1.2).
    pub fn has_stage0(&self) -> bool {
        !(self.downsample_times == 0 && self.num_branches() <= 2)
    }

    /// BatchNorm momentum in PyTorch's convention.
    pub fn bn_momentum(&self) -> f64 {
        self.bn_momentum.unwrap_or(match self.task {
            Task::Classification => 0.1,
            Task::Segmentation => 0.01,
        })
    }

    /// Spatial size (H_i, W_i) of every branch for an input of `height`×`width`.
    pub fn branch_sizes(&self, height: usize, width: usize) -> Vec<(usize, usize)> {
        let f = 1 << self.downsample_times;
        let (mut h, mut w) = (height.div_ceil(f), width.div_ceil(f));
        let mut sizes = Vec::with_capacity(self.num_branches());
        for _ in 0..self.num_branches() {
            sizes.push((h, w));
            h /= 2;
            w /= 2;
        }
        sizes
    }

    /// Solver state size D per sample for an input of `height`×`width` (spec §1.8).
    pub fn state_size(&self, height: usize, width: usize) -> usize {
        self.branch_sizes(height, width)
            .iter()
            .zip(&self.num_channels)
            .map(|((h, w), c)| c * h * w)
            .sum()
    }

    /// Checks that an input size is usable: each side divisible by 2^(DOWNSAMPLE_TIMES + n - 1).
    pub fn check_input_size(&self, height: usize, width: usize) -> Result<(), ConfigError> {
        let d = 1usize << (self.downsample_times + self.num_branches() - 1);
        if !height.is_multiple_of(d) || !width.is_multiple_of(d) || height == 0 || width == 0 {
            return Err(ConfigError::Invalid(format!(
                "input size {height}x{width} must be a non-zero multiple of {d} \
                 (2^(downsample_times + branches - 1)) on both sides"
            )));
        }
        Ok(())
    }

    /// Validates internal consistency; every error names the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = self.num_branches();
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if n == 0 {
            return bad("num_channels must list at least one branch".into());
        }
        if !self.num_blocks.is_empty() && self.num_blocks.len() != n {
            return bad(format!(
                "num_blocks has {} entries, expected {n}",
                self.num_blocks.len()
            ));
        }
        if self.num_blocks.contains(&0) {
            return bad("num_blocks entries must be at least 1".into());
        }
        if !self.big_kernels.is_empty() && self.big_kernels.len() != n {
            return bad(format!(
                "big_kernels has {} entries, expected {n}",
                self.big_kernels.len()
            ));
        }
        if self.big_kernels.iter().any(|&k| k > 2) {
            return bad("big_kernels entries must be 0, 1 or 2".into());
        }
        if self.num_groups == 0 || self.expansion_factor == 0 {
            return bad("num_groups and expansion_factor must be positive".into());
        }
        let post_groups = (self.num_groups / 2).max(1);
        for (i, &c) in self.num_channels.iter().enumerate() {
            if c == 0 || c % self.num_groups != 0 || c % post_groups != 0 {
                return bad(format!(
                    "num_channels[{i}] = {c} must be a positive multiple of num_groups = {}",
                    self.num_groups
                ));
            }
        }
        if self.downsample_times > 2 {
            return bad(format!(
                "downsample_times = {} is not supported (the official configs use 0..=2)",
                self.downsample_times
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout = {} must be in [0, 1)", self.dropout));
        }
        if self.num_classes == 0 || self.in_channels == 0 {
            return bad("num_classes and in_channels must be positive".into());
        }
        match self.task {
            Task::Classification => match &self.classification_head {
                None => {
                    return bad("task = classification needs [model.classification_head]".into())
                }
                Some(h) if h.head_channels.len() != n => {
                    return bad(format!(
                        "classification_head.head_channels has {} entries, expected {n}",
                        h.head_channels.len()
                    ))
                }
                Some(h) if h.head_channels.contains(&0) || h.final_chansize == 0 => {
                    return bad("classification head widths must be positive".into())
                }
                Some(_) => {}
            },
            Task::Segmentation => match &self.segmentation_head {
                None => return bad("task = segmentation needs [model.segmentation_head]".into()),
                Some(h) if h.final_conv_kernel % 2 == 0 => {
                    return bad("segmentation_head.final_conv_kernel must be odd".into())
                }
                Some(_) => {}
            },
        }
        Ok(())
    }
}

pub use mdeq_deq::{BackwardMode, Coupling, StopMode};

/// Equilibrium settings of an experiment (spec §3–4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeqConfig {
    /// Forward solver name (`broyden`, `anderson`, `fixed_point`).
    #[serde(default = "default_solver")]
    pub f_solver: String,
    /// Backward solver name.
    #[serde(default = "default_solver")]
    pub b_solver: String,
    /// Forward solver step limit (F_THRES).
    pub f_thres: usize,
    /// Backward solver step limit (B_THRES).
    pub b_thres: usize,
    /// Stopping criterion.
    pub stop_mode: StopMode,
    /// Solver tolerance (the official code uses 1e-3 in both directions).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Optimizer steps spent in unrolled pretraining before DEQ mode.
    #[serde(default)]
    pub pretrain_steps: usize,
    /// Random F_THRES jitter on Jacobian-loss iterations.
    #[serde(default)]
    pub rand_f_thres_delta: usize,
    /// Per-sample norms with freezing (default), or the official whole-batch norms.
    #[serde(default = "default_coupling")]
    pub coupling: Coupling,
    /// How gradients reach the parameters in DEQ mode.
    #[serde(default = "default_backward")]
    pub backward: BackwardMode,
    /// Solvers tried, in order, on samples the forward solver left unconverged.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// Cap on Broyden's stored (u, v) pairs (None: the threshold, as the official code).
    #[serde(default)]
    pub max_history_pairs: Option<usize>,
    /// With per-sample coupling, evaluate f only on the samples not yet converged (on by
    /// default; off evaluates the whole batch at every step, for comparison).
    #[serde(default = "default_compact_batch")]
    pub compact_batch: bool,
}

fn default_compact_batch() -> bool {
    true
}

fn default_coupling() -> Coupling {
    Coupling::PerSample
}
fn default_backward() -> BackwardMode {
    BackwardMode::Ift
}

fn default_solver() -> String {
    "broyden".into()
}
fn default_eps() -> f64 {
    1e-3
}

/// Optimizer family of a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Adam with L2 weight decay added to the gradient.
    Adam,
    /// SGD with momentum (optionally Nesterov).
    Sgd,
}

/// Learning-rate schedule, stepped every iteration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Cosine annealing to 1e-6 (classification).
    #[default]
    Cosine,
    /// lr·(1 − t/T)^0.9 (the released Cityscapes models, spec §5.4).
    Poly,
}

/// Training recipe (spec §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Initial learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// L2 weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// SGD momentum.
    #[serde(default)]
    pub momentum: f64,
    /// SGD Nesterov flag.
    #[serde(default)]
    pub nesterov: bool,
    /// Training epochs.
    pub epochs: usize,
    /// Total batch size (all official GPUs together).
    pub batch_size: usize,
    /// Training-time augmentation.
    #[serde(default)]
    pub augment: bool,
    /// Jacobian regularisation weight.
    #[serde(default)]
    pub jac_loss_weight: f64,
    /// Probability of computing the Jacobian loss on an iteration.
    #[serde(default)]
    pub jac_loss_freq: f64,
    /// Jacobian loss weight while pretraining.
    #[serde(default)]
    pub pretrain_jac_loss_weight: f64,
    /// Steps between +0.1 increments of the Jacobian loss weight.
    #[serde(default = "default_jac_big")]
    pub jac_incremental: u64,
    /// Epoch after which the Jacobian loss is off.
    #[serde(default = "default_jac_big")]
    pub jac_stop_epoch: u64,
    /// Finite-difference step of the Jacobian-vector products of the Jacobian loss (ours: the
    /// official estimator needs double backward).
    #[serde(default = "default_jac_fd_step")]
    pub jac_fd_step: f64,
}

fn default_jac_fd_step() -> f64 {
    1e-3
}

fn default_jac_big() -> u64 {
    100_000_000
}

/// Dataset named by a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset kind (`cifar10`, `imagenet`, `cityscapes`, `fashion_mnist`, ...).
    pub dataset: String,
    /// Default root directory.
    #[serde(default)]
    pub root: String,
    /// Evaluation resolution [height, width] (default: each image's own size, e.g. full
    /// 1024×2048 Cityscapes frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_size: Option<[usize; 2]>,
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
    pub deq: DeqConfig,
    /// Training recipe.
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
        cfg.validate()?;
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: spec.to_string(),
            source,
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml") | Some("yml") => official_yaml::from_yaml_str(&text, spec),
            _ => Self::from_toml_str(&text, spec),
        }
    }

    /// Validates every component.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        for (what, name) in [
            ("f_solver", &self.deq.f_solver),
            ("b_solver", &self.deq.b_solver),
        ] {
            if !["broyden", "anderson", "fixed_point"].contains(&name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "deq.{what} = '{name}' is not one of broyden, anderson, fixed_point"
                )));
            }
        }
        Ok(())
    }
}
