//! slimnn's compression algorithms, written once against the IR.
//!
//! Every algorithm follows one shape: [`Algorithm::statistic_points`] names the values it needs
//! statistics of, one calibration pass ([`calib::calibrate`]) gathers every algorithm's
//! statistics over a streamed data set through the optimised runtime, and
//! [`Algorithm::apply`] rewrites the graph and returns a per-node [`Report`]. The output graphs
//! use canonical ONNX-style ops only (`DynamicQuantizeLinear` + `MatMulInteger`,
//! `QuantizeLinear`/`DequantizeLinear` pairs, `MatMulNBits`, `Cast`), so they run in the
//! reference evaluator, in the runtime, and in ONNX Runtime after export.
//!
//! ```
//! use slimnn_compress::{quantize, Mode, QuantRecipe};
//! use slimnn_ir::{ops::MatMul, Fact, Graph};
//! use slimnn_tensor::{DType, Dim, Tensor};
//! let mut g = Graph::default();
//! let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(4)])).unwrap();
//! let w = g.add_const("w", Tensor::from_vec(vec![4, 2], vec![0.5f32, -1.0, 0.25, 2.0, 1.0, 0.0, -0.5, 1.5]).unwrap()).unwrap();
//! let y = g.add_node("fc", MatMul, vec![x, w]).unwrap()[0];
//! g.add_output("y", y);
//! let recipe = QuantRecipe { mode: Mode::Dynamic, ..QuantRecipe::default() };
//! let no_data: Vec<Vec<(String, Tensor)>> = vec![];
//! let (q, report) = quantize(&g, &recipe, &no_data, &mut |_| {}).unwrap();
//! // Per-token activation scales by default: one fused op per weight matmul.
//! assert!(q.op_histogram().contains_key("DynamicRowQuantMatMul"));
//! assert_eq!(report.layers[0].bits, 8);
//! ```

pub mod calib;
pub mod gptq;
pub mod mixed;
pub mod pipeline;
pub mod quant;
pub mod range;
pub mod recipe;
pub mod report;
pub mod schemes;
pub mod smoothquant;
pub mod targets;

pub use calib::{calibrate, BatchSource, StatKind, StatPoint, Statistics};
pub use pipeline::quantize;
pub use quant::Granularity;
pub use range::{ActivationType, CalibrationMethod};
pub use recipe::{ActivationGranularity, Fallback, Mode, QuantRecipe};
pub use report::{LayerReport, Report};

use slimnn_ir::Graph;

/// Errors of compression: a recipe that asks for something impossible, a model the algorithm
/// cannot handle, or calibration that failed.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// The recipe (or command line) asks for something that cannot be done.
    #[error("{0}")]
    Recipe(String),
    /// The model has something the algorithm does not handle.
    #[error("{0}")]
    Model(String),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error(transparent)]
    Ir(#[from] slimnn_ir::IrError),
    #[error(transparent)]
    Runtime(#[from] slimnn_runtime::RuntimeError),
    #[error(transparent)]
    Tensor(#[from] slimnn_tensor::TensorError),
}

pub type Result<T, E = CompressError> = std::result::Result<T, E>;

/// A compression algorithm: which statistics it needs, then the rewrite.
pub trait Algorithm {
    fn name(&self) -> &'static str;
    /// Values (and statistic kinds) the algorithm needs gathered over the calibration data.
    fn statistic_points(&self, graph: &Graph) -> Result<Vec<StatPoint>>;
    /// The rewritten graph and what was done to each node.
    fn apply(&self, graph: &Graph, stats: &Statistics) -> Result<(Graph, Report)>;
}
