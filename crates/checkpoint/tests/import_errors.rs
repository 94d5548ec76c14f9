//! Official-file import: all three formats, key hygiene, and every bad-input path.

use candle_core::{DType, Device};
use mdeq_checkpoint::official::read_state_dict_bytes;
use mdeq_checkpoint::{format, import, read_state_dict, CheckpointError};
use mdeq_model::Mdeq;
use mdeq_recipe::ExperimentConfig;
use mdeq_testkit::fixture_str as fixture;
use mdeq_testkit::Context;

fn tiny() -> mdeq_testkit::Result<(ExperimentConfig, Mdeq)> {
    let cfg = ExperimentConfig::load(&fixture("cls-tiny/config.yaml"))?;
    let model = Mdeq::new(&cfg.model, DType::F32, &Device::Cpu, 0)?;
    Ok((cfg, model))
}

#[test]
fn three_formats_give_identical_tensors() -> mdeq_testkit::Result {
    let st = read_state_dict(&fixture("cls-tiny/weights.safetensors"))?;
    for other in ["cls-tiny/state_dict.pth", "cls-tiny/state_dict_legacy.pth"] {
        let mut sd = read_state_dict(&fixture(other))?;
        sd.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(sd.len(), st.len(), "{other}");
        for ((ka, ta), (kb, tb)) in st.iter().zip(&sd) {
            assert_eq!(ka, kb);
            assert_eq!(ta.dims(), tb.dims(), "{ka}");
            let da = ta.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            let db = tb.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            assert_eq!(da, db, "{other}: {ka}");
        }
    }
    Ok(())
}

#[test]
fn wrapper_prefixes_are_stripped_and_old_repo_extras_ignored() -> mdeq_testkit::Result {
    let (_, model) = tiny()?;
    let mut sd = read_state_dict(&fixture("cls-tiny/weights.safetensors"))?;
    let extra = sd[0].1.clone();
    for (k, _) in sd.iter_mut() {
        *k = format!("module.{k}");
    }
    sd.push((
        "fullstage_copy.branches.0.blocks.0.conv1.weight".into(),
        extra.clone(),
    ));
    sd.push(("model.loss.criterion.weight".into(), extra.clone()));
    sd.push(("deq.func.x".into(), extra));
    import::load_into(&model, sd, "wrapped.pth")?;
    Ok(())
}

#[test]
fn every_key_problem_is_reported_in_one_error() -> mdeq_testkit::Result {
    let (_, model) = tiny()?;
    let mut sd = read_state_dict(&fixture("cls-tiny/weights.safetensors"))?;
    let removed = sd.iter().position(|(k, _)| k == "classifier.bias").unwrap();
    sd.remove(removed);
    let i = sd
        .iter()
        .position(|(k, _)| k == "classifier.weight")
        .unwrap();
    sd[i].1 = sd[i].1.narrow(0, 0, 5)?;
    sd.push(("surprise.weight".into(), sd[0].1.clone()));
    // The same key twice, once behind a wrapper prefix: neither copy may silently win.
    let first = sd
        .iter()
        .find(|(k, _)| k == "downsample.0.weight")
        .cloned()
        .context("the fixture has downsample.0.weight")?;
    sd.push((format!("model.{}", first.0), first.1));
    let err = import::load_into(&model, sd, "bad.pth").unwrap_err();
    let CheckpointError::Keys { report, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(report.missing, vec!["classifier.bias".to_string()]);
    assert_eq!(report.unexpected, vec!["surprise.weight".to_string()]);
    assert_eq!(report.duplicated, vec![first.0.clone()]);
    assert_eq!(
        report.misshaped,
        vec![("classifier.weight".to_string(), vec![10, 200], vec![5, 200])]
    );
    let msg = err.to_string();
    assert!(
        msg.contains("bad.pth")
            && msg.contains("classifier.bias")
            && msg.contains("surprise.weight")
            && msg.contains("more than once"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn post_gn_affine_mismatch_is_a_key_error() -> mdeq_testkit::Result {
    let mut cfg = ExperimentConfig::load(&fixture("cls-tiny/config.yaml"))?;
    cfg.model.post_gn_affine = true;
    let model = Mdeq::new(&cfg.model, DType::F32, &Device::Cpu, 0)?;
    let err = import::load_into(
        &model,
        read_state_dict(&fixture("cls-tiny/weights.safetensors"))?,
        "w",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("post_fuse_layers.0.gnorm.weight"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_pickle_naming_a_forbidden_global_is_refused_without_running_it() -> mdeq_testkit::Result {
    // The classic payload: os.system("touch ...") via GLOBAL + REDUCE.
    let marker = std::env::temp_dir().join(format!("mdeq-pwned-{}", std::process::id()));
    let mut p = b"\x80\x02cos\nsystem\nX".to_vec();
    let cmd = format!("touch {}", marker.display());
    p.extend((cmd.len() as u32).to_le_bytes());
    p.extend(cmd.as_bytes());
    p.extend(b"\x85R.");
    let err = read_state_dict_bytes(&p, "evil.pkl")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("os.system") && err.contains("evil.pkl"),
        "{err}"
    );
    assert!(!marker.exists());
    // The same inside a zip archive.
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut buf);
        w.start_file("archive/data.pkl", zip::write::SimpleFileOptions::default())?;
        std::io::Write::write_all(&mut w, &p)?;
        w.finish()?;
    }
    let err = read_state_dict_bytes(buf.get_ref(), "evil.pth")
        .unwrap_err()
        .to_string();
    assert!(err.contains("os.system"), "{err}");
    Ok(())
}

#[test]
fn truncated_files_give_errors_not_panics() -> mdeq_testkit::Result {
    for name in [
        "cls-tiny/state_dict.pth",
        "cls-tiny/state_dict_legacy.pth",
        "cls-tiny/weights.safetensors",
    ] {
        let bytes = std::fs::read(fixture(name))?;
        for cut in [1, 9, 100, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
            let r = read_state_dict_bytes(&bytes[..cut], name);
            assert!(r.is_err(), "{name} cut at {cut} was accepted");
            assert!(r.unwrap_err().to_string().contains(name));
        }
    }
    Ok(())
}

#[test]
fn corrupted_bytes_never_panic() -> mdeq_testkit::Result {
    let bytes = std::fs::read(fixture("cls-tiny/state_dict_legacy.pth"))?;
    for i in (0..bytes.len().min(20_000)).step_by(97) {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        let _ = read_state_dict_bytes(&b, "flipped.pth");
    }
    let err = read_state_dict_bytes(b"hello world", "notes.txt")
        .unwrap_err()
        .to_string();
    assert!(err.contains("notes.txt"), "{err}");
    Ok(())
}

#[test]
fn checkpoints_embed_their_config_and_round_trip() -> mdeq_testkit::Result {
    let (cfg, model) = tiny()?;
    import::load_into(
        &model,
        read_state_dict(&fixture("cls-tiny/weights.safetensors"))?,
        "w",
    )?;
    let dir = std::env::temp_dir().join(format!("mdeq-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("model.safetensors");
    format::save(&path, &model, &cfg, None)?;
    let (cfg2, model2) = format::load(&path, DType::F32, &Device::Cpu)?;
    assert_eq!(cfg, cfg2);
    for (a, b) in model.store().entries().iter().zip(model2.store().entries()) {
        assert_eq!(a.name, b.name);
        let da = a
            .var
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let db = b
            .var
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        assert_eq!(da, db, "{}", a.name);
    }
    // An official file is not an mdeq checkpoint: the error says what to do.
    let err = format::load(
        std::path::Path::new(&fixture("cls-tiny/weights.safetensors")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("mdeq import"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_failed_write_leaves_the_target_intact_and_no_temporary_behind() -> mdeq_testkit::Result {
    let dir = mdeq_testkit::scratch_dir("atomic")?;
    // The rename cannot replace a non-empty directory: the write fails, the directory and its
    // content stay, and the temporary file is gone.
    let path = dir.join("last.safetensors");
    std::fs::create_dir_all(path.join("inside"))?;
    assert!(format::write_atomic(&path, b"second").is_err());
    assert!(path.join("inside").is_dir());
    let left: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    assert_eq!(left.len(), 1, "{left:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn checkpoint_writes_cannot_be_redirected_and_clean_up_after_dead_writers() -> mdeq_testkit::Result
{
    let dir = mdeq_testkit::scratch_dir("atomic-hostile")?;
    let path = dir.join("last.safetensors");
    // Someone who can write the output folder plants symlinks at the temporary names the old
    // writer used (`.<name>.tmp-<pid>`), pointing at a file of the user's.
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"precious")?;
    let pid = std::process::id();
    std::os::unix::fs::symlink(&victim, dir.join(format!(".last.safetensors.tmp-{pid}")))?;
    format::write_atomic(&path, b"checkpoint")?;
    assert_eq!(std::fs::read(&victim)?, b"precious");
    assert_eq!(std::fs::read(&path)?, b"checkpoint");
    // A temporary a killed process left (pid above the kernel's maximum: never alive) is
    // removed by the next write; one of a live process (ours) is left alone.
    let stale = dir.join(".last.safetensors.tmp-4294967-0123456789abcdef");
    let live = dir.join(format!(".last.safetensors.tmp-{pid}-0123456789abcdef"));
    std::fs::write(&stale, vec![0u8; 4096])?;
    std::fs::write(&live, b"in flight")?;
    format::write_atomic(&path, b"again")?;
    assert!(!stale.exists(), "stale temporary left behind");
    assert!(live.exists(), "a live writer's temporary was removed");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn checkpoints_load_whatever_the_low_byte_of_their_header_length() -> mdeq_testkit::Result {
    // A safetensors file starts with its header length, little-endian, so its first byte is
    // any multiple of 8 (the header is padded to 8 bytes) — 0x80, a pickle's PROTO opcode,
    // included. Pad the metadata so that the header length takes every such low byte.
    let cfg = mdeq_testkit::tiny_classifier(&[4, 4]);
    let model = Mdeq::new(&cfg.model, DType::F32, &Device::Cpu, 1)?;
    let tensors: Vec<(String, candle_core::Tensor)> = model
        .store()
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.var.as_tensor().clone()))
        .collect();
    let dir = mdeq_testkit::scratch_dir("header-bytes")?;
    let mut seen = std::collections::BTreeSet::new();
    for pad in 0..256 {
        let metadata = std::collections::HashMap::from([
            (format::CONFIG_KEY.to_string(), cfg.to_toml_string()),
            (
                format::FORMAT_KEY.to_string(),
                format::FORMAT_VERSION.to_string(),
            ),
            ("padding".to_string(), "x".repeat(pad)),
        ]);
        let bytes = safetensors::tensor::serialize(tensors.clone(), Some(metadata))?;
        seen.insert(bytes[0]);
        let path = dir.join(format!("pad{pad}.safetensors"));
        std::fs::write(&path, &bytes)?;
        let (loaded, _) = format::load(&path, DType::F32, &Device::Cpu)
            .with_context(|| format!("first byte {:#04x}", bytes[0]))?;
        assert_eq!(loaded, cfg);
        assert_eq!(
            read_state_dict_bytes(&bytes, "mem")?.len(),
            tensors.len(),
            "first byte {:#04x}",
            bytes[0]
        );
    }
    assert_eq!(
        seen.len(),
        32,
        "every possible first byte was tried: {seen:?}"
    );
    assert!(seen.contains(&0x80));
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
