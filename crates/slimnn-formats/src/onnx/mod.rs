//! ONNX import and export.
//!
//! Import ([`load`], [`from_bytes`]) reads opsets [`MIN_OPSET`]..=[`MAX_OPSET`] of the default
//! domain into a [`Graph`] of canonical ops. Support is decided per node: an op's version is the
//! newest of its versions (per [`op_versions`]) not above the model's opset, and the importer
//! reads the versions [`supported_versions`] lists, converting older forms (attributes that
//! later became inputs) to the canonical ops. Every node is checked before anything is built:
//! unknown ops, unsupported versions and ops of other domains are listed all at once in
//! [`FormatError::UnsupportedOps`]; missing attributes, dangling edges and bad tensors are
//! reported with the node or tensor at fault. Initializers may live in external data files,
//! which must lie inside the model's folder.
//!
//! Export ([`save`], [`to_bytes`]) writes opset 17 (or the lowest later opset the graph needs,
//! e.g. 20 for Gelu), with weights as `raw_data`, value names kept where the graph has them,
//! symbolic dims as `dim_param` and graph metadata as `metadata_props`. Models whose weights
//! exceed [`SaveOptions::external_data_threshold`] get their weights in one file next to the
//! model.
//!
//! ```
//! use slimnn_ir::{Fact, Graph, ops::{Unary, UnaryOp}};
//! use slimnn_tensor::{DType, Dim};
//! let mut g = Graph::default();
//! let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(4)])).unwrap();
//! g.add_output("x_out", x);
//! let bytes = slimnn_formats::onnx::to_bytes(&g).unwrap();
//! let back = slimnn_formats::onnx::from_bytes(&bytes, None).unwrap();
//! assert_eq!(back.input_fact(0), g.input_fact(0));
//! ```

mod convert;
mod export;
mod functions;
mod import;
pub mod op_versions;
mod spec;
mod tensor;

#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod proto {
    //! Message types generated from the vendored `proto/onnx.proto`.
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use export::{required_opset, BASE_OPSET};
pub use tensor::{dtype_from_onnx, dtype_to_onnx, tensor_from_proto, tensor_to_proto};

use crate::{FormatError, Result};
use prost::Message;
use proto::tensor_proto::DataLocation;
use proto::StringStringEntryProto;
use slimnn_ir::Graph;
use std::path::Path;

/// Lowest default-domain opset the importer reads. Which ops it reads at an opset is decided per
/// op version: below opset 7 many ops had forms slimnn does not read (`consumed_inputs`,
/// `broadcast` attributes), and those versions are reported as unsupported.
pub const MIN_OPSET: i64 = 1;
/// Highest default-domain opset the importer reads: the newest the generated version table
/// knows.
pub const MAX_OPSET: i64 = op_versions::NEWEST_OPSET;

/// The versions (`since_version`s) of a default-domain op the importer reads; `None` for ops
/// it does not map at all.
pub fn supported_versions(op_type: &str) -> Option<&'static [i64]> {
    spec::spec(op_type).map(|s| s.versions)
}

/// Every default-domain op the importer maps, with the versions it reads.
pub fn supported_ops() -> impl Iterator<Item = (&'static str, &'static [i64])> {
    spec::SPECS.iter().map(|s| (s.op, s.versions))
}

/// Protobuf messages cannot exceed 2 GiB; larger models need external data.
const PROTOBUF_LIMIT: usize = (1 << 31) - 1;

/// Imports an ONNX model file; external data is resolved against the file's folder.
pub fn load(path: &Path) -> Result<Graph> {
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io { path: path.display().to_string(), source })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    from_bytes(&bytes, Some(dir)).map_err(|e| match e {
        FormatError::Malformed { what, msg } => {
            FormatError::Malformed { what: format!("{}: {what}", path.display()), msg }
        }
        other => other,
    })
}

/// Imports a serialized `ModelProto`. `base_dir` is the folder external data paths are relative
/// to; models with external data cannot be read without it.
pub fn from_bytes(bytes: &[u8], base_dir: Option<&Path>) -> Result<Graph> {
    let model = proto::ModelProto::decode(bytes)
        .map_err(|e| FormatError::malformed("ONNX model", format!("not a valid ModelProto: {e}")))?;
    import::import(&model, base_dir)
}

/// Converts a graph to a `ModelProto` with every weight inline.
pub fn to_model(graph: &Graph) -> Result<proto::ModelProto> {
    export::export(graph)
}

/// Serializes a graph as an ONNX model with every weight inline.
pub fn to_bytes(graph: &Graph) -> Result<Vec<u8>> {
    let model = export::export(graph)?;
    let len = model.encoded_len();
    if len > PROTOBUF_LIMIT {
        return Err(FormatError::Unsupported(format!(
            "the model needs {len} bytes, more than protobuf's 2 GiB limit; use onnx::save, which writes external data"
        )));
    }
    Ok(model.encode_to_vec())
}

/// Options of [`save_with`].
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// When the initializers together take more bytes than this, they are written to
    /// `<model file name>.data` next to the model (ONNX external data).
    pub external_data_threshold: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { external_data_threshold: 1_800_000_000 }
    }
}

/// Writes a graph as an ONNX model file (atomically), with external data when large.
pub fn save(graph: &Graph, path: &Path) -> Result<()> {
    save_with(graph, path, &SaveOptions::default())
}

/// Initializers smaller than this stay inline even when the model uses external data.
const EXTERNAL_MIN_BYTES: usize = 1024;
/// Offsets of tensors in the external data file are multiples of this.
const EXTERNAL_ALIGN: usize = 64;

/// [`save`] with explicit options.
pub fn save_with(graph: &Graph, path: &Path, opts: &SaveOptions) -> Result<()> {
    let mut model = export::export(graph)?;
    let gp = model.graph.as_mut().ok_or_else(|| FormatError::Invalid("exported model has no graph".into()))?;
    let total: u64 = gp.initializer.iter().map(|t| t.raw_data.as_ref().map_or(0, |r| r.len() as u64)).sum();
    if total > opts.external_data_threshold {
        let file_name =
            path.file_name().ok_or_else(|| FormatError::Invalid(format!("{} is not a file path", path.display())))?;
        let data_name = format!("{}.data", file_name.to_string_lossy());
        let mut data: Vec<u8> = Vec::new();
        for t in &mut gp.initializer {
            if t.raw_data.as_ref().is_none_or(|r| r.len() < EXTERNAL_MIN_BYTES) {
                continue;
            }
            let raw = t.raw_data.take().unwrap_or_default();
            data.resize(data.len().next_multiple_of(EXTERNAL_ALIGN), 0);
            let offset = data.len();
            data.extend_from_slice(&raw);
            let kv = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
            t.data_location = Some(DataLocation::External as i32);
            t.external_data = vec![
                kv("location", data_name.clone()),
                kv("offset", offset.to_string()),
                kv("length", raw.len().to_string()),
            ];
        }
        let data_path = path.with_file_name(&data_name);
        crate::write_atomic(&data_path, &data)?;
    }
    let len = model.encoded_len();
    if len > PROTOBUF_LIMIT {
        return Err(FormatError::Unsupported(format!(
            "the model needs {len} bytes even with external data, more than protobuf's 2 GiB limit"
        )));
    }
    crate::write_atomic(path, &model.encode_to_vec())
}
