//! Official key hygiene (reference §1.9) and strict loading of a state dict into a model.

use crate::error::{CheckpointError, KeyReport};
use crate::official::StateDict;
use mdeq_model::Mdeq;

/// Prefixes of official checkpoint entries that are not weights of the model: the old repo's
/// non-weight-normalised twin, its wrapper duplicates, and the segmentation loss's class weights.
pub const IGNORED_PREFIXES: &[&str] = &["fullstage_copy.", "deq.", "loss."];

/// Strips `model.` / `module.` wrappers and drops ignored entries. Returns the kept entries and the
/// names that were dropped.
pub fn normalize_keys(entries: StateDict) -> (StateDict, Vec<String>) {
    let mut kept = Vec::with_capacity(entries.len());
    let mut dropped = Vec::new();
    for (name, t) in entries {
        let mut key = name.as_str();
        while let Some(rest) = key
            .strip_prefix("module.")
            .or_else(|| key.strip_prefix("model."))
        {
            key = rest;
        }
        if IGNORED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            dropped.push(name.clone());
        } else {
            kept.push((key.to_string(), t));
        }
    }
    (kept, dropped)
}

/// Compares a (normalised) state dict with the model's keys and shapes.
pub fn compare(model: &Mdeq, entries: &StateDict) -> KeyReport {
    let mut report = KeyReport::default();
    let store = model.store();
    let mut seen = std::collections::HashSet::new();
    for (k, _) in entries {
        if !seen.insert(k.as_str()) && !report.duplicated.contains(k) {
            report.duplicated.push(k.clone());
        }
    }
    for e in store.entries() {
        if !entries.iter().any(|(k, _)| *k == e.name) {
            report.missing.push(e.name.clone());
        }
    }
    for (k, t) in entries {
        match store.get(k) {
            None => report.unexpected.push(k.clone()),
            Some(e) if e.var.dims() != t.dims() => {
                report
                    .misshaped
                    .push((k.clone(), e.var.dims().to_vec(), t.dims().to_vec()))
            }
            Some(_) => {}
        }
    }
    report
}

/// Loads `entries` into `model` after checking every key; nothing is changed unless all match.
pub fn load_into(model: &Mdeq, entries: StateDict, path: &str) -> Result<(), CheckpointError> {
    let (entries, _) = normalize_keys(entries);
    let report = compare(model, &entries);
    if !report.is_clean() {
        return Err(CheckpointError::Keys {
            path: path.to_string(),
            report,
        });
    }
    let store = model.store();
    for (k, t) in entries {
        let e = store.get(&k).expect("compared above");
        t.to_dtype(e.var.dtype())
            .and_then(|t| t.to_device(e.var.device()))
            .and_then(|t| e.var.set(&t))
            .map_err(|err| CheckpointError::format(path, format!("key {k}: {err}")))?;
    }
    Ok(())
}
