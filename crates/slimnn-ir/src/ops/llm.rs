//! Ops of llama-family decoders whose weights stay block-quantized (ggml formats): matrix
//! product and row lookup against a block-format weight, RMS normalisation, rotary position
//! embedding and causal grouped-query attention. None has an ONNX counterpart that keeps the
//! weights in their block format, so these are slimnn's own; the reference `eval`s below
//! define them (f64 accumulation), the runtime has fast kernels for the heavy ones.

use super::util::{expect_inputs, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{block_format, DType, Dim, Tensor, TensorData};

/// The rows of a `[n, k]` weight as f32 values (block formats dequantized one row at a time by
/// the caller through [`weight_row`]).
fn weight_dims(op: &'static str, w: &Fact) -> IrResult<(Dim, Dim)> {
    if w.rank() != 2 {
        op_bail!(op, "weight must be 2-d [n, k], got {}", show_dims(&w.shape));
    }
    if !matches!(w.dtype, DType::Block(_) | DType::F32) {
        op_bail!(op, "weight must be a block format or f32, got {}", w.dtype);
    }
    Ok((w.shape[0].clone(), w.shape[1].clone()))
}

/// Row `r` of a `[n, k]` weight (block format or f32) as f32.
fn weight_row(w: &Tensor, r: usize, out: &mut [f32]) -> IrResult<()> {
    let k = w.shape()[1];
    match w.data() {
        TensorData::Block { kind, bytes } => {
            let f = block_format(*kind);
            let row_bytes = k / f.block_len() * f.block_bytes();
            f.dequantize(&bytes[r * row_bytes..(r + 1) * row_bytes], out);
        }
        _ => out.copy_from_slice(&w.as_slice::<f32>()?[r * k..(r + 1) * k]),
    }
    Ok(())
}

fn check_weight(op: &'static str, w: &Tensor) -> IrResult<(usize, usize)> {
    if w.rank() != 2 {
        op_bail!(op, "weight must be 2-d [n, k], got {:?}", w.shape());
    }
    let (n, k) = (w.shape()[0], w.shape()[1]);
    if let DType::Block(kind) = w.dtype() {
        let f = block_format(kind);
        if !k.is_multiple_of(f.block_len()) {
            op_bail!(op, "weight rows of {k} values are not whole {}-value {} blocks", f.block_len(), f.name());
        }
    } else if w.dtype() != DType::F32 {
        op_bail!(op, "weight must be a block format or f32, got {}", w.dtype());
    }
    Ok((n, k))
}

fn f32_input<'a>(op: &'static str, what: &str, t: &'a Tensor) -> IrResult<&'a [f32]> {
    if t.dtype() != DType::F32 {
        op_bail!(op, "{what} must be f32, got {}", t.dtype());
    }
    Ok(t.as_slice::<f32>()?)
}

fn same_dim(a: &Dim, b: &Dim) -> bool {
    match (a, b) {
        (Dim::Known(x), Dim::Known(y)) => x == y,
        _ => true,
    }
}

/// `y = x · Wᵀ`: `x` f32 `[.., k]`, `W` `[n, k]` in a block format (or f32), `y` f32 `[.., n]`
/// — a linear layer whose weight rows are stored as ggml blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMatMul;

impl OpDef for BlockMatMul {
    fn name(&self) -> &'static str {
        "BlockMatMul"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("BlockMatMul", inputs, 2, 2)?;
        let (x, w) = (inputs[0], inputs[1]);
        let (n, k) = weight_dims("BlockMatMul", w)?;
        if x.dtype != DType::F32 || x.rank() == 0 {
            op_bail!("BlockMatMul", "input must be f32 of rank >= 1, got {x}");
        }
        let xk = &x.shape[x.rank() - 1];
        if !same_dim(xk, &k) {
            op_bail!("BlockMatMul", "input {} does not match weight [{n},{k}]", show_dims(&x.shape));
        }
        let mut dims = x.shape.clone();
        *dims.last_mut().expect("rank >= 1") = n;
        Ok(vec![Fact::new(DType::F32, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("BlockMatMul", inputs, 2, 2)?;
        let (x, w) = (inputs[0], inputs[1]);
        let (n, k) = check_weight("BlockMatMul", w)?;
        let xs = f32_input("BlockMatMul", "input", x)?;
        if x.rank() == 0 || x.shape()[x.rank() - 1] != k {
            op_bail!("BlockMatMul", "input {:?} does not match weight [{n},{k}]", x.shape());
        }
        let m = xs.len() / k.max(1);
        let mut out = vec![0f32; m * n];
        let mut row = vec![0f32; k];
        for j in 0..n {
            weight_row(w, j, &mut row)?;
            for i in 0..m {
                let a = &xs[i * k..(i + 1) * k];
                out[i * n + j] = a.iter().zip(&row).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>() as f32;
            }
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("rank >= 1") = n;
        Ok(vec![Tensor::from_vec(shape, out)?])
    }
}

/// Rows of a `[vocab, d]` table (block format or f32) picked by i64 ids `[..]`: f32 `[.., d]`
/// (token embedding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGather;

impl OpDef for BlockGather {
    fn name(&self) -> &'static str {
        "BlockGather"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("BlockGather", inputs, 2, 2)?;
        let (table, ids) = (inputs[0], inputs[1]);
        let (_, d) = weight_dims("BlockGather", table)?;
        if ids.dtype != DType::I64 {
            op_bail!("BlockGather", "ids must be i64, got {}", ids.dtype);
        }
        let mut dims = ids.shape.clone();
        dims.push(d);
        Ok(vec![Fact::new(DType::F32, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("BlockGather", inputs, 2, 2)?;
        let (table, ids) = (inputs[0], inputs[1]);
        let (vocab, d) = check_weight("BlockGather", table)?;
        if ids.dtype() != DType::I64 {
            op_bail!("BlockGather", "ids must be i64, got {}", ids.dtype());
        }
        let ids = ids.as_slice::<i64>()?;
        let mut out = vec![0f32; ids.len() * d];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(d.max(1))) {
            if id < 0 || id as usize >= vocab {
                op_bail!("BlockGather", "id {id} is outside the table of {vocab} rows");
            }
            weight_row(table, id as usize, row)?;
        }
        let mut shape = inputs[1].shape().to_vec();
        shape.push(d);
        Ok(vec![Tensor::from_vec(shape, out)?])
    }
}

/// RMS normalisation over the last axis: `y = x / sqrt(mean(x²) + epsilon) * weight`; inputs
/// `[x, weight [d]]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNorm {
    pub epsilon: f32,
}

impl OpDef for RmsNorm {
    fn name(&self) -> &'static str {
        "RMSNormalization"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("RMSNormalization", inputs, 2, 2)?;
        let (x, w) = (inputs[0], inputs[1]);
        if x.dtype != DType::F32 || w.dtype != DType::F32 || x.rank() == 0 || w.rank() != 1 {
            op_bail!("RMSNormalization", "expects f32 x of rank >= 1 and f32 weight [d], got {x} and {w}");
        }
        if !same_dim(&x.shape[x.rank() - 1], &w.shape[0]) {
            op_bail!("RMSNormalization", "weight {} does not match x {}", show_dims(&w.shape), show_dims(&x.shape));
        }
        Ok(vec![x.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("RMSNormalization", inputs, 2, 2)?;
        let x = f32_input("RMSNormalization", "x", inputs[0])?;
        let w = f32_input("RMSNormalization", "weight", inputs[1])?;
        let d = w.len();
        if inputs[0].rank() == 0 || inputs[0].shape()[inputs[0].rank() - 1] != d {
            op_bail!("RMSNormalization", "weight [{d}] does not match x {:?}", inputs[0].shape());
        }
        let mut out = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d.max(1)).zip(out.chunks_exact_mut(d.max(1))) {
            let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + self.epsilon as f64).sqrt();
            for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                *y = (v as f64 * inv * g as f64) as f32;
            }
        }
        Ok(vec![Tensor::from_vec(inputs[0].shape().to_vec(), out)?])
    }
}

/// Rotary position embedding on `x [batch, seq, heads * head_dim]` at `positions [seq]` (i64):
/// within each head, the adjacent pair `(x[2i], x[2i+1])` turns by `pos * base^(-2i /
/// head_dim)`. This is the pairing of the original llama checkpoints and of GGUF files (whose
/// converter permutes Hugging Face's Q/K rows so that HF's "rotate half" pairs `(i, i + d/2)`
/// become adjacent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub head_dim: usize,
    pub base: f32,
}

impl Rope {
    /// `(cos, sin)` of pair `i` at `pos`.
    pub fn angle(&self, pos: i64, i: usize) -> (f64, f64) {
        let theta = pos as f64 * (self.base as f64).powf(-2.0 * i as f64 / self.head_dim as f64);
        (theta.cos(), theta.sin())
    }
}

impl OpDef for Rope {
    fn name(&self) -> &'static str {
        "RotaryEmbedding"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("RotaryEmbedding", inputs, 2, 2)?;
        let (x, pos) = (inputs[0], inputs[1]);
        if x.dtype != DType::F32 || x.rank() != 3 || pos.dtype != DType::I64 || pos.rank() != 1 {
            op_bail!(
                "RotaryEmbedding",
                "expects f32 x [batch, seq, heads*head_dim] and i64 positions [seq], got {x} and {pos}"
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            op_bail!("RotaryEmbedding", "head_dim {} must be even and positive", self.head_dim);
        }
        if let Dim::Known(w) = x.shape[2] {
            if !w.is_multiple_of(self.head_dim) {
                op_bail!("RotaryEmbedding", "width {w} is not a multiple of head_dim {}", self.head_dim);
            }
        }
        if !same_dim(&x.shape[1], &pos.shape[0]) {
            op_bail!("RotaryEmbedding", "positions {} do not match x {}", show_dims(&pos.shape), show_dims(&x.shape));
        }
        Ok(vec![x.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("RotaryEmbedding", inputs, 2, 2)?;
        let x = f32_input("RotaryEmbedding", "x", inputs[0])?;
        let s = inputs[0].shape();
        if inputs[1].dtype() != DType::I64 {
            op_bail!("RotaryEmbedding", "positions must be i64, got {}", inputs[1].dtype());
        }
        let pos = inputs[1].as_slice::<i64>()?;
        if s.len() != 3 || pos.len() != s[1] || !s[2].is_multiple_of(self.head_dim) || !self.head_dim.is_multiple_of(2)
        {
            op_bail!("RotaryEmbedding", "x {s:?} and {} positions do not fit head_dim {}", pos.len(), self.head_dim);
        }
        let width = s[2];
        let mut out = x.to_vec();
        for (r, row) in out.chunks_exact_mut(width.max(1)).enumerate() {
            let p = pos[r % s[1]];
            for head in row.chunks_exact_mut(self.head_dim) {
                for i in 0..self.head_dim / 2 {
                    let (c, sn) = self.angle(p, i);
                    let (a, b) = (head[2 * i] as f64, head[2 * i + 1] as f64);
                    head[2 * i] = (a * c - b * sn) as f32;
                    head[2 * i + 1] = (a * sn + b * c) as f32;
                }
            }
        }
        Ok(vec![Tensor::from_vec(s.to_vec(), out)?])
    }
}

/// Causal grouped-query attention: `q [batch, seq_q, heads * d]`, `k` and `v` `[batch, seq_k,
/// kv_heads * d]` with `seq_k >= seq_q` (the keys of earlier positions come first, as with a
/// KV cache); query `i` attends keys `0..=seq_k - seq_q + i`; query head `h` uses key/value
/// head `h / (heads / kv_heads)`. Output `[batch, seq_q, heads * d]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CausalAttention {
    pub heads: usize,
    pub kv_heads: usize,
    pub scale: f32,
}

impl CausalAttention {
    fn check_heads(&self) -> IrResult<()> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            op_bail!(
                "CausalAttention",
                "heads {} must be a positive multiple of kv_heads {}",
                self.heads,
                self.kv_heads
            );
        }
        Ok(())
    }
}

impl OpDef for CausalAttention {
    fn name(&self) -> &'static str {
        "CausalAttention"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("CausalAttention", inputs, 3, 3)?;
        self.check_heads()?;
        let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
        for f in [q, k, v] {
            if f.dtype != DType::F32 || f.rank() != 3 {
                op_bail!("CausalAttention", "q, k, v must be f32 [batch, seq, width], got {f}");
            }
        }
        if !same_dim(&k.shape[1], &v.shape[1]) || !same_dim(&k.shape[2], &v.shape[2]) {
            op_bail!("CausalAttention", "k {} and v {} differ", show_dims(&k.shape), show_dims(&v.shape));
        }
        if let (Dim::Known(qw), Dim::Known(kw)) = (&q.shape[2], &k.shape[2]) {
            if !qw.is_multiple_of(self.heads) || kw * self.heads != qw * self.kv_heads {
                op_bail!(
                    "CausalAttention",
                    "widths q {qw} and k {kw} do not fit {} / {} heads",
                    self.heads,
                    self.kv_heads
                );
            }
        }
        Ok(vec![q.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("CausalAttention", inputs, 3, 3)?;
        self.check_heads()?;
        let q = f32_input("CausalAttention", "q", inputs[0])?;
        let k = f32_input("CausalAttention", "k", inputs[1])?;
        let v = f32_input("CausalAttention", "v", inputs[2])?;
        let (qs, ks) = (inputs[0].shape(), inputs[1].shape());
        if qs.len() != 3 || ks.len() != 3 || inputs[2].shape() != ks || qs[0] != ks[0] {
            op_bail!("CausalAttention", "shapes q {qs:?}, k {ks:?}, v {:?} do not fit", inputs[2].shape());
        }
        let (batch, sq, sk) = (qs[0], qs[1], ks[1]);
        let d = qs[2] / self.heads;
        if !qs[2].is_multiple_of(self.heads) || ks[2] != d * self.kv_heads || sk < sq {
            op_bail!(
                "CausalAttention",
                "shapes q {qs:?} and k {ks:?} do not fit {} / {} heads",
                self.heads,
                self.kv_heads
            );
        }
        let (qw, kw) = (qs[2], ks[2]);
        let group = self.heads / self.kv_heads;
        let mut out = vec![0f32; q.len()];
        let mut scores = vec![0f64; sk];
        for b in 0..batch {
            for h in 0..self.heads {
                let kh = h / group;
                for i in 0..sq {
                    let visible = sk - sq + i + 1;
                    let qrow = &q[(b * sq + i) * qw + h * d..][..d];
                    let mut max = f64::NEG_INFINITY;
                    for (j, s) in scores[..visible].iter_mut().enumerate() {
                        let krow = &k[(b * sk + j) * kw + kh * d..][..d];
                        *s = qrow.iter().zip(krow).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>() * self.scale as f64;
                        max = max.max(*s);
                    }
                    let mut total = 0.0;
                    for s in &mut scores[..visible] {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    let orow = &mut out[(b * sq + i) * qw + h * d..][..d];
                    for (t, o) in orow.iter_mut().enumerate() {
                        let acc: f64 = (0..visible).map(|j| scores[j] * v[(b * sk + j) * kw + kh * d + t] as f64).sum();
                        *o = (acc / total) as f32;
                    }
                }
            }
        }
        Ok(vec![Tensor::from_vec(qs.to_vec(), out)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimnn_tensor::BlockKind;

    fn q8_weight(n: usize, k: usize) -> (Tensor, Vec<f32>) {
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
        let f = block_format(BlockKind::Q8_0);
        let mut bytes = vec![0u8; n * k / 32 * 34];
        f.quantize(&w, &mut bytes);
        let mut deq = vec![0f32; n * k];
        f.dequantize(&bytes, &mut deq);
        (Tensor::from_blocks(vec![n, k], BlockKind::Q8_0, bytes).unwrap(), deq)
    }

    #[test]
    fn block_matmul_matches_dequantized_product() {
        let (w, deq) = q8_weight(3, 64);
        let x: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let xt = Tensor::from_vec(vec![1, 2, 64], x.clone()).unwrap();
        let y = BlockMatMul.eval(&[&xt, &w]).unwrap().remove(0);
        assert_eq!(y.shape(), &[1, 2, 3]);
        let y = y.as_slice::<f32>().unwrap();
        for i in 0..2 {
            for j in 0..3 {
                let r: f32 = (0..64).map(|t| x[i * 64 + t] * deq[j * 64 + t]).sum();
                assert!((y[i * 3 + j] - r).abs() < 1e-4);
            }
        }
        let f = BlockMatMul.output_facts(&[&Fact::known(DType::F32, &[5, 64]), &Fact::from_tensor(w.into())]).unwrap();
        assert_eq!(f[0].shape, vec![Dim::Known(5), Dim::Known(3)]);
    }

    #[test]
    fn block_gather_rejects_out_of_range_ids() {
        let (w, deq) = q8_weight(3, 32);
        let ids = Tensor::from_vec(vec![2], vec![2i64, 0]).unwrap();
        let y = BlockGather.eval(&[&w, &ids]).unwrap().remove(0);
        assert_eq!(y.shape(), &[2, 32]);
        assert_eq!(&y.as_slice::<f32>().unwrap()[..32], &deq[64..96]);
        let bad = Tensor::from_vec(vec![1], vec![3i64]).unwrap();
        assert!(BlockGather.eval(&[&w, &bad]).unwrap_err().to_string().contains("outside"));
    }

    #[test]
    fn rope_turns_adjacent_pairs() {
        let rope = Rope { head_dim: 4, base: 100.0 };
        let x = Tensor::from_vec(vec![1, 1, 4], vec![1f32, 0.0, 0.0, 1.0]).unwrap();
        let pos = Tensor::from_vec(vec![1], vec![3i64]).unwrap();
        let y = rope.eval(&[&x, &pos]).unwrap().remove(0);
        let y = y.as_slice::<f32>().unwrap();
        // Pair 0 turns by 3 rad, pair 1 by 3 / 10 rad.
        let expect = [3f32.cos(), 3f32.sin(), -(0.3f32.sin()), 0.3f32.cos()];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn causal_attention_first_query_sees_first_key_only() {
        // 2 query heads share one kv head; seq 2, no cache.
        let att = CausalAttention { heads: 2, kv_heads: 1, scale: 1.0 };
        let q = Tensor::from_vec(vec![1, 2, 4], vec![1f32, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]).unwrap();
        let k = Tensor::from_vec(vec![1, 2, 2], vec![1f32, 0.0, 0.0, 1.0]).unwrap();
        let v = Tensor::from_vec(vec![1, 2, 2], vec![10f32, 20.0, 30.0, 40.0]).unwrap();
        let y = att.eval(&[&q, &k, &v]).unwrap().remove(0);
        let y = y.as_slice::<f32>().unwrap();
        assert_eq!(&y[..4], &[10.0, 20.0, 10.0, 20.0]);
        // Second query, head 0: scores [1, 0] -> weights e/(e+1), 1/(e+1).
        let w0 = std::f32::consts::E / (std::f32::consts::E + 1.0);
        assert!((y[4] - (10.0 * w0 + 30.0 * (1.0 - w0))).abs() < 1e-4);
        assert!((y[6] - (10.0 * (1.0 - w0) + 30.0 * w0)).abs() < 1e-4);
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = Tensor::from_vec(vec![1, 2], vec![3f32, 4.0]).unwrap();
        let w = Tensor::from_vec(vec![2], vec![1f32, 2.0]).unwrap();
        let y = RmsNorm { epsilon: 0.0 }.eval(&[&x, &w]).unwrap().remove(0);
        let rms = (12.5f32).sqrt();
        assert_eq!(y.as_slice::<f32>().unwrap(), &[3.0 / rms, 8.0 / rms]);
    }
}
