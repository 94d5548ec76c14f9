//! Adam and SGD with the official semantics: L2 weight decay added to the gradient (not
//! decoupled), applied to every parameter (reference §5.1).

use candle_core::{Result, Tensor, Var};
use mdeq_recipe::{OptimizerKind, TrainConfig};

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
            // Gradients from candle's backward can carry a recorded graph (products with
            // parameters); a moment built from them would chain every step's graph to the next,
            // so the optimizer works on detached values only.
            let (g, param) = (g.detach(), p.as_tensor().detach());
            let g = if self.weight_decay != 0.0 {
                (g + (&param * self.weight_decay)?)?
            } else {
                g
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
                    p.set(&(&param - update)?)?;
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
                    p.set(&(&param - (d * lr)?)?)?;
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

    /// Restores state written by [`Self::state`] after `steps` updates; each moment moves to
    /// the device and float type of its parameter in `params` (a checkpoint is read into host
    /// memory, and may come from a run in another precision).
    pub fn restore(
        &mut self,
        steps: u64,
        tensors: &std::collections::HashMap<String, Tensor>,
        params: &[Var],
    ) -> Result<()> {
        self.steps = steps;
        let moved = |name: String, p: &Var| -> Result<Option<Tensor>> {
            tensors
                .get(&name)
                .map(|t| t.to_device(p.device())?.to_dtype(p.dtype()))
                .transpose()
        };
        for (i, (s, p)) in self.slots.iter_mut().zip(params).enumerate() {
            s.first = moved(format!("optim.first.{i}"), p)?;
            s.second = moved(format!("optim.second.{i}"), p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Optimizer;
    use candle_core::{Device, Tensor, Var};
    use mdeq_recipe::{OptimizerKind, TrainConfig};

    #[test]
    fn optimizer_state_holds_no_recorded_graph() -> mdeq_testkit::Result {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let text = format!(
                "optimizer = \"{}\"\nlr = 0.1\nweight_decay = 0.01\nmomentum = 0.9\nepochs = 1\nbatch_size = 1\n",
                if kind == OptimizerKind::Adam { "adam" } else { "sgd" }
            );
            let cfg: TrainConfig = toml::from_str(&text)?;
            let mut opt = Optimizer::new(&cfg, 1);
            for _ in 0..3 {
                // A gradient that, like candle's, is itself a product with the parameter.
                let g = (p.as_tensor() * 2.0)?;
                assert!(g.track_op());
                opt.step(std::slice::from_ref(&p), &[Some(g)], 0.1)?;
            }
            for (name, t) in opt.state() {
                assert!(!t.track_op(), "{kind:?} {name} keeps a graph");
            }
            assert!(!Tensor::new(&[0f32], &Device::Cpu)?.track_op());
        }
        Ok(())
    }
}
