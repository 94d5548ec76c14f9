//! `mdeq predict`: classes with probabilities for each image, or for segmentation models a
//! colour label map and an overlay PNG per image.

use crate::compute::ComputeArgs;
use crate::eval::chosen_forward;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use mdeq_checkpoint::format;
use mdeq_data::image_folder::decode_image;
use mdeq_data::{DatasetKind, Image};
use mdeq_model::equilibrium::{eval_forward, unrolled_forward};
use mdeq_model::params::all_finite;
use mdeq_model::{Compute, Mdeq, Task};
use mdeq_recipe::ExperimentConfig;
use mdeq_train::evaluate::Forward;
use mdeq_train::loss::predict_pixels;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One image's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// The input file.
    pub image: String,
    /// (class index, class name, probability), most likely first (classification).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(usize, String, f64)>,
    /// Written label-map and overlay PNGs (segmentation).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub written: Vec<String>,
    /// Forward solver steps and final residual.
    pub solver_steps: usize,
    /// Lowest residual the solver reached.
    pub residual: f64,
}

/// Flags of `mdeq predict`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// An mdeq checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// How many classes to list.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Directory for segmentation PNGs.
    #[arg(long, default_value = "predictions")]
    pub out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Image files (PNG or JPEG).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// The forward to predict with [default: the one the checkpoint was trained with].
    #[arg(long, value_enum)]
    pub mode: Option<Forward>,
    /// Where and in what the model computes.
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// Predicts and prints every image.
pub fn run(args: Args) -> Result<()> {
    let compute = args.compute.resolve()?;
    let preds = predict_images(&args, &compute)?;
    if args.json {
        println!("{}", serde_json::json!({ "predictions": preds }));
        return Ok(());
    }
    for p in &preds {
        if p.residual.is_nan() {
            println!("{} (unrolled forward)", p.image);
        } else {
            println!(
                "{} ({} solver steps, residual {:.1e})",
                p.image, p.solver_steps, p.residual
            );
        }
        for (c, name, prob) in &p.top {
            println!("  {:>6.2}%  {name} ({c})", 100.0 * prob);
        }
        for w in &p.written {
            println!("  wrote {w}");
        }
    }
    Ok(())
}

/// Predicts every image of `args` with its checkpoint; segmentation PNGs go to `args.out`.
pub fn predict_images(args: &Args, compute: &Compute) -> Result<Vec<Prediction>> {
    compute.run(|| {
        let (cfg, model, state) =
            format::load_with_state(&args.checkpoint, compute.dtype, &compute.device)?;
        let forward = chosen_forward(&cfg, state.as_ref(), args.mode, &args.checkpoint);
        predict_with(&cfg, &model, forward, args)
    })
}

/// [`predict_images`] with the checkpoint's recipe, model and forward chosen.
fn predict_with(
    cfg: &ExperimentConfig,
    model: &Mdeq,
    forward: Forward,
    args: &Args,
) -> Result<Vec<Prediction>> {
    let (checkpoint, images, top_k, out) = (&args.checkpoint, &args.images, args.top_k, &args.out);
    let compute_device = model.device();
    let kind = DatasetKind::parse(&cfg.data.dataset)?;
    let names = kind.class_names(cfg.model.num_classes);
    let rt = cfg.deq.runtime();
    let norm = kind.normalization();
    if cfg.model.task == Task::Segmentation {
        check_outputs(images, out)?;
    }
    let mut preds = Vec::new();
    for path in images {
        let raw = decode_image(path, cfg.model.in_channels)?;
        let segmentation = cfg.model.task == Task::Segmentation;
        let image = kind
            .prepare_image(raw, segmentation, cfg.model.image_size, cfg.data.eval_size)
            .with_context(|| path.display().to_string())?;
        cfg.model
            .check_input_size(image.height, image.width)
            .with_context(|| format!("{}: resize it or set data.eval_size", path.display()))?;
        let x = Tensor::from_vec(
            norm.apply(&image),
            (1, image.channels, image.height, image.width),
            compute_device,
        )?
        .to_dtype(model.dtype())?;
        let (logits, steps, residual) = match forward {
            Forward::Deq => {
                let (logits, _, stats) = eval_forward(model, &x, &rt)?;
                (logits, stats.steps, stats.worst_lowest())
            }
            Forward::Unrolled => (
                unrolled_forward(model, &x, cfg.model.num_layers)?,
                0,
                f64::NAN,
            ),
        };
        if !all_finite(&logits)? {
            bail!(
                "{}: the model's output is not finite (NaN or ±inf); check that {} holds finite weights",
                path.display(),
                checkpoint.display()
            );
        }
        let mut pred = Prediction {
            image: path.display().to_string(),
            top: Vec::new(),
            written: Vec::new(),
            solver_steps: steps,
            residual,
        };
        match cfg.model.task {
            Task::Classification => {
                let p = candle_nn::ops::softmax(&logits, 1)?
                    .squeeze(0)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                let mut order: Vec<usize> = (0..p.len()).collect();
                order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                pred.top = order
                    .into_iter()
                    .take(top_k)
                    .map(|c| (c, names[c].clone(), p[c] as f64))
                    .collect();
            }
            Task::Segmentation => {
                let classes = predict_pixels(&logits, image.height, image.width)?
                    .squeeze(0)?
                    .flatten_all()?
                    .to_vec1::<u32>()?;
                let palette = kind.palette(cfg.model.num_classes);
                pred.written = write_segmentation(path, out, &image, &classes, &palette)?;
            }
        }
        preds.push(pred);
    }
    Ok(preds)
}

/// The PNGs a segmentation prediction of `input` writes into `out`.
fn output_paths(input: &Path, out: &Path) -> [PathBuf; 2] {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    ["labels", "overlay"].map(|suffix| out.join(format!("{stem}_{suffix}.png")))
}

/// Refuses, before anything is written, outputs that two inputs would share (the same stem in
/// different folders) or that would overwrite an input.
fn check_outputs(images: &[PathBuf], out: &Path) -> Result<()> {
    let canonical = |p: &Path| -> PathBuf {
        // Outputs may not exist yet: canonicalise their folder and keep the file name.
        match (
            p.parent().and_then(|d| d.canonicalize().ok()),
            p.file_name(),
        ) {
            (Some(dir), Some(name)) => dir.join(name),
            _ => p.to_path_buf(),
        }
    };
    let inputs: Vec<PathBuf> = images.iter().map(|p| canonical(p)).collect();
    let mut planned: std::collections::HashMap<PathBuf, &Path> = Default::default();
    for input in images {
        for output in output_paths(input, out) {
            let key = canonical(&output);
            if let Some(other) = planned.insert(key.clone(), input) {
                bail!(
                    "{} and {} would both write {}: give them different names or predict them separately",
                    other.display(),
                    input.display(),
                    output.display()
                );
            }
            if inputs.contains(&key) {
                bail!(
                    "predicting {} would overwrite the input {}: choose another --out",
                    input.display(),
                    output.display()
                );
            }
        }
    }
    Ok(())
}

/// Writes `<stem>_labels.png` (palette colours) and `<stem>_overlay.png` (half image, half
/// colours) into `out`.
fn write_segmentation(
    input: &Path,
    out: &Path,
    image: &Image,
    classes: &[u32],
    palette: &[[u8; 3]],
) -> Result<Vec<String>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (w, h) = (image.width as u32, image.height as u32);
    let colour = |i: usize| palette[classes[i] as usize % palette.len()];
    let labels = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(colour((y * w + x) as usize)));
    let overlay = image::RgbImage::from_fn(w, h, |x, y| {
        let i = (y * w + x) as usize;
        let c = image.channels;
        let px = |k: usize| image.pixels[i * c + k.min(c - 1)] as u16;
        let col = colour(i);
        image::Rgb([0, 1, 2].map(|k| ((px(k) + col[k] as u16) / 2) as u8))
    });
    let mut written = Vec::new();
    for (path, img) in output_paths(input, out).into_iter().zip([labels, overlay]) {
        img.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}
