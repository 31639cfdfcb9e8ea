//! Structured per-layer reports, kept in the model's metadata and printed by the CLI.

use serde::{Deserialize, Serialize};

/// What quantization did to one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// The matmul node's name in the input graph.
    pub node: String,
    /// e.g. `int8-dynamic`, `int8-qdq`, `int4-g32`, `bf16`, `fp32`.
    pub scheme: String,
    /// Weight bits (32 when kept in float).
    pub bits: u32,
    /// `[K, N]` of the weight.
    pub shape: [usize; 2],
    /// Smallest and largest weight scale.
    pub weight_scale: Option<(f32, f32)>,
    /// Weight signal-to-quantization-noise ratio in dB.
    pub weight_sqnr_db: Option<f64>,
    /// Activation `(scale, zero point)` of static quantization.
    pub activation: Option<(f32, i32)>,
    /// Activation SQNR in dB estimated from the calibration histogram.
    pub activation_sqnr_db: Option<f64>,
    /// Relative output error of the model with only this layer quantized (sensitivity).
    pub sensitivity: Option<f64>,
    /// Why the layer was left in higher precision, when it was.
    pub note: Option<String>,
}

impl LayerReport {
    pub fn new(node: &str, scheme: &str, bits: u32, shape: [usize; 2]) -> LayerReport {
        LayerReport {
            node: node.to_string(),
            scheme: scheme.to_string(),
            bits,
            shape,
            weight_scale: None,
            weight_sqnr_db: None,
            activation: None,
            activation_sqnr_db: None,
            sensitivity: None,
            note: None,
        }
    }
}

/// A compression run's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub layers: Vec<LayerReport>,
    /// Algorithm-level notes (SmoothQuant, mixed-precision decisions, measured error).
    pub notes: Vec<String>,
}

/// Metadata key the report is stored under in the output model.
pub const METADATA_KEY: &str = "slimnn.quantization";

impl Report {
    pub fn merge(&mut self, other: Report) {
        for l in other.layers {
            match self.layers.iter_mut().find(|x| x.node == l.node) {
                Some(x) => *x = l,
                None => self.layers.push(l),
            }
        }
        self.notes.extend(other.notes);
    }

    /// The per-layer table `slimnn quantize` prints.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<44} {:<13} {:>4} {:>11} {:>21} {:>9} {:>9} {:>10}\n",
            "layer", "scheme", "bits", "K x N", "weight scale min..max", "w SQNR", "act SQNR", "sensitiv."
        );
        let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
        for l in &self.layers {
            let name = if l.node.len() > 44 { format!("…{}", &l.node[l.node.len() - 43..]) } else { l.node.clone() };
            s.push_str(&format!(
                "{:<44} {:<13} {:>4} {:>11} {:>21} {:>9} {:>9} {:>10}\n",
                name,
                l.scheme,
                l.bits,
                format!("{}x{}", l.shape[0], l.shape[1]),
                l.weight_scale.map_or("-".into(), |(a, b)| format!("{a:.2e}..{b:.2e}")),
                opt(l.weight_sqnr_db, 1),
                opt(l.activation_sqnr_db, 1),
                opt(l.sensitivity, 5),
            ));
            if let Some(n) = &l.note {
                // Notes follow their row, indented under the layer name.
                s.push_str(&format!("    {n}\n"));
            }
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s
    }
}
