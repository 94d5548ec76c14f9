//! The parameter store: every trainable tensor and buffer of a model under its official
//! state_dict name, in the official key order.

use crate::nn::BatchNormGroup;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr_free::{normal, uniform};

/// Whether an entry is trained or only carried (BatchNorm statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Updated by the optimizer.
    Parameter,
    /// Running statistics and counters.
    Buffer,
}

/// One named tensor of the store.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Official dotted key.
    pub name: String,
    /// Parameter or buffer.
    pub kind: EntryKind,
    /// The storage; modules hold tensors that share it.
    pub var: Var,
}

/// All named tensors of a model.
#[derive(Debug, Clone)]
pub struct ParamStore {
    entries: Vec<Entry>,
    device: Device,
    dtype: DType,
    batch_norm_group: BatchNormGroup,
}

impl ParamStore {
    /// An empty store creating float tensors of `dtype` on `device`.
    pub fn new(dtype: DType, device: &Device) -> Self {
        Self {
            entries: Vec::new(),
            device: device.clone(),
            dtype,
            batch_norm_group: BatchNormGroup::default(),
        }
    }

    /// The ranks the model's BatchNorm layers take batch statistics over (shared by all).
    pub fn batch_norm_group(&self) -> &BatchNormGroup {
        &self.batch_norm_group
    }

    /// Float dtype of the model.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the model.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every entry in official order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Trainable parameters in official order.
    pub fn parameters(&self) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::Parameter)
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.parameters().map(|e| e.var.elem_count()).sum()
    }

    /// The first entry (parameter or buffer) holding a NaN or an infinity, if any.
    pub fn first_non_finite(&self) -> Result<Option<&str>> {
        // One read-back for the whole model: on a GPU a synchronisation per tensor would cost
        // more than the check. 0·x sums to NaN exactly when some element is not finite.
        let floats: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.var.dtype().is_float())
            .collect();
        if floats.is_empty() {
            return Ok(None);
        }
        let sums = floats
            .iter()
            .map(|e| {
                e.var
                    .affine(0.0, 0.0)?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)
            })
            .collect::<Result<Vec<_>>>()?;
        let sums = Tensor::stack(&sums, 0)?.to_vec1::<f64>()?;
        Ok(floats
            .iter()
            .zip(sums)
            .find(|(_, s)| !s.is_finite())
            .map(|(e, _)| e.name.as_str()))
    }

    fn add(&mut self, name: String, kind: EntryKind, tensor: Tensor) -> Result<Var> {
        debug_assert!(self.get(&name).is_none(), "duplicate key {name}");
        let var = Var::from_tensor(&tensor)?;
        self.entries.push(Entry {
            name,
            kind,
            var: var.clone(),
        });
        Ok(var)
    }
}

/// Creates named, initialised tensors under a key prefix.
pub struct ParamBuilder<'a> {
    store: &'a mut ParamStore,
    rng: &'a mut StdRng,
    prefix: String,
}

/// How a new parameter is initialised (reference §1.7).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Constant value.
    Const(f64),
    /// N(0, std²).
    Normal(f64),
    /// U(−bound, bound).
    Uniform(f64),
}

impl<'a> ParamBuilder<'a> {
    /// A builder at the root of `store`, drawing initial values from `rng`.
    pub fn new(store: &'a mut ParamStore, rng: &'a mut StdRng) -> Self {
        Self {
            store,
            rng,
            prefix: String::new(),
        }
    }

    /// A builder for the sub-module `name`.
    pub fn pp(&mut self, name: impl std::fmt::Display) -> ParamBuilder<'_> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        ParamBuilder {
            store: self.store,
            rng: self.rng,
            prefix,
        }
    }

    /// The store's BatchNorm group, for a BatchNorm layer to hold.
    pub fn batch_norm_group(&self) -> BatchNormGroup {
        self.store.batch_norm_group.clone()
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn values(&mut self, n: usize, init: Init) -> Vec<f64> {
        match init {
            Init::Const(c) => vec![c; n],
            Init::Normal(std) => (0..n).map(|_| normal(self.rng) * std).collect(),
            Init::Uniform(b) => (0..n).map(|_| uniform(self.rng, b)).collect(),
        }
    }

    /// Float tensor with `init` values (not registered).
    pub fn tensor(&mut self, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let v = self.values(shape.elem_count(), init);
        Tensor::from_vec(v, shape, &self.store.device)?.to_dtype(self.store.dtype)
    }

    /// Registers a trainable parameter.
    pub fn param(&mut self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let t = self.tensor(shape, init)?;
        self.param_from(name, t)
    }

    /// Registers a trainable parameter with given values.
    pub fn param_from(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        let key = self.key(name);
        Ok(self
            .store
            .add(key, EntryKind::Parameter, t)?
            .as_tensor()
            .clone())
    }

    /// Registers a float buffer.
    pub fn buffer(&mut self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Var> {
        let t = self.tensor(shape, init)?;
        let key = self.key(name);
        self.store.add(key, EntryKind::Buffer, t)
    }

    /// Registers an int64 scalar counter buffer (`num_batches_tracked`).
    pub fn counter(&mut self, name: &str) -> Result<Var> {
        let t = Tensor::new(0i64, &self.store.device)?;
        let key = self.key(name);
        self.store.add(key, EntryKind::Buffer, t)
    }
}

/// A seeded generator for parameter initialisation.
pub fn init_rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Minimal distributions over `rand`'s uniform source (Box–Muller), so initialisation is
/// reproducible from a seed on every platform.
mod rand_distr_free {
    use super::Rng;

    /// A standard normal draw.
    pub fn normal(rng: &mut impl Rng) -> f64 {
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// A U(−b, b) draw.
    pub fn uniform(rng: &mut impl Rng, b: f64) -> f64 {
        (rng.gen::<f64>() * 2.0 - 1.0) * b
    }
}

/// True when every element of `t` is finite (integer tensors always are): 0·x is 0 for finite
/// x and NaN for NaN and ±∞, so the sum is NaN exactly when some element is not finite.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    // The zeros sum exactly in any float type: no widened copy of the tensor is needed.
    let sum = t.affine(0.0, 0.0)?.sum_all()?;
    Ok(sum
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?
        .is_finite())
}
