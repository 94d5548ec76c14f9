//! A restricted pickle reader for PyTorch state dicts.
//!
//! It interprets the opcodes a `torch.save(state_dict)` file uses and never executes code: a
//! global is only a name here, and only the few a state dict needs are accepted (tensor rebuild,
//! typed storages, `OrderedDict`). Any other global is rejected with an error naming it, so a
//! hostile file cannot make us call anything.

use std::collections::HashMap;

/// Element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    /// float32
    F32,
    /// float64
    F64,
    /// float16
    F16,
    /// bfloat16
    BF16,
    /// int64
    I64,
    /// int32
    I32,
    /// int16
    I16,
    /// int8
    I8,
    /// uint8
    U8,
    /// bool
    Bool,
}

impl StorageDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }
}

/// A reference to (part of) a storage, as `_rebuild_tensor_v2` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Storage key (file name in a zip archive, object id in a legacy file).
    pub storage_key: String,
    /// Element type.
    pub dtype: StorageDtype,
    /// Elements in the whole storage.
    pub storage_numel: usize,
    /// First element of this tensor within the storage.
    pub offset: usize,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

/// A value on the unpickler's stack.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Python None.
    None,
    /// bool
    Bool(bool),
    /// int that fits i64.
    Int(i64),
    /// int beyond i64, as little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    /// float
    Float(f64),
    /// str
    Str(String),
    /// bytes
    Bytes(Vec<u8>),
    /// tuple
    Tuple(Vec<Value>),
    /// list
    List(Vec<Value>),
    /// dict / OrderedDict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// An accepted global, by (module, name).
    Global(String, String),
    /// A storage named by a persistent id.
    Storage {
        key: String,
        dtype: StorageDtype,
        numel: usize,
    },
    /// A rebuilt tensor.
    Tensor(TensorRef),
    /// The MARK sentinel.
    Mark,
}

/// Why a pickle could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickleError {
    /// The stream ended inside an opcode.
    #[error("truncated pickle: unexpected end of data at byte {0}")]
    Truncated(usize),
    /// An opcode we do not interpret.
    #[error("unsupported pickle opcode 0x{op:02x} at byte {at}")]
    UnsupportedOpcode { op: u8, at: usize },
    /// A global outside the allow-list.
    #[error("refusing to load: the pickle references the global '{0}', which a state dict never needs (it could run code)")]
    ForbiddenGlobal(String),
    /// Structurally wrong content.
    #[error("malformed pickle at byte {at}: {message}")]
    Malformed { at: usize, message: String },
}

const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
];

fn check_global(module: &str, name: &str) -> Result<Value, PickleError> {
    let allowed = ALLOWED_GLOBALS.contains(&(module, name))
        || (module == "torch" && StorageDtype::from_storage_class(name).is_some());
    if allowed {
        Ok(Value::Global(module.to_string(), name.to_string()))
    } else {
        Err(PickleError::ForbiddenGlobal(format!("{module}.{name}")))
    }
}

/// Limits that keep a hostile file from exhausting memory.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 22;
/// Deepest container nesting accepted (a state dict nests four levels). Deeper values would
/// overflow the thread's stack when dropped, cloned or printed.
pub const MAX_DEPTH: usize = 64;
/// Memo copies may cost at most this many units per input byte (plus a fixed allowance): a
/// real state dict copies a few short strings, while a hostile one copies one large value
/// thousands of times to turn kilobytes into gigabytes.
const COPY_BUDGET_PER_BYTE: usize = 16;

/// Reads one pickle from `data[*pos..]`, advancing `pos` past its STOP opcode.
pub fn load(data: &[u8], pos: &mut usize) -> Result<Value, PickleError> {
    Unpickler {
        data,
        pos,
        stack: Vec::new(),
        memo: HashMap::new(),
        copy_budget: CopyBudget::new(data.len().saturating_mul(COPY_BUDGET_PER_BYTE) + (1 << 20)),
    }
    .run()
}

/// What memo copies may still cost; a `Cell` because the value being copied is borrowed from
/// the unpickler while it is charged.
struct CopyBudget {
    initial: usize,
    left: std::cell::Cell<usize>,
}

impl CopyBudget {
    fn new(units: usize) -> Self {
        Self {
            initial: units,
            left: std::cell::Cell::new(units),
        }
    }
}

struct Unpickler<'a, 'p> {
    data: &'a [u8],
    pos: &'p mut usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// Units (nodes and bytes, see [`weight_within`]) that memo copies may still cost.
    copy_budget: CopyBudget,
}

/// The size of `v` in units (one per node, one per byte of its strings), if at most `cap`;
/// computed without recursion.
fn weight_within(v: &Value, cap: usize) -> Option<usize> {
    let mut total = 0usize;
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        total += match v {
            Value::Str(s) => s.len() + 1,
            Value::Bytes(b) | Value::BigInt(b) => b.len() + 1,
            Value::Storage { key, .. } => key.len() + 1,
            Value::Tensor(t) => t.storage_key.len() + t.shape.len() + t.stride.len() + 1,
            Value::Global(m, n) => m.len() + n.len() + 1,
            _ => 1,
        };
        if total > cap {
            return None;
        }
        match v {
            Value::Tuple(xs) | Value::List(xs) => todo.extend(xs),
            Value::Dict(kv) => kv.iter().for_each(|(k, v)| todo.extend([k, v])),
            _ => {}
        }
    }
    Some(total)
}

/// The container nesting depth of `v` (0 for a scalar), if at most `max`; without recursion.
fn depth_within(v: &Value, max: usize) -> Option<usize> {
    let mut deepest = 0;
    let mut todo = vec![(v, 0usize)];
    while let Some((v, d)) = todo.pop() {
        let children: Vec<&Value> = match v {
            Value::Tuple(xs) | Value::List(xs) => xs.iter().collect(),
            Value::Dict(kv) => kv.iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => continue,
        };
        if d + 1 > max {
            return None;
        }
        deepest = deepest.max(d + 1);
        todo.extend(children.into_iter().map(|c| (c, d + 1)));
    }
    Some(deepest)
}

impl Unpickler<'_, '_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let start = *self.pos;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(start))?;
        *self.pos = end;
        Ok(&self.data[start..end])
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let start = *self.pos;
        let rel = self.data[start..]
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(start))?;
        let s = String::from_utf8_lossy(&self.data[start..start + rel]).into_owned();
        *self.pos = start + rel + 1;
        Ok(s)
    }
    fn malformed(&self, message: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            at: *self.pos,
            message: message.into(),
        }
    }
    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.malformed("stack too deep"));
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Value, PickleError> {
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let at = self
            .stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or_else(|| self.malformed("no MARK on the stack"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top_mut(&mut self) -> Result<&mut Value, PickleError> {
        let at = *self.pos;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            at,
            message: "stack underflow".into(),
        })
    }
    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        if self.memo.len() >= MAX_MEMO {
            return Err(self.malformed("memo too large"));
        }
        let top = self
            .stack
            .last()
            .ok_or_else(|| self.malformed("memo put on empty stack"))?;
        self.charge_copy(top)?;
        let v = top.clone();
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u32) -> Result<(), PickleError> {
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| self.malformed(format!("memo key {key} missing")))?;
        self.charge_copy(v)?;
        let v = v.clone();
        self.push(v)
    }
    /// Takes the cost of copying `v` out of the copy budget, or refuses the file.
    fn charge_copy(&self, v: &Value) -> Result<(), PickleError> {
        let cost = weight_within(v, self.copy_budget.left.get()).ok_or_else(|| {
            self.malformed(format!(
                "memo copies would exceed {} units for a {}-byte pickle (memo amplification)",
                self.copy_budget.initial,
                self.data.len()
            ))
        })?;
        self.copy_budget
            .left
            .set(self.copy_budget.left.get() - cost);
        Ok(())
    }
    /// Refuses a value that would nest containers deeper than [`MAX_DEPTH`] inside its parent.
    fn check_nesting<'v>(
        &self,
        children: impl IntoIterator<Item = &'v Value>,
    ) -> Result<(), PickleError> {
        for c in children {
            if depth_within(c, MAX_DEPTH - 1).is_none() {
                return Err(self.malformed(format!("containers nested deeper than {MAX_DEPTH}")));
            }
        }
        Ok(())
    }
    fn string(&mut self, n: usize) -> Result<Value, PickleError> {
        let at = *self.pos;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| PickleError::Malformed {
            at,
            message: "invalid UTF-8 string".into(),
        })?;
        Ok(Value::Str(s.to_string()))
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let at = *self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.push(Value::Mark)?,
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    let v = if n == 0 {
                        Value::Int(0)
                    } else if n <= 8 {
                        let neg = b[n - 1] & 0x80 != 0;
                        let mut buf = [if neg { 0xff } else { 0 }; 8];
                        buf[..n].copy_from_slice(&b);
                        Value::Int(i64::from_le_bytes(buf))
                    } else {
                        Value::BigInt(b)
                    };
                    self.push(v)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| PickleError::Truncated(at))?;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b')' => self.push(Value::Tuple(vec![]))?,
                b']' => self.push(Value::List(vec![]))?,
                b'}' => self.push(Value::Dict(vec![]))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.check_nesting(&items)?;
                    self.push(Value::Tuple(items))?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.check_nesting(&items)?;
                    self.push(Value::List(items))?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.check_nesting(&items)?;
                    let pairs =
                        pairs(items).ok_or_else(|| self.malformed("odd number of dict items"))?;
                    self.push(Value::Dict(pairs))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.malformed("stack underflow in TUPLEn"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.check_nesting(&items)?;
                    self.push(Value::Tuple(items))?
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = check_global(&module, &name)?;
                    self.push(g)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let g = check_global(&m, &n)?;
                            self.push(g)?
                        }
                        _ => return Err(self.malformed("STACK_GLOBAL needs two strings")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.push(v)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args)?;
                    self.push(v)?
                }
                0x81 => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    return Err(PickleError::ForbiddenGlobal(format!("NEWOBJ of {cls:?}")));
                }
                b'b' => {
                    // BUILD sets attributes; on a state dict it only carries `_metadata`, which we
                    // do not need. On anything else it would be object construction: refuse.
                    let _state = self.pop()?;
                    if !matches!(self.stack.last(), Some(Value::Dict(_))) {
                        return Err(self.malformed("BUILD on a non-dict object"));
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.check_nesting([&k, &v])?;
                    match self.top_mut()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err(self.malformed("SETITEM on a non-dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.check_nesting(&items)?;
                    let new = pairs(items)
                        .ok_or_else(|| self.malformed("odd number of SETITEMS items"))?;
                    match self.top_mut()? {
                        Value::Dict(d) => d.extend(new),
                        _ => return Err(self.malformed("SETITEMS on a non-dict")),
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    self.check_nesting([&v])?;
                    match self.top_mut()? {
                        Value::List(l) => l.push(v),
                        _ => return Err(self.malformed("APPEND on a non-list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.check_nesting(&items)?;
                    match self.top_mut()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err(self.malformed("APPENDS on a non-list")),
                    }
                }
                _ => return Err(PickleError::UnsupportedOpcode { op, at }),
            }
        }
    }

    fn persistent(&self, pid: Value) -> Result<Value, PickleError> {
        let items = match pid {
            Value::Tuple(items) => items,
            other => return Err(self.malformed(format!("persistent id is not a tuple: {other:?}"))),
        };
        match items.as_slice() {
            [Value::Str(kind), Value::Global(m, cls), key, Value::Str(_location), Value::Int(numel), ..]
                if kind == "storage" && m == "torch" =>
            {
                let dtype = StorageDtype::from_storage_class(cls)
                    .ok_or_else(|| self.malformed(format!("unknown storage {cls}")))?;
                let key = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    other => return Err(self.malformed(format!("storage key {other:?}"))),
                };
                let numel =
                    usize::try_from(*numel).map_err(|_| self.malformed("negative storage size"))?;
                Ok(Value::Storage { key, dtype, numel })
            }
            _ => Err(self.malformed(format!("unsupported persistent id {items:?}"))),
        }
    }

    fn reduce(&self, func: Value, args: Value) -> Result<Value, PickleError> {
        let (module, name) = match func {
            Value::Global(m, n) => (m, n),
            other => return Err(self.malformed(format!("REDUCE of a non-callable {other:?}"))),
        };
        let args = match args {
            Value::Tuple(a) => a,
            other => {
                return Err(self.malformed(format!("REDUCE arguments are not a tuple: {other:?}")))
            }
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => Ok(Value::Dict(vec![])),
            ("torch._utils", "_rebuild_parameter") => args
                .into_iter()
                .next()
                .ok_or_else(|| self.malformed("empty _rebuild_parameter")),
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let [storage, offset, shape, stride, ..] = args.as_slice() else {
                    return Err(self
                        .malformed("_rebuild_tensor needs (storage, offset, size, stride, ...)"));
                };
                let Value::Storage { key, dtype, numel } = storage else {
                    return Err(self.malformed("tensor without a storage"));
                };
                let ints = |v: &Value| -> Option<Vec<usize>> {
                    match v {
                        Value::Tuple(xs) => xs
                            .iter()
                            .map(|x| {
                                if let Value::Int(i) = x {
                                    usize::try_from(*i).ok()
                                } else {
                                    None
                                }
                            })
                            .collect(),
                        _ => None,
                    }
                };
                let (Some(shape), Some(stride), Value::Int(offset)) =
                    (ints(shape), ints(stride), offset)
                else {
                    return Err(self.malformed("bad tensor size/stride/offset"));
                };
                if shape.len() != stride.len() || *offset < 0 {
                    return Err(self.malformed("tensor size and stride disagree"));
                }
                Ok(Value::Tensor(TensorRef {
                    storage_key: key.clone(),
                    dtype: *dtype,
                    storage_numel: *numel,
                    offset: *offset as usize,
                    shape,
                    stride,
                }))
            }
            _ => Err(PickleError::ForbiddenGlobal(format!("{module}.{name}"))),
        }
    }
}

fn pairs(items: Vec<Value>) -> Option<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Some(out)
}
