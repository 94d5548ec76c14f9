//! The `mdeq` command-line tool's commands, one module each (its flags and its `run`), as a
//! library so tests can drive them.

pub mod bench;
pub mod compute;
pub mod eval;
pub mod import;
pub mod info;
pub mod parity;
pub mod predict;
pub mod presets;
pub mod train;
