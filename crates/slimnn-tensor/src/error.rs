use crate::DType;

/// Errors raised while building or converting tensors.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TensorError {
    #[error("shape {shape:?} has {numel} elements but {len} values were given")]
    LengthMismatch { shape: Vec<usize>, numel: usize, len: usize },
    #[error("shape {shape:?}: element count overflows")]
    Overflow { shape: Vec<usize> },
    #[error(
        "shape {shape:?} of {dtype} needs {bytes} bytes, more than the limit of {limit} bytes (set {env} to raise it)"
    )]
    TooLarge { shape: Vec<usize>, dtype: DType, bytes: u128, limit: u128, env: &'static str },
    #[error("expected a {expected} tensor, got {actual}")]
    DType { expected: DType, actual: DType },
    #[error("cannot broadcast shapes {a:?} and {b:?}")]
    Broadcast { a: Vec<usize>, b: Vec<usize> },
    #[error("cannot cast {from} to {to}")]
    Cast { from: DType, to: DType },
    #[error("{0}")]
    Invalid(String),
}
