use slimnn_tensor::TensorError;

/// Errors of graph construction, inference, rewriting and evaluation.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum IrError {
    /// An op rejected its inputs or attributes (raised by `output_facts` or `eval`).
    #[error("{op}: {msg}")]
    Op { op: &'static str, msg: String },
    /// An error located at a node of a graph.
    #[error("node '{node}' ({op}): {source}")]
    Node { node: String, op: &'static str, source: Box<IrError> },
    /// A graph input given at run time does not match the graph's signature.
    #[error("input '{name}': {msg}")]
    Input { name: String, msg: String },
    #[error("graph: {0}")]
    Graph(String),
    #[error("pass '{pass}': {msg}")]
    Pass { pass: String, msg: String },
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

impl IrError {
    pub fn op(op: &'static str, msg: impl Into<String>) -> IrError {
        IrError::Op { op, msg: msg.into() }
    }

    /// Wraps an error with the node it happened at.
    pub fn at_node(self, node: &str, op: &'static str) -> IrError {
        IrError::Node { node: node.to_string(), op, source: Box::new(self) }
    }
}

pub type IrResult<T> = Result<T, IrError>;

/// Returns early with an [`IrError::Op`].
#[macro_export]
macro_rules! op_bail {
    ($op:expr, $($fmt:tt)*) => {
        return Err($crate::IrError::op($op, format!($($fmt)*)))
    };
}
