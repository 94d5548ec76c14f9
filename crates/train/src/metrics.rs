//! Scores: top-k accuracy for classification, the confusion matrix and IoU for segmentation
//! (reference §5.3: pixels labelled ignore are skipped; IoU_c = TP / max(1, TP + FP + FN)).

use candle_core::{DType, Result, Tensor};
use mdeq_data::IGNORE_LABEL;

/// (top-1 correct, top-5 correct) in a batch of (B, K) logits and (B) labels. A sample with a
/// non-finite logit is wrong at every k (with NaN no logit compares greater than the target's,
/// which would otherwise count it right); a label outside 0..K is an error.
pub fn correct(logits: &Tensor, labels: &Tensor) -> Result<(usize, usize)> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let labels = labels.to_vec1::<i64>()?;
    let (mut c1, mut c5) = (0, 0);
    for (row, &label) in rows.iter().zip(&labels) {
        let target = usize::try_from(label)
            .ok()
            .and_then(|l| row.get(l))
            .copied()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("label {label} outside 0..{}", row.len()))
            })?;
        if !row.iter().all(|v| v.is_finite()) {
            continue;
        }
        let better = row.iter().filter(|&&v| v > target).count();
        c1 += (better == 0) as usize;
        c5 += (better < 5) as usize;
    }
    Ok((c1, c5))
}

/// Counts of (true class, predicted class) over labelled pixels, and per true class the pixels
/// that got no prediction (non-finite logits: wrong in every score).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionMatrix {
    classes: usize,
    counts: Vec<u64>,
    unpredicted: Vec<u64>,
}

impl ConfusionMatrix {
    /// An empty matrix for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
            unpredicted: vec![0; classes],
        }
    }

    /// Adds (B, H, W) int64 labels against (B, H, W) predicted classes; ignore-labelled pixels are
    /// skipped; a prediction equal to the class count (see `predict_pixels`) is no prediction; a
    /// label or prediction outside those is an error.
    pub fn add(&mut self, labels: &Tensor, predicted: &Tensor) -> Result<()> {
        let labels = labels.flatten_all()?.to_vec1::<i64>()?;
        let predicted = predicted
            .flatten_all()?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        for (&t, &p) in labels.iter().zip(&predicted) {
            if t == IGNORE_LABEL as i64 {
                continue;
            }
            if t < 0 || t as usize >= self.classes {
                candle_core::bail!("label {t} outside 0..{} (and not ignore)", self.classes);
            }
            match (p as usize).cmp(&self.classes) {
                std::cmp::Ordering::Less => {
                    self.counts[t as usize * self.classes + p as usize] += 1
                }
                std::cmp::Ordering::Equal => self.unpredicted[t as usize] += 1,
                std::cmp::Ordering::Greater => {
                    candle_core::bail!("predicted class {p} outside 0..={}", self.classes)
                }
            }
        }
        Ok(())
    }

    /// The counts of every rank's pixels together (exact below 2^53 pixels per cell; a
    /// collective call: every rank makes it).
    pub fn all_reduce(&mut self, world: &mdeq_distributed::World) -> Result<()> {
        if !world.is_distributed() {
            return Ok(());
        }
        let mine: Vec<f64> = self
            .counts
            .iter()
            .chain(&self.unpredicted)
            .map(|&c| c as f64)
            .collect();
        let all = world.all_reduce_host(&mine, mdeq_distributed::Reduce::Sum)?;
        let (counts, unpredicted) = all.split_at(self.counts.len());
        self.counts = counts.iter().map(|&c| c as u64).collect();
        self.unpredicted = unpredicted.iter().map(|&c| c as u64).collect();
        Ok(())
    }

    /// Pixels counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.unpredicted.iter().sum::<u64>()
    }

    /// Intersection over union of each class.
    pub fn iou(&self) -> Vec<f64> {
        let k = self.classes;
        (0..k)
            .map(|c| {
                let tp = self.counts[c * k + c];
                let actual: u64 =
                    (0..k).map(|p| self.counts[c * k + p]).sum::<u64>() + self.unpredicted[c];
                let predicted: u64 = (0..k).map(|t| self.counts[t * k + c]).sum();
                tp as f64 / (actual + predicted - tp).max(1) as f64
            })
            .collect()
    }

    /// Mean IoU over all classes.
    pub fn mean_iou(&self) -> f64 {
        let iou = self.iou();
        iou.iter().sum::<f64>() / iou.len().max(1) as f64
    }

    /// Mean IoU over the classes that occur in the labels or the predictions (a batch's mIoU:
    /// classes absent from both say nothing about it).
    pub fn mean_iou_present(&self) -> f64 {
        let k = self.classes;
        let present: Vec<f64> = self
            .iou()
            .into_iter()
            .enumerate()
            .filter(|&(c, _)| {
                self.unpredicted[c] > 0
                    || (0..k).any(|o| self.counts[c * k + o] + self.counts[o * k + c] > 0)
            })
            .map(|(_, v)| v)
            .collect();
        present.iter().sum::<f64>() / present.len().max(1) as f64
    }

    /// Fraction of counted pixels predicted right.
    pub fn pixel_accuracy(&self) -> f64 {
        let k = self.classes;
        let tp: u64 = (0..k).map(|c| self.counts[c * k + c]).sum();
        tp as f64 / self.total().max(1) as f64
    }
}
