//! PyTorch checkpoints (`torch.save` of a state_dict): the zip format (PyTorch >= 1.6:
//! `<archive>/data.pkl` plus one raw file per storage, `<archive>/data/<key>`) and the legacy
//! stream (magic number, protocol version, sys info, the pickled object, the storage keys,
//! then each storage as an element count and raw little-endian data).
//!
//! The pickle is run by a small virtual machine of our own that knows the opcodes of pickle
//! protocols 2 to 5 and only the globals torch uses to rebuild tensors
//! (`torch._utils._rebuild_tensor_v2` and friends, `collections.OrderedDict`, the typed
//! storage classes). Any other global is refused, so loading a checkpoint never runs code.
//! Tensors are rebuilt from storage, offset, size and stride, so non-contiguous and shared
//! views come out as the values torch would show.

use crate::{FormatError, Result};
use slimnn_tensor::{checked_numel, DType, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

/// The magic number the legacy format pickles first (`torch.serialization.MAGIC_NUMBER`).
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;
/// The legacy format's protocol version (`torch.serialization.PROTOCOL_VERSION`).
const LEGACY_PROTOCOL: i64 = 1001;

/// Which of the two `torch.save` layouts a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    Zip,
    Legacy,
}

/// A state_dict: named tensors in the order the checkpoint lists them.
#[derive(Debug, Clone)]
pub struct StateDict {
    pub format: CheckpointFormat,
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl StateDict {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }
    pub fn into_entries(self) -> Vec<(String, Tensor)> {
        self.entries
    }
}

/// True if `path` starts like a `torch.save` file: a zip archive holding a `data.pkl`, or a
/// pickle stream (protocol 2 or higher) as the legacy format writes.
pub fn is_checkpoint(path: &Path) -> bool {
    let mut head = [0u8; 4];
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    if f.read_exact(&mut head).is_err() {
        return false;
    }
    if &head == b"PK\x03\x04" {
        // Other zip files (e.g. .npz) are not checkpoints; only ask the zip reader for those
        // with a torch-like name.
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        return matches!(ext, "pt" | "pth" | "bin" | "ckpt" | "tar");
    }
    head[0] == 0x80 && (2..=5).contains(&head[1])
}

/// Reads a checkpoint file (either format) into a state_dict.
pub fn load(path: &Path) -> Result<StateDict> {
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io { path: path.display().to_string(), source })?;
    parse(&bytes, &path.display().to_string())
}

/// Parses checkpoint bytes; `what` names the source in errors.
pub fn parse(bytes: &[u8], what: &str) -> Result<StateDict> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        parse_zip(bytes, what)
    } else if bytes.first() == Some(&0x80) {
        parse_legacy(bytes, what)
    } else {
        Err(FormatError::malformed(
            what,
            "not a PyTorch checkpoint: neither a zip archive nor a pickle stream (the legacy torch.save format)",
        ))
    }
}

// ------------------------------------------------------------------ zip format

fn parse_zip(bytes: &[u8], what: &str) -> Result<StateDict> {
    let zip_err = |e: zip::result::ZipError| FormatError::malformed(what, format!("zip archive: {e}"));
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(zip_err)?;
    // torch names the top folder after the file ("archive" for buffers); find it by data.pkl.
    let mut pickles: Vec<String> = vec![];
    for name in archive.file_names() {
        let name = name.map_err(zip_err)?;
        if name.ends_with("/data.pkl") && name.matches('/').count() == 1 {
            pickles.push(name.to_string());
        }
    }
    let pkl_name = match pickles.as_slice() {
        [one] => one.clone(),
        [] => return Err(FormatError::malformed(what, "zip archive has no <archive>/data.pkl: not a torch.save file")),
        many => return Err(FormatError::malformed(what, format!("zip archive has several data.pkl files: {many:?}"))),
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let read_entry = |archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str, limit: u64| {
        let entry = archive.by_name(name).map_err(zip_err)?;
        let mut out = Vec::with_capacity(entry.size().min(limit) as usize);
        entry
            .take(limit)
            .read_to_end(&mut out)
            .map_err(|e| FormatError::malformed(what, format!("reading {name}: {e}")))?;
        Ok::<_, FormatError>(out)
    };
    let byteorder_name = format!("{prefix}byteorder");
    if archive.index_for_name(&byteorder_name).is_some() {
        let order = read_entry(&mut archive, &byteorder_name, 16)?;
        if order.trim_ascii() != b"little" {
            return Err(FormatError::Unsupported(format!(
                "{what}: byte order '{}' (only little-endian checkpoints are supported)",
                String::from_utf8_lossy(&order)
            )));
        }
    }
    let pickle = read_entry(&mut archive, &pkl_name, bytes.len() as u64)?;
    let mut vm = Unpickler::new(&pickle, format!("{what}: {pkl_name}"));
    let root = vm.run()?;
    let tensors = state_dict_entries(root, what)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let key = &t.storage.key;
        if !storages.contains_key(key) {
            let entry_name = format!("{prefix}data/{key}");
            let needed = t.storage.byte_len(what)?;
            let data = match archive.index_for_name(&entry_name) {
                Some(_) => read_entry(&mut archive, &entry_name, needed as u64)?,
                None => {
                    return Err(FormatError::malformed(
                        what,
                        format!("tensor '{name}': its storage '{key}' is missing ({entry_name} is not in the archive)"),
                    ))
                }
            };
            if data.len() < needed {
                return Err(FormatError::malformed(
                    what,
                    format!(
                        "tensor '{name}': storage '{key}' holds {} bytes, {} x {} needs {needed}",
                        data.len(),
                        t.storage.numel,
                        t.storage.dtype
                    ),
                ));
            }
            storages.insert(key.clone(), data);
        }
        let tensor = materialize(&name, &t, &storages[key], what)?;
        entries.push((name, tensor));
    }
    Ok(StateDict::new(CheckpointFormat::Zip, entries))
}

// ------------------------------------------------------------------ legacy format

fn parse_legacy(bytes: &[u8], what: &str) -> Result<StateDict> {
    let mut pos = 0;
    let next = |label: &str, pos: &mut usize| -> Result<Value> {
        let mut vm = Unpickler::new(&bytes[*pos..], format!("{what}: {label}"));
        let v = vm.run()?;
        *pos += vm.pos;
        Ok(v)
    };
    let magic = next("magic number", &mut pos)?;
    if !matches!(magic, Value::Int(v) if v == LEGACY_MAGIC as i128) {
        return Err(FormatError::malformed(
            what,
            "not a PyTorch checkpoint: the first pickle is not torch's magic number (a plain pickle file?)",
        ));
    }
    let protocol = next("protocol version", &mut pos)?;
    if !matches!(protocol, Value::Int(LEGACY_PROTOCOL_I128)) {
        return Err(FormatError::Unsupported(format!(
            "{what}: legacy checkpoint protocol {} (only {LEGACY_PROTOCOL} is supported)",
            protocol.kind()
        )));
    }
    let sys_info = next("sys info", &mut pos)?;
    if let Value::Dict(d) = &sys_info {
        let d = d.borrow();
        for pair in d.0.chunks_exact(2) {
            if matches!(&pair[0], Value::Str(k) if &**k == "little_endian") && matches!(pair[1], Value::Bool(false)) {
                return Err(FormatError::Unsupported(format!(
                    "{what}: big-endian checkpoint (only little-endian checkpoints are supported)"
                )));
            }
        }
    }
    let root = next("state_dict pickle", &mut pos)?;
    let tensors = state_dict_entries(root, what)?;
    let keys = match next("storage key list", &mut pos)? {
        Value::List(l) => {
            let l = l.borrow();
            l.0.iter()
                .map(|k| match k {
                    Value::Str(s) => Ok(s.to_string()),
                    other => Err(FormatError::malformed(what, format!("storage key is a {}, not a str", other.kind()))),
                })
                .collect::<Result<Vec<_>>>()?
        }
        other => return Err(FormatError::malformed(what, format!("storage key list is a {}", other.kind()))),
    };
    // Storage key -> (tensor naming it first, its description); the data follow in key order.
    let mut wanted: HashMap<&str, (&str, &Rc<StorageRef>)> = HashMap::new();
    for (name, t) in &tensors {
        wanted.entry(t.storage.key.as_str()).or_insert((name.as_str(), &t.storage));
    }
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in keys {
        let (user, storage) = wanted
            .get(key.as_str())
            .copied()
            .ok_or_else(|| FormatError::malformed(what, format!("storage '{key}' is listed but no tensor uses it")))?;
        let truncated = |pos: usize| {
            FormatError::malformed(
                what,
                format!("truncated: storage '{key}' (tensor '{user}') ends past the end of the file at byte {pos}"),
            )
        };
        let count_bytes = bytes.get(pos..pos + 8).ok_or_else(|| truncated(pos))?;
        let count = i64::from_le_bytes(count_bytes.try_into().expect("8 bytes"));
        pos += 8;
        if count < 0 || count as u64 != storage.numel as u64 {
            return Err(FormatError::malformed(
                what,
                format!(
                    "storage '{key}' (tensor '{user}') holds {count} elements, its tensors expect {}",
                    storage.numel
                ),
            ));
        }
        let len = storage.byte_len(what)?;
        let end = pos.checked_add(len).filter(|&e| e <= bytes.len()).ok_or_else(|| truncated(bytes.len()))?;
        storages.insert(key, &bytes[pos..end]);
        pos = end;
    }
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let data = storages.get(&t.storage.key).ok_or_else(|| {
            FormatError::malformed(what, format!("tensor '{name}': its storage '{}' is missing", t.storage.key))
        })?;
        let tensor = materialize(&name, &t, data, what)?;
        entries.push((name, tensor));
    }
    Ok(StateDict::new(CheckpointFormat::Legacy, entries))
}

const LEGACY_PROTOCOL_I128: i128 = LEGACY_PROTOCOL as i128;

impl StateDict {
    fn new(format: CheckpointFormat, entries: Vec<(String, Tensor)>) -> StateDict {
        let index = entries.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        StateDict { format, entries, index }
    }
}

// ------------------------------------------------------------------ tensors

/// A storage named by a persistent id: `('storage', type, key, location, numel[, view])`.
#[derive(Debug)]
struct StorageRef {
    key: String,
    dtype: DType,
    numel: usize,
}

impl StorageRef {
    fn byte_len(&self, what: &str) -> Result<usize> {
        self.numel.checked_mul(self.dtype.size_of()).ok_or_else(|| {
            FormatError::malformed(what, format!("storage '{}' of {} elements is too large", self.key, self.numel))
        })
    }
}

/// What `_rebuild_tensor_v2` was given.
#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// The top-level object as (name, tensor) pairs: a dict of tensors, or a training checkpoint
/// dict holding one under `state_dict` / `model_state_dict` / `model`.
fn state_dict_entries(root: Value, what: &str) -> Result<Vec<(String, Rc<TensorRef>)>> {
    fn as_tensor_dict(v: &Value) -> std::result::Result<Vec<(String, Rc<TensorRef>)>, String> {
        let Value::Dict(d) = v else { return Err(format!("the pickled object is a {}, not a dict", v.kind())) };
        let d = d.borrow();
        let mut out: Vec<(String, Rc<TensorRef>)> = Vec::with_capacity(d.0.len() / 2);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for pair in d.0.chunks_exact(2) {
            let Value::Str(k) = &pair[0] else { return Err(format!("a key is a {}, not a str", pair[0].kind())) };
            let Value::Tensor(t) = &pair[1] else {
                return Err(format!("entry '{k}' is a {}, not a tensor", pair[1].kind()));
            };
            // A repeated key replaces the value in place, as a Python dict does.
            match seen.get(&**k) {
                Some(&i) => out[i].1 = t.clone(),
                None => {
                    seen.insert(k.to_string(), out.len());
                    out.push((k.to_string(), t.clone()));
                }
            }
        }
        Ok(out)
    }
    match as_tensor_dict(&root) {
        Ok(v) => Ok(v),
        Err(msg) => {
            if let Value::Dict(d) = &root {
                let d = d.borrow();
                for wrapper in ["state_dict", "model_state_dict", "model"] {
                    let inner = d.0.chunks_exact(2).find(|p| matches!(&p[0], Value::Str(k) if &**k == wrapper));
                    if let Some(Ok(v)) = inner.map(|p| as_tensor_dict(&p[1])) {
                        return Ok(v);
                    }
                }
            }
            Err(FormatError::malformed(what, format!("not a state_dict: {msg}")))
        }
    }
}

/// Copies the elements a (size, stride, offset) view selects out of its storage, row-major.
fn materialize(name: &str, t: &TensorRef, storage: &[u8], what: &str) -> Result<Tensor> {
    let dtype = t.storage.dtype;
    let es = dtype.size_of();
    let bad = |msg: String| FormatError::malformed(what, format!("tensor '{name}': {msg}"));
    if t.size.len() != t.stride.len() {
        return Err(bad(format!("size {:?} and stride {:?} differ in rank", t.size, t.stride)));
    }
    let numel = checked_numel(&t.size, dtype).map_err(|e| bad(e.to_string()))?;
    let storage_numel = t.storage.numel;
    if numel > 0 {
        let mut last = t.offset;
        for (&n, &s) in t.size.iter().zip(&t.stride) {
            last = (n - 1).checked_mul(s).and_then(|r| r.checked_add(last)).ok_or_else(|| {
                bad(format!("view size {:?} stride {:?} offset {} overflows", t.size, t.stride, t.offset))
            })?;
        }
        if last >= storage_numel {
            return Err(bad(format!(
                "view size {:?} stride {:?} offset {} reaches element {last} of a storage of {storage_numel}",
                t.size, t.stride, t.offset
            )));
        }
    } else if t.offset > storage_numel {
        return Err(bad(format!("offset {} is past its storage of {storage_numel}", t.offset)));
    }
    let contiguous = slimnn_tensor::strides_of(&t.size);
    let raw: Vec<u8> = if numel == 0 {
        Vec::new()
    } else if t.size.iter().zip(&t.stride).zip(&contiguous).all(|((&n, &s), &c)| n == 1 || s == c) {
        storage[t.offset * es..(t.offset + numel) * es].to_vec()
    } else {
        let mut out = Vec::with_capacity(numel * es);
        let rank = t.size.len();
        let mut idx = vec![0usize; rank];
        let mut at = t.offset;
        for _ in 0..numel {
            out.extend_from_slice(&storage[at * es..(at + 1) * es]);
            // Odometer over the index, innermost dim fastest.
            for d in (0..rank).rev() {
                idx[d] += 1;
                at += t.stride[d];
                if idx[d] < t.size[d] {
                    break;
                }
                at -= t.stride[d] * t.size[d];
                idx[d] = 0;
            }
        }
        out
    };
    Tensor::from_le_bytes(dtype, t.size.clone(), &raw).map_err(|e| bad(e.to_string()))
}

// ------------------------------------------------------------------ pickle VM

/// The globals a state_dict may name; everything else is refused.
#[derive(Debug, Clone, Copy)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(DType),
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", storage) => Global::Storage(match storage {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        }),
        _ => return None,
    })
}

/// Container contents. Dropping them walks a work list instead of recursing, so a deeply
/// nested pickle cannot overflow the stack when its values are freed.
#[derive(Debug, Default)]
struct Items(Vec<Value>);

impl Drop for Items {
    fn drop(&mut self) {
        let mut work = std::mem::take(&mut self.0);
        while let Some(v) = work.pop() {
            match v {
                Value::Tuple(rc) => {
                    if let Ok(mut items) = Rc::try_unwrap(rc) {
                        work.append(&mut items.0);
                    }
                }
                Value::List(rc) | Value::Dict(rc) => {
                    if let Ok(cell) = Rc::try_unwrap(rc) {
                        let mut items = cell.into_inner();
                        work.append(&mut items.0);
                    }
                }
                _ => {}
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i128),
    /// An integer too wide for i128 (only its size is kept).
    BigInt,
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<Items>),
    List(Rc<RefCell<Items>>),
    /// Keys and values alternate.
    Dict(Rc<RefCell<Items>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class or function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
    fn tuple(items: Vec<Value>) -> Value {
        Value::Tuple(Rc::new(Items(items)))
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    what: String,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    storages: HashMap<String, Rc<StorageRef>>,
}

/// Unpickling stops at this many stack entries (a state_dict needs a handful).
const MAX_STACK: usize = 1 << 20;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], what: String) -> Unpickler<'a> {
        Unpickler {
            data,
            pos: 0,
            what,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storages: HashMap::new(),
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> FormatError {
        FormatError::malformed(&self.what, format!("{msg} (pickle byte {})", self.pos))
    }

    fn take(&mut self, n: usize, op: &str) -> Result<&'a [u8]> {
        match self.pos.checked_add(n).filter(|&end| end <= self.data.len()) {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!("truncated: {op} needs {n} bytes, {} left", self.data.len() - self.pos))),
        }
    }
    fn u8(&mut self, op: &str) -> Result<u8> {
        Ok(self.take(1, op)?[0])
    }
    fn u16(&mut self, op: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, op)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, op: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, op)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, op: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, op)?.try_into().expect("8 bytes")))
    }
    fn line(&mut self, op: &str) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.err(format!("truncated: {op} line")))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| self.err(format!("{op}: line is not UTF-8")))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn len_to_usize(&self, n: u64, op: &str) -> Result<usize> {
        usize::try_from(n).ok().filter(|&n| n <= self.data.len()).ok_or_else(|| {
            self.err(format!("truncated: {op} of {n} bytes, {} left", self.data.len().saturating_sub(self.pos)))
        })
    }
    fn utf8(&mut self, n: usize, op: &str) -> Result<Value> {
        let raw = self.take(n, op)?;
        let s = std::str::from_utf8(raw).map_err(|_| self.err(format!("{op}: string is not UTF-8")))?;
        Ok(Value::Str(Rc::from(s)))
    }
    fn bytes(&mut self, n: usize, op: &str) -> Result<Value> {
        self.take(n, op)?;
        Ok(Value::Bytes)
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err("pickle stack too deep"));
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self, op: &str) -> Result<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err(format!("{op}: stack is empty above the mark")));
        }
        self.stack.pop().ok_or_else(|| self.err(format!("{op}: stack is empty")))
    }
    fn top(&self, op: &str) -> Result<&Value> {
        self.stack.last().ok_or_else(|| self.err(format!("{op}: stack is empty")))
    }
    fn pop_mark(&mut self, op: &str) -> Result<Vec<Value>> {
        let m = self.marks.pop().ok_or_else(|| self.err(format!("{op} without a MARK")))?;
        if m > self.stack.len() {
            return Err(self.err(format!("{op}: mark above the stack")));
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&mut self, key: u64) -> Result<()> {
        let v = self.memo.get(&key).cloned().ok_or_else(|| self.err(format!("memo entry {key} is not set")))?;
        self.push(v)
    }
    fn memo_put(&mut self, key: u64) -> Result<()> {
        let v = self.top("PUT")?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    /// Runs to STOP and returns the pickled object; `self.pos` is then just past STOP.
    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = *self.data.get(at).ok_or_else(|| self.err("truncated: the pickle ends before STOP"))?;
            self.pos += 1;
            match op {
                0x80 => {
                    let proto = self.u8("PROTO")?;
                    if proto > 5 {
                        return Err(self.err(format!("pickle protocol {proto} is not supported")));
                    }
                }
                0x95 => {
                    self.u64("FRAME")?;
                }
                b'.' => {
                    let v = self.pop("STOP")?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop("POP")?;
                }
                b'1' => {
                    self.pop_mark("POP_MARK")?;
                }
                b'2' => {
                    let v = self.top("DUP")?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32("BININT")? as i32;
                    self.push(Value::Int(v as i128))?
                }
                b'K' => {
                    let v = self.u8("BININT1")?;
                    self.push(Value::Int(v as i128))?
                }
                b'M' => {
                    let v = self.u16("BININT2")?;
                    self.push(Value::Int(v as i128))?
                }
                b'I' | b'L' => {
                    let name = if op == b'I' { "INT" } else { "LONG" };
                    let line = self.line(name)?;
                    let v = match line.trim_end_matches('L') {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => s.parse::<i128>().map(Value::Int).map_err(|_| self.err(format!("{name}: bad number")))?,
                    };
                    self.push(v)?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8("LONG1")? as u64 } else { self.u32("LONG4")? as u64 };
                    let n = self.len_to_usize(n, "LONG")?;
                    let raw = self.take(n, "LONG")?;
                    self.push(little_endian_int(raw))?
                }
                b'G' => {
                    self.take(8, "BINFLOAT")?;
                    self.push(Value::Float)?
                }
                b'X' => {
                    let n = self.u32("BINUNICODE")? as u64;
                    let n = self.len_to_usize(n, "BINUNICODE")?;
                    let v = self.utf8(n, "BINUNICODE")?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8("SHORT_BINUNICODE")? as usize;
                    let v = self.utf8(n, "SHORT_BINUNICODE")?;
                    self.push(v)?
                }
                0x8d => {
                    let n = self.u64("BINUNICODE8")?;
                    let n = self.len_to_usize(n, "BINUNICODE8")?;
                    let v = self.utf8(n, "BINUNICODE8")?;
                    self.push(v)?
                }
                // Python 2 str: bytes that torch's loader decodes as text.
                b'T' | b'U' => {
                    let n = if op == b'T' { self.u32("BINSTRING")? as u64 } else { self.u8("SHORT_BINSTRING")? as u64 };
                    let n = self.len_to_usize(n, "BINSTRING")?;
                    let raw = self.take(n, "BINSTRING")?;
                    self.push(Value::Str(Rc::from(String::from_utf8_lossy(raw).as_ref())))?
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32("BINBYTES")? as u64,
                        b'C' => self.u8("SHORT_BINBYTES")? as u64,
                        _ => self.u64("BINBYTES8")?,
                    };
                    let n = self.len_to_usize(n, "BINBYTES")?;
                    let v = self.bytes(n, "BINBYTES")?;
                    self.push(v)?
                }
                b')' => self.push(Value::tuple(vec![]))?,
                b't' => {
                    let items = self.pop_mark("TUPLE")?;
                    self.push(Value::tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop("TUPLEn")?);
                    }
                    items.reverse();
                    self.push(Value::tuple(items))?
                }
                b']' => self.push(Value::List(Rc::default()))?,
                b'l' => {
                    let items = self.pop_mark("LIST")?;
                    self.push(Value::List(Rc::new(RefCell::new(Items(items)))))?
                }
                b'a' => {
                    let v = self.pop("APPEND")?;
                    self.extend_list(vec![v], "APPEND")?
                }
                b'e' => {
                    let items = self.pop_mark("APPENDS")?;
                    self.extend_list(items, "APPENDS")?
                }
                b'}' => self.push(Value::Dict(Rc::default()))?,
                b'd' => {
                    let items = self.pop_mark("DICT")?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("DICT: odd number of items"));
                    }
                    self.push(Value::Dict(Rc::new(RefCell::new(Items(items)))))?
                }
                b's' => {
                    let v = self.pop("SETITEM")?;
                    let k = self.pop("SETITEM")?;
                    self.extend_dict(vec![k, v], "SETITEM")?
                }
                b'u' => {
                    let items = self.pop_mark("SETITEMS")?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS: odd number of items"));
                    }
                    self.extend_dict(items, "SETITEMS")?
                }
                b'c' => {
                    let module = self.line("GLOBAL")?;
                    let name = self.line("GLOBAL")?;
                    let g = self.global(module, name)?;
                    self.push(g)?
                }
                0x93 => {
                    let name = self.pop("STACK_GLOBAL")?;
                    let module = self.pop("STACK_GLOBAL")?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.err("STACK_GLOBAL: module and name must be strings"));
                    };
                    let g = self.global(module, name)?;
                    self.push(g)?
                }
                b'R' => {
                    let args = self.pop("REDUCE")?;
                    let func = self.pop("REDUCE")?;
                    let v = self.reduce(func, args)?;
                    self.push(v)?
                }
                b'b' => {
                    let _state = self.pop("BUILD")?;
                    // OrderedDict state is `_metadata` (module versions); tensors' state is
                    // unused by inference. Neither changes the values.
                    match self.top("BUILD")? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => return Err(self.err(format!("BUILD on a {}", other.kind()))),
                    }
                }
                0x81 | 0x92 => {
                    return Err(self.err("not a state_dict: the pickle constructs an object (NEWOBJ)"));
                }
                b'Q' => {
                    let pid = self.pop("BINPERSID")?;
                    let v = self.persistent_load(pid)?;
                    self.push(v)?
                }
                b'P' => {
                    return Err(self.err("not a state_dict: text persistent ids are not torch's"));
                }
                b'q' => {
                    let k = self.u8("BINPUT")? as u64;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32("LONG_BINPUT")? as u64;
                    self.memo_put(k)?
                }
                b'p' => {
                    let k = self.line("PUT")?.parse::<u64>().map_err(|_| self.err("PUT: bad index"))?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8("BINGET")? as u64;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32("LONG_BINGET")? as u64;
                    self.memo_get(k)?
                }
                b'g' => {
                    let k = self.line("GET")?.parse::<u64>().map_err(|_| self.err("GET: bad index"))?;
                    self.memo_get(k)?
                }
                other => {
                    self.pos = at;
                    return Err(self.err(format!("unsupported pickle opcode 0x{other:02x}")));
                }
            }
        }
    }

    fn extend_list(&mut self, items: Vec<Value>, op: &str) -> Result<()> {
        match self.top(op)? {
            Value::List(l) => {
                l.borrow_mut().0.extend(items);
                Ok(())
            }
            other => Err(self.err(format!("{op} on a {}", other.kind()))),
        }
    }
    fn extend_dict(&mut self, items: Vec<Value>, op: &str) -> Result<()> {
        match self.top(op)? {
            Value::Dict(d) => {
                d.borrow_mut().0.extend(items);
                Ok(())
            }
            other => Err(self.err(format!("{op} on a {}", other.kind()))),
        }
    }

    fn global(&self, module: &str, name: &str) -> Result<Value> {
        resolve_global(module, name)
            .map(Value::Global)
            .ok_or_else(|| self.err(format!("not a state_dict: global {module}.{name}")))
    }

    fn persistent_load(&mut self, pid: Value) -> Result<Value> {
        let Value::Tuple(t) = &pid else {
            return Err(self.err(format!("not a state_dict: persistent id is a {}", pid.kind())));
        };
        let f = &t.0;
        let (Some(Value::Str(tag)), Some(Value::Global(Global::Storage(dtype))), Some(key), Some(Value::Int(numel))) =
            (f.first(), f.get(1), f.get(2), f.get(4))
        else {
            return Err(self.err("not a state_dict: persistent id is not ('storage', type, key, location, numel)"));
        };
        if &**tag != "storage" {
            return Err(self.err(format!("not a state_dict: persistent id of kind '{tag}'")));
        }
        if f.get(5).is_some_and(|v| !matches!(v, Value::None)) {
            return Err(FormatError::Unsupported(format!(
                "{}: storage views (checkpoints from PyTorch before 1.0) are not supported",
                self.what
            )));
        }
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => return Err(self.err(format!("storage key is a {}", other.kind()))),
        };
        let numel = usize::try_from(*numel).map_err(|_| self.err(format!("storage '{key}' has {numel} elements")))?;
        if let Some(known) = self.storages.get(&key) {
            if known.dtype != *dtype || known.numel != numel {
                return Err(self.err(format!("storage '{key}' is named with two types or sizes")));
            }
            return Ok(Value::Storage(known.clone()));
        }
        let s = Rc::new(StorageRef { key: key.clone(), dtype: *dtype, numel });
        self.storages.insert(key, s.clone());
        Ok(Value::Storage(s))
    }

    fn reduce(&self, func: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = func else { return Err(self.err(format!("REDUCE calls a {}", func.kind()))) };
        let Value::Tuple(args) = args else { return Err(self.err("REDUCE arguments are not a tuple")) };
        let a = &args.0;
        match g {
            Global::OrderedDict => {
                if !a.is_empty() {
                    return Err(self.err("OrderedDict(...) with arguments is not supported"));
                }
                Ok(Value::Dict(Rc::default()))
            }
            Global::RebuildTensor | Global::RebuildTensorV2 => {
                if a.len() < 4 {
                    return Err(self.err(format!("_rebuild_tensor with {} arguments", a.len())));
                }
                let Value::Storage(storage) = &a[0] else {
                    return Err(self.err(format!("_rebuild_tensor: first argument is a {}", a[0].kind())));
                };
                let offset = self.int_arg(&a[1], "storage offset")?;
                let size = self.int_tuple(&a[2], "size")?;
                let stride = self.int_tuple(&a[3], "stride")?;
                Ok(Value::Tensor(Rc::new(TensorRef { storage: storage.clone(), offset, size, stride })))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match a.first() {
                Some(Value::Tensor(t)) => Ok(Value::Tensor(t.clone())),
                _ => Err(self.err("_rebuild_parameter without a tensor")),
            },
            Global::Storage(_) => Err(self.err("not a state_dict: a storage class is called")),
        }
    }

    fn int_arg(&self, v: &Value, what: &str) -> Result<usize> {
        match v {
            Value::Int(i) => {
                usize::try_from(*i).map_err(|_| self.err(format!("tensor {what} {i} is negative or too large")))
            }
            other => Err(self.err(format!("tensor {what} is a {}", other.kind()))),
        }
    }
    fn int_tuple(&self, v: &Value, what: &str) -> Result<Vec<usize>> {
        match v {
            Value::Tuple(t) => t.0.iter().map(|x| self.int_arg(x, what)).collect(),
            other => Err(self.err(format!("tensor {what} is a {}", other.kind()))),
        }
    }
}

/// A two's-complement little-endian integer (LONG1 / LONG4).
fn little_endian_int(raw: &[u8]) -> Value {
    if raw.len() > 16 {
        return Value::BigInt;
    }
    let negative = raw.last().is_some_and(|&b| b & 0x80 != 0);
    let mut buf = if negative { [0xffu8; 16] } else { [0u8; 16] };
    buf[..raw.len()].copy_from_slice(raw);
    Value::Int(i128::from_le_bytes(buf))
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle of `{name: _rebuild_tensor_v2(storage, offset, size, stride)}`.
    fn tensor_pickle(key: &str, numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\n)R(");
        p.push(b'X');
        p.extend((1u32).to_le_bytes());
        p.extend(b"w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend(b"(X");
        p.extend(7u32.to_le_bytes());
        p.extend(b"storage");
        p.extend(b"ctorch\nFloatStorage\n");
        p.push(b'X');
        p.extend((key.len() as u32).to_le_bytes());
        p.extend(key.as_bytes());
        p.push(b'X');
        p.extend(3u32.to_le_bytes());
        p.extend(b"cpu");
        p.extend([b'K', numel, b'N', b't', b'Q']);
        p.extend([b'K', offset, b'(']);
        for &s in size {
            p.extend([b'K', s]);
        }
        p.extend(b"t(");
        for &s in stride {
            p.extend([b'K', s]);
        }
        p.extend(b"t\x89ccollections\nOrderedDict\n)RtRu.");
        p
    }

    /// A legacy stream: magic, protocol, sys info, `object`, the key list pickle, storages.
    fn legacy_stream(object: &[u8], keys: &[u8], storages: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80, 2, 0x8a, 10];
        f.extend(&LEGACY_MAGIC.to_le_bytes()[..10]);
        f.push(b'.');
        f.extend([0x80, 2, b'M']);
        f.extend(1001u16.to_le_bytes());
        f.push(b'.');
        f.extend(b"\x80\x02}.");
        f.extend(object);
        f.extend(keys);
        f.extend(storages);
        f
    }

    fn legacy_file(pickle: &[u8], key: &str, values: &[f32], count: i64) -> Vec<u8> {
        let mut keys = b"\x80\x02(X".to_vec();
        keys.extend((key.len() as u32).to_le_bytes());
        keys.extend(key.as_bytes());
        keys.extend(b"l.");
        let mut data = count.to_le_bytes().to_vec();
        for v in values {
            data.extend(v.to_le_bytes());
        }
        legacy_stream(pickle, &keys, &data)
    }

    #[test]
    fn legacy_transposed_view() {
        // Storage 0..6; the tensor is its 2x3 transpose-like view with offset 0.
        let p = tensor_pickle("k", 6, 0, &[3, 2], &[1, 3]);
        let vals: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let sd = parse(&legacy_file(&p, "k", &vals, 6), "t.pth").unwrap();
        assert_eq!(sd.format, CheckpointFormat::Legacy);
        let w = sd.get("w").unwrap();
        assert_eq!(w.shape(), &[3, 2]);
        assert_eq!(w.as_slice::<f32>().unwrap(), &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn legacy_offset_view() {
        let p = tensor_pickle("k", 6, 2, &[2, 2], &[2, 1]);
        let vals: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let sd = parse(&legacy_file(&p, "k", &vals, 6), "t.pth").unwrap();
        assert_eq!(sd.get("w").unwrap().as_slice::<f32>().unwrap(), &[2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn view_past_storage_is_an_error() {
        let p = tensor_pickle("k", 6, 3, &[2, 2], &[2, 1]);
        let vals: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let e = parse(&legacy_file(&p, "k", &vals, 6), "t.pth").unwrap_err().to_string();
        assert!(e.contains("tensor 'w'") && e.contains("reaches element 6"), "{e}");
    }

    #[test]
    fn truncated_everywhere_is_an_error_not_a_panic() {
        let p = tensor_pickle("k", 6, 0, &[3, 2], &[1, 3]);
        let vals: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let file = legacy_file(&p, "k", &vals, 6);
        for cut in 0..file.len() {
            let e = parse(&file[..cut], "t.pth").unwrap_err().to_string();
            assert!(e.starts_with("t.pth"), "cut {cut}: {e}");
        }
        let e = parse(&file[..file.len() - 3], "t.pth").unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("storage 'k'") && e.contains("tensor 'w'"), "{e}");
    }

    #[test]
    fn wrong_storage_count() {
        let p = tensor_pickle("k", 6, 0, &[3, 2], &[1, 3]);
        let vals: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let e = parse(&legacy_file(&p, "k", &vals, 5), "t.pth").unwrap_err().to_string();
        assert!(e.contains("holds 5 elements"), "{e}");
    }

    #[test]
    fn foreign_global_is_refused() {
        let e = parse(b"\x80\x02cos\nsystem\n.", "evil.pth").unwrap_err().to_string();
        // The legacy reader first wants the magic number; a bare pickle fails on the global.
        assert!(e.contains("not a state_dict: global os.system"), "{e}");
        let e = parse(b"\x80\x02cbuiltins\neval\n.", "evil.pth").unwrap_err().to_string();
        assert!(e.contains("global builtins.eval"), "{e}");
    }

    #[test]
    fn plain_pickle_is_not_a_checkpoint() {
        // pickle.dumps({'a': 1}, protocol=2)
        let e = parse(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.", "plain.pkl").unwrap_err().to_string();
        assert!(e.contains("not torch's magic number"), "{e}");
        let e = parse(b"hello", "x.pth").unwrap_err().to_string();
        assert!(e.contains("not a PyTorch checkpoint"), "{e}");
    }

    #[test]
    fn non_tensor_entry_is_not_a_state_dict() {
        let f = legacy_stream(b"\x80\x02}X\x05\x00\x00\x00epochK\x03s.", b"\x80\x02].", b"");
        let e = parse(&f, "ckpt.pth").unwrap_err().to_string();
        assert!(e.contains("not a state_dict: entry 'epoch' is a int"), "{e}");
        let f = legacy_stream(b"\x80\x02]K\x01a.", b"\x80\x02].", b"");
        let e = parse(&f, "ckpt.pth").unwrap_err().to_string();
        assert!(e.contains("not a state_dict: the pickled object is a list"), "{e}");
    }

    #[test]
    fn deep_nesting_drops_without_overflow() {
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        let mut vm = Unpickler::new(&p, "deep".into());
        let v = vm.run().unwrap();
        assert!(matches!(v, Value::Tuple(_)));
        drop(v);
    }

    #[test]
    fn long_ints() {
        assert!(matches!(little_endian_int(&[0xff]), Value::Int(-1)));
        assert!(matches!(little_endian_int(&[0x00, 0x01]), Value::Int(256)));
        assert!(
            matches!(little_endian_int(&LEGACY_MAGIC.to_le_bytes()[..10]), Value::Int(v) if v == LEGACY_MAGIC as i128)
        );
    }
}
