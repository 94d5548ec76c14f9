//! Adam and SGD with the official semantics: L2 weight decay added to the gradient (not
//! decoupled), applied to every parameter (spec §5.1).

use candle_core::{Result, Tensor, Var};
use mdeq_model::config::{OptimizerKind, TrainConfig};

/// Optimizer state for one parameter.
#[derive(Debug, Clone)]
struct Slot {
    first: Option<Tensor>,
    second: Option<Tensor>,
}

/// Adam (PyTorch defaults β = (0.9, 0.999), ε = 1e-8) or SGD with momentum / Nesterov.
#[derive(Debug, Clone)]
pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    momentum: f64,
    nesterov: bool,
    steps: u64,
    slots: Vec<Slot>,
}

impl Optimizer {
    /// An optimizer for `n` parameters.
    pub fn new(cfg: &TrainConfig, n: usize) -> Self {
        Self {
            kind: cfg.optimizer,
            weight_decay: cfg.weight_decay,
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            steps: 0,
            slots: vec![
                Slot {
                    first: None,
                    second: None
                };
                n
            ],
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `params[i]` (None: no gradient).
    pub fn step(&mut self, params: &[Var], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for ((p, g), slot) in params.iter().zip(grads).zip(&mut self.slots) {
            let Some(g) = g else { continue };
            let g = if self.weight_decay != 0.0 {
                (g + (p.as_tensor() * self.weight_decay)?)?
            } else {
                g.clone()
            };
            match self.kind {
                OptimizerKind::Adam => {
                    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
                    let m = match &slot.first {
                        None => (&g * (1.0 - b1))?,
                        Some(m) => ((m * b1)? + (&g * (1.0 - b1))?)?,
                    };
                    let v = match &slot.second {
                        None => (g.sqr()? * (1.0 - b2))?,
                        Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                    };
                    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                    let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
                    let update = ((&m / denom)? * (lr / bc1))?;
                    p.set(&(p.as_tensor() - update)?)?;
                    slot.first = Some(m);
                    slot.second = Some(v);
                }
                OptimizerKind::Sgd => {
                    let d = if self.momentum != 0.0 {
                        let buf = match &slot.first {
                            None => g.clone(),
                            Some(b) => ((b * self.momentum)? + &g)?,
                        };
                        let d = if self.nesterov {
                            (&g + (&buf * self.momentum)?)?
                        } else {
                            buf.clone()
                        };
                        slot.first = Some(buf);
                        d
                    } else {
                        g
                    };
                    p.set(&(p.as_tensor() - (d * lr)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// Named state tensors for a checkpoint (`optim.first.<i>`, `optim.second.<i>`; the prefix is
    /// `mdeq_checkpoint::format::OPTIMIZER_PREFIX`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(t) = &s.first {
                out.push((format!("optim.first.{i}"), t.clone()));
            }
            if let Some(t) = &s.second {
                out.push((format!("optim.second.{i}"), t.clone()));
            }
        }
        out
    }

    /// Restores state written by [`Self::state`] after `steps` updates.
    pub fn restore(&mut self, steps: u64, tensors: &std::collections::HashMap<String, Tensor>) {
        self.steps = steps;
        for (i, s) in self.slots.iter_mut().enumerate() {
            s.first = tensors.get(&format!("optim.first.{i}")).cloned();
            s.second = tensors.get(&format!("optim.second.{i}")).cloned();
        }
    }
}
