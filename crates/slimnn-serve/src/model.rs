//! A model as the server sees it: its signature (names, dtypes, shapes), how it loads, and the
//! batcher in front of its runnable.

use crate::batcher::Batcher;
use crate::config::ModelConfig;
use crate::error::ServeError;
use crate::metrics::Metrics;
use anyhow::{bail, Context, Result};
use slimnn_data::text::TextTokenizer;
use slimnn_ir::Graph;
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Dim, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Loads a model as `slimnn run` does ([`slimnn_formats::load_model`]).
pub fn load_graph(path: &Path) -> Result<Graph> {
    slimnn_formats::load_model(path).with_context(|| format!("loading {}", path.display()))
}

/// One dimension of a signature: a fixed size, or a named/unnamed free size.
#[derive(Debug, Clone, PartialEq)]
pub enum SigDim {
    Fixed(usize),
    Free(Option<String>),
}

#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<SigDim>,
}

impl TensorSpec {
    /// Shape as the protocol reports it (-1 for a free dimension).
    pub fn wire_shape(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|d| match d {
                SigDim::Fixed(n) => *n as i64,
                SigDim::Free(_) => -1,
            })
            .collect()
    }
}

/// What a model takes and gives.
#[derive(Debug, Clone)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

fn sig_dim(d: &Dim) -> SigDim {
    match d {
        Dim::Known(n) => SigDim::Fixed(*n),
        Dim::Sym(s) => SigDim::Free(Some(s.to_string())),
        Dim::Unknown => SigDim::Free(None),
    }
}

impl Signature {
    pub fn of(g: &Graph) -> Signature {
        let spec = |name: &str, f: &slimnn_ir::Fact| TensorSpec {
            name: name.to_string(),
            dtype: f.dtype,
            shape: f.shape.iter().map(sig_dim).collect(),
        };
        Signature {
            inputs: (0..g.inputs().len()).map(|i| spec(g.input_name(i), g.input_fact(i))).collect(),
            outputs: g.outputs().iter().map(|(n, o)| spec(n, g.fact(*o))).collect(),
        }
    }

    /// Checks dtypes, ranks, fixed sizes, and that a named free size is the same in every input.
    pub fn check(&self, inputs: &[Tensor]) -> Result<(), ServeError> {
        let mut named: Vec<(&str, usize, &str)> = Vec::new();
        for (spec, t) in self.inputs.iter().zip(inputs) {
            let bad = |m: String| ServeError::BadRequest(format!("input '{}': {m}", spec.name));
            if t.dtype() != spec.dtype {
                return Err(bad(format!(
                    "datatype {} does not match the model's {}",
                    crate::codec::datatype_name(t.dtype()).unwrap_or("?"),
                    crate::codec::datatype_name(spec.dtype).unwrap_or("?")
                )));
            }
            if t.rank() != spec.shape.len() {
                return Err(bad(format!(
                    "shape {:?} has rank {} but the model wants rank {} ({:?})",
                    t.shape(),
                    t.rank(),
                    spec.shape.len(),
                    spec.wire_shape()
                )));
            }
            for (axis, (d, &n)) in spec.shape.iter().zip(t.shape()).enumerate() {
                match d {
                    SigDim::Fixed(want) if *want != n => {
                        return Err(bad(format!(
                            "dimension {axis} is {n} but the model wants {want} (shape {:?})",
                            spec.wire_shape()
                        )))
                    }
                    SigDim::Free(Some(sym)) => {
                        if let Some((_, other, who)) = named.iter().find(|(s, _, _)| s == sym) {
                            if *other != n {
                                return Err(bad(format!(
                                    "dimension {axis} ('{sym}') is {n} but input '{who}' has {other} there"
                                )));
                            }
                        } else {
                            named.push((sym, n, &spec.name));
                        }
                    }
                    _ => {}
                }
            }
            if t.is_empty() {
                return Err(bad(format!("shape {:?} holds no values", t.shape())));
            }
        }
        Ok(())
    }

    /// Whether every input's first axis is free (requests can be stacked along it).
    pub fn batchable(&self) -> bool {
        !self.inputs.is_empty()
            && self.inputs.iter().all(|s| matches!(s.shape.first(), Some(SigDim::Free(_))))
            && self.outputs.iter().all(|s| matches!(s.shape.first(), Some(SigDim::Free(_))))
    }

    /// Whether this looks like a transformer taking `[batch, sequence]` integer ids, so that
    /// requests of different lengths can be zero-padded (with a zero attention mask) to a bucket.
    pub fn sequence_paddable(&self) -> bool {
        self.batchable()
            && self.inputs.iter().any(|s| s.name == "attention_mask")
            && self
                .inputs
                .iter()
                .all(|s| s.dtype.is_integer() && s.shape.len() == 2 && matches!(s.shape[1], SigDim::Free(_)))
    }

    /// Outputs whose second axis follows the sequence length (cut back after padding).
    pub fn sequence_outputs(&self) -> Vec<bool> {
        self.outputs.iter().map(|s| s.shape.len() >= 2 && matches!(s.shape[1], SigDim::Free(_))).collect()
    }
}

/// Where one model version comes from.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub name: String,
    pub version: String,
    /// `.onnx` file or checkpoint folder.
    pub path: PathBuf,
    /// `tokenizer.json` for the text endpoints, when one sits next to the model.
    pub tokenizer: Option<PathBuf>,
    pub config: ModelConfig,
}

/// A loaded, servable model version.
pub struct LoadedModel {
    pub source: ModelSource,
    pub signature: Signature,
    pub batcher: Batcher,
    pub tokenizer: Option<TextTokenizer>,
}

impl LoadedModel {
    pub fn load(source: ModelSource, metrics: Arc<Metrics>) -> Result<LoadedModel> {
        let graph = load_graph(&source.path)?;
        let signature = Signature::of(&graph);
        for t in signature.inputs.iter().chain(&signature.outputs) {
            if crate::codec::datatype_name(t.dtype).is_none() {
                bail!("{}: tensor '{}' has dtype {}, which the protocol cannot carry", source.name, t.name, t.dtype);
            }
        }
        let threads = source.config.threads.unwrap_or_else(slimnn_runtime::physical_cores);
        let runnable = Arc::new(
            Runnable::new(
                graph,
                RuntimeConfig {
                    threads,
                    precision: source.config.precision,
                    int8_attention: source.config.int8_attention,
                },
            )
            .with_context(|| format!("preparing {} for the runtime", source.path.display()))?,
        );
        let tokenizer = match &source.tokenizer {
            Some(p) => {
                let max_len = max_seq_length(&source.path).unwrap_or(512);
                Some(TextTokenizer::from_file(p, max_len).with_context(|| format!("loading {}", p.display()))?)
            }
            None => None,
        };
        let batcher = Batcher::start(&source, &signature, runnable, metrics);
        Ok(LoadedModel { source, signature, batcher, tokenizer })
    }
}

/// `max_seq_length` from a checkpoint folder's (or an .onnx file's folder's) sentence_bert_config.json.
fn max_seq_length(model: &Path) -> Option<usize> {
    let dir = if model.is_dir() { model } else { model.parent()? };
    let text = std::fs::read_to_string(dir.join("sentence_bert_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["max_seq_length"].as_u64().map(|n| n as usize)
}

/// The `tokenizer.json` belonging to a model path: inside a checkpoint folder, or beside an .onnx file.
pub fn tokenizer_for(model: &Path) -> Option<PathBuf> {
    let dir = if model.is_dir() { model.to_path_buf() } else { model.parent()?.to_path_buf() };
    let p = dir.join("tokenizer.json");
    p.is_file().then_some(p)
}
