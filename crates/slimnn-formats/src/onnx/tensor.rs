//! `TensorProto` <-> [`Tensor`], including external data files.

use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::{StringStringEntryProto, TensorProto};
use crate::{FormatError, Result};
use slimnn_tensor::{bf16, checked_numel, f16, DType, Tensor};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

/// The slimnn dtype of an ONNX `TensorProto.DataType` code, or an error naming the type when
/// slimnn has no equivalent (strings, unsigned 16/32/64-bit, complex, fp8, 4-bit, ...).
pub fn dtype_from_onnx(code: i32) -> Result<DType> {
    let dt =
        DataType::try_from(code).map_err(|_| FormatError::Unsupported(format!("unknown ONNX data type {code}")))?;
    Ok(match dt {
        DataType::Float => DType::F32,
        DataType::Double => DType::F64,
        DataType::Float16 => DType::F16,
        DataType::Bfloat16 => DType::BF16,
        DataType::Int8 => DType::I8,
        DataType::Uint8 => DType::U8,
        DataType::Int16 => DType::I16,
        DataType::Int32 => DType::I32,
        DataType::Int64 => DType::I64,
        DataType::Bool => DType::Bool,
        other => {
            return Err(FormatError::Unsupported(format!("ONNX data type {} is not supported", other.as_str_name())))
        }
    })
}

/// The ONNX `TensorProto.DataType` code of a plain dtype (`None` for block formats).
pub fn dtype_to_onnx(dt: DType) -> Option<i32> {
    Some(match dt {
        DType::F32 => DataType::Float,
        DType::F64 => DataType::Double,
        DType::F16 => DataType::Float16,
        DType::BF16 => DataType::Bfloat16,
        DType::I8 => DataType::Int8,
        DType::U8 => DataType::Uint8,
        DType::I16 => DataType::Int16,
        DType::I32 => DataType::Int32,
        DType::I64 => DataType::Int64,
        DType::Bool => DataType::Bool,
        DType::Block(_) => return None,
    } as i32)
}

fn tensor_label(t: &TensorProto) -> String {
    match t.name.as_deref() {
        Some(n) if !n.is_empty() => format!("tensor '{n}'"),
        _ => "tensor".to_string(),
    }
}

/// Converts a `TensorProto` to a [`Tensor`]. Data may be in `raw_data`, in the typed fields, or
/// in an external file resolved against `base_dir` (the model's folder). Dims, element counts
/// and external ranges are all checked before anything is allocated or read.
pub fn tensor_from_proto(t: &TensorProto, base_dir: Option<&Path>) -> Result<Tensor> {
    let what = tensor_label(t);
    let bad = |msg: String| FormatError::malformed(what.clone(), msg);
    let dtype =
        dtype_from_onnx(t.data_type.unwrap_or(0)).map_err(|e| FormatError::Unsupported(format!("{what}: {e}")))?;
    if t.segment.is_some() {
        return Err(FormatError::Unsupported(format!("{what}: segmented tensors are not supported")));
    }
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad(format!("negative dim {d} in {:?}", t.dims))))
        .collect::<Result<_>>()?;
    let numel = checked_numel(&shape, dtype).map_err(|e| bad(e.to_string()))?;
    let nbytes = numel * dtype.size_of();

    if t.data_location == Some(DataLocation::External as i32) {
        let raw = read_external(t, base_dir, nbytes as u64).map_err(|e| match e {
            FormatError::Malformed { msg, .. } => bad(msg),
            other => other,
        })?;
        return Ok(Tensor::from_le_bytes(dtype, shape, &raw)?);
    }
    if let Some(raw) = &t.raw_data {
        if raw.len() != nbytes {
            return Err(bad(format!(
                "raw_data holds {} bytes but shape {shape:?} of {dtype} needs {nbytes}",
                raw.len()
            )));
        }
        return Ok(Tensor::from_le_bytes(dtype, shape, raw)?);
    }
    let count = |n: usize, field: &str| {
        if n != numel {
            Err(bad(format!("{field} holds {n} values but shape {shape:?} has {numel} elements")))
        } else {
            Ok(())
        }
    };
    let t32 = &t.int32_data;
    let narrow = |field_vals: &[i32], lo: i64, hi: i64| -> Result<()> {
        match field_vals.iter().find(|&&v| (v as i64) < lo || (v as i64) > hi) {
            Some(v) => Err(bad(format!("int32_data value {v} is out of range for {dtype}"))),
            None => Ok(()),
        }
    };
    let tensor = match dtype {
        DType::F32 => {
            count(t.float_data.len(), "float_data")?;
            Tensor::from_vec(shape.clone(), t.float_data.clone())?
        }
        DType::F64 => {
            count(t.double_data.len(), "double_data")?;
            Tensor::from_vec(shape.clone(), t.double_data.clone())?
        }
        DType::I64 => {
            count(t.int64_data.len(), "int64_data")?;
            Tensor::from_vec(shape.clone(), t.int64_data.clone())?
        }
        DType::I32 => {
            count(t32.len(), "int32_data")?;
            Tensor::from_vec(shape.clone(), t32.clone())?
        }
        DType::I16 => {
            count(t32.len(), "int32_data")?;
            narrow(t32, i16::MIN as i64, i16::MAX as i64)?;
            Tensor::from_vec(shape.clone(), t32.iter().map(|&v| v as i16).collect())?
        }
        DType::I8 => {
            count(t32.len(), "int32_data")?;
            narrow(t32, i8::MIN as i64, i8::MAX as i64)?;
            Tensor::from_vec(shape.clone(), t32.iter().map(|&v| v as i8).collect())?
        }
        DType::U8 => {
            count(t32.len(), "int32_data")?;
            narrow(t32, 0, u8::MAX as i64)?;
            Tensor::from_vec(shape.clone(), t32.iter().map(|&v| v as u8).collect())?
        }
        DType::Bool => {
            count(t32.len(), "int32_data")?;
            Tensor::from_vec(shape.clone(), t32.iter().map(|&v| v != 0).collect())?
        }
        // Half floats are stored as their 16 bits in the low half of each int32.
        DType::F16 => {
            count(t32.len(), "int32_data")?;
            Tensor::from_vec(shape.clone(), t32.iter().map(|&v| f16::from_bits(v as u16)).collect())?
        }
        DType::BF16 => {
            count(t32.len(), "int32_data")?;
            Tensor::from_vec(shape.clone(), t32.iter().map(|&v| bf16::from_bits(v as u16)).collect())?
        }
        DType::Block(_) => unreachable!("dtype_from_onnx never yields block formats"),
    };
    Ok(tensor)
}

/// Reads exactly `nbytes` of external data for `t`, after checking the file lies inside
/// `base_dir` and the declared range lies inside the file.
fn read_external(t: &TensorProto, base_dir: Option<&Path>, nbytes: u64) -> Result<Vec<u8>> {
    let bad = |msg: String| FormatError::malformed("", msg);
    let mut location = None;
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    for StringStringEntryProto { key, value } in &t.external_data {
        let value = value.as_deref().unwrap_or("");
        let num = |v: &str| v.parse::<u64>().map_err(|_| bad(format!("external data {key:?} is not a number: {v:?}")));
        match key.as_deref() {
            Some("location") => location = Some(value.to_string()),
            Some("offset") => offset = num(value)?,
            Some("length") => length = Some(num(value)?),
            _ => {}
        }
    }
    let location = location.ok_or_else(|| bad("external data has no location".into()))?;
    let base = base_dir.ok_or_else(|| {
        bad(format!("external data '{location}' needs the model's folder (load the model from a file)"))
    })?;
    let path = resolve_inside(base, &location)?;
    let io = |e: std::io::Error| FormatError::Io { path: path.display().to_string(), source: e };
    let mut file = std::fs::File::open(&path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    if offset > file_len {
        return Err(bad(format!("external data offset {offset} is beyond the end of '{location}' ({file_len} bytes)")));
    }
    let length = length.unwrap_or(file_len - offset);
    if length > file_len - offset {
        return Err(bad(format!(
            "external data range {offset}+{length} is beyond the end of '{location}' ({file_len} bytes)"
        )));
    }
    if length != nbytes {
        return Err(bad(format!("external data length {length} does not match the {nbytes} bytes the shape needs")));
    }
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(nbytes as usize)
        .map_err(|_| bad(format!("cannot allocate {nbytes} bytes for external data")))?;
    file.take(nbytes).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 != nbytes {
        return Err(bad(format!("external data file '{location}' shrank while reading")));
    }
    Ok(buf)
}

/// Joins a relative `location` to `base`, refusing absolute paths, `..`, and symlinks that lead
/// outside `base`.
fn resolve_inside(base: &Path, location: &str) -> Result<PathBuf> {
    let bad = |msg: String| FormatError::malformed("", msg);
    let rel = Path::new(location);
    if location.is_empty()
        || rel.is_absolute()
        || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(bad(format!(
            "external data location '{location}' must be a relative path inside the model's folder"
        )));
    }
    let path = base.join(rel);
    let io = |p: &Path, e: std::io::Error| FormatError::Io { path: p.display().to_string(), source: e };
    let real_base = base.canonicalize().map_err(|e| io(base, e))?;
    let real = path.canonicalize().map_err(|e| io(&path, e))?;
    if !real.starts_with(&real_base) {
        return Err(bad(format!("external data location '{location}' leads outside the model's folder")));
    }
    Ok(real)
}

/// Converts a [`Tensor`] to a `TensorProto` named `name`, data in `raw_data` (little endian).
/// Block-quantized tensors and tensors carrying quantization parameters have no plain ONNX
/// tensor form and are refused.
pub fn tensor_to_proto(t: &Tensor, name: &str) -> Result<TensorProto> {
    let code = dtype_to_onnx(t.dtype())
        .ok_or_else(|| FormatError::Unsupported(format!("tensor '{name}': {} has no ONNX tensor type", t.dtype())))?;
    if t.quant().is_some() {
        return Err(FormatError::Unsupported(format!(
            "tensor '{name}': quantization parameters attached to a tensor cannot be stored in ONNX"
        )));
    }
    Ok(TensorProto {
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(code),
        name: Some(name.to_string()),
        raw_data: Some(t.to_le_bytes()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(dt: DataType, dims: &[i64]) -> TensorProto {
        TensorProto { dims: dims.to_vec(), data_type: Some(dt as i32), name: Some("t".into()), ..Default::default() }
    }

    #[test]
    fn typed_fields() {
        let mut p = proto(DataType::Float, &[2]);
        p.float_data = vec![1.5, -2.0];
        assert_eq!(tensor_from_proto(&p, None).unwrap().as_slice::<f32>().unwrap(), &[1.5, -2.0]);

        let mut p = proto(DataType::Float16, &[2]);
        // 0x3c00 = 1.0, 0xc000 = -2.0 in IEEE half.
        p.int32_data = vec![0x3c00, 0xc000];
        let t = tensor_from_proto(&p, None).unwrap();
        assert_eq!(t.to_f64_vec(), vec![1.0, -2.0]);

        let mut p = proto(DataType::Bfloat16, &[1]);
        p.int32_data = vec![0x3f80]; // 1.0
        assert_eq!(tensor_from_proto(&p, None).unwrap().to_f64_vec(), vec![1.0]);

        let mut p = proto(DataType::Uint8, &[3]);
        p.int32_data = vec![0, 7, 255];
        assert_eq!(tensor_from_proto(&p, None).unwrap().as_slice::<u8>().unwrap(), &[0, 7, 255]);
        p.int32_data = vec![0, 7, 256];
        assert!(tensor_from_proto(&p, None).is_err());

        let mut p = proto(DataType::Bool, &[2]);
        p.int32_data = vec![0, 1];
        assert_eq!(tensor_from_proto(&p, None).unwrap().as_slice::<bool>().unwrap(), &[false, true]);

        let mut p = proto(DataType::Int64, &[]);
        p.int64_data = vec![-3];
        let t = tensor_from_proto(&p, None).unwrap();
        assert_eq!((t.shape(), t.as_slice::<i64>().unwrap()), (&[][..], &[-3i64][..]));

        let mut p = proto(DataType::Double, &[1]);
        p.double_data = vec![0.25];
        assert_eq!(tensor_from_proto(&p, None).unwrap().as_slice::<f64>().unwrap(), &[0.25]);
    }

    #[test]
    fn raw_roundtrip_and_errors() {
        let t = Tensor::from_vec(vec![2, 2], vec![1i32, -2, 3, 4]).unwrap();
        let p = tensor_to_proto(&t, "w").unwrap();
        assert_eq!(tensor_from_proto(&p, None).unwrap(), t);

        let mut short = p.clone();
        short.raw_data = Some(vec![0; 15]);
        assert!(matches!(tensor_from_proto(&short, None), Err(FormatError::Malformed { .. })));

        let mut huge = proto(DataType::Float, &[1 << 40, 1 << 40]);
        assert!(tensor_from_proto(&huge, None).is_err());
        huge.dims = vec![1 << 20, 1 << 30];
        assert!(tensor_from_proto(&huge, None).is_err());
        huge.dims = vec![-1];
        assert!(tensor_from_proto(&huge, None).is_err());

        let missing = proto(DataType::Float, &[3]);
        assert!(tensor_from_proto(&missing, None).is_err());
        let empty = proto(DataType::Float, &[0, 3]);
        assert_eq!(tensor_from_proto(&empty, None).unwrap().shape(), &[0, 3]);

        let s = proto(DataType::String, &[1]);
        assert!(matches!(tensor_from_proto(&s, None), Err(FormatError::Unsupported(_))));
        let blk = Tensor::from_blocks(vec![32], slimnn_tensor::BlockKind::Q8_0, vec![0; 34]).unwrap();
        assert!(tensor_to_proto(&blk, "b").is_err());
    }

    #[test]
    fn external_paths_are_confined() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("w.bin"), [0u8; 16]).unwrap();
        let ext = |loc: &str, off: &str, len: &str| {
            let mut p = proto(DataType::Float, &[2]);
            p.data_location = Some(DataLocation::External as i32);
            let kv = |k: &str, v: &str| StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) };
            p.external_data = vec![kv("location", loc), kv("offset", off), kv("length", len)];
            p
        };
        let t = tensor_from_proto(&ext("w.bin", "8", "8"), Some(&dir)).unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap(), &[0.0, 0.0]);
        assert!(tensor_from_proto(&ext("w.bin", "12", "8"), Some(&dir)).is_err());
        assert!(tensor_from_proto(&ext("w.bin", "0", "16"), Some(&dir)).is_err());
        assert!(tensor_from_proto(&ext("w.bin", "99", "8"), Some(&dir)).is_err());
        assert!(tensor_from_proto(&ext("../w.bin", "0", "8"), Some(&dir)).is_err());
        assert!(tensor_from_proto(&ext("/etc/passwd", "0", "8"), Some(&dir)).is_err());
        assert!(tensor_from_proto(&ext("w.bin", "0", "8"), None).is_err());
    }
}
