//! Text to BERT-style model inputs through a `tokenizer.json` (the `tokenizers` crate).

use crate::{DataError, Result};
use slimnn_tensor::Tensor;
use std::path::Path;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// A tokenizer configured to pad a batch to its longest text and truncate to `max_len`.
pub struct TextTokenizer {
    inner: Tokenizer,
}

/// `input_ids`, `attention_mask` and `token_type_ids`, each i64 `[batch, sequence]`.
pub struct Encoded {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
}

impl Encoded {
    /// The three tensors named as BERT models name their inputs.
    pub fn into_named(self) -> Vec<(String, Tensor)> {
        vec![
            ("input_ids".into(), self.input_ids),
            ("attention_mask".into(), self.attention_mask),
            ("token_type_ids".into(), self.token_type_ids),
        ]
    }
}

impl TextTokenizer {
    pub fn from_file(path: &Path, max_len: usize) -> Result<TextTokenizer> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| DataError::File { path: path.display().to_string(), msg: e.to_string() })?;
        inner.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..Default::default() }));
        inner
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        Ok(TextTokenizer { inner })
    }

    /// Tokenizes a batch of texts (with special tokens), padded to the longest.
    pub fn encode(&self, texts: &[&str]) -> Result<Encoded> {
        self.encode_with(&self.inner, texts)
    }

    /// Tokenizes a batch to exactly `len` tokens per text (truncated or padded).
    pub fn encode_fixed(&self, texts: &[&str], len: usize) -> Result<Encoded> {
        let mut t = self.inner.clone();
        t.with_padding(Some(PaddingParams { strategy: PaddingStrategy::Fixed(len), ..Default::default() }));
        t.with_truncation(Some(TruncationParams { max_length: len, ..Default::default() }))
            .map_err(|e| DataError::Tokenizer(e.to_string()))?;
        self.encode_with(&t, texts)
    }

    fn encode_with(&self, tok: &Tokenizer, texts: &[&str]) -> Result<Encoded> {
        if texts.is_empty() {
            return Err(DataError::Tokenizer("no text to encode".into()));
        }
        let enc = tok.encode_batch(texts.to_vec(), true).map_err(|e| DataError::Tokenizer(e.to_string()))?;
        let seq = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let collect = |f: &dyn Fn(&tokenizers::Encoding) -> Vec<i64>| -> Result<Tensor> {
            let mut v = Vec::with_capacity(texts.len() * seq);
            for e in &enc {
                v.extend(f(e));
            }
            Ok(Tensor::from_vec(vec![texts.len(), seq], v)?)
        };
        Ok(Encoded {
            input_ids: collect(&|e| e.get_ids().iter().map(|&i| i as i64).collect())?,
            attention_mask: collect(&|e| e.get_attention_mask().iter().map(|&i| i as i64).collect())?,
            token_type_ids: collect(&|e| e.get_type_ids().iter().map(|&i| i as i64).collect())?,
        })
    }
}
