//! Training losses: cross-entropy on classes, and the segmentation loss of the official recipe
//! (logits upsampled bilinearly with align_corners = true to the label size, per-class weighted
//! cross-entropy that skips the ignore label, reference §5.3), both optionally label-smoothed.

use candle_core::{DType, Result, Tensor};
use mdeq_data::IGNORE_LABEL;
use mdeq_model::nn::upsample::bilinear_resize;

/// The per-sample loss against a label-smoothed target: with smoothing ε the target puts 1 − ε
/// on the label and ε spread evenly over all K classes, so the loss is
/// (1 − ε)·(−log p_y) + ε·mean_k(−log p_k). `log_p` is (…, K, …) with classes on `class_dim`,
/// `picked` is log p_y with that dimension removed.
fn smoothed_nll(
    log_p: &Tensor,
    picked: &Tensor,
    class_dim: usize,
    smoothing: f64,
) -> Result<Tensor> {
    let nll = picked.neg()?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = log_p.mean(class_dim)?.neg()?;
    (nll * (1.0 - smoothing))? + (uniform * smoothing)?
}

/// Mean cross-entropy of (B, K) logits against (B) class indices, with label smoothing ε
/// (0 is the plain cross-entropy).
pub fn classification_loss(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    if smoothing == 0.0 {
        return candle_nn::loss::cross_entropy(logits, labels);
    }
    let log_p = candle_nn::ops::log_softmax(logits, 1)?;
    let picked = log_p
        .gather(&labels.unsqueeze(1)?.contiguous()?, 1)?
        .squeeze(1)?;
    smoothed_nll(&log_p, &picked, 1, smoothing)?.mean_all()
}

/// Weighted mean cross-entropy of (B, K, h, w) logits against (B, H, W) labels:
/// Σ w_y·(−log p_y) / Σ w_y over pixels whose label is not [`IGNORE_LABEL`]; unit weights when
/// `class_weights` is None. Zero (with a zero gradient) when every pixel is ignored. With label
/// smoothing ε each pixel's −log p_y becomes (1 − ε)·(−log p_y) + ε·mean_k(−log p_k).
pub fn segmentation_loss(
    logits: &Tensor,
    labels: &Tensor,
    class_weights: Option<&Tensor>,
    smoothing: f64,
) -> Result<Tensor> {
    let (b, k, _, _) = logits.dims4()?;
    let (_, h, w) = labels.dims3()?;
    let logits = bilinear_resize(logits, h, w, true)?;
    let log_p = candle_nn::ops::log_softmax(&logits, 1)?;
    let valid = labels.ne(IGNORE_LABEL as i64)?;
    let safe = valid.where_cond(labels, &labels.zeros_like()?)?;
    let picked = log_p
        .gather(&safe.unsqueeze(1)?.contiguous()?, 1)?
        .squeeze(1)?;
    let valid_f = valid.to_dtype(logits.dtype())?;
    let weight = match class_weights {
        Some(cw) => {
            if cw.dim(0)? != k {
                candle_core::bail!("{} class weights for {k} classes", cw.dim(0)?);
            }
            cw.to_dtype(logits.dtype())?
                .index_select(&safe.flatten_all()?, 0)?
                .reshape((b, h, w))?
                .mul(&valid_f)?
        }
        None => valid_f,
    };
    let total = weight.sum_all()?;
    let denom = total.maximum(1e-12)?;
    let per_pixel = smoothed_nll(&log_p, &picked, 1, smoothing)?;
    per_pixel.mul(&weight)?.sum_all()?.div(&denom)
}

/// Per-pixel predicted classes (B, H, W) of (B, K, h, w) logits upsampled to (H, W) as the
/// official validation does (bilinear, align_corners = true). A pixel with a non-finite logit
/// has no prediction and gets K, which the metrics count as wrong.
pub fn predict_pixels(logits: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let up = bilinear_resize(logits, height, width, true)?;
    let classes = up.dim(1)?;
    let predicted = up.argmax_keepdim(1)?.squeeze(1)?.to_dtype(DType::U32)?;
    // |x| < ∞ is false for NaN and ±∞.
    let finite = up.abs()?.lt(f64::INFINITY)?.min_keepdim(1)?.squeeze(1)?;
    let none = Tensor::full(classes as u32, predicted.shape(), predicted.device())?;
    finite.where_cond(&predicted, &none)
}
