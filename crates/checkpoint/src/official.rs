//! Reading official state dicts: PyTorch zip `.pth`, legacy (pre-1.6) pickled `.pth`/`.pkl`, and
//! safetensors. The format is recognised from the file's first bytes, not its name.

use crate::error::CheckpointError;
use crate::pickle::{self, StorageDtype, TensorRef, Value};
use candle_core::{DType, Tensor};
use mdeq_model::HOST;
use std::collections::HashMap;
use std::io::Read;

/// Named tensors in the file's order.
pub type StateDict = Vec<(String, Tensor)>;

/// The container format of a state-dict file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// `torch.save` zip archive (PyTorch ≥ 1.6).
    TorchZip,
    /// `torch.save(..., _use_new_zipfile_serialization=False)` and PyTorch < 1.6.
    TorchLegacy,
    /// safetensors.
    Safetensors,
}

/// Recognises the format from the leading bytes, by each format's whole signature: safetensors
/// (an 8-byte little-endian header length that fits the file, then `{`) is tested first,
/// because its first byte is the low byte of that length and can be anything — 0x80, a
/// pickle's PROTO opcode, included.
pub fn detect_format(bytes: &[u8], path: &str) -> Result<FileFormat, CheckpointError> {
    if is_safetensors(bytes) {
        Ok(FileFormat::Safetensors)
    } else if bytes.starts_with(b"PK\x03\x04") {
        Ok(FileFormat::TorchZip)
    } else if bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]) {
        // PROTO opcode with a protocol torch.save writes (2) or a later pickle could (3..=5).
        Ok(FileFormat::TorchLegacy)
    } else {
        Err(CheckpointError::format(
            path,
            "not a PyTorch (.pth zip or legacy pickle) or safetensors file",
        ))
    }
}

/// An 8-byte header length that fits in the file, followed by the JSON header's `{`.
fn is_safetensors(bytes: &[u8]) -> bool {
    let Some(len) = bytes.get(..8) else {
        return false;
    };
    let header = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    header >= 2 && header <= (bytes.len() - 8) as u64 && bytes[8] == b'{'
}

/// Reads every tensor of a state dict from `path`.
pub fn read_state_dict(path: &str) -> Result<StateDict, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_string(),
        cause: source,
    })?;
    read_state_dict_bytes(&bytes, path)
}

/// Reads every tensor of a state dict held in memory (`path` is used in messages).
pub fn read_state_dict_bytes(bytes: &[u8], path: &str) -> Result<StateDict, CheckpointError> {
    match detect_format(bytes, path)? {
        FileFormat::Safetensors => read_safetensors(bytes, path),
        FileFormat::TorchZip => read_zip(bytes, path),
        FileFormat::TorchLegacy => read_legacy(bytes, path),
    }
}

fn read_safetensors(bytes: &[u8], path: &str) -> Result<StateDict, CheckpointError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| CheckpointError::format(path, format!("invalid safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &HOST)
            .map_err(|e| CheckpointError::format(path, format!("tensor {name}: {e}")))?;
        out.push((name, t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn read_zip(bytes: &[u8], path: &str) -> Result<StateDict, CheckpointError> {
    let zerr = |e: zip::result::ZipError| {
        CheckpointError::format(path, format!("corrupt zip archive: {e}"))
    };
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(zerr)?;
    let pkl_name = archive
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.to_string())
        .ok_or_else(|| {
            CheckpointError::format(path, "zip archive has no data.pkl: not a torch.save file")
        })?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut f) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        f.read_to_string(&mut order)
            .map_err(|e| CheckpointError::format(path, format!("byteorder: {e}")))?;
        if order.trim() != "little" {
            return Err(CheckpointError::format(
                path,
                format!("byte order '{}' is not supported", order.trim()),
            ));
        }
    }
    // Entries are inflated up to what they must hold and one byte more, never to what their
    // header claims: a small archive cannot make us allocate gigabytes.
    let mut read_entry = |name: &str, limit: u64| -> Result<Vec<u8>, CheckpointError> {
        let entry_err = |m: String| CheckpointError::format(path, format!("entry {name}: {m}"));
        let f = archive
            .by_name(name)
            .map_err(|e| entry_err(e.to_string()))?;
        let mut buf = Vec::new();
        f.take(limit.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| entry_err(e.to_string()))?;
        if buf.len() as u64 > limit {
            return Err(entry_err(format!(
                "holds more than the {limit} bytes it may"
            )));
        }
        Ok(buf)
    };
    let pkl = read_entry(&pkl_name, MAX_PICKLE_BYTES)?;
    let mut pos = 0;
    let root = pickle::load(&pkl, &mut pos).map_err(|source| CheckpointError::Pickle {
        path: path.to_string(),
        cause: source,
    })?;
    let refs = tensor_refs(root, path)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(refs.len());
    for (name, r) in refs {
        if !storages.contains_key(&r.storage_key) {
            // The storage's own element count says how many bytes it holds (checked against
            // the data in `materialize`).
            let expected = (r.storage_numel as u64).saturating_mul(r.dtype.size() as u64);
            let data = read_entry(&format!("{prefix}data/{}", r.storage_key), expected)?;
            storages.insert(r.storage_key.clone(), data);
        }
        out.push((
            name.clone(),
            materialize(&r, &storages[&r.storage_key], &name, path)?,
        ));
    }
    Ok(out)
}

/// The largest `data.pkl` accepted: the pickle of a state dict is a few hundred bytes per tensor.
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Legacy magic number 0x1950a86a20f9469cfc6c, as pickled by torch (little-endian LONG1 bytes).
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn read_legacy(bytes: &[u8], path: &str) -> Result<StateDict, CheckpointError> {
    let perr = |source| CheckpointError::Pickle {
        path: path.to_string(),
        cause: source,
    };
    let mut pos = 0;
    match pickle::load(bytes, &mut pos).map_err(perr)? {
        Value::BigInt(b) if b == LEGACY_MAGIC => {}
        _ => {
            return Err(CheckpointError::format(
                path,
                "pickle file is not a torch.save file (bad magic number)",
            ))
        }
    }
    match pickle::load(bytes, &mut pos).map_err(perr)? {
        Value::Int(1001) => {}
        other => {
            return Err(CheckpointError::format(
                path,
                format!("unsupported legacy protocol version {other:?}"),
            ))
        }
    }
    if let Value::Dict(info) = pickle::load(bytes, &mut pos).map_err(perr)? {
        let little = info
            .iter()
            .find(|(k, _)| *k == Value::Str("little_endian".into()))
            .map(|(_, v)| v.clone());
        if little == Some(Value::Bool(false)) {
            return Err(CheckpointError::format(
                path,
                "big-endian legacy files are not supported",
            ));
        }
    }
    let root = pickle::load(bytes, &mut pos).map_err(perr)?;
    let keys = match pickle::load(bytes, &mut pos).map_err(perr)? {
        Value::List(keys) => keys,
        _ => {
            return Err(CheckpointError::format(
                path,
                "legacy storage key list is missing",
            ))
        }
    };
    let refs = tensor_refs(root, path)?;
    let dtype_of: HashMap<&str, StorageDtype> = refs
        .iter()
        .map(|(_, r)| (r.storage_key.as_str(), r.dtype))
        .collect();
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err(CheckpointError::format(
                path,
                "legacy storage key is not a string",
            ));
        };
        let dtype = *dtype_of.get(key.as_str()).ok_or_else(|| {
            CheckpointError::format(path, format!("storage {key} is not used by any tensor"))
        })?;
        let header = bytes.get(pos..pos + 8).ok_or_else(|| {
            CheckpointError::format(path, format!("truncated before storage {key}"))
        })?;
        let numel = u64::from_le_bytes(header.try_into().unwrap()) as usize;
        pos += 8;
        let n = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| CheckpointError::format(path, "storage size overflows"))?;
        let data = bytes.get(pos..pos + n).ok_or_else(|| {
            CheckpointError::format(
                path,
                format!(
                    "truncated: storage {key} needs {n} bytes, {} left",
                    bytes.len() - pos
                ),
            )
        })?;
        pos += n;
        storages.insert(key, data.to_vec());
    }
    refs.into_iter()
        .map(|(name, r)| {
            let data = storages.get(&r.storage_key).ok_or_else(|| {
                CheckpointError::format(
                    path,
                    format!("tensor {name}: storage {} missing", r.storage_key),
                )
            })?;
            Ok((name.clone(), materialize(&r, data, &name, path)?))
        })
        .collect()
}

/// The (name, tensor reference) pairs of a state dict, accepting a bare state dict or a training
/// checkpoint holding one under "state_dict".
fn tensor_refs(root: Value, path: &str) -> Result<Vec<(String, TensorRef)>, CheckpointError> {
    let Value::Dict(mut items) = root else {
        return Err(CheckpointError::format(
            path,
            "top-level object is not a dict",
        ));
    };
    let nested = items
        .iter()
        .position(|(k, v)| *k == Value::Str("state_dict".into()) && matches!(v, Value::Dict(_)));
    if let Some(i) = nested {
        if let (_, Value::Dict(inner)) = items.swap_remove(i) {
            items = inner;
        }
    }
    items
        .into_iter()
        .map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Ok((k, t)),
            (Value::Str(k), other) => Err(CheckpointError::format(
                path,
                format!("key {k} holds {} instead of a tensor", kind(&other)),
            )),
            (k, _) => Err(CheckpointError::format(
                path,
                format!("non-string key {k:?}"),
            )),
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Dict(_) => "a dict",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Int(_) | Value::BigInt(_) => "an int",
        Value::Float(_) => "a float",
        Value::Str(_) => "a string",
        _ => "a non-tensor value",
    }
}

/// Copies the (possibly strided) elements of `r` out of its storage into a contiguous tensor.
fn materialize(
    r: &TensorRef,
    storage: &[u8],
    name: &str,
    path: &str,
) -> Result<Tensor, CheckpointError> {
    let es = r.dtype.size();
    let err = |m: String| CheckpointError::format(path, format!("tensor {name}: {m}"));
    let storage_bytes = r
        .storage_numel
        .checked_mul(es)
        .ok_or_else(|| err(format!("storage of {} elements overflows", r.storage_numel)))?;
    if storage.len() < storage_bytes {
        return Err(err(format!(
            "storage holds {} bytes, expected {storage_bytes}",
            storage.len()
        )));
    }
    let numel = r
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| err(format!("shape {:?} overflows", r.shape)))?;
    // A view may not hold more elements than its storage: stride-0 (broadcast) views would
    // turn a few stored bytes into an allocation of any size, and a state dict has none.
    if numel > r.storage_numel {
        return Err(err(format!(
            "shape {:?} has {numel} elements, more than its storage's {}",
            r.shape, r.storage_numel
        )));
    }
    let mut out = Vec::with_capacity(numel * es);
    if numel > 0 {
        let last = r
            .shape
            .iter()
            .zip(&r.stride)
            .try_fold(r.offset, |acc, (&d, &s)| {
                (d - 1).checked_mul(s)?.checked_add(acc)
            })
            .ok_or_else(|| err(format!("strides {:?} overflow", r.stride)))?;
        if last >= r.storage_numel {
            return Err(err(format!(
                "view reaches element {last} of a storage of {}",
                r.storage_numel
            )));
        }
        let mut idx = vec![0usize; r.shape.len()];
        for _ in 0..numel {
            let e = r.offset + idx.iter().zip(&r.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&storage[e * es..(e + 1) * es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < r.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
    let dtype = match r.dtype {
        StorageDtype::F32 => DType::F32,
        StorageDtype::F64 => DType::F64,
        StorageDtype::F16 => DType::F16,
        StorageDtype::BF16 => DType::BF16,
        StorageDtype::I64 => DType::I64,
        StorageDtype::U8 => DType::U8,
        other => return Err(err(format!("element type {other:?} is not supported"))),
    };
    Tensor::from_raw_buffer(&out, dtype, &r.shape, &HOST).map_err(|e| err(e.to_string()))
}
