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
    /// Training samples held out for validation (a fixed seeded draw; 0: none). When set, the
    /// epoch-end evaluations and the best checkpoint use them, and the test split is left to
    /// `mdeq eval`, so that a recipe is tuned without looking at its test set.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub validation: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
