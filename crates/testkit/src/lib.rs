//! What the workspace's tests share, so that no test file keeps its own copy: the fixture
//! folder, deterministic tensors, relative errors, the tiny recipes and a toy IDX dataset.

pub mod hostile;

use candle_core::{DType, Device, Shape, Tensor};
use mdeq_data::Split;
use mdeq_recipe::{
    ClassificationHeadConfig, DataConfig, DeqConfig, ExperimentConfig, ModelConfig, StopMode, Task,
    TrainConfig,
};
use std::path::{Path, PathBuf};

/// What a test returns: any error fails it with its message and context.
pub type Result<T = ()> = anyhow::Result<T>;

pub use anyhow::{self, bail, ensure, Context};
pub use mdeq_kernels as kernels;

/// Turns each named test function (`fn name() -> mdeq_testkit::Result`, no `#[test]`) into two
/// tests, `name::native` and `name::portable`, that run it with that kernel choice active: the
/// portable run takes candle's stock ops, the code path of every non-CPU device, so a test of the
/// engine also checks the GPU path's composition on a machine without a GPU (the shape of
/// candle's `test_device!`).
#[macro_export]
macro_rules! on_every_kernel {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn native() -> $crate::Result {
                $crate::kernels::with_kernels($crate::kernels::KernelChoice::Native, super::$name)
            }
            #[test]
            fn portable() -> $crate::Result {
                $crate::kernels::with_kernels($crate::kernels::KernelChoice::Portable, super::$name)
            }
        }
    )*};
}

/// `fixtures/<rel>` in the repository (see `fixtures/README.md`).
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

/// [`fixture`] as a string, for APIs that take one.
pub fn fixture_str(rel: &str) -> String {
    fixture(rel).display().to_string()
}

/// max |a − b| / max |b|, computed in float64.
pub fn max_rel(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let err = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(err / scale.max(1e-300))
}

/// sin(freq·i + phase) over the flat index i: smooth, deterministic values in [−1, 1].
pub fn wave_values(n: usize, freq: f64, phase: f64) -> Vec<f64> {
    (0..n).map(|i| (freq * i as f64 + phase).sin()).collect()
}

/// [`wave_values`] as a float64 CPU tensor of `shape`.
pub fn wave(shape: impl Into<Shape>, freq: f64, phase: f64) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    Tensor::from_vec(
        wave_values(shape.elem_count(), freq, phase),
        shape,
        &Device::Cpu,
    )
}

/// Deterministic values in [−1, 1) from a multiplicative hash of the flat index: unlike a
/// wave, neighbouring entries are unrelated, which exercises every summation order.
pub fn hashed(shape: impl Into<Shape>, seed: u64) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f64> = (0..shape.elem_count() as u64)
        .map(|i| (((i + 1) * (seed * 2_654_435_761 + 97)) % 1000) as f64 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// A small classification MDEQ for 8×8 grey images: branches of `channels` (head widths half
/// of them), expansion 2, 2 groups, no dropout, non-affine post-fusion norms, 3 unrolled
/// layers, 5 classes; Broyden 4/4 in rel mode; Adam 0.01, batch 4, one epoch.
pub fn tiny_classifier(channels: &[usize]) -> ExperimentConfig {
    ExperimentConfig {
        name: "tiny".into(),
        model: ModelConfig {
            task: Task::Classification,
            num_channels: channels.to_vec(),
            num_blocks: Vec::new(),
            big_kernels: Vec::new(),
            expansion_factor: 2,
            num_groups: 2,
            downsample_times: 0,
            wnorm: true,
            dropout: 0.0,
            block_gn_affine: true,
            fuse_gn_affine: true,
            post_gn_affine: false,
            num_layers: 3,
            num_classes: 5,
            image_size: [8, 8],
            in_channels: 1,
            bn_momentum: None,
            classification_head: Some(ClassificationHeadConfig {
                head_channels: channels.iter().map(|c| c / 2).collect(),
                final_chansize: 8,
            }),
            segmentation_head: None,
        },
        deq: DeqConfig {
            f_thres: 4,
            b_thres: 4,
            stop_mode: StopMode::Rel,
            ..DeqConfig::default()
        },
        train: TrainConfig {
            lr: 0.01,
            epochs: 1,
            batch_size: 4,
            ..TrainConfig::default()
        },
        data: DataConfig {
            dataset: "mnist".into(),
            root: String::new(),
            eval_size: None,
            validation: 0,
        },
    }
}

/// Writes `n` 8×8 grey images per split in the IDX layout under `dir`: class k (0..4) is a
/// bright block on rows 2k and 2k + 1, columns 2..6, on a black background (so that fashion
/// scenes composed from them have clean item masks).
pub fn write_toy_idx(dir: &Path, n: usize) -> Result {
    std::fs::create_dir_all(dir)?;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let k = i % 4;
        for p in 0..64 {
            let (y, x) = (p / 8, p % 8);
            let bright = y / 2 == k && (2..6).contains(&x);
            pixels.push(if bright {
                220
            } else {
                (i * 7 + p * 3) as u8 % 40
            });
        }
        labels.push(k as u8);
    }
    for split in [Split::Train, Split::Test] {
        mdeq_data::idx::write_split(dir, split, (8, 8), &pixels, &labels)?;
    }
    Ok(())
}

/// A fresh, empty scratch folder for one test, named by `tag` and the process.
pub fn scratch_dir(tag: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("mdeq-test-{tag}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The message (with its causes) of the error `result` must be; its success is a test failure
/// that says `what` was wrongly accepted.
pub fn error_text<T, E: Into<anyhow::Error>>(
    what: &str,
    result: std::result::Result<T, E>,
) -> Result<String> {
    match result {
        Ok(_) => bail!("{what}: accepted, expected an error"),
        Err(e) => Ok(format!("{:#}", e.into())),
    }
}
