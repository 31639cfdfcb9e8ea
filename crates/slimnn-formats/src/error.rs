use slimnn_ir::IrError;
use slimnn_tensor::TensorError;

/// Errors of reading and writing model and tensor files. Messages name the file and, where
/// there is one, the node or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The bytes are not a valid file of the format (truncated, corrupt, inconsistent).
    #[error("{what}: {msg}")]
    Malformed { what: String, msg: String },
    /// Ops the importer cannot handle, all of them listed at once.
    #[error("unsupported ops ({} node(s)): {}", .0.len(), .0.join("; "))]
    UnsupportedOps(Vec<String>),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Ir(#[from] IrError),
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("{0}")]
    Invalid(String),
}

impl FormatError {
    pub fn malformed(what: impl Into<String>, msg: impl Into<String>) -> FormatError {
        FormatError::Malformed { what: what.into(), msg: msg.into() }
    }
}
