//! Helpers shared by the kernel tests.

use candle_core::{DType, Device, Tensor};

/// max |a − b| / max |b|, in float64.
pub fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let err = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    err / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-300)
}

/// A smooth deterministic test tensor: sin(a·i + 0.3) over the flat index i.
#[allow(dead_code)] // not every test file uses every helper
pub fn wave(shape: &[usize], a: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| (a * i as f64 + 0.3).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}
