//! User-facing tasks built on a model: sentence embeddings.

use anyhow::{bail, Context, Result};
use slimnn_data::text::TextTokenizer;
use slimnn_ir::Graph;
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::Tensor;
use std::path::Path;

/// A BERT-family sentence-embedding model: tokenizer + graph with a `sentence_embedding` output,
/// run by the optimised runtime.
pub struct SentenceEmbedder {
    pub graph: Graph,
    pub tokenizer: TextTokenizer,
    runnable: Runnable,
    output: usize,
}

impl SentenceEmbedder {
    /// Loads a checkpoint folder; `max_len` defaults to the folder's
    /// `sentence_bert_config.json` `max_seq_length`, else 512.
    pub fn load(dir: &Path, max_len: Option<usize>) -> Result<SentenceEmbedder> {
        let graph = crate::model::load(dir)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            bail!("{}: missing tokenizer.json", dir.display());
        }
        let max_len = match max_len {
            Some(n) => n,
            None => std::fs::read_to_string(dir.join("sentence_bert_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["max_seq_length"].as_u64())
                .map(|n| n as usize)
                .unwrap_or(512),
        };
        let tokenizer = TextTokenizer::from_file(&tok_path, max_len)?;
        let output = graph
            .outputs()
            .iter()
            .position(|(n, _)| n == "sentence_embedding")
            .with_context(|| format!("{}: the model has no 'sentence_embedding' output", dir.display()))?;
        let runnable = Runnable::new(graph.clone(), RuntimeConfig::default())?;
        Ok(SentenceEmbedder { graph, tokenizer, runnable, output })
    }

    /// Embeds texts in batches; returns `[texts, hidden]` f32 L2-normalised embeddings.
    pub fn embed(&self, texts: &[&str], batch: usize) -> Result<Tensor> {
        let mut rows: Vec<f32> = Vec::new();
        let mut dim = 0;
        let mut state = self.runnable.new_state();
        for chunk in texts.chunks(batch.max(1)) {
            let enc = self.tokenizer.encode(chunk)?;
            let mut out = self.runnable.run(&mut state, enc.into_named())?;
            let e = out.swap_remove(self.output);
            dim = e.shape()[1];
            rows.extend_from_slice(e.as_slice::<f32>()?);
        }
        Ok(Tensor::from_vec(vec![texts.len(), dim], rows)?)
    }
}

/// Cosine similarity of two equal-length vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}
