//! Checkpoint import and our checkpoint format.
//!
//! - [`official`]: read official state dicts (zip `.pth`, legacy pickles, safetensors);
//! - [`pickle`]: the restricted pickle reader behind it (never executes code);
//! - [`import`]: key hygiene and strict validation against a model;
//! - [`format`]: our safetensors checkpoints with the config embedded, written atomically.

pub mod error;
pub mod format;
pub mod import;
pub mod official;
pub mod pickle;

pub use error::{CheckpointError, KeyReport};
pub use official::{read_state_dict, StateDict};
