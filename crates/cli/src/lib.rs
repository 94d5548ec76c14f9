//! The `mdeq` command-line tool's commands, as a library so tests can drive them.

pub mod bench;
pub mod eval;
pub mod info;
pub mod parity;
pub mod predict;
