//! The multiscale equilibrium cell f(z; x) (`fullstage` in the official code; reference §1.3).

pub mod fuse;
pub mod post_fuse;
pub mod residual_block;
pub mod solver_map;

use crate::config::ModelConfig;
use crate::params::ParamBuilder;
use candle_core::{Result, Tensor};
use fuse::FuseLayer;
use post_fuse::PostFuse;
use residual_block::{BlockShape, ResidualBlock};

/// The intermediate values of one cell application that [`MultiscaleCell::vjp`] reads.
#[derive(Debug, Clone, Default)]
pub struct CellTape {
    blocks: Vec<Vec<residual_block::BlockTape>>,
    fuse: Vec<Vec<Option<fuse::FuseTape>>>,
    post: Vec<(Tensor, Tensor)>,
}

/// Residual blocks per branch, fusion, post-fusion.
#[derive(Debug, Clone)]
pub struct MultiscaleCell {
    blocks: Vec<Vec<ResidualBlock>>,
    fuse: Vec<Vec<Option<FuseLayer>>>,
    post: Vec<PostFuse>,
}

impl MultiscaleCell {
    /// Registers `branches.*`, `fuse_layers.*`, `post_fuse_layers.*` under the builder's prefix.
    pub fn new(pb: &mut ParamBuilder, cfg: &ModelConfig) -> Result<Self> {
        let n = cfg.num_branches();
        let mut blocks = Vec::with_capacity(n);
        for (i, &c) in cfg.num_channels.iter().enumerate() {
            let shape = BlockShape {
                channels: c,
                expansion: cfg.expansion_factor,
                groups: cfg.num_groups,
                big_kernel: cfg.big_kernel_of(i),
                affine: cfg.block_gn_affine,
                wnorm: cfg.wnorm,
            };
            let mut branch = pb.pp(format!("branches.{i}.blocks"));
            blocks.push(
                (0..cfg.blocks_of(i))
                    .map(|b| ResidualBlock::new(&mut branch.pp(b), shape))
                    .collect::<Result<_>>()?,
            );
        }
        let mut fuse = Vec::new();
        let mut post = Vec::new();
        if n > 1 {
            for i in 0..n {
                let mut row = Vec::with_capacity(n);
                for j in 0..n {
                    row.push(if i == j {
                        None
                    } else {
                        let (ci, cj) = (cfg.num_channels[i], cfg.num_channels[j]);
                        Some(FuseLayer::new(
                            &mut pb.pp(format!("fuse_layers.{i}.{j}")),
                            i,
                            j,
                            ci,
                            cj,
                            cfg.num_groups,
                            cfg.fuse_gn_affine,
                        )?)
                    });
                }
                fuse.push(row);
            }
            for (i, &c) in cfg.num_channels.iter().enumerate() {
                post.push(PostFuse::new(
                    &mut pb.pp(format!("post_fuse_layers.{i}")),
                    c,
                    cfg.num_groups,
                    cfg.post_gn_affine,
                    cfg.wnorm,
                )?);
            }
        }
        Ok(Self { blocks, fuse, post })
    }

    /// Evaluation-ready copy: weight norm computed once; with `detach`, no tensor carries a graph
    /// back to the parameters (for solver iterations and VJPs that must not touch them).
    pub fn prepared(&self, detach: bool) -> Result<Self> {
        Ok(Self {
            blocks: self
                .blocks
                .iter()
                .map(|bs| bs.iter().map(|b| b.prepared(detach)).collect::<Result<_>>())
                .collect::<Result<_>>()?,
            fuse: self
                .fuse
                .iter()
                .map(|row| {
                    row.iter()
                        .map(|f| f.as_ref().map(|f| f.prepared(detach)))
                        .collect()
                })
                .collect(),
            post: self
                .post
                .iter()
                .map(|p| p.prepared(detach))
                .collect::<Result<_>>()?,
        })
    }

    /// f(z; x): `z` and `injection` hold one tensor per branch; `masks` holds the dropout mask of
    /// each branch (or `None`). Only the first block of a branch receives the injection.
    pub fn forward(
        &self,
        z: &[Tensor],
        injection: &[Tensor],
        masks: &[Option<Tensor>],
    ) -> Result<Vec<Tensor>> {
        Ok(self.forward_taped(z, injection, masks)?.0)
    }

    /// [`Self::forward`], also returning the tape [`Self::vjp`] reads.
    pub fn forward_taped(
        &self,
        z: &[Tensor],
        injection: &[Tensor],
        masks: &[Option<Tensor>],
    ) -> Result<(Vec<Tensor>, CellTape)> {
        let mut tape = CellTape::default();
        let mut b = Vec::with_capacity(z.len());
        for (i, blocks) in self.blocks.iter().enumerate() {
            let mut t = z[i].clone();
            let mut branch_tape = Vec::with_capacity(blocks.len());
            for (k, block) in blocks.iter().enumerate() {
                let inj = if k == 0 && i == 0 {
                    injection.first()
                } else {
                    None
                };
                // Branches ≥ 1 receive an all-zero injection; skipping the add changes nothing.
                let (out, bt) =
                    block.forward_taped(&t, inj, masks.get(i).and_then(|m| m.as_ref()))?;
                t = out;
                branch_tape.push(bt);
            }
            tape.blocks.push(branch_tape);
            b.push(t);
        }
        if self.fuse.is_empty() {
            return Ok((b, tape));
        }
        let mut out = Vec::with_capacity(b.len());
        for (i, row) in self.fuse.iter().enumerate() {
            let mut y: Option<Tensor> = None;
            let mut row_tape = Vec::with_capacity(row.len());
            for (j, layer) in row.iter().enumerate() {
                let term = match layer {
                    None => {
                        row_tape.push(None);
                        b[j].clone()
                    }
                    Some(l) => {
                        let (t, ft) = l.forward_taped(&b[j])?;
                        row_tape.push(Some(ft));
                        t
                    }
                };
                y = Some(match y {
                    None => term,
                    Some(acc) => (acc + term)?,
                });
            }
            tape.fuse.push(row_tape);
            let (o, pt) = self.post[i].forward_taped(&y.expect("at least one branch"))?;
            tape.post.push(pt);
            out.push(o);
        }
        Ok((out, tape))
    }

    /// The vector–Jacobian product dL/dz = (dL/d f) · ∂f/∂z at the point `tape` was recorded at,
    /// with weights, injection and dropout masks held fixed: the unit of work of the implicit
    /// backward. Written out by hand from the taped intermediates, so that one recording serves
    /// every product and no autodiff bookkeeping runs per product.
    pub fn vjp(&self, tape: &CellTape, d_out: &[Tensor]) -> Result<Vec<Tensor>> {
        let n = self.blocks.len();
        let mut d_b: Vec<Option<Tensor>> = vec![None; n];
        if self.fuse.is_empty() {
            d_b = d_out.iter().cloned().map(Some).collect();
        } else {
            for (i, row) in self.fuse.iter().enumerate() {
                let dy = self.post[i].vjp(&tape.post[i], &d_out[i])?;
                for (j, layer) in row.iter().enumerate() {
                    let term = match (layer, &tape.fuse[i][j]) {
                        (Some(l), Some(ft)) => l.vjp(ft, &dy)?,
                        _ => dy.clone(),
                    };
                    d_b[j] = Some(match d_b[j].take() {
                        None => term,
                        Some(acc) => (acc + term)?,
                    });
                }
            }
        }
        let mut dz = Vec::with_capacity(n);
        for ((blocks, tapes), d) in self.blocks.iter().zip(&tape.blocks).zip(d_b) {
            let mut d = d.ok_or_else(|| {
                candle_core::Error::Msg("cell vjp: a branch got no gradient".into())
            })?;
            for (block, bt) in blocks.iter().zip(tapes).rev() {
                d = block.vjp(bt, &d)?;
            }
            dz.push(d);
        }
        Ok(dz)
    }
}
