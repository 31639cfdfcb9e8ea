//! `POST /v1/embeddings`: the OpenAI embeddings request/response shape over a BERT-family model
//! with a `tokenizer.json`. Texts go through the same batcher as tensor requests.

use crate::error::ServeError;
use crate::server::AppState;
use serde::{Deserialize, Serialize};
use slimnn_tensor::Tensor;

/// Most texts one request may carry.
const MAX_TEXTS: usize = 2048;

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    input: Input,
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

fn bad(m: impl Into<String>) -> ServeError {
    ServeError::BadRequest(m.into())
}

#[derive(Serialize)]
pub struct Embedding {
    object: &'static str,
    index: usize,
    /// f32 written as f32 (shortest form), not widened to f64.
    embedding: Vec<f32>,
}

#[derive(Serialize)]
pub struct Usage {
    prompt_tokens: i64,
    total_tokens: i64,
}

/// The OpenAI embeddings response shape.
#[derive(Serialize)]
pub struct EmbeddingResponse {
    object: &'static str,
    data: Vec<Embedding>,
    model: String,
    usage: Usage,
}

pub async fn handle(state: &AppState, body: &[u8]) -> Result<EmbeddingResponse, ServeError> {
    let req: EmbeddingRequest =
        serde_json::from_slice(body).map_err(|e| bad(format!("not an embeddings request: {e}")))?;
    if let Some(f) = req.encoding_format.as_deref().filter(|f| *f != "float") {
        return Err(bad(format!("encoding_format '{f}' is not supported (use \"float\")")));
    }
    let texts = match req.input {
        Input::One(t) => vec![t],
        Input::Many(v) => v,
    };
    if texts.is_empty() || texts.len() > MAX_TEXTS {
        return Err(bad(format!("'input' must hold 1 to {MAX_TEXTS} texts, not {}", texts.len())));
    }
    let model = state.repo.resolve(&req.model, None)?;
    let tok = model.tokenizer.as_ref().ok_or_else(|| {
        bad(format!("model '{}' has no tokenizer.json next to it, so it cannot embed text", req.model))
    })?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let enc = tok.encode(&refs).map_err(|e| bad(format!("tokenizing: {e}")))?;
    let mask = enc.attention_mask.clone();
    let mut named = enc.into_named();
    let mut inputs = Vec::with_capacity(model.signature.inputs.len());
    for spec in &model.signature.inputs {
        let i = named.iter().position(|(n, _)| *n == spec.name).ok_or_else(|| {
            bad(format!("model '{}' takes input '{}', which a tokenizer does not make", req.model, spec.name))
        })?;
        inputs.push(named.swap_remove(i).1);
    }
    model.signature.check(&inputs)?;
    let outputs = state.infer(&model, inputs).await?;
    let rows = pooled(&model.signature, &outputs, &mask)?;
    let prompt_tokens: i64 = mask.as_slice::<i64>().map(|m| m.iter().sum()).unwrap_or(0);
    let data = rows
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| Embedding { object: "embedding", index, embedding })
        .collect();
    Ok(EmbeddingResponse {
        object: "list",
        data,
        model: req.model,
        usage: Usage { prompt_tokens, total_tokens: prompt_tokens },
    })
}

/// One embedding per text: the `sentence_embedding` output if the model has it, else the
/// mask-weighted mean of the first `[batch, sequence, hidden]` output, L2-normalised.
fn pooled(sig: &crate::model::Signature, outputs: &[Tensor], mask: &Tensor) -> Result<Vec<Vec<f32>>, ServeError> {
    let internal = |m: String| ServeError::Internal(m);
    if let Some(i) = sig.outputs.iter().position(|s| s.name == "sentence_embedding") {
        let t = outputs[i].cast(slimnn_tensor::DType::F32).map_err(|e| internal(e.to_string()))?;
        let dim = *t.shape().last().unwrap_or(&1);
        let v = t.as_slice::<f32>().map_err(|e| internal(e.to_string()))?;
        return Ok(v.chunks(dim.max(1)).map(|c| c.to_vec()).collect());
    }
    let t = outputs
        .iter()
        .find(|t| t.rank() == 3)
        .ok_or_else(|| bad("the model has neither a 'sentence_embedding' nor a [batch, sequence, hidden] output"))?;
    let t = t.cast(slimnn_tensor::DType::F32).map_err(|e| internal(e.to_string()))?;
    let (b, s, h) = (t.shape()[0], t.shape()[1], t.shape()[2]);
    let v = t.as_slice::<f32>().map_err(|e| internal(e.to_string()))?;
    let m = mask.as_slice::<i64>().map_err(|e| internal(e.to_string()))?;
    let mask_len = mask.shape().get(1).copied().unwrap_or(0);
    let mut out = Vec::with_capacity(b);
    for r in 0..b {
        let mut acc = vec![0f64; h];
        let mut count = 0f64;
        for p in 0..s.min(mask_len) {
            if m[r * mask_len + p] != 0 {
                count += 1.0;
                for (a, x) in acc.iter_mut().zip(&v[(r * s + p) * h..][..h]) {
                    *a += *x as f64;
                }
            }
        }
        let mean: Vec<f64> = acc.iter().map(|a| a / count.max(1.0)).collect();
        let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        out.push(mean.iter().map(|x| (x / norm) as f32).collect());
    }
    Ok(out)
}
