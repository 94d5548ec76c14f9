//! `mdeq train`, `mdeq eval` and `mdeq predict` driven as a user would, on small datasets this
//! test writes in the IDX layout: a classification recipe and a fashion-scenes segmentation
//! recipe, each trained for a few steps, evaluated, and asked for predictions.

use mdeq_testkit::{scratch_dir, tiny_classifier, write_toy_idx, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The tiny classifier as a ten-class Fashion-MNIST recipe with a short schedule.
fn classification_recipe() -> String {
    let mut cfg = tiny_classifier(&[4, 4]);
    cfg.name = "cls-e2e".into();
    cfg.model.num_layers = 2;
    cfg.model.num_classes = 10;
    cfg.deq.f_thres = 3;
    cfg.deq.b_thres = 3;
    cfg.deq.pretrain_steps = 2;
    cfg.train.batch_size = 5;
    cfg.data.dataset = "fashion_mnist".into();
    cfg.to_toml_string()
}

fn segmentation_recipe() -> String {
    r#"name = "seg-e2e"
[model]
task = "segmentation"
num_channels = [4, 4, 4]
num_blocks = [1, 1, 1]
big_kernels = [0, 0, 0]
expansion_factor = 2
num_groups = 2
downsample_times = 1
post_gn_affine = true
num_layers = 2
num_classes = 11
image_size = [16, 16]
in_channels = 1
[model.segmentation_head]
final_conv_kernel = 1
[deq]
f_thres = 3
b_thres = 3
stop_mode = "rel"
pretrain_steps = 2
[train]
optimizer = "adam"
lr = 0.01
epochs = 1
batch_size = 5
[data]
dataset = "fashion_scenes"
"#
    .to_string()
}

fn mdeq(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mdeq"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mdeq {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn last_json(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// A scratch folder with the toy dataset in `data/` and `recipe` in `recipe.toml`.
fn setup(tag: &str, recipe: &str) -> mdeq_testkit::Result<(PathBuf, PathBuf, PathBuf)> {
    let root = scratch_dir(&format!("cli-{tag}"))?;
    let data = root.join("data");
    write_toy_idx(&data, 20)?;
    let cfg = root.join("recipe.toml");
    std::fs::write(&cfg, recipe)?;
    Ok((root, data, cfg))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `mdeq eval --json` of `ckpt` on `data` with `extra` flags: the report's JSON.
fn eval_json(ckpt: &Path, data: &Path, extra: &[&str]) -> Value {
    let base = ["eval", "--checkpoint", s(ckpt), "--data", s(data), "--json"];
    last_json(&mdeq(&[&base[..], extra].concat()))
}

/// Trains the recipe for four steps; returns its last checkpoint.
fn train_briefly(cfg: &Path, data: &Path, out: &Path) -> PathBuf {
    let args = [
        "train",
        "--config",
        s(cfg),
        "--data",
        s(data),
        "--out",
        s(out),
    ];
    mdeq(&[&args[..], &["--max-steps", "4"]].concat());
    out.join("checkpoint-last.safetensors")
}

#[test]
fn classification_train_eval_predict() -> mdeq_testkit::Result {
    let (root, data, cfg) = setup("cls", &classification_recipe())?;
    let out = root.join("run");
    let ckpt = train_briefly(&cfg, &data, &out);
    let eval = |extra: &[&str]| eval_json(&ckpt, &data, extra);
    let curve = eval(&["--f-thres", "1,3"]);
    let points = curve["curve"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for (p, t) in points.iter().zip([1, 3]) {
        assert_eq!(p["f_thres"], t);
        assert_eq!(p["n"], 20);
        let (t1, t5) = (p["top1"].as_f64().unwrap(), p["top5"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&t1) && t1 <= t5);
    }
    assert!(std::fs::read(out.join("accuracy_vs_compute.png"))?.starts_with(b"\x89PNG"));
    let one = eval(&[]);
    assert!(one["top1"].is_number() && one["f_thres"] == 3);

    // Anytime inference: per-sample early exit at each tolerance. A looser tolerance lets each
    // image leave the solve no later, so it never costs more f evaluations; the diagnostics
    // describe every image, and a converged image's residual is below its tolerance.
    let plots = root.join("plots");
    let anytime = eval(&[
        "--f-thres",
        "12",
        "--tol",
        "0.9,1e-2,1e-6",
        "--diagnose",
        "--plots",
        s(&plots),
    ]);
    let points = anytime["curve"].as_array().unwrap();
    assert_eq!(points.len(), 3);
    let evals: Vec<f64> = points
        .iter()
        .map(|p| p["mean_evaluations"].as_f64().unwrap())
        .collect();
    assert!(evals.windows(2).all(|w| w[0] <= w[1]), "{evals:?}");
    assert!(evals[0] < evals[2] && evals[2] <= 13.0, "{evals:?}");
    for (p, tol) in points.iter().zip([0.9, 1e-2, 1e-6]) {
        assert_eq!(p["tol"], tol);
        let d = &p["diagnostics"];
        assert_eq!(d["residual"]["count"], 20);
        assert_eq!(d["spectral_radius"]["count"], 20);
        let converged = p["converged"].as_f64().unwrap();
        let below = d["residual"]["below"].as_f64().unwrap();
        assert!(below >= converged - 1e-12, "{below} < {converged}");
        let (lo, hi) = (
            d["residual"]["min"].as_f64().unwrap(),
            d["residual"]["max"].as_f64().unwrap(),
        );
        let mean = p["mean_residual"].as_f64().unwrap();
        assert!(lo <= mean && mean <= hi, "{lo} {mean} {hi}");
        assert!(d["spectral_radius"]["min"].as_f64().unwrap() > 0.0);
    }
    assert!(points[0]["converged"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read(plots.join("accuracy_vs_tolerance.png"))?.starts_with(b"\x89PNG"));

    // A grey PNG of a different size: resized to the recipe's 8×8.
    let png = root.join("item.png");
    image::GrayImage::from_fn(16, 16, |x, y| {
        image::Luma([if y / 4 == 1 && x > 3 { 220 } else { 0 }])
    })
    .save(&png)?;
    let pred = last_json(&mdeq(&[
        "predict",
        "--checkpoint",
        s(&ckpt),
        "--top-k",
        "3",
        "--json",
        s(&png),
    ]));
    let top = pred["predictions"][0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    let probs: Vec<f64> = top.iter().map(|t| t[2].as_f64().unwrap()).collect();
    assert!(probs.windows(2).all(|w| w[0] >= w[1]) && probs.iter().sum::<f64>() <= 1.0 + 1e-6);
    let names = mdeq_data::idx::FASHION_MNIST_CLASSES;
    for t in top {
        assert_eq!(
            t[1].as_str().unwrap(),
            names[t[0].as_u64().unwrap() as usize]
        );
    }
    // A file that is not an image: an error naming it.
    std::fs::write(root.join("bad.png"), b"nope")?;
    let bad = Command::new(env!("CARGO_BIN_EXE_mdeq"))
        .args([
            "predict",
            "--checkpoint",
            s(&ckpt),
            s(&root.join("bad.png")),
        ])
        .output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad.png"));
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn segmentation_train_eval_predict() -> mdeq_testkit::Result {
    let (root, data, cfg) = setup("seg", &segmentation_recipe())?;
    let out = root.join("run");
    let ckpt = train_briefly(&cfg, &data, &out);
    let log = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    assert!(log
        .lines()
        .any(|l| l.contains("\"kind\":\"eval\"") && l.contains("\"miou\"")));
    let r = eval_json(&ckpt, &data, &[]);
    let iou: Vec<f64> = r["class_iou"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(iou.len(), 11);
    let mean = iou.iter().sum::<f64>() / 11.0;
    assert!((r["miou"].as_f64().unwrap() - mean).abs() < 1e-12);
    let table = mdeq(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)]);
    assert!(table.contains("mIoU") && table.contains("background") && table.contains("ankle boot"));

    let png = root.join("scene.png");
    image::GrayImage::from_fn(16, 16, |x, y| {
        image::Luma([if (4..10).contains(&y) && x > 5 {
            200
        } else {
            0
        }])
    })
    .save(&png)?;
    let pred_dir = root.join("pred");
    mdeq(&[
        "predict",
        "--checkpoint",
        s(&ckpt),
        "--out",
        s(&pred_dir),
        s(&png),
    ]);
    for name in ["scene_labels.png", "scene_overlay.png"] {
        let img = image::open(pred_dir.join(name))?;
        assert_eq!((img.width(), img.height()), (16, 16), "{name}");
    }
    // Outputs two inputs would share, or that would overwrite an input, are refused before
    // anything is written.
    let twin = root.join("other").join("scene.png");
    std::fs::create_dir_all(twin.parent().context("a parent")?)?;
    std::fs::copy(&png, &twin)?;
    let labels = pred_dir.join("scene_labels.png");
    let before = std::fs::read(&labels)?;
    for (inputs, expected) in [
        ([s(&png), s(&twin)], "would both write"),
        ([s(&png), s(&labels)], "would overwrite the input"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mdeq"))
            .args(["predict", "--checkpoint", s(&ckpt), "--out", s(&pred_dir)])
            .args(inputs)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "{stderr}"
        );
    }
    assert_eq!(std::fs::read(&labels)?, before, "nothing was written");
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[test]
fn bench_times_every_figure_and_prints_its_json_report() -> mdeq_testkit::Result {
    let fixture = mdeq_testkit::fixture_str("cls-tiny");
    let stdout = mdeq(&[
        "bench",
        "--fixture",
        &fixture,
        "--batch",
        "2",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--f-steps",
        "2",
        "--b-steps",
        "2",
        "--json",
    ]);
    assert_eq!(stdout.lines().count(), 1, "--json prints the report alone");
    let report = last_json(&stdout);
    for figure in [
        "cell_forward",
        "forward_backward",
        "vjp",
        "train_step",
        "train_step_frozen",
        "train_step_ift",
        "train_step_ift_whole_batch",
        "train_step_phantom",
        "train_step_jfb",
        "train_step_unrolled",
        "forward_solve",
        "inference_per_image",
    ] {
        let ms = report["mdeq"][figure].as_f64();
        assert!(ms.is_some_and(|t| t > 0.0), "{figure}: {ms:?}");
    }
    // Without --compare-torch there is nothing to compare with.
    assert_eq!(report["ratio"], serde_json::json!({}));
    Ok(())
}

/// Processes running `exe busy-loop`, from /proc (Linux).
fn busy_loops_of(exe: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| {
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.first() == Some(&exe.as_bytes()) && args.get(1) == Some(&&b"busy-loop"[..])
        })
        .count()
}

#[test]
fn bench_busy_runs_competing_processes_while_it_times_and_stops_them() -> mdeq_testkit::Result {
    let exe = env!("CARGO_BIN_EXE_mdeq");
    let fixture = mdeq_testkit::fixture_str("cls-tiny");
    let child = Command::new(exe)
        .args([
            "bench",
            "--fixture",
            &fixture,
            "--batch",
            "2",
            "--busy",
            "2",
        ])
        .args([
            "--warmup",
            "0",
            "--repeats",
            "200",
            "--only",
            "cell_forward",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // While it times, two busy processes run beside it.
    let mut seen = 0;
    for _ in 0..200 {
        seen = seen.max(busy_loops_of(exe));
        if seen == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(seen, 2, "busy processes seen while timing");
    assert!(
        stderr.contains("2 busy processes run beside every figure"),
        "{stderr}"
    );
    let report = last_json(&String::from_utf8_lossy(&out.stdout));
    assert!(report["mdeq"]["cell_forward"]
        .as_f64()
        .is_some_and(|t| t > 0.0));
    // None is left running when the bench ends.
    assert_eq!(busy_loops_of(exe), 0);
    Ok(())
}

#[test]
fn a_bad_file_gives_one_error_line_naming_it_and_exit_status_2() -> mdeq_testkit::Result {
    let root = scratch_dir("cli-errors")?;
    let bad = root.join("bad.pth");
    std::fs::write(&bad, b"\x80\x02(")?;
    let out_path = root.join("out.safetensors");
    let (missing_toml, missing_ckpt) =
        (root.join("missing.toml"), root.join("missing.safetensors"));
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec![
                "import",
                "--config",
                "cifar-tiny",
                s(&bad),
                "-o",
                s(&out_path),
            ],
            "truncated pickle",
        ),
        (vec!["info", s(&missing_toml)], "No such file"),
        (
            vec!["eval", "--checkpoint", s(&missing_ckpt)],
            "No such file",
        ),
    ];
    for (args, cause) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_mdeq"))
            .args(&args)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(error_lines(&stderr), 1, "{args:?}: {stderr}");
        assert_eq!(stderr.matches(cause).count(), 1, "printed once: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!out_path.exists());
    std::fs::remove_dir_all(root)?;
    Ok(())
}

/// The lines of `stderr` besides the one that says what a command computes with (printed at the
/// start of every computing command); a refusal must have exactly one.
fn error_lines(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| !l.starts_with("computing on "))
        .count()
}

/// `--device cuda` where there is no CUDA is refused in one line that says why (a build without
/// the feature, or no usable device), before any file is read; an unknown device name is a
/// usage error naming the accepted ones.
#[test]
fn cuda_without_cuda_is_one_clear_error() -> mdeq_testkit::Result {
    if candle_core::utils::cuda_is_available() && candle_core::Device::new_cuda(0).is_ok() {
        return Ok(()); // a GPU is here: nothing to refuse
    }
    for args in [
        &[
            "eval",
            "--checkpoint",
            "missing.safetensors",
            "--device",
            "cuda",
        ][..],
        &["train", "--config", "cifar-tiny", "--device", "cuda:1"],
        &["bench", "--device", "cuda"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mdeq"))
            .args(args)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        let why = if candle_core::utils::cuda_is_available() {
            "no usable CUDA device"
        } else {
            "built without CUDA"
        };
        assert!(
            stderr.contains("--device cuda:") && stderr.contains(why),
            "{stderr}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_mdeq"))
        .args(["bench", "--device", "gpu"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cpu, cuda or cuda:N"), "{stderr}");
    Ok(())
}

/// A checkpoint written during unrolled pretraining is evaluated (and predicted) unrolled, as
/// training validated it, and says so; its score is the run's own evaluation of that
/// checkpoint; `--mode deq` solves instead. A checkpoint past pretraining solves by default.
#[test]
fn eval_uses_the_forward_the_checkpoint_was_trained_with() -> mdeq_testkit::Result {
    let recipe = classification_recipe().replace("pretrain_steps = 2", "pretrain_steps = 50");
    assert!(recipe.contains("pretrain_steps = 50"));
    let (root, data, cfg) = setup("cls-mode", &recipe)?;
    let out = root.join("run");
    let ckpt = train_briefly(&cfg, &data, &out);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let run_eval: Value = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .rfind(|v| v["kind"] == "eval")
        .context("the run evaluated at its end")?;
    let eval = |mode: Option<&str>| -> mdeq_testkit::Result<(Value, String)> {
        let mut args = ["eval", "--checkpoint", s(&ckpt), "--data", s(&data)].to_vec();
        args.push("--json");
        if let Some(m) = mode {
            args.extend(["--mode", m]);
        }
        let o = Command::new(env!("CARGO_BIN_EXE_mdeq"))
            .args(&args)
            .output()?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Ok((
            last_json(&String::from_utf8(o.stdout)?),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    };
    let (unrolled, said) = eval(None)?;
    assert!(
        said.contains("unrolled mode") && said.contains("step 4 of 50"),
        "{said}"
    );
    assert_eq!(
        unrolled["top1"], run_eval["top1"],
        "eval = the run's own evaluation"
    );
    assert_eq!(unrolled["mean_steps"], 0.0);
    assert_eq!(unrolled["forward"], "unrolled");
    let (deq, said) = eval(Some("deq"))?;
    assert!(
        said.contains("DEQ mode") && said.contains("--mode asks"),
        "{said}"
    );
    assert!(deq["mean_steps"].as_f64().unwrap() > 0.0);
    assert_eq!(deq["forward"], "deq");
    // Tolerances and diagnostics describe a solve: refused for the unrolled forward, with the
    // way to ask for the solve.
    let o = Command::new(env!("CARGO_BIN_EXE_mdeq"))
        .args([
            "eval",
            "--checkpoint",
            s(&ckpt),
            "--data",
            s(&data),
            "--diagnose",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("--mode deq"),
        "{stderr}"
    );
    // Past pretraining (the standard recipe pretrains for 2 of its 4 steps): DEQ by default.
    let (root2, data2, cfg2) = setup("cls-mode-deq", &classification_recipe())?;
    let ckpt2 = train_briefly(&cfg2, &data2, &root2.join("run"));
    let o = Command::new(env!("CARGO_BIN_EXE_mdeq"))
        .args([
            "eval",
            "--checkpoint",
            s(&ckpt2),
            "--data",
            s(&data2),
            "--json",
        ])
        .output()?;
    assert!(String::from_utf8_lossy(&o.stderr).contains("trained as a DEQ"));
    std::fs::remove_dir_all(root)?;
    std::fs::remove_dir_all(root2)?;
    Ok(())
}
