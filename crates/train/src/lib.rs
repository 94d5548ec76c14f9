//! Training and evaluation: the official optimizers and schedule, and a resumable training loop.

pub mod evaluate;
pub mod optimizer;
pub mod schedule;
pub mod trainer;

pub use trainer::{train, TrainOptions, TrainSummary};
