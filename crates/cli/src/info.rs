//! `mdeq info`: architecture summary, parameter counts and solver state size.

use anyhow::{Context, Result};
use candle_core::DType;
use mdeq_checkpoint::format;
use mdeq_model::{Mdeq, Task, HOST};
use mdeq_recipe::ExperimentConfig;
use std::fmt::Write;

/// Flags of `mdeq info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A TOML config, an official YAML, a preset name (e.g. cifar-tiny) or an mdeq checkpoint.
    pub target: String,
}

/// Prints the summary of `args.target`.
pub fn run(args: Args) -> Result<()> {
    let target = &args.target;
    let cfg = if target.ends_with(".safetensors") && std::path::Path::new(target).exists() {
        let bytes = std::fs::read(target).with_context(|| format!("reading {target}"))?;
        format::read_config(&bytes, target)?
    } else {
        ExperimentConfig::load(target)?
    };
    // Built in host memory to count what it holds; nothing is computed.
    let model = Mdeq::new(&cfg.model, DType::F32, &HOST, 0)?;
    print!("{}", summary(&cfg, &model));
    Ok(())
}

/// Parameter counts of a built model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    /// All trainable scalars.
    pub total: usize,
    /// Trainable scalars inside f (`fullstage.*`).
    pub in_cell: usize,
}

/// Counts the trainable parameters of `model`.
pub fn counts(model: &Mdeq) -> Counts {
    let mut c = Counts {
        total: 0,
        in_cell: 0,
    };
    for e in model.store().parameters() {
        c.total += e.var.elem_count();
        if e.name.starts_with("fullstage.") {
            c.in_cell += e.var.elem_count();
        }
    }
    c
}

/// A human-readable summary of a config and its model.
pub fn summary(cfg: &ExperimentConfig, model: &Mdeq) -> String {
    let m = &cfg.model;
    let c = counts(model);
    let [h, w] = m.image_size;
    let mut s = String::new();
    let _ = writeln!(s, "experiment        {}", cfg.name);
    let _ = writeln!(
        s,
        "task              {:?}, {} classes",
        m.task, m.num_classes
    );
    let _ = writeln!(
        s,
        "input             {}x{}x{} (H x W x C)",
        h, w, m.in_channels
    );
    let _ = writeln!(
        s,
        "stem              {} stride-2 stage(s), stage0 {}",
        m.downsample_times,
        if m.has_stage0() { "yes" } else { "no" }
    );
    let _ = writeln!(s, "branches          {}", m.num_branches());
    for (i, (c_i, (hh, ww))) in m.num_channels.iter().zip(m.branch_sizes(h, w)).enumerate() {
        let _ = writeln!(
            s,
            "  branch {i}        {c_i} channels at {hh}x{ww}, {} block(s), expansion {}",
            m.blocks_of(i),
            m.expansion_factor
        );
    }
    let _ = writeln!(
        s,
        "normalisation     GroupNorm {} groups (post-fuse {}), affine block/fuse/post = {}/{}/{}, weight norm {}",
        m.num_groups,
        (m.num_groups / 2).max(1),
        m.block_gn_affine,
        m.fuse_gn_affine,
        m.post_gn_affine,
        m.wnorm
    );
    let _ = writeln!(s, "dropout           {}", m.dropout);
    match m.task {
        Task::Classification => {
            let hd = m.classification_head.as_ref().expect("validated");
            let _ = writeln!(
                s,
                "head              classification, channels {:?}, final {}",
                hd.head_channels, hd.final_chansize
            );
        }
        Task::Segmentation => {
            let _ = writeln!(
                s,
                "head              segmentation, {} concatenated channels",
                m.num_channels.iter().sum::<usize>()
            );
        }
    }
    let _ = writeln!(
        s,
        "parameters        {} total, {} in f",
        group(c.total),
        group(c.in_cell)
    );
    let _ = writeln!(
        s,
        "state size D      {} per sample",
        group(m.state_size(h, w))
    );
    let _ = writeln!(
        s,
        "solver            forward {} ({} steps), backward {} ({} steps), stop {:?}, pretrain {} steps x {} layers",
        cfg.deq.f_solver, cfg.deq.f_thres, cfg.deq.b_solver, cfg.deq.b_thres, cfg.deq.stop_mode, cfg.deq.pretrain_steps, m.num_layers
    );
    s
}

/// 1234567 → "1,234,567".
pub fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
