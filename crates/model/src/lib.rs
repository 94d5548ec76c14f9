//! The Multiscale Deep Equilibrium Model (Bai, Koltun, Kolter, NeurIPS 2020), numerically faithful
//! to the official MDEQ-Vision code. See `shared/docs/mdeq-spec.md` for the reference behaviour.

pub mod cell;
pub mod config;
pub mod equilibrium;
pub mod head;
pub mod mdeq;
pub mod nn;
pub mod params;
pub mod state;
pub mod stem;

pub use config::{ExperimentConfig, ModelConfig, Task};
pub use mdeq::Mdeq;
pub use params::ParamStore;
pub use state::StateLayout;
