//! Variational ("recurrent") dropout masks (reference §1.6).

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;

/// A (B, C, 1, 1) mask of Bernoulli(1 − p) draws scaled by 1/(1 − p), shared by all spatial
/// positions and held fixed for every evaluation of f in one forward.
pub fn variational_dropout_mask(
    rng: &mut impl Rng,
    batch: usize,
    channels: usize,
    p: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keep = 1.0 - p;
    let values: Vec<f64> = (0..batch * channels)
        .map(|_| {
            if rng.gen::<f64>() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(values, (batch, channels, 1, 1), device)?.to_dtype(dtype)
}
