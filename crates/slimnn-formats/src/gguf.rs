//! GGUF (version 2 and 3) files, as llama.cpp writes them: a header of typed key/value metadata
//! and tensor descriptors, then aligned tensor data. The file is memory-mapped; [`GgufFile::tensor`]
//! copies one tensor out (block-quantized tensors stay in their block format).
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count; each metadata entry is a string key, a `u32` value type and the value; each tensor
//! descriptor is a string name, `u32` rank, `rank` x `u64` dims (fastest-varying first), `u32`
//! ggml type and a `u64` offset into the data section, which starts at the first multiple of
//! `general.alignment` (default 32) after the header.

use crate::{FormatError, Result};
use slimnn_tensor::{block_format, BlockKind, DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// The ggml tensor types slimnn reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Block(BlockKind),
}

impl GgmlType {
    /// Maps ggml's type id; `None` for types slimnn does not read.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Block(BlockKind::Q4_0),
            3 => GgmlType::Block(BlockKind::Q4_1),
            8 => GgmlType::Block(BlockKind::Q8_0),
            12 => GgmlType::Block(BlockKind::Q4K),
            14 => GgmlType::Block(BlockKind::Q6K),
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Block(BlockKind::Q4_0) => 2,
            GgmlType::Block(BlockKind::Q4_1) => 3,
            GgmlType::Block(BlockKind::Q8_0) => 8,
            GgmlType::Block(BlockKind::Q4K) => 12,
            GgmlType::Block(BlockKind::Q6K) => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Values per block (1 for plain floats) and bytes per block.
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Block(k) => (block_format(k).block_len(), block_format(k).block_bytes()),
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            GgmlType::F32 => DType::F32,
            GgmlType::F16 => DType::F16,
            GgmlType::BF16 => DType::BF16,
            GgmlType::Block(k) => DType::Block(k),
        }
    }
}

/// Names of ggml's other type ids, so an error can say what the file holds.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        13 => "Q5_K",
        15 => "Q8_K",
        16..=23 => "an IQ format",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        _ => "unknown",
    }
}

/// A tensor descriptor from the header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Row-major shape (GGUF's dims reversed: the last dim is the contiguous one).
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte offset of the data in the file.
    pub file_offset: usize,
    pub byte_len: usize,
}

/// An open, memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: String,
    map: memmap2::Mmap,
    pub version: u32,
    pub metadata: HashMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

/// Reads little-endian values from the header with bounds checks; errors name the file, what
/// was being read and the offset.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str, msg: impl std::fmt::Display) -> FormatError {
        FormatError::malformed(format!("{} (offset {}, {what})", self.path, self.pos), msg.to_string())
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => {
                Err(self
                    .err(what, format!("file is truncated: {n} bytes needed, {} left", self.bytes.len() - self.pos)))
            }
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit in what is left of the file at `min_item_bytes` per item.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            return Err(self.err(what, format!("count {n} cannot fit in the {left} bytes left (truncated or corrupt)")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err(what, "string is not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(self.array::<1>(what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => GgufValue::Str(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(self.err(what, "arrays nested too deeply"));
                }
                let item_ty = self.u32(what)?;
                let n = self.count(what, 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_ty, what, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(self.err(what, format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Maps `path` and parses its header; every tensor descriptor is checked (type known,
    /// dims whole blocks, data inside the file) before any data is read.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| FormatError::Io { path: shown.clone(), source })?;
        // SAFETY: the map is read-only and private to this process; a file truncated by
        // another process while mapped is outside what a reader can guard against.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|source| FormatError::Io { path: shown.clone(), source })?;
        let mut c = Cursor { bytes: &map, pos: 0, path: &shown };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(FormatError::malformed(
                shown.clone(),
                format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(FormatError::Unsupported(format!("{shown}: GGUF version {version} (slimnn reads 2 and 3)")));
        }
        // A tensor descriptor takes at least 8 + 4 + 4 + 8 bytes, a metadata entry 8 + 4 + 1.
        let n_tensors = c.count("tensor count", 24)?;
        let n_meta = c.count("metadata count", 13)?;
        let mut metadata = HashMap::new();
        for i in 0..n_meta {
            let key = c.string(&format!("metadata key {i}"))?;
            let ty = c.u32(&format!("type of metadata '{key}'"))?;
            let value = c.value(ty, &format!("metadata '{key}'"), 0)?;
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor {i}"))?;
            let what = format!("tensor '{name}'");
            let rank = c.u32(&what)? as usize;
            if rank > 4 {
                return Err(c.err(&what, format!("rank {rank} (GGUF tensors have at most 4 dims)")));
            }
            let mut dims = Vec::with_capacity(rank);
            for _ in 0..rank {
                dims.push(c.u64(&what)?);
            }
            let type_id = c.u32(&what)?;
            let offset = c.u64(&what)?;
            raw.push((name, dims, type_id, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a as usize,
                _ => {
                    return Err(FormatError::malformed(shown, format!("general.alignment {v:?} is not a power of two")))
                }
            },
        };
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::new();
        for (name, dims, type_id, offset) in raw {
            let at =
                |msg: String| FormatError::malformed(format!("{shown}: tensor '{name}' (data offset {offset})"), msg);
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                at(format!(
                    "tensor type {type_id} ({}) is not supported; slimnn reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K",
                    ggml_type_name(type_id)
                ))
            })?;
            let (block_len, block_bytes) = ggml_type.block();
            let numel =
                dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| at("dims overflow".into()))?;
            let first = dims.first().copied().unwrap_or(1);
            if !first.is_multiple_of(block_len as u64) {
                return Err(at(format!("row length {first} is not a multiple of the {block_len}-value block")));
            }
            let byte_len = (numel / block_len as u64)
                .checked_mul(block_bytes as u64)
                .ok_or_else(|| at("size overflows".into()))?;
            let start = (data_start as u64).checked_add(offset).ok_or_else(|| at("offset overflows".into()))?;
            let end = start.checked_add(byte_len).ok_or_else(|| at("offset overflows".into()))?;
            if end > map.len() as u64 {
                return Err(at(format!("file is truncated: data ends at byte {end}, file has {} bytes", map.len())));
            }
            let shape = dims.iter().rev().map(|&d| d as usize).collect();
            by_name.insert(name.clone(), tensors.len());
            tensors.push(GgufTensorInfo {
                name,
                shape,
                ggml_type,
                file_offset: start as usize,
                byte_len: byte_len as usize,
            });
        }
        Ok(GgufFile { path: shown, map, version, metadata, tensors, by_name })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str, want: &str) -> FormatError {
        FormatError::malformed(self.path.clone(), format!("metadata '{key}' is missing or not {want}"))
    }

    /// A required integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(GgufValue::as_u64).ok_or_else(|| self.missing(key, "an integer"))
    }

    /// A required numeric metadata value.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key).and_then(GgufValue::as_f64).ok_or_else(|| self.missing(key, "a number"))
    }

    /// A required string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key).and_then(GgufValue::as_str).ok_or_else(|| self.missing(key, "a string"))
    }

    /// A required array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self.get(key).and_then(GgufValue::as_array).ok_or_else(|| self.missing(key, "an array"))?;
        arr.iter().map(|v| v.as_str().ok_or_else(|| self.missing(key, "an array of strings"))).collect()
    }

    pub fn info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| FormatError::malformed(self.path.clone(), format!("tensor '{name}' is missing")))
    }

    /// The raw bytes of a tensor (a view into the map).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name)?;
        Ok(&self.map[info.file_offset..info.file_offset + info.byte_len])
    }

    /// Copies one tensor out: floats as their dtype, block formats as block bytes.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.info(name)?;
        let bytes = self.bytes(name)?;
        let t = match info.ggml_type {
            GgmlType::Block(kind) => Tensor::from_blocks(info.shape.clone(), kind, bytes.to_vec()),
            other => Tensor::from_le_bytes(other.dtype(), info.shape.clone(), bytes),
        };
        t.map_err(|e| {
            FormatError::malformed(
                format!("{}: tensor '{name}' (offset {})", self.path, info.file_offset),
                e.to_string(),
            )
        })
    }
}

/// Builders for hand-made GGUF files (tests; also handy to write small fixtures).
pub mod write {
    use super::GgufValue;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend(x.to_le_bytes()),
            GgufValue::I16(x) => out.extend(x.to_le_bytes()),
            GgufValue::U32(x) => out.extend(x.to_le_bytes()),
            GgufValue::I32(x) => out.extend(x.to_le_bytes()),
            GgufValue::U64(x) => out.extend(x.to_le_bytes()),
            GgufValue::I64(x) => out.extend(x.to_le_bytes()),
            GgufValue::F32(x) => out.extend(x.to_le_bytes()),
            GgufValue::F64(x) => out.extend(x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(*x as u8),
            GgufValue::Str(s) => string(out, s),
            GgufValue::Array(items) => {
                out.extend(items.first().map_or(4, type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    value(out, i);
                }
            }
        }
    }

    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::Str(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// A GGUF v3 file: metadata, then tensors given as (name, GGUF dims fastest first, ggml
    /// type id, raw bytes), data aligned to 32.
    pub fn gguf_bytes(metadata: &[(&str, GgufValue)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            string(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in tensors {
            string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::gguf_bytes;
    use super::*;
    use slimnn_tensor::{bf16, f16};

    fn open_bytes(bytes: &[u8], name: &str) -> Result<GgufFile> {
        // The file stays mapped after the directory is removed (Linux unlink semantics).
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&p, bytes).unwrap();
        GgufFile::open(&p)
    }

    fn sample() -> Vec<u8> {
        let f32s: Vec<u8> = [1.0f32, -2.0, 3.5, 0.25, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16s: Vec<u8> = [1.5f32, -0.5].iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let bf16s: Vec<u8> = [2.0f32, -8.0].iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
        let x: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 16.0).collect();
        let blocks = |k: BlockKind| {
            let f = block_format(k);
            let mut q = vec![0u8; 256 / f.block_len() * f.block_bytes()];
            f.quantize(&x, &mut q);
            q
        };
        gguf_bytes(
            &[
                ("general.architecture", GgufValue::Str("llama".into())),
                ("llama.block_count", GgufValue::U32(2)),
                ("llama.rope.freq_base", GgufValue::F32(10000.0)),
                (
                    "tokenizer.ggml.tokens",
                    GgufValue::Array(vec![GgufValue::Str("a".into()), GgufValue::Str("b".into())]),
                ),
            ],
            &[
                ("w_f32", vec![3, 2], 0, f32s),
                ("w_f16", vec![2], 1, f16s),
                ("w_bf16", vec![2], 30, bf16s),
                ("w_q8_0", vec![256], 8, blocks(BlockKind::Q8_0)),
                ("w_q4_0", vec![256], 2, blocks(BlockKind::Q4_0)),
                ("w_q4_1", vec![256], 3, blocks(BlockKind::Q4_1)),
                ("w_q4_k", vec![256], 12, blocks(BlockKind::Q4K)),
                ("w_q6_k", vec![256, 1], 14, blocks(BlockKind::Q6K)),
            ],
        )
    }

    #[test]
    fn reads_metadata_and_every_tensor_type() {
        let g = open_bytes(&sample(), "ok").unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(g.get_strings("tokenizer.ggml.tokens").unwrap(), ["a", "b"]);
        let t = g.tensor("w_f32").unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.as_slice::<f32>().unwrap(), &[1.0, -2.0, 3.5, 0.25, 5.0, 6.0]);
        assert_eq!(g.tensor("w_f16").unwrap().to_f64_vec(), [1.5, -0.5]);
        assert_eq!(g.tensor("w_bf16").unwrap().to_f64_vec(), [2.0, -8.0]);
        for (name, kind, tol) in [
            ("w_q8_0", BlockKind::Q8_0, 0.07),
            ("w_q4_0", BlockKind::Q4_0, 1.1),
            ("w_q4_1", BlockKind::Q4_1, 0.6),
            ("w_q4_k", BlockKind::Q4K, 0.6),
            ("w_q6_k", BlockKind::Q6K, 0.15),
        ] {
            let t = g.tensor(name).unwrap();
            assert_eq!(t.dtype(), DType::Block(kind), "{name}");
            assert_eq!(t.len(), 256);
            for (i, v) in t.to_f64_vec().iter().enumerate() {
                let x = (i as f64 - 128.0) / 16.0;
                assert!((v - x).abs() <= tol, "{name}[{i}]: {v} vs {x}");
            }
        }
        assert_eq!(g.tensor("w_q6_k").unwrap().shape(), &[1, 256]);
    }

    #[test]
    fn truncated_file_names_the_tensor_and_offset() {
        let bytes = sample();
        let err = open_bytes(&bytes[..bytes.len() - 100], "trunc").unwrap_err().to_string();
        assert!(err.contains("trunc.gguf") && err.contains("tensor 'w_q6_k'") && err.contains("truncated"), "{err}");
        assert!(err.contains("offset"), "{err}");
        // Cut inside the header.
        let err = open_bytes(&bytes[..60], "trunc_header").unwrap_err().to_string();
        assert!(err.contains("trunc_header.gguf") && err.contains("offset"), "{err}");
    }

    #[test]
    fn unknown_tensor_type_and_bad_magic() {
        let bytes = gguf_bytes(&[], &[("odd", vec![32], 99, vec![0; 64])]);
        let err = open_bytes(&bytes, "odd").unwrap_err().to_string();
        assert!(err.contains("tensor 'odd'") && err.contains("tensor type 99") && err.contains("offset"), "{err}");
        let err = open_bytes(b"GGML\x03\x00\x00\x00", "magic").unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
    }
}
