//! Training and evaluation: losses, metrics, the official optimizers and schedules, and a
//! resumable training loop with metrics, TensorBoard events and plots.

pub mod data;
pub mod distribution;
pub mod evaluate;
pub mod loss;
pub mod metrics;
pub mod optimizer;
pub mod plots;
pub mod run_log;
pub mod schedule;
pub mod step;
pub mod tensorboard;
pub mod trainer;

pub use trainer::{train, TrainOptions, TrainSummary};
