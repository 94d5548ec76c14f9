//! Competing load for `mdeq bench --busy N`: N processes that spin on a core each for as long as
//! the bench runs, so that a figure (ours and PyTorch's alike) is measured on a machine whose cores
//! are shared, as when an evaluation runs beside a training run.

use anyhow::{Context, Result};
use std::process::{Child, Command, Stdio};

/// The hidden subcommand a busy process runs.
pub const BUSY_LOOP_COMMAND: &str = "busy-loop";

/// Busy processes, stopped when dropped.
pub struct BusyLoad {
    children: Vec<Child>,
}

impl BusyLoad {
    /// Starts `n` busy processes (copies of this executable in [`BUSY_LOOP_COMMAND`] mode).
    pub fn start(n: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("finding this executable to start busy loops")?;
        let mut load = Self {
            children: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let child = Command::new(&exe)
                .arg(BUSY_LOOP_COMMAND)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting a busy loop ({})", exe.display()))?;
            load.children.push(child);
        }
        Ok(load)
    }
}

impl Drop for BusyLoad {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spins one core until killed.
pub fn spin_forever() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}
