//! Reader for the official MDEQ-Vision yacs YAML experiment files.
//!
//! A yacs file is merged over the official defaults (`lib/config/default.py`,
//! `lib/config/models.py`), so a missing key takes the official default here too. Keys that only
//! matter to other HRNet tasks (pose joints, heatmaps, ...) are accepted and ignored, as yacs does.

use crate::{
    ClassificationHeadConfig, ConfigError, DataConfig, DeqConfig, ExperimentConfig, LrSchedule,
    ModelConfig, OptimizerKind, SegmentationHeadConfig, SolverKind, StopMode, Task, TrainConfig,
};
use serde_yaml::Value;

struct Yaml<'a> {
    root: Value,
    origin: &'a str,
}

impl<'a> Yaml<'a> {
    fn get(&self, key: &str) -> Option<&Value> {
        let mut v = &self.root;
        for part in key.split('.') {
            v = v.get(part)?;
        }
        Some(v)
    }

    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Key {
            path: self.origin.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, format!("expected a number, found {v:?}"))),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(key, format!("expected a non-negative integer, found {v:?}"))
            }),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true/false, found {v:?}"))),
        }
    }

    fn str_or(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(key, format!("expected a string, found {v:?}"))),
        }
    }

    fn usizes_or(&self, key: &str, default: &[usize]) -> Result<Vec<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(default.to_vec()),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64().map(|x| x as usize).ok_or_else(|| {
                        self.err(key, format!("expected a list of integers, found {v:?}"))
                    })
                })
                .collect(),
            Some(v) => Err(self.err(key, format!("expected a list, found {v:?}"))),
        }
    }

    fn list_len_or(&self, key: &str, default: usize) -> usize {
        match self.get(key) {
            Some(Value::Sequence(items)) => items.len(),
            _ => default,
        }
    }
}

/// The largest YAML accepted (the official experiment files are about 2 KB).
pub const MAX_YAML_BYTES: usize = crate::MAX_CONFIG_BYTES;
/// The deepest nesting of flow collections (`[`, `{`) accepted: yacs files nest two levels,
/// and the YAML parser's time grows with the square of the depth.
pub const MAX_YAML_FLOW_DEPTH: usize = 32;

/// Refuses text too large or too deeply nested to be a yacs file, before parsing it.
fn precheck(text: &str, origin: &str) -> Result<(), ConfigError> {
    let refuse = |message: String| ConfigError::Yaml {
        path: origin.to_string(),
        message,
    };
    if text.len() > MAX_YAML_BYTES {
        return Err(refuse(format!(
            "{} bytes, more than the {MAX_YAML_BYTES} a config may have",
            text.len()
        )));
    }
    let (mut depth, mut quote) = (0usize, None);
    for (line, row) in text.lines().zip(1..) {
        let mut comment = false;
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '#') => comment = true,
                _ if comment => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_YAML_FLOW_DEPTH {
                        return Err(refuse(format!(
                            "line {row}: collections nested deeper than {MAX_YAML_FLOW_DEPTH}"
                        )));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Parses an official yacs YAML file into our typed config (official defaults fill the gaps).
pub fn from_yaml_str(text: &str, origin: &str) -> Result<ExperimentConfig, ConfigError> {
    precheck(text, origin)?;
    let root: Value = serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml {
        path: origin.to_string(),
        message: e.to_string(),
    })?;
    if !root.is_mapping() {
        return Err(ConfigError::Yaml {
            path: origin.to_string(),
            message: "top level is not a mapping".into(),
        });
    }
    let y = Yaml { root, origin };
    let fs = "MODEL.EXTRA.FULL_STAGE";

    let dataset = y.str_or("DATASET.DATASET", "mpii")?;
    let is_seg = dataset.eq_ignore_ascii_case("cityscapes")
        || y.get("MODEL.EXTRA.FINAL_CONV_KERNEL").is_some();
    let task = if is_seg {
        Task::Segmentation
    } else {
        Task::Classification
    };

    let num_branches = y.usize_or(&format!("{fs}.NUM_BRANCHES"), 4)?;
    let num_channels = y.usizes_or(&format!("{fs}.NUM_CHANNELS"), &[64, 128, 256, 512])?;
    if num_channels.len() != num_branches {
        return Err(y.err(
            &format!("{fs}.NUM_CHANNELS"),
            format!(
                "has {} entries but NUM_BRANCHES is {num_branches}",
                num_channels.len()
            ),
        ));
    }
    let num_blocks = y.usizes_or(&format!("{fs}.NUM_BLOCKS"), &vec![1; num_branches])?;
    let big_kernels = y.usizes_or(&format!("{fs}.BIG_KERNELS"), &vec![0; num_branches])?;
    let module_count = y.usize_or(&format!("{fs}.NUM_MODULES"), 1)?;
    if module_count != 1 {
        return Err(y.err(
            &format!("{fs}.NUM_MODULES"),
            "only 1 module is supported (as in every official config)",
        ));
    }
    for (key, want) in [("BLOCK", "BASIC"), ("FUSE_METHOD", "SUM")] {
        let got = y.str_or(&format!("{fs}.{key}"), want)?;
        if got != want {
            return Err(y.err(
                &format!("{fs}.{key}"),
                format!("only {want} is supported, found {got}"),
            ));
        }
    }
    if y.bool_or("MODEL.CONV_INJECTION", false)? {
        return Err(y.err(
            "MODEL.CONV_INJECTION",
            "convolutional injection is not part of MDEQ-Vision's model",
        ));
    }

    let (num_classes, image_size, classification_head, segmentation_head) = match task {
        Task::Classification => {
            let size = y.usizes_or("MODEL.IMAGE_SIZE", &[256, 256])?;
            (
                y.usize_or("MODEL.NUM_CLASSES", 1000)?,
                size,
                Some(ClassificationHeadConfig {
                    head_channels: y
                        .usizes_or(&format!("{fs}.HEAD_CHANNELS"), &[32, 64, 128, 256])?,
                    final_chansize: y.usize_or(&format!("{fs}.FINAL_CHANSIZE"), 2048)?,
                }),
                None,
            )
        }
        Task::Segmentation => (
            y.usize_or("DATASET.NUM_CLASSES", 1000)?,
            y.usizes_or("TRAIN.IMAGE_SIZE", &[1024, 512])?,
            None,
            Some(SegmentationHeadConfig {
                final_conv_kernel: y.usize_or("MODEL.EXTRA.FINAL_CONV_KERNEL", 1)?,
            }),
        ),
    };
    if image_size.len() != 2 {
        return Err(y.err("IMAGE_SIZE", "expected [width, height]"));
    }

    let model = ModelConfig {
        task,
        num_channels,
        num_blocks,
        big_kernels,
        expansion_factor: y.usize_or("MODEL.EXPANSION_FACTOR", 5)?,
        num_groups: y.usize_or("MODEL.NUM_GROUPS", 4)?,
        downsample_times: y.usize_or("MODEL.DOWNSAMPLE_TIMES", 2)?,
        wnorm: y.bool_or("MODEL.WNORM", false)?,
        dropout: y.f64_or("MODEL.DROPOUT", 0.0)?,
        block_gn_affine: y.bool_or("MODEL.BLOCK_GN_AFFINE", true)?,
        fuse_gn_affine: y.bool_or("MODEL.FUSE_GN_AFFINE", true)?,
        post_gn_affine: y.bool_or("MODEL.POST_GN_AFFINE", true)?,
        num_layers: y.usize_or("MODEL.NUM_LAYERS", 5)?,
        num_classes,
        // yacs sizes are width × height.
        image_size: [image_size[1], image_size[0]],
        in_channels: 3,
        bn_momentum: None,
        classification_head,
        segmentation_head,
    };

    let stop_mode = match y.str_or("DEQ.STOP_MODE", "abs")?.as_str() {
        "abs" => StopMode::Abs,
        "rel" => StopMode::Rel,
        other => {
            return Err(y.err(
                "DEQ.STOP_MODE",
                format!("expected abs or rel, found {other}"),
            ))
        }
    };
    let solver = |key: &str| -> Result<SolverKind, ConfigError> {
        let name = y.str_or(key, "broyden")?;
        SolverKind::from_name(&name).ok_or_else(|| y.err(key, format!("unknown solver '{name}'")))
    };
    let ours = DeqConfig::default();
    let deq = DeqConfig {
        f_solver: solver("DEQ.F_SOLVER")?,
        b_solver: solver("DEQ.B_SOLVER")?,
        f_thres: y.usize_or("DEQ.F_THRES", ours.f_thres)?,
        b_thres: y.usize_or("DEQ.B_THRES", ours.b_thres)?,
        stop_mode,
        // The official defaults that differ from ours.
        pretrain_steps: y.usize_or("TRAIN.PRETRAIN_STEPS", 100_000)?,
        rand_f_thres_delta: y.usize_or("DEQ.RAND_F_THRES_DELTA", 2)?,
        ..ours
    };

    let optimizer = match y
        .str_or("TRAIN.OPTIMIZER", "adam")?
        .to_ascii_lowercase()
        .as_str()
    {
        "adam" => OptimizerKind::Adam,
        "sgd" => OptimizerKind::Sgd,
        other => {
            return Err(y.err(
                "TRAIN.OPTIMIZER",
                format!("expected adam or sgd, found {other}"),
            ))
        }
    };
    let gpus = y.list_len_or("GPUS", 1).max(1);
    let ours = TrainConfig::default();
    let train = TrainConfig {
        optimizer,
        lr: y.f64_or("TRAIN.LR", ours.lr)?,
        // The released segmentation models were trained with poly decay whatever the yaml says
        // (reference §5.4).
        lr_schedule: if is_seg {
            LrSchedule::Poly
        } else {
            LrSchedule::Cosine
        },
        // The official defaults for decay, momentum and augmentation differ from ours.
        weight_decay: y.f64_or("TRAIN.WD", 0.0001)?,
        momentum: y.f64_or("TRAIN.MOMENTUM", 0.9)?,
        nesterov: y.bool_or("TRAIN.NESTEROV", false)?,
        epochs: y.usize_or("TRAIN.END_EPOCH", ours.epochs)?,
        batch_size: y.usize_or("TRAIN.BATCH_SIZE_PER_GPU", ours.batch_size)? * gpus,
        augment: y.bool_or("DATASET.AUGMENT", true)?,
        jac_loss_weight: y.f64_or("LOSS.JAC_LOSS_WEIGHT", ours.jac_loss_weight)?,
        jac_loss_freq: y.f64_or("LOSS.JAC_LOSS_FREQ", ours.jac_loss_freq)?,
        pretrain_jac_loss_weight: y.f64_or(
            "LOSS.PRETRAIN_JAC_LOSS_WEIGHT",
            ours.pretrain_jac_loss_weight,
        )?,
        jac_incremental: y.f64_or("LOSS.JAC_INCREMENTAL", ours.jac_incremental as f64)? as u64,
        jac_stop_epoch: y.f64_or("LOSS.JAC_STOP_EPOCH", ours.jac_stop_epoch as f64)? as u64,
        ..ours
    };
    let data = DataConfig {
        dataset,
        root: y.str_or("DATASET.ROOT", "")?,
        eval_size: None,
        validation: 0,
    };
    let name = std::path::Path::new(origin)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("official")
        .to_string();
    let cfg = ExperimentConfig {
        name,
        model,
        deq,
        train,
        data,
    };
    cfg.validate_in(origin)?;
    Ok(cfg)
}
