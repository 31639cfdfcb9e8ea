//! Hugging Face BERT-family checkpoints: `config.json` + `model.safetensors` built into the IR.
//!
//! The graph mirrors what PyTorch's ONNX exporter writes for `BertModel` (MatMul against
//! pre-transposed weights, decomposed erf GELU, additive attention mask, LayerNormalization),
//! followed by sentence-transformers' mean pooling and L2 normalisation. Inputs are
//! `input_ids`, `attention_mask`, `token_type_ids` (i64, `[batch, sequence]`); outputs are
//! `last_hidden_state` (`[batch, sequence, hidden]`) and `sentence_embedding` (`[batch, hidden]`).

use crate::{FormatError, Result};
use safetensors::{Dtype as StDtype, SafeTensors};
use slimnn_ir::ops::*;
use slimnn_ir::{Fact, Graph, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The fields of `config.json` the builder uses.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct BertConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_type_vocab() -> usize {
    2
}

/// True if `dir` looks like a Hugging Face checkpoint folder.
pub fn is_checkpoint_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file() && dir.join("model.safetensors").is_file()
}

/// Loads a BERT-family checkpoint folder into a graph.
pub fn load_bert(dir: &Path) -> Result<Graph> {
    load_bert_layers(dir, None)
}

/// Like [`load_bert`], keeping only the encoder layers listed in `layers` (checkpoint layer
/// indices, in the order the new encoder stacks them; `None` keeps all): a shallower student
/// initialised from a teacher, e.g. `[0, 2, 4]`. The new layers are numbered from 0.
pub fn load_bert_layers(dir: &Path, layers: Option<&[usize]>) -> Result<Graph> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|source| FormatError::Io { path: config_path.display().to_string(), source })?;
    let config: BertConfig = serde_json::from_str(&text)
        .map_err(|e| FormatError::malformed(config_path.display().to_string(), e.to_string()))?;
    let weights_path = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights_path)
        .map_err(|source| FormatError::Io { path: weights_path.display().to_string(), source })?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| FormatError::malformed(weights_path.display().to_string(), e.to_string()))?;
    let weights = Weights::new(&st, weights_path.display().to_string());
    let all: Vec<usize> = (0..config.num_hidden_layers).collect();
    let layers = layers.unwrap_or(&all);
    if let Some(&bad) = layers.iter().find(|&&l| l >= config.num_hidden_layers) {
        return Err(FormatError::Invalid(format!(
            "{}: layer {bad} asked for, but the checkpoint has {} layers",
            config_path.display(),
            config.num_hidden_layers
        )));
    }
    build_bert(&config, &weights, layers)
}

/// Named f32 weights of a safetensors file, found with or without a `bert.` prefix.
struct Weights<'a> {
    st: &'a SafeTensors<'a>,
    prefix: &'static str,
    file: String,
}

impl<'a> Weights<'a> {
    fn new(st: &'a SafeTensors<'a>, file: String) -> Weights<'a> {
        let prefix = if st.names().iter().any(|n| n.starts_with("bert.")) { "bert." } else { "" };
        Weights { st, prefix, file }
    }

    /// The tensor `name` as f32, checked against `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let view = self
            .st
            .tensor(&full)
            .map_err(|_| FormatError::malformed(&self.file, format!("tensor '{full}' is missing")))?;
        if view.shape() != shape {
            return Err(FormatError::malformed(
                &self.file,
                format!("tensor '{full}' has shape {:?}, config implies {shape:?}", view.shape()),
            ));
        }
        let dtype = match view.dtype() {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            other => {
                return Err(FormatError::Unsupported(format!("{}: tensor '{full}' has dtype {other:?}", self.file)))
            }
        };
        let t = Tensor::from_le_bytes(dtype, shape.to_vec(), view.data())
            .map_err(|e| FormatError::malformed(&self.file, format!("tensor '{full}': {e}")))?;
        Ok(t.cast(DType::F32)?)
    }

    /// A PyTorch `Linear` weight `[out, in]`, transposed to `[in, out]` for `x @ W`.
    fn linear_t(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Tensor> {
        let w = self.get(name, &[out_dim, in_dim])?;
        let w = w.as_slice::<f32>()?;
        let mut t = vec![0f32; w.len()];
        for o in 0..out_dim {
            for i in 0..in_dim {
                t[i * out_dim + o] = w[o * in_dim + i];
            }
        }
        Ok(Tensor::from_vec(vec![in_dim, out_dim], t)?)
    }
}

/// Graph-building helpers that name nodes as PyTorch's exporter does (`/encoder/layer.0/...`).
struct Builder {
    g: Graph,
    consts: HashMap<String, OutletId>,
}

impl Builder {
    fn node(&mut self, name: &str, op: impl Into<Op>, inputs: Vec<OutletId>) -> Result<OutletId> {
        Ok(self.g.add_node(name, op, inputs)?[0])
    }
    fn konst(&mut self, name: &str, t: Tensor) -> Result<OutletId> {
        if let Some(&o) = self.consts.get(name) {
            return Ok(o);
        }
        let o = self.g.add_const(name, Arc::new(t))?;
        self.consts.insert(name.to_string(), o);
        Ok(o)
    }
    fn scalar(&mut self, v: f32) -> Result<OutletId> {
        self.konst(&format!("const_f32_{v:e}"), Tensor::scalar(v))
    }
    fn ints(&mut self, name: &str, v: &[i64]) -> Result<OutletId> {
        self.konst(name, Tensor::from_vec(vec![v.len()], v.to_vec())?)
    }
    fn bin(&mut self, name: &str, op: BinaryOp, a: OutletId, b: OutletId) -> Result<OutletId> {
        self.node(name, Binary(op), vec![a, b])
    }
    fn un(&mut self, name: &str, op: UnaryOp, a: OutletId) -> Result<OutletId> {
        self.node(name, Unary(op), vec![a])
    }
    /// `x @ W + b` for a PyTorch Linear named `path` (weights `path.weight`, `path.bias`).
    fn linear(
        &mut self,
        w: &Weights,
        scope: &str,
        path: &str,
        x: OutletId,
        out: usize,
        inp: usize,
    ) -> Result<OutletId> {
        let wt = w.linear_t(&format!("{path}.weight"), out, inp)?;
        let wo = self.konst(&format!("{path}.weight.T"), wt)?;
        let b = self.konst(&format!("{path}.bias"), w.get(&format!("{path}.bias"), &[out])?)?;
        let mm = self.node(&format!("{scope}/MatMul"), MatMul, vec![x, wo])?;
        self.bin(&format!("{scope}/Add"), BinaryOp::Add, mm, b)
    }
    fn layer_norm(
        &mut self,
        w: &Weights,
        scope: &str,
        path: &str,
        x: OutletId,
        dim: usize,
        eps: f64,
    ) -> Result<OutletId> {
        let s = self.konst(&format!("{path}.weight"), w.get(&format!("{path}.weight"), &[dim])?)?;
        let b = self.konst(&format!("{path}.bias"), w.get(&format!("{path}.bias"), &[dim])?)?;
        self.node(&format!("{scope}/LayerNormalization"), LayerNorm::new(-1, eps as f32), vec![x, s, b])
    }
}

fn build_bert(c: &BertConfig, w: &Weights, layers: &[usize]) -> Result<Graph> {
    if c.model_type != "bert" {
        return Err(FormatError::Unsupported(format!(
            "config.json model_type '{}' is not supported (expected 'bert')",
            c.model_type
        )));
    }
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(FormatError::Invalid(format!(
            "config.json: hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size, c.num_attention_heads
        )));
    }
    let (h, heads, ffn) = (c.hidden_size, c.num_attention_heads, c.intermediate_size);
    let head_dim = h / heads;
    let mut b = Builder { g: Graph::default(), consts: HashMap::new() };
    let dims = vec![Dim::sym("batch"), Dim::sym("sequence")];
    let ids = b.g.add_input("input_ids", Fact::new(DType::I64, dims.clone()))?;
    let mask = b.g.add_input("attention_mask", Fact::new(DType::I64, dims.clone()))?;
    let types = b.g.add_input("token_type_ids", Fact::new(DType::I64, dims))?;

    // Embeddings: word + token type + position (positions sliced to the sequence length).
    let word_emb =
        b.konst("embeddings.word_embeddings.weight", w.get("embeddings.word_embeddings.weight", &[c.vocab_size, h])?)?;
    let type_emb = b.konst(
        "embeddings.token_type_embeddings.weight",
        w.get("embeddings.token_type_embeddings.weight", &[c.type_vocab_size, h])?,
    )?;
    let pos_emb = b.konst(
        "embeddings.position_embeddings.weight",
        w.get("embeddings.position_embeddings.weight", &[c.max_position_embeddings, h])?,
    )?;
    let positions: Vec<i64> = (0..c.max_position_embeddings as i64).collect();
    let pos_ids =
        b.konst("embeddings.position_ids", Tensor::from_vec(vec![1, c.max_position_embeddings], positions)?)?;
    let shape = b.node("/embeddings/Shape", Shape { start: 0, end: None }, vec![ids])?;
    let one = b.ints("const_1", &[1])?;
    let zero = b.ints("const_0", &[0])?;
    let seq = b.node("/embeddings/Gather_seq", Gather { axis: 0 }, vec![shape, one])?;
    let pos_slice = b.node("/embeddings/Slice", Slice, vec![pos_ids, zero, seq, one])?;
    let we = b.node("/embeddings/word_embeddings/Gather", Gather { axis: 0 }, vec![word_emb, ids])?;
    let te = b.node("/embeddings/token_type_embeddings/Gather", Gather { axis: 0 }, vec![type_emb, types])?;
    let pe = b.node("/embeddings/position_embeddings/Gather", Gather { axis: 0 }, vec![pos_emb, pos_slice])?;
    let e = b.bin("/embeddings/Add", BinaryOp::Add, we, te)?;
    let e = b.bin("/embeddings/Add_1", BinaryOp::Add, e, pe)?;
    let mut x = b.layer_norm(w, "/embeddings/LayerNorm", "embeddings.LayerNorm", e, h, c.layer_norm_eps)?;

    // Additive mask: (1 - mask) * lowest f32, shaped [batch, 1, 1, sequence].
    let m = b.node("/Unsqueeze_mask", Unsqueeze { axes: vec![1, 2] }, vec![mask])?;
    let m = b.node("/Cast_mask", Cast { to: DType::F32 }, vec![m])?;
    let one_f = b.scalar(1.0)?;
    let m = b.bin("/Sub_mask", BinaryOp::Sub, one_f, m)?;
    let lowest = b.scalar(f32::MIN)?;
    let add_mask = b.bin("/Mul_mask", BinaryOp::Mul, m, lowest)?;

    let split_heads = b.ints("const_split_heads", &[0, 0, heads as i64, head_dim as i64])?;
    let merge_heads = b.ints("const_merge_heads", &[0, 0, h as i64])?;
    let scale = b.scalar((head_dim as f32).sqrt())?;
    for (l, &from) in layers.iter().enumerate() {
        let p = format!("encoder.layer.{from}");
        let s = format!("/encoder/layer.{l}");
        let att = format!("{s}/attention/self");
        let proj = |b: &mut Builder, name: &str, perm: Vec<usize>| -> Result<OutletId> {
            let y = b.linear(w, &format!("{att}/{name}"), &format!("{p}.attention.self.{name}"), x, h, h)?;
            let y = b.node(&format!("{att}/{name}/Reshape"), Reshape { allowzero: false }, vec![y, split_heads])?;
            b.node(&format!("{att}/{name}/Transpose"), Transpose { perm: Some(perm) }, vec![y])
        };
        let q = proj(&mut b, "query", vec![0, 2, 1, 3])?;
        let k = proj(&mut b, "key", vec![0, 2, 3, 1])?;
        let v = proj(&mut b, "value", vec![0, 2, 1, 3])?;
        let scores = b.node(&format!("{att}/MatMul"), MatMul, vec![q, k])?;
        let scores = b.bin(&format!("{att}/Div"), BinaryOp::Div, scores, scale)?;
        let scores = b.bin(&format!("{att}/Add"), BinaryOp::Add, scores, add_mask)?;
        let probs = b.node(&format!("{att}/Softmax"), Softmax { axis: -1, legacy_2d: false }, vec![scores])?;
        let ctx = b.node(&format!("{att}/MatMul_1"), MatMul, vec![probs, v])?;
        let ctx = b.node(&format!("{att}/Transpose"), Transpose { perm: Some(vec![0, 2, 1, 3]) }, vec![ctx])?;
        let ctx = b.node(&format!("{att}/Reshape"), Reshape { allowzero: false }, vec![ctx, merge_heads])?;
        let o =
            b.linear(w, &format!("{s}/attention/output/dense"), &format!("{p}.attention.output.dense"), ctx, h, h)?;
        let o = b.bin(&format!("{s}/attention/output/Add"), BinaryOp::Add, o, x)?;
        let o = b.layer_norm(
            w,
            &format!("{s}/attention/output/LayerNorm"),
            &format!("{p}.attention.output.LayerNorm"),
            o,
            h,
            c.layer_norm_eps,
        )?;
        let f = b.linear(w, &format!("{s}/intermediate/dense"), &format!("{p}.intermediate.dense"), o, ffn, h)?;
        let f = activation(&mut b, &c.hidden_act, &format!("{s}/intermediate/intermediate_act_fn"), f)?;
        let f = b.linear(w, &format!("{s}/output/dense"), &format!("{p}.output.dense"), f, h, ffn)?;
        let f = b.bin(&format!("{s}/output/Add"), BinaryOp::Add, f, o)?;
        x = b.layer_norm(
            w,
            &format!("{s}/output/LayerNorm"),
            &format!("{p}.output.LayerNorm"),
            f,
            h,
            c.layer_norm_eps,
        )?;
    }
    b.g.add_output("last_hidden_state", x);

    // sentence-transformers: mean over unmasked tokens, then L2 normalisation.
    let mf = b.node("/pooling/Cast", Cast { to: DType::F32 }, vec![mask])?;
    let mf = b.node("/pooling/Unsqueeze", Unsqueeze { axes: vec![2] }, vec![mf])?;
    let masked = b.bin("/pooling/Mul", BinaryOp::Mul, x, mf)?;
    let sum_axes = Reduce { op: ReduceOp::Sum, axes: Some(vec![1]), keepdims: false, noop_with_empty_axes: false };
    let summed = b.node("/pooling/ReduceSum", sum_axes.clone(), vec![masked])?;
    let count = b.node("/pooling/ReduceSum_1", sum_axes, vec![mf])?;
    let tiny = b.scalar(1e-9)?;
    let inf = b.scalar(f32::MAX)?;
    let count = b.node("/pooling/Clip", Clip, vec![count, tiny, inf])?;
    let mean = b.bin("/pooling/Div", BinaryOp::Div, summed, count)?;
    let sq = b.bin("/normalize/Mul", BinaryOp::Mul, mean, mean)?;
    let ss = b.node(
        "/normalize/ReduceSum",
        Reduce { op: ReduceOp::Sum, axes: Some(vec![1]), keepdims: true, noop_with_empty_axes: false },
        vec![sq],
    )?;
    let norm = b.un("/normalize/Sqrt", UnaryOp::Sqrt, ss)?;
    let eps = b.scalar(1e-12)?;
    let norm = b.bin("/normalize/Max", BinaryOp::Max, norm, eps)?;
    let emb = b.bin("/normalize/Div", BinaryOp::Div, mean, norm)?;
    b.g.add_output("sentence_embedding", emb);
    b.g.metadata.insert("source".into(), "huggingface bert (safetensors)".into());
    Ok(b.g)
}

/// The FFN activation as PyTorch's exporter decomposes it.
fn activation(b: &mut Builder, act: &str, scope: &str, x: OutletId) -> Result<OutletId> {
    match act {
        "gelu" => {
            let sqrt2 = b.scalar(std::f32::consts::SQRT_2)?;
            let half = b.scalar(0.5)?;
            let one = b.scalar(1.0)?;
            let d = b.bin(&format!("{scope}/Div"), BinaryOp::Div, x, sqrt2)?;
            let e = b.un(&format!("{scope}/Erf"), UnaryOp::Erf, d)?;
            let a = b.bin(&format!("{scope}/Add"), BinaryOp::Add, e, one)?;
            let m = b.bin(&format!("{scope}/Mul"), BinaryOp::Mul, x, a)?;
            b.bin(&format!("{scope}/Mul_1"), BinaryOp::Mul, m, half)
        }
        "gelu_new" | "gelu_pytorch_tanh" => b.un(&format!("{scope}/Gelu"), UnaryOp::Gelu { tanh: true }, x),
        "relu" => b.un(&format!("{scope}/Relu"), UnaryOp::Relu, x),
        other => Err(FormatError::Unsupported(format!("config.json hidden_act '{other}' is not supported"))),
    }
}
