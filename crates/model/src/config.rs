//! The MDEQ architecture as a typed, validated config (the `[model]` section of a recipe; the
//! whole experiment config, which contains it, is `mdeq_recipe::ExperimentConfig`).

use serde::{Deserialize, Serialize};

/// Most branches a config may have (the official configs use 4; every branch halves the size).
pub const MAX_BRANCHES: usize = 8;

/// The environment variable that raises [`DEFAULT_MAX_PARAMETERS`].
pub const MAX_PARAMETERS_VAR: &str = "MDEQ_MAX_PARAMETERS";

/// The most trainable parameters a config may describe by default (ImageNet XL has 9.0e7): a
/// config, perhaps inside a downloaded checkpoint, cannot make us allocate terabytes.
pub const DEFAULT_MAX_PARAMETERS: u64 = 1 << 31;

/// The parameter limit in force: [`MAX_PARAMETERS_VAR`] if set to a number, else the default.
pub fn max_parameters() -> u64 {
    std::env::var(MAX_PARAMETERS_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_PARAMETERS)
}

/// A model config that cannot describe a working MDEQ; the message names the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid model config: {0}")]
pub struct InvalidModelConfig(pub String);

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Image classification (MDEQClsNet).
    Classification,
    /// Semantic segmentation (MDEQSegNet).
    Segmentation,
}

/// Architecture of the classification head (reference §2.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationHeadConfig {
    /// Bottleneck width h_i per branch; each incre module outputs 4·h_i channels.
    pub head_channels: Vec<usize>,
    /// Width of the final 1×1 layer before pooling.
    pub final_chansize: usize,
}

/// Architecture of the segmentation head (reference §2.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentationHeadConfig {
    /// Kernel size of the last convolution (1 in every official config).
    pub final_conv_kernel: usize,
}

/// The MDEQ architecture (reference §1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Classification or segmentation.
    pub task: Task,
    /// Channels C_i of each branch, highest resolution first; its length is the branch count n.
    pub num_channels: Vec<usize>,
    /// Residual blocks per branch (1 in every official config).
    #[serde(default)]
    pub num_blocks: Vec<usize>,
    /// 0: 3×3 convolutions; 1: conv1 is 5×5; 2: both are 5×5.
    #[serde(default)]
    pub big_kernels: Vec<usize>,
    /// Width multiplier E of the first convolution of each residual block.
    pub expansion_factor: usize,
    /// GroupNorm groups G (post-fuse layers use G/2).
    pub num_groups: usize,
    /// Stride-2 stages in the stem (0, 1 or 2).
    pub downsample_times: usize,
    /// Weight normalisation of the cell's block and post-fuse convolutions.
    #[serde(default = "default_true")]
    pub wnorm: bool,
    /// Variational dropout rate inside the cell.
    #[serde(default)]
    pub dropout: f64,
    /// Affine GroupNorms in the residual blocks.
    #[serde(default = "default_true")]
    pub block_gn_affine: bool,
    /// Affine GroupNorms in the fuse layers.
    #[serde(default = "default_true")]
    pub fuse_gn_affine: bool,
    /// Affine GroupNorms after fusion.
    #[serde(default = "default_true")]
    pub post_gn_affine: bool,
    /// Weight-tied unrolled applications of f during pretraining.
    pub num_layers: usize,
    /// Number of output classes.
    pub num_classes: usize,
    /// Input image size (height, width) the recipe trains at.
    pub image_size: [usize; 2],
    /// Input channels (3 for RGB, 1 for grey images).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// BatchNorm momentum; defaults to 0.1 (classification) or 0.01 (segmentation).
    #[serde(default)]
    pub bn_momentum: Option<f64>,
    /// Classification head; required when `task = "classification"`.
    #[serde(default)]
    pub classification_head: Option<ClassificationHeadConfig>,
    /// Segmentation head; required when `task = "segmentation"`.
    #[serde(default)]
    pub segmentation_head: Option<SegmentationHeadConfig>,
}

fn default_true() -> bool {
    true
}
fn default_in_channels() -> usize {
    3
}

impl ModelConfig {
    /// Number of branches (resolutions) n.
    pub fn num_branches(&self) -> usize {
        self.num_channels.len()
    }

    /// Residual blocks of branch `i`.
    pub fn blocks_of(&self, i: usize) -> usize {
        self.num_blocks.get(i).copied().unwrap_or(1)
    }

    /// Big-kernel level of branch `i`.
    pub fn big_kernel_of(&self, i: usize) -> usize {
        self.big_kernels.get(i).copied().unwrap_or(0)
    }

    /// The official stage0 presence rule (reference §1.2).
    pub fn has_stage0(&self) -> bool {
        !(self.downsample_times == 0 && self.num_branches() <= 2)
    }

    /// BatchNorm momentum in PyTorch's convention.
    pub fn bn_momentum(&self) -> f64 {
        self.bn_momentum.unwrap_or(match self.task {
            Task::Classification => 0.1,
            Task::Segmentation => 0.01,
        })
    }

    /// Spatial size (H_i, W_i) of every branch for an input of `height`×`width`.
    pub fn branch_sizes(&self, height: usize, width: usize) -> Vec<(usize, usize)> {
        let f = 1 << self.downsample_times;
        let (mut h, mut w) = (height.div_ceil(f), width.div_ceil(f));
        let mut sizes = Vec::with_capacity(self.num_branches());
        for _ in 0..self.num_branches() {
            sizes.push((h, w));
            h /= 2;
            w /= 2;
        }
        sizes
    }

    /// Solver state size D per sample for an input of `height`×`width` (reference §1.8).
    pub fn state_size(&self, height: usize, width: usize) -> usize {
        self.branch_sizes(height, width)
            .iter()
            .zip(&self.num_channels)
            .map(|((h, w), c)| c * h * w)
            .sum()
    }

    /// Checks that an input size is usable: each side divisible by 2^(DOWNSAMPLE_TIMES + n - 1).
    pub fn check_input_size(&self, height: usize, width: usize) -> Result<(), InvalidModelConfig> {
        let d = 1usize << (self.downsample_times + self.num_branches() - 1);
        if !height.is_multiple_of(d) || !width.is_multiple_of(d) || height == 0 || width == 0 {
            return Err(InvalidModelConfig(format!(
                "input size {height}x{width} must be a non-zero multiple of {d} \
                 (2^(downsample_times + branches - 1)) on both sides"
            )));
        }
        Ok(())
    }

    /// An upper bound on the trainable parameters, computed before anything is allocated, with
    /// checked arithmetic (`None`: beyond 2^64).
    pub fn parameter_bound(&self) -> Option<u64> {
        let c: Vec<u64> = self.num_channels.iter().map(|&c| c as u64).collect();
        let e = self.expansion_factor as u64;
        let k2 = 25; // the largest kernel, 5×5
        let sq = |x: u64| x.checked_mul(x);
        let c0 = *c.first()?;
        let stem = checked_sum([
            sq(c0)?.checked_mul(11),
            c0.checked_mul(9 * self.in_channels as u64),
        ])?;
        let blocks = checked_sum(c.iter().map(|&ci| {
            sq(ci)?
                .checked_mul(e)?
                .checked_mul(2 * k2 + 1)?
                .checked_add(8 * e * ci)
        }))?;
        let fuse = checked_sum(c.iter().enumerate().flat_map(|(i, &ci)| {
            c.iter()
                .enumerate()
                .map(move |(j, &cj)| sq(ci.max(cj))?.checked_mul(9 * (i.abs_diff(j) as u64 + 1)))
        }))?;
        let classes = self.num_classes as u64;
        let head = match (&self.classification_head, &self.segmentation_head) {
            (Some(h), _) => {
                let hs: Vec<u64> = h.head_channels.iter().map(|&x| x as u64).collect();
                let last = *hs.last()?;
                let f = h.final_chansize as u64;
                let per_branch = checked_sum(hs.iter().zip(&c).map(|(&hi, &ci)| {
                    sq(hi)?
                        .checked_mul(13)?
                        .checked_add(hi.checked_mul(ci)?.checked_mul(5)?)
                }))?;
                let downsample = checked_sum(
                    hs.windows(2)
                        .map(|w| w[0].checked_mul(w[1])?.checked_mul(144)),
                )?;
                checked_sum([
                    Some(per_branch),
                    Some(downsample),
                    last.checked_mul(4)?.checked_mul(f),
                    f.checked_mul(classes + 4),
                ])?
            }
            (None, Some(h)) => {
                let total = c.iter().try_fold(0u64, |a, &x| a.checked_add(x))?;
                let k = h.final_conv_kernel as u64;
                sq(total)?
                    .checked_add(total.checked_mul(classes)?.checked_mul(k.checked_mul(k)?)?)?
            }
            (None, None) => 0,
        };
        checked_sum([Some(stem), Some(blocks), Some(fuse), Some(head)])
    }

    /// Validates internal consistency; every error names the field at fault.
    pub fn validate(&self) -> Result<(), InvalidModelConfig> {
        let n = self.num_branches();
        let bad = |m: String| Err(InvalidModelConfig(m));
        if n == 0 {
            return bad("num_channels must list at least one branch".into());
        }
        if n > MAX_BRANCHES {
            return bad(format!(
                "num_channels lists {n} branches; at most {MAX_BRANCHES} are supported (the official configs use 4)"
            ));
        }
        if !self.num_blocks.is_empty() && self.num_blocks.len() != n {
            return bad(format!(
                "num_blocks has {} entries, expected {n}",
                self.num_blocks.len()
            ));
        }
        if self.num_blocks.contains(&0) {
            return bad("num_blocks entries must be at least 1".into());
        }
        if !self.big_kernels.is_empty() && self.big_kernels.len() != n {
            return bad(format!(
                "big_kernels has {} entries, expected {n}",
                self.big_kernels.len()
            ));
        }
        if self.big_kernels.iter().any(|&k| k > 2) {
            return bad("big_kernels entries must be 0, 1 or 2".into());
        }
        if self.num_groups == 0 || self.expansion_factor == 0 {
            return bad("num_groups and expansion_factor must be positive".into());
        }
        let post_groups = (self.num_groups / 2).max(1);
        for (i, &c) in self.num_channels.iter().enumerate() {
            if c == 0 || c % self.num_groups != 0 || c % post_groups != 0 {
                return bad(format!(
                    "num_channels[{i}] = {c} must be a positive multiple of num_groups = {}",
                    self.num_groups
                ));
            }
        }
        if self.downsample_times > 2 {
            return bad(format!(
                "downsample_times = {} is not supported (the official configs use 0..=2)",
                self.downsample_times
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout = {} must be in [0, 1)", self.dropout));
        }
        if self.num_classes == 0 || self.in_channels == 0 {
            return bad("num_classes and in_channels must be positive".into());
        }
        match self.task {
            Task::Classification => match &self.classification_head {
                None => {
                    return bad("task = classification needs [model.classification_head]".into())
                }
                Some(h) if h.head_channels.len() != n => {
                    return bad(format!(
                        "classification_head.head_channels has {} entries, expected {n}",
                        h.head_channels.len()
                    ))
                }
                Some(h) if h.head_channels.contains(&0) || h.final_chansize == 0 => {
                    return bad("classification head widths must be positive".into())
                }
                Some(_) => {}
            },
            Task::Segmentation => match &self.segmentation_head {
                None => return bad("task = segmentation needs [model.segmentation_head]".into()),
                Some(h) if h.final_conv_kernel % 2 == 0 => {
                    return bad("segmentation_head.final_conv_kernel must be odd".into())
                }
                Some(_) => {}
            },
        }
        let limit = max_parameters();
        match self.parameter_bound() {
            Some(p) if p <= limit => {}
            bound => {
                return bad(format!(
                    "num_channels = {:?} with expansion_factor = {} and these heads describes {} \
                     parameters, above the limit of {limit} (set {MAX_PARAMETERS_VAR} to raise it)",
                    self.num_channels,
                    self.expansion_factor,
                    bound.map_or("more than 2^64".to_string(), |p| format!("up to {p}"))
                ))
            }
        }
        Ok(())
    }
}

/// The sum of `xs`, or `None` if an item is `None` or the sum overflows.
fn checked_sum(xs: impl IntoIterator<Item = Option<u64>>) -> Option<u64> {
    xs.into_iter().try_fold(0u64, |acc, x| acc.checked_add(x?))
}
