//! The segmentation and classification losses (plain and label-smoothed) against float64 hand
//! computations, the confusion matrix and IoU on a
//! hand-counted example, and the TensorBoard event file decoded field by field.

use candle_core::{Device, Tensor};
use mdeq_train::loss::{classification_loss, segmentation_loss};
use mdeq_train::metrics::ConfusionMatrix;
use mdeq_train::tensorboard::EventWriter;

/// −log p_k of every class k from one sample's logits, in float64.
fn nll_by_class(z: &[f64]) -> Vec<f64> {
    let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
    z.iter().map(|v| lse - v).collect()
}

/// The smoothed target (1 − ε on y, ε/K on every class) dotted with −log p.
fn smoothed(nll: &[f64], y: usize, smoothing: f64) -> f64 {
    let k = nll.len() as f64;
    nll.iter()
        .enumerate()
        .map(|(c, l)| ((if c == y { 1.0 - smoothing } else { 0.0 }) + smoothing / k) * l)
        .sum()
}

#[test]
fn classification_loss_with_label_smoothing_by_hand() -> mdeq_testkit::Result {
    let logits: Vec<f32> = (0..12).map(|i| ((i * 5) % 7) as f32 * 0.4 - 1.2).collect();
    let labels = [2i64, 0, 3];
    let dev = Device::Cpu;
    let t_logits = Tensor::from_vec(logits.clone(), (3, 4), &dev)?;
    let t_labels = Tensor::new(&labels, &dev)?;
    for smoothing in [0.0, 0.1, 0.5] {
        let want = (0..3)
            .map(|b| {
                let z: Vec<f64> = logits[b * 4..b * 4 + 4].iter().map(|&v| v as f64).collect();
                smoothed(&nll_by_class(&z), labels[b] as usize, smoothing)
            })
            .sum::<f64>()
            / 3.0;
        let got = classification_loss(&t_logits, &t_labels, smoothing)?.to_scalar::<f32>()? as f64;
        assert!(
            (got - want).abs() < 1e-6,
            "ε = {smoothing}: {got} vs {want}"
        );
    }
    // Uniform logits: every class has −log p = log K, whatever the target.
    let uniform = Tensor::zeros((3, 4), candle_core::DType::F32, &dev)?;
    let got = classification_loss(&uniform, &t_labels, 0.3)?.to_scalar::<f32>()? as f64;
    assert!((got - 4f64.ln()).abs() < 1e-6, "{got}");
    Ok(())
}

#[test]
fn segmentation_loss_is_the_weighted_mean_over_labelled_pixels() -> mdeq_testkit::Result {
    // B = 2, K = 3, 2×2 pixels (no resizing: logits already at label size).
    let logits: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.0).collect();
    let labels: Vec<i64> = vec![0, 2, 255, 1, 1, 1, 0, 255];
    let weights = [0.5f64, 2.0, 1.5];
    let dev = Device::Cpu;
    let t_logits = Tensor::from_vec(logits.clone(), (2, 3, 2, 2), &dev)?;
    let t_labels = Tensor::from_vec(labels.clone(), (2, 2, 2), &dev)?;
    let t_weights = Tensor::new(&[0.5f32, 2.0, 1.5], &dev)?;
    for smoothing in [0.0, 0.2] {
        let (mut num, mut den) = (0f64, 0f64);
        for b in 0..2 {
            for p in 0..4 {
                let y = labels[b * 4 + p];
                if y == 255 {
                    continue;
                }
                let z: Vec<f64> = (0..3).map(|k| logits[b * 12 + k * 4 + p] as f64).collect();
                let w = weights[y as usize];
                num += w * smoothed(&nll_by_class(&z), y as usize, smoothing);
                den += w;
            }
        }
        let got = segmentation_loss(&t_logits, &t_labels, Some(&t_weights), smoothing)?
            .to_scalar::<f32>()? as f64;
        assert!(
            (got - num / den).abs() < 1e-6,
            "ε = {smoothing}: {got} vs {}",
            num / den
        );
    }
    let all_ignored = Tensor::full(255i64, (2, 2, 2), &dev)?;
    let zero = segmentation_loss(&t_logits, &all_ignored, None, 0.1)?;
    assert_eq!(zero.to_scalar::<f32>()?, 0.0);
    Ok(())
}

#[test]
fn confusion_matrix_iou_by_hand() -> mdeq_testkit::Result {
    let dev = Device::Cpu;
    // truth:     0 0 1 1 2 255
    // predicted: 0 1 1 1 0 2
    let truth = Tensor::new(&[0i64, 0, 1, 1, 2, 255], &dev)?;
    let pred = Tensor::new(&[0u32, 1, 1, 1, 0, 2], &dev)?;
    let mut m = ConfusionMatrix::new(3);
    m.add(&truth, &pred)?;
    assert_eq!(m.total(), 5, "the ignored pixel is not counted");
    // class 0: TP 1, FN 1, FP 1 → 1/3; class 1: TP 2, FP 1 → 2/3; class 2: TP 0 → 0.
    let iou = m.iou();
    assert!((iou[0] - 1.0 / 3.0).abs() < 1e-12 && (iou[1] - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(iou[2], 0.0);
    assert!((m.mean_iou() - 1.0 / 3.0).abs() < 1e-12);
    assert!((m.pixel_accuracy() - 3.0 / 5.0).abs() < 1e-12);
    // All three classes occur (class 2 in the truth): the batch mIoU is the plain mean here…
    assert!((m.mean_iou_present() - 1.0 / 3.0).abs() < 1e-12);
    // …and a class that never occurs is left out of it.
    let mut wide = ConfusionMatrix::new(5);
    wide.add(&truth, &pred)?;
    assert!((wide.mean_iou_present() - 1.0 / 3.0).abs() < 1e-12);
    assert!((wide.mean_iou() - 1.0 / 5.0).abs() < 1e-12);
    let bad = Tensor::new(&[7i64], &dev)?;
    assert!(m.add(&bad, &Tensor::new(&[0u32], &dev)?).is_err());
    Ok(())
}

fn read_varint(b: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[*at];
        *at += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// (field number, wire type, payload bytes or fixed value bytes) of one protobuf message.
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < b.len() {
        let key = read_varint(b, &mut at);
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => read_varint(b, &mut at).to_le_bytes().to_vec(),
            1 => {
                at += 8;
                b[at - 8..at].to_vec()
            }
            2 => {
                let n = read_varint(b, &mut at) as usize;
                at += n;
                b[at - n..at].to_vec()
            }
            5 => {
                at += 4;
                b[at - 4..at].to_vec()
            }
            w => panic!("wire type {w}"),
        };
        out.push((field, wire, payload));
    }
    out
}

#[test]
fn tensorboard_events_decode_to_the_logged_scalars() -> mdeq_testkit::Result {
    let dir = std::env::temp_dir().join(format!("mdeq-tb-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut w = EventWriter::create(&dir)?;
    w.scalar("train/loss", 7, 0.25)?;
    w.scalar("eval/top1", 300, 0.875)?;
    w.flush()?;
    let bytes = std::fs::read(w.path())?;
    // The TFRecord masked CRC-32C, computed here from the Castagnoli polynomial bit by bit.
    let crc32c = |data: &[u8]| {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        let crc = !crc;
        crc.rotate_right(15).wrapping_add(0xa282_ead8)
    };
    let mut at = 0;
    let mut events = Vec::new();
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let n = u64::from_le_bytes(len_bytes.try_into()?) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into()?);
        assert_eq!(len_crc, crc32c(len_bytes));
        let data = &bytes[at + 12..at + 12 + n];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + n..at + 16 + n].try_into()?);
        assert_eq!(data_crc, crc32c(data));
        events.push(fields(data));
        at += 16 + n;
    }
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[0][2],
        (3, 2, b"brain.Event:2".to_vec()),
        "file_version first"
    );
    let scalar = |e: &Vec<(u64, u64, Vec<u8>)>| {
        let step = u64::from_le_bytes(e[1].2.clone().try_into().unwrap());
        let summary = fields(&e[2].2);
        let value = fields(&summary[0].2);
        let tag = String::from_utf8(value[0].2.clone()).unwrap();
        let v = f32::from_le_bytes(value[1].2.clone().try_into().unwrap());
        (step, tag, v)
    };
    assert_eq!(scalar(&events[1]), (7, "train/loss".to_string(), 0.25));
    assert_eq!(scalar(&events[2]), (300, "eval/top1".to_string(), 0.875));
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn non_finite_outputs_count_as_wrong_in_every_metric() -> mdeq_testkit::Result {
    use mdeq_train::loss::predict_pixels;
    use mdeq_train::metrics::correct;
    let dev = Device::Cpu;
    // Sample 0: right; 1: NaN everywhere (no logit compares greater than the target's, which
    // used to count it right); 2: the target's logit is +∞; 3: right but one logit is NaN.
    let nan = f32::NAN;
    let logits = Tensor::new(
        &[
            [3.0f32, 1.0, 0.0],
            [nan, nan, nan],
            [0.0, f32::INFINITY, 0.0],
            [2.0, nan, 0.0],
        ],
        &dev,
    )?;
    let labels = Tensor::new(&[0i64, 1, 1, 0], &dev)?;
    assert_eq!(correct(&logits, &labels)?, (1, 1));
    let err = correct(&logits, &Tensor::new(&[0i64, 1, 3, 0], &dev)?).unwrap_err();
    assert!(err.to_string().contains("label 3 outside 0..3"), "{err}");

    // Segmentation: a pixel with a non-finite logit gets no prediction (the class count) and
    // lowers both its class's IoU and the pixel accuracy. B = 1, K = 2, 1×2 pixels, labels [0, 1].
    let logits = Tensor::new(&[[[[5.0f32, nan]], [[0.0, 1.0]]]], &dev)?;
    let predicted = predict_pixels(&logits, 1, 2)?;
    assert_eq!(predicted.flatten_all()?.to_vec1::<u32>()?, vec![0, 2]);
    let mut confusion = ConfusionMatrix::new(2);
    confusion.add(&Tensor::new(&[[[0i64, 1]]], &dev)?, &predicted)?;
    assert_eq!(confusion.total(), 2);
    assert_eq!(confusion.pixel_accuracy(), 0.5);
    assert_eq!(confusion.iou(), vec![1.0, 0.0]);
    Ok(())
}

#[test]
fn charts_of_any_finite_or_non_finite_values_are_drawn() -> mdeq_testkit::Result {
    use mdeq_train::plots::{line_chart, Series};
    let dir = mdeq_testkit::scratch_dir("plots")?;
    let path = dir.join("wild.png");
    // ±1e308 once made the axis range infinite and the drawing loop forever.
    let series = [Series {
        name: "loss".into(),
        points: vec![
            (1.0, 0.5),
            (2.0, 1e308),
            (3.0, -1e308),
            (4.0, f64::NAN),
            (f64::INFINITY, 0.2),
            (5.0, 0.25),
        ],
    }];
    let started = std::time::Instant::now();
    line_chart(&path, "wild", "step", "loss", &series)?;
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
    assert!(std::fs::read(&path)?.starts_with(b"\x89PNG"));
    // A single point, or a flat line, still gets a non-empty range.
    let flat = [Series {
        name: "acc".into(),
        points: vec![(1.0, 1e99), (2.0, 1e99)],
    }];
    line_chart(&dir.join("flat.png"), "flat", "step", "acc", &flat)?;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// The order statistics of 1, 2, …, 100 (shuffled, with a NaN and an infinity) by nearest
/// rank: the q-quantile is the ⌈100q⌉-th smallest value.
#[test]
fn distribution_reads_the_nearest_rank_quantiles() {
    use mdeq_train::distribution::Distribution;
    let mut values: Vec<f64> = (1..=100).map(|k| ((k * 37) % 100 + 1) as f64).collect();
    values.push(f64::NAN);
    values.insert(3, f64::INFINITY);
    let d = Distribution::of(&values, 10.5);
    assert_eq!((d.count, d.non_finite), (100, 2));
    assert_eq!(
        (d.min, d.median, d.p90, d.p99, d.max),
        (1.0, 50.0, 90.0, 99.0, 100.0)
    );
    assert_eq!(d.mean, 50.5);
    assert_eq!(d.below, 0.1);
    let none = Distribution::of(&[f64::NAN], 1.0);
    assert_eq!((none.count, none.non_finite), (0, 1));
    assert!(none.median.is_nan() && none.mean.is_nan());
}
