//! Tensors on the wire: Open Inference Protocol datatype names, JSON tensor data, and the
//! binary-data extension (raw little-endian bytes after the JSON header).

use crate::error::ServeError;
use crate::model::Signature;
use serde::Serialize;
use serde_json::Value;
use slimnn_tensor::{bf16, f16, DType, Tensor, TensorData};

/// The protocol's name for a dtype (`FP32`, `INT64`, ...); `None` for formats the protocol lacks.
pub fn datatype_name(dt: DType) -> Option<&'static str> {
    Some(match dt {
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::I8 => "INT8",
        DType::U8 => "UINT8",
        DType::I16 => "INT16",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
        DType::Bool => "BOOL",
        DType::Block(_) => return None,
    })
}

/// The dtype of a protocol datatype name, or why it is not accepted.
pub fn parse_datatype(name: &str) -> Result<DType, String> {
    Ok(match name {
        "FP32" => DType::F32,
        "FP64" => DType::F64,
        "FP16" => DType::F16,
        "BF16" => DType::BF16,
        "INT8" => DType::I8,
        "UINT8" => DType::U8,
        "INT16" => DType::I16,
        "INT32" => DType::I32,
        "INT64" => DType::I64,
        "BOOL" => DType::Bool,
        "UINT16" | "UINT32" | "UINT64" | "BYTES" => return Err(format!("datatype {name} is not supported by slimnn")),
        other => return Err(format!("unknown datatype '{other}'")),
    })
}

/// One decoded input before it is checked against the model: name, dtype, shape, data.
#[derive(Debug)]
pub struct WireTensor {
    pub name: String,
    pub tensor: Tensor,
}

/// Which outputs a caller wants, and whether each comes back as raw bytes.
#[derive(Debug, Clone)]
pub struct OutputRequest {
    pub name: String,
    pub binary: bool,
}

/// A decoded REST inference request.
#[derive(Debug)]
pub struct RestRequest {
    pub id: Option<String>,
    pub inputs: Vec<WireTensor>,
    /// Empty: every output, as `binary_default` says.
    pub outputs: Vec<OutputRequest>,
    pub binary_default: bool,
}

fn bad(msg: impl Into<String>) -> ServeError {
    ServeError::BadRequest(msg.into())
}

/// Shape from JSON: a list of non-negative integers.
fn parse_shape(v: Option<&Value>, what: &str) -> Result<Vec<usize>, ServeError> {
    let arr = v.and_then(Value::as_array).ok_or_else(|| bad(format!("{what}: 'shape' must be a list of sizes")))?;
    arr.iter()
        .map(|d| {
            d.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| bad(format!("{what}: shape entry {d} is not a non-negative integer")))
        })
        .collect()
}

/// Element count of a shape, refusing overflow.
pub fn element_count(shape: &[usize], what: &str) -> Result<usize, ServeError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("{what}: shape {shape:?} is too large")))
}

/// Appends the scalars of a (possibly nested) JSON list to `out`, depth-first.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>, limit: usize, what: &str) -> Result<(), ServeError> {
    // Iterative, so deeply nested input cannot overflow the stack.
    let mut stack = vec![v];
    while let Some(x) = stack.pop() {
        match x {
            Value::Array(items) => stack.extend(items.iter().rev()),
            scalar => {
                if out.len() >= limit {
                    return Err(bad(format!("{what}: 'data' has more values than the shape holds ({limit})")));
                }
                out.push(scalar)
            }
        }
    }
    Ok(())
}

/// A tensor from JSON `data` values (flat or nested) of the given dtype and shape.
pub fn tensor_from_json(dtype: DType, shape: Vec<usize>, data: &Value, what: &str) -> Result<Tensor, ServeError> {
    let n = element_count(&shape, what)?;
    let mut vals = Vec::with_capacity(n.min(1 << 20));
    flatten(data, &mut vals, n, what)?;
    if vals.len() != n {
        return Err(bad(format!("{what}: 'data' has {} values but shape {shape:?} needs {n}", vals.len())));
    }
    let tensor = if dtype == DType::Bool {
        let b: Result<Vec<bool>, _> = vals
            .iter()
            .map(|v| v.as_bool().ok_or_else(|| bad(format!("{what}: BOOL data holds {v}, not true/false"))))
            .collect();
        Tensor::from_vec(shape, b?)
    } else if dtype.is_float() {
        let f: Result<Vec<f64>, _> = vals
            .iter()
            .map(|v| v.as_f64().ok_or_else(|| bad(format!("{what}: {} data holds {v}, not a number", dt_name(dtype)))))
            .collect();
        Tensor::from_f64s(dtype, shape, &f?)
    } else {
        let (lo, hi) = int_range(dtype);
        let i: Result<Vec<i64>, _> = vals
            .iter()
            .map(|v| {
                v.as_i64().filter(|x| (lo..=hi).contains(x)).ok_or_else(|| {
                    bad(format!("{what}: {} data holds {v}, not an integer in [{lo}, {hi}]", dt_name(dtype)))
                })
            })
            .collect();
        Tensor::from_i64s(dtype, shape, &i?)
    };
    tensor.map_err(|e| bad(format!("{what}: {e}")))
}

fn dt_name(dt: DType) -> &'static str {
    datatype_name(dt).unwrap_or("?")
}

fn int_range(dt: DType) -> (i64, i64) {
    match dt {
        DType::I8 => (i8::MIN as i64, i8::MAX as i64),
        DType::U8 => (0, u8::MAX as i64),
        DType::I16 => (i16::MIN as i64, i16::MAX as i64),
        DType::I32 => (i32::MIN as i64, i32::MAX as i64),
        _ => (i64::MIN, i64::MAX),
    }
}

/// A tensor from raw little-endian bytes; the byte count must match exactly.
pub fn tensor_from_raw(dtype: DType, shape: Vec<usize>, raw: &[u8], what: &str) -> Result<Tensor, ServeError> {
    let n = element_count(&shape, what)?;
    let want = n.checked_mul(dtype.size_of()).ok_or_else(|| bad(format!("{what}: shape {shape:?} is too large")))?;
    if raw.len() != want {
        return Err(bad(format!(
            "{what}: {} bytes of data for shape {shape:?} of {} (expected {want})",
            raw.len(),
            dt_name(dtype)
        )));
    }
    Tensor::from_le_bytes(dtype, shape, raw).map_err(|e| bad(format!("{what}: {e}")))
}

fn param_bool(params: Option<&Value>, key: &str) -> Option<bool> {
    params.and_then(|p| p.get(key)).and_then(Value::as_bool)
}

/// Decodes a REST `infer` body. `header_len` is the `Inference-Header-Content-Length` header:
/// when given, the first `header_len` bytes are JSON and the rest binary tensor data.
pub fn decode_rest(body: &[u8], header_len: Option<usize>) -> Result<RestRequest, ServeError> {
    let (json_bytes, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let root: Value =
        serde_json::from_slice(json_bytes).map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    let obj = root.as_object().ok_or_else(|| bad("request body must be a JSON object"))?;
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(bad(format!("'id' must be a string, not {other}"))),
    };
    let binary_default = param_bool(obj.get("parameters"), "binary_data_output").unwrap_or(false);
    let raw_inputs =
        obj.get("inputs").and_then(Value::as_array).ok_or_else(|| bad("request needs an 'inputs' list of tensors"))?;
    let mut inputs = Vec::with_capacity(raw_inputs.len());
    for (i, t) in raw_inputs.iter().enumerate() {
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("inputs[{i}] needs a string 'name'")))?
            .to_string();
        let what = format!("input '{name}'");
        let dtype_name = t
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("{what}: needs a string 'datatype'")))?;
        let dtype = parse_datatype(dtype_name).map_err(|e| bad(format!("{what}: {e}")))?;
        let shape = parse_shape(t.get("shape"), &what)?;
        let binary_size = t.get("parameters").and_then(|p| p.get("binary_data_size"));
        let tensor = match (binary_size, t.get("data")) {
            (Some(size), None) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| bad(format!("{what}: 'binary_data_size' must be a non-negative integer")))?;
                if header_len.is_none() {
                    return Err(bad(format!(
                        "{what}: binary data given without an Inference-Header-Content-Length header"
                    )));
                }
                if size > binary.len() {
                    return Err(bad(format!(
                        "{what}: binary_data_size {size} exceeds the {} bytes of binary data left",
                        binary.len()
                    )));
                }
                let (chunk, rest) = binary.split_at(size);
                binary = rest;
                tensor_from_raw(dtype, shape, chunk, &what)?
            }
            (None, Some(data)) => tensor_from_json(dtype, shape, data, &what)?,
            (Some(_), Some(_)) => return Err(bad(format!("{what}: give either 'data' or binary_data_size, not both"))),
            (None, None) => return Err(bad(format!("{what}: needs 'data' (or binary data)"))),
        };
        inputs.push(WireTensor { name, tensor });
    }
    if !binary.is_empty() {
        return Err(bad(format!("{} bytes of binary data are not claimed by any input", binary.len())));
    }
    let mut outputs = Vec::new();
    if let Some(outs) = obj.get("outputs") {
        let outs = outs.as_array().ok_or_else(|| bad("'outputs' must be a list"))?;
        for (i, o) in outs.iter().enumerate() {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("outputs[{i}] needs a string 'name'")))?;
            let binary = param_bool(o.get("parameters"), "binary_data").unwrap_or(binary_default);
            outputs.push(OutputRequest { name: name.to_string(), binary });
        }
    }
    Ok(RestRequest { id, inputs, outputs, binary_default })
}

/// Checks decoded inputs against a model's signature and orders them as the model wants.
pub fn bind_inputs(sig: &Signature, inputs: Vec<WireTensor>) -> Result<Vec<Tensor>, ServeError> {
    let mut slots: Vec<Option<Tensor>> = vec![None; sig.inputs.len()];
    for w in inputs {
        let idx = sig.inputs.iter().position(|s| s.name == w.name).ok_or_else(|| {
            let names: Vec<&str> = sig.inputs.iter().map(|s| s.name.as_str()).collect();
            bad(format!("input '{}': the model has no such input (it takes {})", w.name, names.join(", ")))
        })?;
        if slots[idx].is_some() {
            return Err(bad(format!("input '{}' is given twice", w.name)));
        }
        slots[idx] = Some(w.tensor);
    }
    let mut out = Vec::with_capacity(slots.len());
    for (spec, slot) in sig.inputs.iter().zip(slots) {
        out.push(slot.ok_or_else(|| bad(format!("input '{}' is missing", spec.name)))?);
    }
    sig.check(&out)?;
    Ok(out)
}

/// Output data as JSON, written with each type's own shortest form (f32 as f32, not widened).
#[derive(Serialize)]
#[serde(untagged)]
pub enum JsonData<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    I8(&'a [i8]),
    U8(&'a [u8]),
    I16(&'a [i16]),
    I32(&'a [i32]),
    I64(&'a [i64]),
    Bool(&'a [bool]),
    Widened(Vec<f32>),
}

impl<'a> JsonData<'a> {
    pub fn of(t: &'a Tensor) -> JsonData<'a> {
        match t.data() {
            TensorData::F32(v) => JsonData::F32(v),
            TensorData::F64(v) => JsonData::F64(v),
            TensorData::F16(v) => JsonData::Widened(v.iter().map(|x: &f16| x.to_f32()).collect()),
            TensorData::BF16(v) => JsonData::Widened(v.iter().map(|x: &bf16| x.to_f32()).collect()),
            TensorData::I8(v) => JsonData::I8(v),
            TensorData::U8(v) => JsonData::U8(v),
            TensorData::I16(v) => JsonData::I16(v),
            TensorData::I32(v) => JsonData::I32(v),
            TensorData::I64(v) => JsonData::I64(v),
            TensorData::Bool(v) => JsonData::Bool(v),
            TensorData::Block { .. } => JsonData::Widened(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_request_with_nested_data() {
        let body = br#"{"id":"7","inputs":[{"name":"x","datatype":"FP32","shape":[2,2],"data":[[1,2],[3,4.5]]}]}"#;
        let r = decode_rest(body, None).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.inputs[0].tensor.as_slice::<f32>().unwrap(), &[1.0, 2.0, 3.0, 4.5]);
    }

    #[test]
    fn binary_request() {
        let header = br#"{"inputs":[{"name":"x","datatype":"INT32","shape":[2],"parameters":{"binary_data_size":8}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&7i32.to_le_bytes());
        body.extend_from_slice(&(-1i32).to_le_bytes());
        let r = decode_rest(&body, Some(header.len())).unwrap();
        assert_eq!(r.inputs[0].tensor.as_slice::<i32>().unwrap(), &[7, -1]);
        assert!(decode_rest(&body, Some(body.len() + 1)).is_err());
        assert!(decode_rest(&body[..body.len() - 1], Some(header.len())).is_err());
    }

    #[test]
    fn clear_errors() {
        let err = |b: &[u8]| decode_rest(b, None).unwrap_err().to_string();
        assert!(err(b"{nope").contains("not valid JSON"));
        assert!(err(br#"{"inputs":[{"name":"a","datatype":"INT8","shape":[1],"data":[300]}]}"#).contains("'a'"));
        assert!(err(br#"{"inputs":[{"name":"a","datatype":"FP32","shape":[3],"data":[1,2]}]}"#).contains("needs 3"));
        assert!(err(br#"{"inputs":[{"name":"a","datatype":"STRING","shape":[1],"data":[1]}]}"#).contains("unknown"));
        let huge = br#"{"inputs":[{"name":"a","datatype":"FP32","shape":[4294967296,4294967296,16],"data":[]}]}"#;
        assert!(err(huge).contains("too large"));
    }
}
