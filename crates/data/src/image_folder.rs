//! ImageFolder (the ImageNet layout): `<root>/train/<class>/*.JPEG`, `<root>/val/<class>/*`;
//! classes are the sub-directory names in sorted order; JPEG and PNG are decoded on demand as RGB.

use crate::{DataError, Dataset, Image, Sample, Split, Target};
use std::path::{Path, PathBuf};

/// Image files under one directory per class, decoded when asked for.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    files: Vec<(PathBuf, u32)>,
    classes: Vec<String>,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpeg" | "jpg" | "png"))
}

/// The entries of `dir` in sorted order, naming the directory on failure.
pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir.display(), e))?;
    let mut out = Vec::new();
    for entry in rd {
        out.push(entry.map_err(|e| DataError::io(dir.display(), e))?.path());
    }
    out.sort();
    Ok(out)
}

/// Reads an image file as RGB, naming the file on failure.
pub fn decode_rgb(path: &Path) -> Result<Image, DataError> {
    decode_image(path, 3)
}

/// Reads an image file (PNG or JPEG) as grey (`channels` 1) or RGB (3), naming the file on
/// failure.
pub fn decode_image(path: &Path, channels: usize) -> Result<Image, DataError> {
    let img = crate::decode::decode_file(path, "image")?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let pixels = match channels {
        1 => img.to_luma8().into_raw(),
        3 => img.to_rgb8().into_raw(),
        c => {
            return Err(DataError::format(
                path.display(),
                format!("models read 1 or 3 channels, not {c}"),
            ))
        }
    };
    Ok(Image {
        channels,
        height,
        width,
        pixels,
    })
}

impl ImageFolder {
    /// Lists `split` (`train` or `val`) under `root`.
    pub fn open(root: &Path, split: Split) -> Result<Self, DataError> {
        let dir = root.join(match split {
            Split::Train => "train",
            Split::Test => "val",
        });
        let class_dirs: Vec<PathBuf> = sorted_entries(&dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        if class_dirs.is_empty() {
            return Err(DataError::format(
                dir.display(),
                "no class directories (expected <split>/<class>/<image files>)",
            ));
        }
        let mut files = Vec::new();
        let mut classes = Vec::new();
        for (label, class_dir) in class_dirs.iter().enumerate() {
            classes.push(
                class_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            for f in sorted_entries(class_dir)? {
                if f.is_file() && is_image(&f) {
                    files.push((f, label as u32));
                }
            }
        }
        if files.is_empty() {
            return Err(DataError::format(
                dir.display(),
                "no .JPEG/.jpg/.png files in any class directory",
            ));
        }
        Ok(Self { files, classes })
    }

    /// Class names, index = label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn channels(&self) -> usize {
        3
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
    fn get(&self, i: usize) -> Result<Sample, DataError> {
        let (path, label) = &self.files[i];
        Ok(Sample {
            image: decode_rgb(path)?,
            target: Target::Class(*label),
        })
    }
    fn describe(&self, i: usize) -> String {
        self.files[i].0.display().to_string()
    }
}
