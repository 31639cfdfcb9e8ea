//! Fast kernels for the LLM ops of `slimnn_ir::ops` (llm.rs): matrix products against
//! block-quantized constant weights ([`slimnn_kernels::blockq`]), causal grouped-query attention
//! (on [`slimnn_kernels::attention::mha`] with the key/value heads repeated and a causal mask)
//! and rotary embedding with one cos/sin table per call. Other LLM ops (RMSNorm, the block
//! embedding lookup) are cheap and run on the reference evaluator.

use crate::Result;
use slimnn_ir::ops::{BlockMatMul, CausalAttention, Rope};
use slimnn_ir::{Graph, IrError, NodeId, Op};
use slimnn_kernels::attention::{mha, AttnDims, AttnMask};
use slimnn_kernels::blockq::{block_matmul, BlockWeight, FastFormat};
use slimnn_kernels::Par;
use slimnn_tensor::{block_format, BlockKind, DType, Tensor, TensorData};
use std::sync::Arc;

/// A lowered LLM op.
#[derive(Debug)]
pub enum BlockKernel {
    /// `x · Wᵀ` with `W` a constant `[n, k]` block-format (or f32) weight; inputs `[x, w]`.
    MatMul { weight: Arc<Tensor> },
    /// Causal grouped-query attention; inputs `[q, k, v]`.
    Attention(CausalAttention),
    /// Rotary embedding; inputs `[x, positions]`.
    Rope(Rope),
}

impl BlockKernel {
    pub fn name(&self) -> String {
        match self {
            BlockKernel::MatMul { weight } => format!("block_matmul:{}", weight.dtype()),
            BlockKernel::Attention(_) => "causal_gqa_attention".into(),
            BlockKernel::Rope(_) => "rope".into(),
        }
    }
}

/// The kernel for node `id`, when it is an LLM op with f32 activations (and a constant weight).
pub(crate) fn lower(g: &Graph, id: NodeId) -> Option<BlockKernel> {
    let node = g.node(id);
    let f32_in = |i: usize| node.inputs.get(i).is_some_and(|&o| g.fact(o).dtype == DType::F32);
    match &node.op {
        Op::BlockMatMul(BlockMatMul) if f32_in(0) => {
            let w = g.fact(*node.inputs.get(1)?).konst.clone()?;
            matches!(w.dtype(), DType::Block(_) | DType::F32).then_some(BlockKernel::MatMul { weight: w })
        }
        Op::CausalAttention(a) if (0..3).all(f32_in) => Some(BlockKernel::Attention(*a)),
        Op::Rope(r) if f32_in(0) => Some(BlockKernel::Rope(*r)),
        _ => None,
    }
}

fn f32s(t: &Tensor) -> Result<&[f32]> {
    Ok(t.as_slice::<f32>()?)
}

impl BlockKernel {
    /// Runs on `ins` into `out` (the output's length, contents overwritten).
    pub(crate) fn run(&self, ins: &[&Tensor], out: &mut [f32], par: bool) -> Result<()> {
        let gpar = if par { Par::Current } else { Par::Seq };
        match self {
            BlockKernel::MatMul { weight } => matmul(weight, f32s(ins[0])?, out, gpar),
            BlockKernel::Attention(a) => attention(a, ins, out, gpar),
            BlockKernel::Rope(r) => rope(r, ins, out),
        }
    }
}

fn matmul(w: &Tensor, x: &[f32], out: &mut [f32], par: Par<'_>) -> Result<()> {
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let m = x.len() / k.max(1);
    match w.data() {
        TensorData::Block { kind, bytes } => {
            let f = block_format(*kind);
            let fast = match kind {
                BlockKind::Q4_1 => Some(FastFormat::Q4_1),
                BlockKind::Q8_0 => Some(FastFormat::Q8_0),
                _ => None,
            };
            let dequantize = |src: &[u8], dst: &mut [f32]| f.dequantize(src, dst);
            let bw = BlockWeight {
                bytes,
                n,
                k,
                block_len: f.block_len(),
                block_bytes: f.block_bytes(),
                fast,
                dequantize: &dequantize,
            };
            block_matmul(m, x, &bw, out, par)?;
        }
        _ => {
            let wt = w.as_slice::<f32>()?;
            let packed = slimnn_kernels::PackedB::from_transposed(wt, k, n, k)?;
            slimnn_kernels::gemm(m, x, k, &packed, out, n, slimnn_kernels::Epilogue::NONE, par)?;
        }
    }
    Ok(())
}

fn attention(a: &CausalAttention, ins: &[&Tensor], out: &mut [f32], par: Par<'_>) -> Result<()> {
    let (q, k, v) = (ins[0], ins[1], ins[2]);
    let (qs, ks) = (q.shape(), k.shape());
    let bad = || IrError::op("CausalAttention", format!("shapes q {qs:?}, k {ks:?} do not fit"));
    if qs.len() != 3
        || ks.len() != 3
        || v.shape() != ks
        || qs[0] != ks[0]
        || ks[1] < qs[1]
        || !qs[2].is_multiple_of(a.heads)
    {
        return Err(bad().into());
    }
    let (batch, sq, sk) = (qs[0], qs[1], ks[1]);
    let d = qs[2] / a.heads;
    if ks[2] != d * a.kv_heads || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        return Err(bad().into());
    }
    // Repeat each key/value head for its group of query heads.
    let group = a.heads / a.kv_heads;
    let widen = |t: &[f32]| -> Vec<f32> {
        if group == 1 {
            return t.to_vec();
        }
        let mut w = Vec::with_capacity(t.len() * group);
        for row in t.chunks_exact(ks[2]) {
            for head in row.chunks_exact(d) {
                for _ in 0..group {
                    w.extend_from_slice(head);
                }
            }
        }
        w
    };
    let (kw, vw) = (widen(f32s(k)?), widen(f32s(v)?));
    // Query i sees keys 0..=sk - sq + i.
    let mut mask = vec![0f32; sq * sk];
    for (i, row) in mask.chunks_exact_mut(sk).enumerate() {
        row[sk - sq + i + 1..].fill(f32::NEG_INFINITY);
    }
    let dims = AttnDims { batch, seq_q: sq, seq_k: sk, heads: a.heads, head_dim: d };
    let mask = (sq > 1).then_some(AttnMask { data: &mask, shape: [1, 1, sq, sk] });
    mha(f32s(q)?, &kw, &vw, mask, dims, a.scale, out, par)?;
    Ok(())
}

fn rope(r: &Rope, ins: &[&Tensor], out: &mut [f32]) -> Result<()> {
    let x = f32s(ins[0])?;
    let s = ins[0].shape();
    let pos = ins[1].as_slice::<i64>()?;
    let half = r.head_dim / 2;
    if s.len() != 3 || pos.len() != s[1] || r.head_dim == 0 || !s[2].is_multiple_of(r.head_dim) || out.len() != x.len()
    {
        return Err(IrError::op("RotaryEmbedding", format!("x {s:?} and {} positions do not fit", pos.len())).into());
    }
    let table: Vec<(f32, f32)> =
        pos.iter().flat_map(|&p| (0..half).map(move |i| r.angle(p, i))).map(|(c, s)| (c as f32, s as f32)).collect();
    for (row_index, (xr, yr)) in x.chunks_exact(s[2]).zip(out.chunks_exact_mut(s[2])).enumerate() {
        let t = &table[(row_index % s[1]) * half..][..half];
        for (xh, yh) in xr.chunks_exact(r.head_dim).zip(yr.chunks_exact_mut(r.head_dim)) {
            for (i, &(c, sn)) in t.iter().enumerate() {
                let (a, b) = (xh[2 * i], xh[2 * i + 1]);
                yh[2 * i] = a * c - b * sn;
                yh[2 * i + 1] = a * sn + b * c;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimnn_ir::OpDef;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn attention_matches_reference_with_cache_and_groups() {
        let a = CausalAttention { heads: 6, kv_heads: 2, scale: 0.3 };
        for (sq, sk, par) in [(5, 5, false), (3, 7, true), (1, 9, false)] {
            let q = Tensor::from_vec(vec![1, sq, 6 * 4], values(sq * 24, 1)).unwrap();
            let k = Tensor::from_vec(vec![1, sk, 2 * 4], values(sk * 8, 2)).unwrap();
            let v = Tensor::from_vec(vec![1, sk, 2 * 4], values(sk * 8, 3)).unwrap();
            let expect = a.eval(&[&q, &k, &v]).unwrap().remove(0);
            let mut out = vec![0f32; sq * 24];
            BlockKernel::Attention(a).run(&[&q, &k, &v], &mut out, par).unwrap();
            close(&out, expect.as_slice::<f32>().unwrap(), 1e-5);
        }
    }

    #[test]
    fn rope_matches_reference() {
        let r = Rope { head_dim: 8, base: 10000.0 };
        let x = Tensor::from_vec(vec![1, 3, 16], values(48, 4)).unwrap();
        let pos = Tensor::from_vec(vec![3], vec![5i64, 6, 7]).unwrap();
        let expect = r.eval(&[&x, &pos]).unwrap().remove(0);
        let mut out = vec![0f32; 48];
        BlockKernel::Rope(r).run(&[&x, &pos], &mut out, false).unwrap();
        close(&out, expect.as_slice::<f32>().unwrap(), 1e-6);
    }

    #[test]
    fn matmul_matches_reference_for_each_format() {
        for kind in [BlockKind::Q4_1, BlockKind::Q8_0, BlockKind::Q4_0, BlockKind::Q4K, BlockKind::Q6K] {
            let f = block_format(kind);
            let (n, k) = (40, 256);
            let mut bytes = vec![0u8; n * k / f.block_len() * f.block_bytes()];
            f.quantize(&values(n * k, 5), &mut bytes);
            let w = Arc::new(Tensor::from_blocks(vec![n, k], kind, bytes).unwrap());
            for m in [1, 6] {
                let x = Tensor::from_vec(vec![m, k], values(m * k, 6)).unwrap();
                let expect = BlockMatMul.eval(&[&x, &w]).unwrap().remove(0);
                let mut out = vec![0f32; m * n];
                BlockKernel::MatMul { weight: w.clone() }.run(&[&x, &w], &mut out, m > 1).unwrap();
                close(&out, expect.as_slice::<f32>().unwrap(), 1e-4);
            }
        }
    }
}
