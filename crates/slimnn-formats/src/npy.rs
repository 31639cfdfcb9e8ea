//! `.npy` reading and writing (format versions 1.0 to 3.0, little-endian, C order): the tensor
//! interchange format of the CLI and of the Python reference scripts.

use crate::{FormatError, Result};
use slimnn_tensor::{checked_numel, DType, Tensor};
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

fn descr_of(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::I16 => "<i2",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
        DType::Bool => "|b1",
        other => return Err(FormatError::Unsupported(format!(".npy has no {other} dtype"))),
    })
}

fn dtype_of(descr: &str) -> Option<DType> {
    Some(match descr {
        "<f4" => DType::F32,
        "<f8" => DType::F64,
        "<f2" => DType::F16,
        "|i1" | "<i1" | "i1" => DType::I8,
        "|u1" | "<u1" | "u1" => DType::U8,
        "<i2" => DType::I16,
        "<i4" => DType::I32,
        "<i8" => DType::I64,
        "|b1" | "<b1" | "b1" | "?" => DType::Bool,
        _ => return None,
    })
}

/// Encodes a tensor as `.npy` bytes (version 1.0, or 2.0 if the header needs it).
pub fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let shape = match t.shape() {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        s => format!("({})", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}", descr_of(t.dtype())?);
    // Pad so the data starts on a 64-byte boundary, header ending in a newline.
    let prefix_v1 = MAGIC.len() + 2 + 2;
    let v2 = header.len() + 1 + prefix_v1 > u16::MAX as usize;
    let prefix = if v2 { prefix_v1 + 2 } else { prefix_v1 };
    let total = (prefix + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - prefix - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + t.len() * t.dtype().size_of());
    out.extend_from_slice(MAGIC);
    if v2 {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&t.to_le_bytes());
    Ok(out)
}

/// Writes a tensor to `path` atomically.
pub fn write(path: &Path, t: &Tensor) -> Result<()> {
    crate::write_atomic(path, &to_bytes(t)?)
}

/// Reads a `.npy` file.
pub fn read(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io { path: path.display().to_string(), source })?;
    from_bytes(&bytes).map_err(|e| match e {
        FormatError::Malformed { msg, .. } => FormatError::malformed(path.display().to_string(), msg),
        other => other,
    })
}

/// Decodes `.npy` bytes.
pub fn from_bytes(b: &[u8]) -> Result<Tensor> {
    let bad = |msg: String| FormatError::malformed(".npy", msg);
    if b.len() < 10 || &b[..6] != MAGIC {
        return Err(bad("not a .npy file (bad magic)".into()));
    }
    let (hlen, start): (usize, usize) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return Err(bad("truncated header".into()));
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => return Err(bad(format!("unsupported format version {v}"))),
    };
    let header = b.get(start..start.saturating_add(hlen)).ok_or_else(|| bad("truncated header".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text".into()))?;
    let descr = dict_value(header, "descr").ok_or_else(|| bad(format!("header has no 'descr': {header}")))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = dtype_of(descr).ok_or_else(|| {
        FormatError::Unsupported(format!(
            ".npy dtype '{descr}' is not supported (little-endian numbers and bools only)"
        ))
    })?;
    match dict_value(header, "fortran_order") {
        Some("False") => {}
        Some("True") => {
            return Err(FormatError::Unsupported(".npy in Fortran order is not supported; save with C order".into()))
        }
        other => return Err(bad(format!("bad 'fortran_order' in header: {other:?}"))),
    }
    let shape_text = dict_value(header, "shape").ok_or_else(|| bad(format!("header has no 'shape': {header}")))?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| bad(format!("bad shape {shape_text}")))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L').parse::<usize>().map_err(|_| bad(format!("bad dim '{s}' in shape {shape_text}")))
        })
        .collect::<Result<Vec<usize>>>()?;
    let numel = checked_numel(&shape, dtype)?;
    let data = &b[start + hlen..];
    let want = numel * dtype.size_of();
    if data.len() != want {
        return Err(bad(format!("shape {shape:?} of {dtype} needs {want} data bytes, file has {}", data.len())));
    }
    Ok(Tensor::from_le_bytes(dtype, shape, data)?)
}

/// The text of `key`'s value in a Python dict literal (a tuple is returned with parentheses).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[pos + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}'])? };
    Some(rest[..end].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_npy_dtypes_and_ranks() {
        for dt in
            [DType::F32, DType::F64, DType::F16, DType::I8, DType::U8, DType::I16, DType::I32, DType::I64, DType::Bool]
        {
            for shape in [vec![], vec![3], vec![2, 3], vec![1, 0, 2]] {
                let n: usize = shape.iter().product();
                let vals: Vec<f64> = (0..n).map(|i| i as f64).collect();
                let t = Tensor::from_f64s(dt, shape.clone(), &vals).unwrap();
                let b = to_bytes(&t).unwrap();
                assert_eq!((b.len() - t.len() * dt.size_of()) % 64, 0);
                assert_eq!(from_bytes(&b).unwrap(), t, "{dt} {shape:?}");
            }
        }
    }

    #[test]
    fn reads_numpy_written_header() {
        // Header exactly as numpy 1.x writes np.arange(3, dtype='<i8').
        let mut b = b"\x93NUMPY\x01\x00v\x00{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }".to_vec();
        b.resize(10 + 0x76 - 1, b' ');
        b.push(b'\n');
        for v in 0i64..3 {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let t = from_bytes(&b).unwrap();
        assert_eq!(t.as_slice::<i64>().unwrap(), &[0, 1, 2]);
    }

    #[test]
    fn malformed_files_are_errors() {
        let t = Tensor::from_vec(vec![2, 2], vec![1f32, 2.0, 3.0, 4.0]).unwrap();
        let good = to_bytes(&t).unwrap();
        assert!(from_bytes(&good[..good.len() - 1]).is_err(), "truncated data");
        assert!(from_bytes(&good[..20]).is_err(), "truncated header");
        assert!(from_bytes(b"hello world, not npy").is_err());
        // Edits the header in place (same length, so the data offset stays valid).
        let edit = |from: &str, to: &str| {
            assert_eq!(from.len(), to.len());
            let mut b = good.clone();
            let pos = b.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
            b[pos..pos + to.len()].copy_from_slice(to.as_bytes());
            from_bytes(&b).unwrap_err().to_string()
        };
        assert!(edit("(2, 2), }                    ", "(99999999999, 99999999999), }").contains("overflows"));
        assert!(edit("(2, 2), }                    ", "(9999999, 999999999),       }").contains("more than the limit"));
        assert!(edit("False", "True ").contains("Fortran"));
        assert!(edit("<f4", ">f4").contains("not supported"));
    }
}
