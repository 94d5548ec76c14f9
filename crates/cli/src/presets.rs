//! `mdeq presets`: the built-in presets named after the official experiments.

use anyhow::Result;
use mdeq_recipe::presets::{preset_or_error, PRESETS};

/// Prints each preset with its branch widths.
pub fn run() -> Result<()> {
    for (name, _) in PRESETS {
        let cfg = preset_or_error(name)?;
        let widths: Vec<String> = cfg
            .model
            .num_channels
            .iter()
            .map(|c| c.to_string())
            .collect();
        println!("{name:<20} {}", widths.join("/"));
    }
    Ok(())
}
