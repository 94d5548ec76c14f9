//! The `[train]` section: optimizer, schedule, epochs, batch, augmentation and the Jacobian
//! regularisation schedule (reference §4.5, §5).

use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Cosine annealing to 1e-6 (classification).
    Cosine,
    /// lr·(1 − t/T)^0.9 (the released Cityscapes models, reference §5.4).
    Poly,
}

/// Where BatchNorm takes its train-mode statistics when a batch is split (over the ranks of a
/// data-parallel job, or into micro-batches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchNormStatistics {
    /// Over every rank's rows together (synchronised BatchNorm): the run does not depend on the
    /// number of ranks.
    Global,
    /// Over each rank's own rows, as the official code's DataParallel replicas do.
    PerReplica,
}

/// Training recipe. Missing keys take [`TrainConfig::default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Initial learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub lr_schedule: LrSchedule,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD Nesterov flag.
    pub nesterov: bool,
    /// Training epochs.
    pub epochs: usize,
    /// Total batch size (all official GPUs together).
    pub batch_size: usize,
    /// Training-time augmentation.
    pub augment: bool,
    /// Label smoothing ε of the training loss, in [0, 1): the target puts 1 − ε on the label
    /// and ε spread evenly over the classes (evaluation always scores the plain prediction).
    pub label_smoothing: f64,
    /// Jacobian regularisation weight.
    pub jac_loss_weight: f64,
    /// Probability of computing the Jacobian loss on an iteration.
    pub jac_loss_freq: f64,
    /// Jacobian loss weight while pretraining.
    pub pretrain_jac_loss_weight: f64,
    /// Steps between +0.1 increments of the Jacobian loss weight.
    pub jac_incremental: u64,
    /// Epoch after which the Jacobian loss is off.
    pub jac_stop_epoch: u64,
    /// Finite-difference step of the Jacobian-vector products of the Jacobian loss (ours: the
    /// official estimator needs double backward).
    pub jac_fd_step: f64,
    /// BatchNorm statistics of a batch split over ranks.
    pub batch_norm: BatchNormStatistics,
    /// Micro-batches per optimizer step: each rank's rows are processed in this many equal parts
    /// whose gradients are averaged (the memory of a smaller batch, the update of the whole;
    /// BatchNorm statistics per part).
    pub micro_batches: usize,
}

impl Default for TrainConfig {
    /// Adam at 1e-3 with cosine decay, 140 epochs of 32 (the official defaults), no weight
    /// decay, momentum, augmentation or label smoothing, no Jacobian loss, one micro-batch, and BatchNorm over
    /// the global batch.
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::Adam,
            lr: 1e-3,
            lr_schedule: LrSchedule::Cosine,
            weight_decay: 0.0,
            momentum: 0.0,
            nesterov: false,
            epochs: 140,
            batch_size: 32,
            augment: false,
            label_smoothing: 0.0,
            jac_loss_weight: 0.0,
            jac_loss_freq: 0.0,
            pretrain_jac_loss_weight: 0.0,
            jac_incremental: 100_000_000,
            jac_stop_epoch: 100_000_000,
            jac_fd_step: 1e-3,
            batch_norm: BatchNormStatistics::Global,
            micro_batches: 1,
        }
    }
}

impl TrainConfig {
    /// Checks every setting; the message names the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        let finite_non_negative = [
            ("weight_decay", self.weight_decay),
            ("momentum", self.momentum),
            ("jac_loss_weight", self.jac_loss_weight),
            ("pretrain_jac_loss_weight", self.pretrain_jac_loss_weight),
        ];
        for (key, value) in finite_non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!("train.{key} = {value} must be finite and ≥ 0"));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!(
                "train.lr = {} must be finite and positive",
                self.lr
            ));
        }
        if !(self.jac_fd_step.is_finite() && self.jac_fd_step > 0.0) {
            return Err(format!(
                "train.jac_fd_step = {} must be finite and positive",
                self.jac_fd_step
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(format!(
                "train.label_smoothing = {} must be in [0, 1)",
                self.label_smoothing
            ));
        }
        if !(0.0..=1.0).contains(&self.jac_loss_freq) {
            return Err(format!(
                "train.jac_loss_freq = {} must be in [0, 1]",
                self.jac_loss_freq
            ));
        }
        if self.micro_batches == 0 {
            return Err("train.micro_batches = 0 must be at least 1".into());
        }
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(format!(
                "train.epochs = {} and train.batch_size = {} must be positive",
                self.epochs, self.batch_size
            ));
        }
        Ok(())
    }
}
