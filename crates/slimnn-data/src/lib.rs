//! Data for slimnn: tokenizing text into model inputs ([`text::TextTokenizer`]) and reading
//! the real corpora of `scripts/fetch-assets.sh` ([`corpus`]).

pub mod bpe;
pub mod corpus;
pub mod datasets;
pub mod text;

/// Errors of reading data sets and tokenizing.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Tensor(#[from] slimnn_tensor::TensorError),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
