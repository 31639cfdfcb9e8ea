//! Loading a model from any supported source, and describing it.

use anyhow::{Context, Result};
use slimnn_ir::Graph;
use std::path::Path;

/// Loads an `.onnx` file, a Hugging Face checkpoint folder or a PyTorch EfficientNet-Lite0
/// checkpoint ([`slimnn_formats::load_model`]).
pub fn load(path: &Path) -> Result<Graph> {
    slimnn_formats::load_model(path).with_context(|| format!("loading {}", path.display()))
}

/// Bytes a model takes on disk (a folder counts every file in it).
pub fn size_on_disk(path: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => {
                std::fs::read_dir(p).map(|rd| rd.filter_map(|e| e.ok()).map(|e| walk(&e.path())).sum()).unwrap_or(0)
            }
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    walk(path)
}

#[derive(Debug, serde::Serialize)]
pub struct ValueInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<String>,
}

/// What `slimnn inspect` reports.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub ops: std::collections::BTreeMap<String, usize>,
    pub nodes: usize,
    pub parameters: usize,
    pub size_on_disk_bytes: u64,
}

pub fn summarize(g: &Graph, path: &Path) -> Summary {
    let info = |name: &str, f: &slimnn_ir::Fact| ValueInfo {
        name: name.to_string(),
        dtype: f.dtype.to_string(),
        shape: f.shape.iter().map(|d| d.to_string()).collect(),
    };
    Summary {
        inputs: (0..g.inputs().len()).map(|i| info(g.input_name(i), g.input_fact(i))).collect(),
        outputs: g.outputs().iter().map(|(n, o)| info(n, g.fact(*o))).collect(),
        ops: g.op_histogram().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        nodes: g.op_histogram().values().sum(),
        parameters: g.parameter_count(),
        size_on_disk_bytes: size_on_disk(path),
    }
}

/// What the runtime makes of a model for one set of input shapes.
#[derive(Debug, serde::Serialize)]
pub struct OptimizedSummary {
    pub shapes: Vec<Vec<usize>>,
    pub report: slimnn_runtime::OptimizeReport,
    pub plan: slimnn_runtime::PlanSummary,
}

/// Canonicalises and lowers `g` with symbolic dims bound by `dims` (`NAME=VALUE`; by default
/// `batch` is 1 and every other symbol 128).
pub fn optimized_summary(g: &Graph, dims: &[String], precision: slimnn_runtime::Precision) -> Result<OptimizedSummary> {
    let mut bound = std::collections::HashMap::new();
    for d in dims {
        let (k, v) = d.split_once('=').with_context(|| format!("--dim '{d}' must be NAME=VALUE"))?;
        let v: usize = v.parse().with_context(|| format!("--dim '{d}': '{v}' is not a size"))?;
        bound.insert(k.to_string(), v);
    }
    let shapes: Vec<Vec<usize>> = (0..g.inputs().len())
        .map(|i| {
            g.input_fact(i)
                .shape
                .iter()
                .map(|d| match d {
                    slimnn_tensor::Dim::Known(n) => *n,
                    slimnn_tensor::Dim::Sym(s) => {
                        bound.get(s.as_ref()).copied().unwrap_or(if s.as_ref() == "batch" { 1 } else { 128 })
                    }
                    slimnn_tensor::Dim::Unknown => 1,
                })
                .collect()
        })
        .collect();
    let rt = slimnn_runtime::Runnable::new(
        g.clone(),
        slimnn_runtime::RuntimeConfig { precision, ..slimnn_runtime::RuntimeConfig::with_threads(1) },
    )?;
    let plan = rt.plan_for(&shapes)?.summary();
    Ok(OptimizedSummary { shapes, report: rt.report().clone(), plan })
}

/// `name` with every character outside `A-Za-z0-9._-` replaced by `_`, so it is a safe file name.
pub fn safe_file_name(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
    // "." and ".." are not usable as file names.
    if s.is_empty() || s.chars().all(|c| c == '.') {
        format!("_{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names() {
        assert_eq!(safe_file_name("last_hidden_state"), "last_hidden_state");
        assert_eq!(safe_file_name("/encoder/layer.0:out"), "_encoder_layer.0_out");
        assert_eq!(safe_file_name(".."), "_..");
        assert_eq!(safe_file_name("é"), "_");
    }
}
