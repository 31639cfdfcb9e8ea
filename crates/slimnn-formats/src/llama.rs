//! Llama-family decoders from GGUF files, built into the IR with their weights still in the
//! file's block formats (Q4_1, Q8_0, ...; see [`slimnn_ir::ops::BlockMatMul`]).
//!
//! Graph signature (one graph serves prefill and decoding; the runtime plans once per shape):
//! * inputs: `input_ids` i64 `[batch, seq]`; `positions` i64 `[seq]` (the absolute positions of
//!   the new tokens, `past..past + seq`); per layer `i`, `past_key.i` and `past_value.i` f32
//!   `[batch, past, kv_heads * head_dim]` (`past` may be 0);
//! * outputs: `logits` f32 `[batch, seq, vocab]` (or `[batch, 1, vocab]` for the last position
//!   only, [`Logits::Last`]); per layer `present_key.i` / `present_value.i` f32 `[batch, past +
//!   seq, kv_heads * head_dim]`, the cache to pass as `past_*` on the next call.
//!
//! One block: `h = x + Wo · attn(rope(Wq · n), rope(Wk · n), Wv · n)` with `n = rmsnorm(x)`,
//! then `x' = h + Wdown · (silu(Wgate · m) * (Wup · m))` with `m = rmsnorm(h)`. Keys and values
//! are kept after RoPE, in the layout the projections produce. RoPE pairs adjacent values, the
//! convention of GGUF files (see [`slimnn_ir::ops::Rope`]).

use crate::gguf::GgufFile;
use crate::{FormatError, Result};
use slimnn_ir::ops::*;
use slimnn_ir::{Fact, Graph, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};
use std::sync::Arc;

/// Hyper-parameters read from the GGUF metadata (`<arch>.*` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub arch: String,
    pub layers: usize,
    pub d_model: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub vocab: usize,
    pub context_length: usize,
}

impl LlamaConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<LlamaConfig> {
        let arch = g.get_str("general.architecture")?.to_string();
        if !matches!(arch.as_str(), "llama" | "mistral" | "smollm") {
            return Err(FormatError::Unsupported(format!(
                "{}: architecture '{arch}' is not a llama-family decoder slimnn builds",
                g.path()
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
        let layers = u("block_count")?;
        let d_model = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = g.get_u64(&key("attention.head_count_kv")).map(|v| v as usize).unwrap_or(heads);
        let head_dim = d_model.checked_div(heads).unwrap_or(0);
        let embd = g.info("token_embd.weight")?;
        let vocab = embd.shape.first().copied().unwrap_or(0);
        let config = LlamaConfig {
            arch: arch.clone(),
            layers,
            d_model,
            ffn: u("feed_forward_length")?,
            heads,
            kv_heads,
            head_dim,
            rope_base: g.get_f64(&key("rope.freq_base")).unwrap_or(10000.0) as f32,
            rms_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            vocab,
            context_length: u("context_length")?,
        };
        let bad = |msg: String| Err(FormatError::malformed(g.path().to_string(), msg));
        if heads == 0
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || !d_model.is_multiple_of(heads)
            || !head_dim.is_multiple_of(2)
        {
            return bad(format!("{heads} heads / {kv_heads} kv heads do not divide d_model {d_model} into even heads"));
        }
        if let Ok(rot) = u("rope.dimension_count") {
            if rot != head_dim {
                return bad(format!("partial rotary embedding ({rot} of {head_dim} dims) is not supported"));
            }
        }
        Ok(config)
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// The decoder's weights, shared by every graph built from them.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    pub token_embd: Arc<Tensor>,
    pub output: Arc<Tensor>,
    pub output_norm: Arc<Tensor>,
    pub blocks: Vec<BlockWeights>,
}

#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub attn_norm: Arc<Tensor>,
    pub q: Arc<Tensor>,
    pub k: Arc<Tensor>,
    pub v: Arc<Tensor>,
    pub o: Arc<Tensor>,
    pub ffn_norm: Arc<Tensor>,
    pub gate: Arc<Tensor>,
    pub up: Arc<Tensor>,
    pub down: Arc<Tensor>,
}

impl LlamaWeights {
    /// Copies the weights out of the (mapped) file; block formats stay as they are, plain
    /// half-precision matrices are widened to f32.
    pub fn load(g: &GgufFile, c: &LlamaConfig) -> Result<LlamaWeights> {
        let matrix = |name: &str, n: usize, k: usize| -> Result<Arc<Tensor>> {
            let t = g.tensor(name)?;
            if t.shape() != [n, k] {
                return Err(FormatError::malformed(
                    format!("{}: tensor '{name}'", g.path()),
                    format!("shape {:?}, expected [{n}, {k}]", t.shape()),
                ));
            }
            Ok(Arc::new(match t.dtype() {
                DType::Block(_) | DType::F32 => t,
                _ => t.cast(DType::F32)?,
            }))
        };
        let vector = |name: &str, n: usize| -> Result<Arc<Tensor>> {
            let t = g.tensor(name)?;
            if t.shape() != [n] {
                return Err(FormatError::malformed(
                    format!("{}: tensor '{name}'", g.path()),
                    format!("shape {:?}, expected [{n}]", t.shape()),
                ));
            }
            Ok(Arc::new(t.cast(DType::F32)?))
        };
        let (d, kv, f) = (c.d_model, c.kv_width(), c.ffn);
        let token_embd = matrix("token_embd.weight", c.vocab, d)?;
        // Tied head when the file has no separate output matrix.
        let output = match g.info("output.weight") {
            Ok(_) => matrix("output.weight", c.vocab, d)?,
            Err(_) => token_embd.clone(),
        };
        let blocks = (0..c.layers)
            .map(|i| {
                let p = |s: &str| format!("blk.{i}.{s}.weight");
                Ok(BlockWeights {
                    attn_norm: vector(&p("attn_norm"), d)?,
                    q: matrix(&p("attn_q"), d, d)?,
                    k: matrix(&p("attn_k"), kv, d)?,
                    v: matrix(&p("attn_v"), kv, d)?,
                    o: matrix(&p("attn_output"), d, d)?,
                    ffn_norm: vector(&p("ffn_norm"), d)?,
                    gate: matrix(&p("ffn_gate"), f, d)?,
                    up: matrix(&p("ffn_up"), f, d)?,
                    down: matrix(&p("ffn_down"), d, f)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LlamaWeights { token_embd, output, output_norm: vector("output_norm.weight", d)?, blocks })
    }

    /// Bytes the weights take in memory.
    pub fn bytes(&self) -> usize {
        let size = |t: &Arc<Tensor>| match t.data() {
            slimnn_tensor::TensorData::Block { bytes, .. } => bytes.len(),
            _ => t.len() * t.dtype().size_of(),
        };
        let mut total = size(&self.token_embd) + size(&self.output_norm);
        if !Arc::ptr_eq(&self.output, &self.token_embd) {
            total += size(&self.output);
        }
        for b in &self.blocks {
            total += [&b.attn_norm, &b.q, &b.k, &b.v, &b.o, &b.ffn_norm, &b.gate, &b.up, &b.down]
                .into_iter()
                .map(size)
                .sum::<usize>();
        }
        total
    }
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position (`[batch, seq, vocab]`): perplexity, checks.
    All,
    /// The last position only (`[batch, 1, vocab]`): generation.
    Last,
}

/// Builds the decoder graph (signature in the module docs).
pub fn build_llama(c: &LlamaConfig, w: &LlamaWeights, logits: Logits) -> Result<Graph> {
    let mut g = Graph::default();
    let (batch, seq, past) = (Dim::sym("batch"), Dim::sym("seq"), Dim::sym("past"));
    let ids = g.add_input("input_ids", Fact::new(DType::I64, vec![batch.clone(), seq.clone()]))?;
    let positions = g.add_input("positions", Fact::new(DType::I64, vec![seq]))?;
    let kv_fact = Fact::new(DType::F32, vec![batch, past, Dim::Known(c.kv_width())]);
    let mut pasts = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let k = g.add_input(&format!("past_key.{i}"), kv_fact.clone())?;
        let v = g.add_input(&format!("past_value.{i}"), kv_fact.clone())?;
        pasts.push((k, v));
    }
    let one = |g: &mut Graph, name: &str, op: Op, ins: Vec<OutletId>| -> Result<OutletId> {
        Ok(g.add_node(name, op, ins)?[0])
    };
    let table = g.add_const("token_embd.weight", w.token_embd.clone())?;
    let mut x = one(&mut g, "embed", BlockGather.into(), vec![table, ids])?;
    let norm = RmsNorm { epsilon: c.rms_eps };
    let rope = Rope { head_dim: c.head_dim, base: c.rope_base };
    let attention = CausalAttention { heads: c.heads, kv_heads: c.kv_heads, scale: 1.0 / (c.head_dim as f32).sqrt() };
    let mut presents = Vec::with_capacity(c.layers);
    for (i, (b, &(past_k, past_v))) in w.blocks.iter().zip(&pasts).enumerate() {
        let name = |s: &str| format!("blk.{i}.{s}");
        let weight = |g: &mut Graph, s: &str, t: &Arc<Tensor>| g.add_const(&name(&format!("{s}.weight")), t.clone());
        let attn_norm = weight(&mut g, "attn_norm", &b.attn_norm)?;
        let wq = weight(&mut g, "attn_q", &b.q)?;
        let wk = weight(&mut g, "attn_k", &b.k)?;
        let wv = weight(&mut g, "attn_v", &b.v)?;
        let wo = weight(&mut g, "attn_output", &b.o)?;
        let ffn_norm = weight(&mut g, "ffn_norm", &b.ffn_norm)?;
        let wgate = weight(&mut g, "ffn_gate", &b.gate)?;
        let wup = weight(&mut g, "ffn_up", &b.up)?;
        let wdown = weight(&mut g, "ffn_down", &b.down)?;

        let n = one(&mut g, &name("attn_norm"), norm.into(), vec![x, attn_norm])?;
        let q = one(&mut g, &name("q"), BlockMatMul.into(), vec![n, wq])?;
        let k = one(&mut g, &name("k"), BlockMatMul.into(), vec![n, wk])?;
        let v = one(&mut g, &name("v"), BlockMatMul.into(), vec![n, wv])?;
        let q = one(&mut g, &name("q_rope"), rope.into(), vec![q, positions])?;
        let k = one(&mut g, &name("k_rope"), rope.into(), vec![k, positions])?;
        let k_all = one(&mut g, &name("present_key"), Concat { axis: 1 }.into(), vec![past_k, k])?;
        let v_all = one(&mut g, &name("present_value"), Concat { axis: 1 }.into(), vec![past_v, v])?;
        presents.push((k_all, v_all));
        let a = one(&mut g, &name("attention"), attention.into(), vec![q, k_all, v_all])?;
        let o = one(&mut g, &name("attn_output"), BlockMatMul.into(), vec![a, wo])?;
        let h = one(&mut g, &name("attn_residual"), Binary(BinaryOp::Add).into(), vec![x, o])?;

        let m = one(&mut g, &name("ffn_norm"), norm.into(), vec![h, ffn_norm])?;
        let gate = one(&mut g, &name("ffn_gate"), BlockMatMul.into(), vec![m, wgate])?;
        let up = one(&mut g, &name("ffn_up"), BlockMatMul.into(), vec![m, wup])?;
        let sig = one(&mut g, &name("ffn_sigmoid"), Unary(UnaryOp::Sigmoid).into(), vec![gate])?;
        let silu = one(&mut g, &name("ffn_silu"), Binary(BinaryOp::Mul).into(), vec![gate, sig])?;
        let prod = one(&mut g, &name("ffn_swiglu"), Binary(BinaryOp::Mul).into(), vec![silu, up])?;
        let down = one(&mut g, &name("ffn_down"), BlockMatMul.into(), vec![prod, wdown])?;
        x = one(&mut g, &name("ffn_residual"), Binary(BinaryOp::Add).into(), vec![h, down])?;
    }
    if logits == Logits::Last {
        let start = g.add_const("last/start", Tensor::from_vec(vec![1], vec![-1i64])?)?;
        let end = g.add_const("last/end", Tensor::from_vec(vec![1], vec![i64::MAX])?)?;
        let axis = g.add_const("last/axis", Tensor::from_vec(vec![1], vec![1i64])?)?;
        x = one(&mut g, "last_position", Slice.into(), vec![x, start, end, axis])?;
    }
    let out_norm = g.add_const("output_norm.weight", w.output_norm.clone())?;
    let head = g.add_const("output.weight", w.output.clone())?;
    let x = one(&mut g, "output_norm", norm.into(), vec![x, out_norm])?;
    let logits = one(&mut g, "output", BlockMatMul.into(), vec![x, head])?;
    g.add_output("logits", logits);
    for (i, (k, v)) in presents.into_iter().enumerate() {
        g.add_output(&format!("present_key.{i}"), k);
        g.add_output(&format!("present_value.{i}"), v);
    }
    Ok(g)
}

/// Opens a GGUF llama-family model: its config, weights and the file (for the tokenizer).
pub fn load_llama(path: &std::path::Path) -> Result<(GgufFile, LlamaConfig, LlamaWeights)> {
    let g = GgufFile::open(path)?;
    let c = LlamaConfig::from_gguf(&g)?;
    let w = LlamaWeights::load(&g, &c)?;
    Ok((g, c, w))
}
