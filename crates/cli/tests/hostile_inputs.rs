//! Every class of hostile or corrupt input, generated here (`mdeq_testkit::hostile`), run
//! through the command a user would run: each must end with exit status 2 and one error line
//! naming the file and the fault — no panic, no signal — within seconds and a memory limit
//! far below what the input would make a naive reader allocate.

use mdeq_testkit::hostile::{
    billion_laughs, deep_tuples, deep_yaml, gz_idx_bomb, legacy_view, memo_bomb, zip_with_bomb,
};
use mdeq_testkit::{scratch_dir, tiny_classifier, write_toy_idx};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Address space the command may use: enough for mdeq's allocator and thread stacks, far less
/// than the gigabytes each hostile file would cost a naive reader.
const ADDRESS_SPACE_KIB: u64 = 6 << 20;
const TIME_LIMIT: Duration = Duration::from_secs(30);

/// Runs `mdeq args` under the limits; returns (exit status, stderr).
fn mdeq(args: &[&str]) -> mdeq_testkit::Result<(Option<i32>, String)> {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "ulimit -v {ADDRESS_SPACE_KIB}; exec '{}' {}",
        env!("CARGO_BIN_EXE_mdeq"),
        quoted.join(" ")
    );
    let started = Instant::now();
    let out = Command::new("sh").args(["-c", &script]).output()?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    mdeq_testkit::ensure!(took < TIME_LIMIT, "mdeq {args:?} took {took:?}: {stderr}");
    Ok((out.status.code(), stderr))
}

/// Asserts a clean refusal: status 2, one line, naming `file` and containing `fault`.
fn refused(args: &[&str], file: &Path, fault: &str) -> mdeq_testkit::Result {
    let (status, stderr) = mdeq(args)?;
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    assert_eq!(
        status,
        Some(2),
        "mdeq {args:?} (a signal is None): {stderr}"
    );
    // Computing commands first say what they compute with; nothing else may precede the error.
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("computing on "))
        .collect();
    assert_eq!(lines.len(), 1, "mdeq {args:?}: {stderr}");
    assert!(
        stderr.contains(name) && stderr.contains(fault) && !stderr.contains("panicked"),
        "mdeq {args:?}: expected '{name}' and '{fault}' in: {stderr}"
    );
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn hostile_weights_files_are_refused_by_import() -> mdeq_testkit::Result {
    let dir = scratch_dir("hostile-import")?;
    let zip_src = std::fs::read(mdeq_testkit::fixture("cls-tiny/state_dict.pth"))?;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("deep.pth", deep_tuples(200_000), "nested deeper"),
        ("memo.pth", memo_bomb(20_000), "memo amplification"),
        ("laughs.pth", billion_laughs(12), "memo amplification"),
        (
            "wide.pth",
            legacy_view(&[1 << 16, 1 << 15], &[0, 0]),
            "more than its storage",
        ),
        (
            "huge.pth",
            legacy_view(&[1 << 32, 1 << 32, 1 << 32], &[0, 0, 0]),
            "overflows",
        ),
        (
            "bomb.pth",
            zip_with_bomb(&zip_src, "data/0", 256)?,
            "more than the 2592 bytes",
        ),
        (
            "truncated.pth",
            zip_src[..zip_src.len() / 2].to_vec(),
            "corrupt zip",
        ),
        (
            "noise.pth",
            (0..4096u64).map(|i| (i * 2654435761 % 251) as u8).collect(),
            "not a PyTorch",
        ),
    ];
    let out = dir.join("out.safetensors");
    for (name, bytes, fault) in &cases {
        let file = dir.join(name);
        std::fs::write(&file, bytes)?;
        let config = mdeq_testkit::fixture_str("cls-tiny/config.yaml");
        refused(
            &["import", "--config", &config, s(&file), "-o", s(&out)],
            &file,
            fault,
        )?;
    }
    assert!(!out.exists(), "a refused import wrote its output");
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn hostile_configs_are_refused_by_every_command_that_reads_them() -> mdeq_testkit::Result {
    let dir = scratch_dir("hostile-configs")?;
    let mut huge = tiny_classifier(&[4, 4]);
    huge.model.num_channels = vec![1_000_000, 1_000_000];
    huge.model
        .classification_head
        .as_mut()
        .expect("head")
        .head_channels = vec![8, 8];
    let mut runaway = tiny_classifier(&[4, 4]);
    runaway.deq.f_thres = 1_000_000_000;
    let mut nan_lr = tiny_classifier(&[4, 4]);
    nan_lr.train.lr = f64::NAN;
    let cases = [
        ("huge.toml", huge.to_toml_string(), "above the limit"),
        (
            "runaway.toml",
            runaway.to_toml_string(),
            "deq.f_thres = 1000000000",
        ),
        ("nan.toml", nan_lr.to_toml_string(), "train.lr = NaN"),
        ("deep.yaml", deep_yaml(100_000), "nested deeper"),
    ];
    for (name, text, fault) in &cases {
        let file = dir.join(name);
        std::fs::write(&file, text)?;
        refused(&["info", s(&file)], &file, fault)?;
        let data = dir.join("data");
        refused(
            &[
                "train",
                "--config",
                s(&file),
                "--data",
                s(&data),
                "--out",
                s(&dir.join("run")),
            ],
            &file,
            fault,
        )?;
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[test]
fn a_hostile_dataset_is_refused_by_train() -> mdeq_testkit::Result {
    let dir = scratch_dir("hostile-data")?;
    let data = dir.join("data");
    write_toy_idx(&data, 8)?;
    // The training images replaced by a gzip bomb: 8 images claimed, 1 GiB of zeros behind.
    std::fs::remove_file(data.join("train-images-idx3-ubyte"))?;
    let bomb = data.join("train-images-idx3-ubyte.gz");
    std::fs::write(&bomb, gz_idx_bomb(8, 1024)?)?;
    let mut cfg = tiny_classifier(&[4, 4]);
    cfg.model.num_classes = 10;
    let (recipe, run) = (dir.join("recipe.toml"), dir.join("run"));
    std::fs::write(&recipe, cfg.to_toml_string())?;
    let args = [
        "train",
        "--config",
        s(&recipe),
        "--data",
        s(&data),
        "--out",
        s(&run),
    ];
    refused(&args, &bomb, "or more")?;
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
