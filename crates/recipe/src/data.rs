//! The `[data]` section: which dataset, where, and at what evaluation size.

use serde::{Deserialize, Serialize};

/// Dataset named by a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset kind (`cifar10`, `imagenet`, `cityscapes`, `fashion_mnist`, ...).
    pub dataset: String,
    /// Default root directory.
    #[serde(default)]
    pub root: String,
    /// Evaluation resolution [height, width] (default: each image's own size, e.g. full
    /// 1024×2048 Cityscapes frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_size: Option<[usize; 2]>,
}
