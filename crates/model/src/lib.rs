//! The Multiscale Deep Equilibrium Model (Bai, Koltun, Kolter, NeurIPS 2020), numerically faithful
//! to the official MDEQ-Vision code. `docs/reference.md` describes the reference behaviour.

pub mod cell;
pub mod compute;
pub mod config;
pub mod equilibrium;
pub mod head;
pub mod mdeq;
pub mod nn;
pub mod params;
pub mod state;
pub mod stem;

pub use compute::{Compute, DeviceSpec, HOST};
pub use config::{ModelConfig, Task};
pub use mdeq::Mdeq;
pub use params::ParamStore;
pub use state::StateLayout;
