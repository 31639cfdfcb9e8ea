//! MatMul and Gemm whose B is a run-time tensor (parameters passed as inputs, attention's
//! activation products, every backward product): lowered onto the batched kernel of
//! `slimnn_kernels::matmul`, which packs B per call. A Transpose of an operand's last two axes
//! read only by the product is absorbed (packed transposed / read transposed), a following
//! bias Add, activation and residual Add are fused as for constant weights, and a Reduce sum
//! over the product's batch axes (a weight gradient) becomes a batch reduction inside it.

use super::{fuse_tail, out0, Ctx, Group};
use crate::plan::{Fusion, Kernel};
use slimnn_ir::ops::{Binary, BinaryOp, Gemm, MatMul, Reduce, ReduceOp, Transpose};
use slimnn_ir::{NodeId, Op, OutletId};
use slimnn_kernels::matmul::{BatchedMatMul, MatMulDims};
use slimnn_kernels::{Activation, Epilogue, Par};
use slimnn_tensor::Tensor;
use std::sync::Arc;

/// A lowered run-time product; step inputs `[a, b, bias?, residual?]`.
#[derive(Debug)]
pub struct MatMulKernel {
    pub spec: BatchedMatMul,
    pub bias: bool,
    pub activation: Activation,
    pub residual: bool,
}

impl MatMulKernel {
    pub fn name(&self) -> String {
        let mut s = "matmul".to_string();
        let d = self.spec.dims;
        if d.a_trans {
            s.push_str("+at");
        }
        if d.b_trans {
            s.push_str("+bt");
        }
        if self.spec.reduce {
            s.push_str("+batch_sum");
        }
        if self.bias {
            s.push_str("+bias");
        }
        if self.activation != Activation::None {
            s.push_str(&format!("+{:?}", self.activation).to_lowercase());
        }
        if self.residual {
            s.push_str("+residual");
        }
        s
    }

    pub fn run(&self, ins: &[&Tensor], out: &mut [f32], par: Par<'_>) -> crate::Result<()> {
        let a = ins[0].as_slice::<f32>()?;
        let b = ins[1].as_slice::<f32>()?;
        let mut next = 2;
        let mut ep = Epilogue::NONE.with_activation(self.activation);
        if self.bias {
            ep = ep.with_bias(ins[next].as_slice::<f32>()?);
            next += 1;
        }
        if self.residual {
            ep = ep.with_residual(ins[next].as_slice::<f32>()?, self.spec.dims.n);
        }
        slimnn_kernels::matmul::matmul(&self.spec, a, b, out, ep, par)?;
        Ok(())
    }
}

/// `(source, node)` when `o` is a Transpose swapping the last two axes that only `reader`
/// reads.
fn swapped_last_two(c: &Ctx, o: OutletId, reader: NodeId) -> Option<(OutletId, NodeId)> {
    let Op::Transpose(Transpose { perm }) = c.op(o) else { return None };
    let rank = c.g.fact(o).rank();
    if rank < 2 || c.sole_reader(o) != Some(reader) {
        return None;
    }
    let want: Vec<usize> = (0..rank - 2).chain([rank - 1, rank - 2]).collect();
    // No perm reverses the axes, which swaps the last two only for rank 2.
    let ok = match perm {
        Some(p) => *p == want,
        None => rank == 2,
    };
    ok.then(|| (c.g.node(o.node).inputs[0], o.node))
}

/// A MatMul or Gemm on f32 operands of known shapes, B not a constant 2-d weight (those take
/// the pre-packed path).
pub(super) fn match_matmul(c: &Ctx, id: NodeId) -> Option<Group> {
    let node = c.g.node(id);
    let (mut a, mut b) = (*node.inputs.first()?, *node.inputs.get(1)?);
    let (mut a_trans, mut b_trans, gemm_bias) = match &node.op {
        Op::MatMul(MatMul) => (false, false, None),
        Op::Gemm(Gemm { alpha, beta, trans_a, trans_b }) if *alpha == 1.0 => {
            let bias = match node.inputs.get(2) {
                None => None,
                Some(&cb) if *beta == 1.0 => Some(cb),
                Some(_) => return None,
            };
            (*trans_a, *trans_b, bias)
        }
        _ => return None,
    };
    if !c.is_f32(a) || !c.is_f32(b) || !c.is_f32(out0(id)) {
        return None;
    }
    let (sa0, sb0) = (c.shape(a)?, c.shape(b)?);
    if sa0.is_empty() || sb0.is_empty() {
        return None;
    }
    let mut members = vec![];
    if sa0.len() >= 2 {
        if let Some((src, t)) = swapped_last_two(c, a, id) {
            (a, a_trans) = (src, !a_trans);
            members.push(t);
        }
    }
    if sb0.len() >= 2 {
        if let Some((src, t)) = swapped_last_two(c, b, id) {
            (b, b_trans) = (src, !b_trans);
            members.push(t);
        }
    }
    members.push(id);
    let (sa, sb) = (c.shape(a)?, c.shape(b)?);
    // 1-d operands: a row vector A (m = 1) and a column vector B (n = 1); either is the same
    // memory transposed or not.
    let (batch_a, m, ka) = match sa.len() {
        1 => (vec![], 1, sa[0]),
        r if a_trans => (sa[..r - 2].to_vec(), sa[r - 1], sa[r - 2]),
        r => (sa[..r - 2].to_vec(), sa[r - 2], sa[r - 1]),
    };
    let (batch_b, kb, n) = match sb.len() {
        1 => (vec![], sb[0], 1),
        r if b_trans => (sb[..r - 2].to_vec(), sb[r - 1], sb[r - 2]),
        r => (sb[..r - 2].to_vec(), sb[r - 2], sb[r - 1]),
    };
    if ka != kb {
        return None;
    }
    let dims = MatMulDims { m, k: ka, n, a_trans: a_trans && sa.len() > 1, b_trans: b_trans && sb.len() > 1 };
    let mut spec = BatchedMatMul { dims, batch_a, batch_b, reduce: false };
    let batch_out = spec.batch_out().ok()?;
    let mut inputs = vec![a, b];
    let mut end = out0(id);
    let mut notes = vec![];
    let mut bias = false;
    if let Some(cb) = gemm_bias {
        if !is_row_vector(c, cb, n) {
            return None;
        }
        inputs.push(cb);
        bias = true;
    }
    // A sum over all batch axes right after the product: a weight gradient.
    if !bias && !batch_out.is_empty() && c.g.fact(out0(id)).rank() == batch_out.len() + 2 {
        if let Some(r) = c.sole_reader(end) {
            if let Op::Reduce(Reduce { op: ReduceOp::Sum, axes: Some(axes), .. }) = &c.g.node(r).op {
                let rank = (batch_out.len() + 2) as i64;
                let mut ax: Vec<i64> = axes.iter().map(|&x| if x < 0 { x + rank } else { x }).collect();
                ax.sort_unstable();
                ax.dedup();
                if ax == (0..batch_out.len() as i64).collect::<Vec<_>>() && c.g.node(r).inputs.len() == 1 {
                    spec.reduce = true;
                    members.push(r);
                    end = out0(r);
                    notes.push(format!("sum over {} batch matrices", batch_out.iter().product::<usize>()));
                }
            }
        }
    }
    let (mut activation, mut residual) = (Activation::None, false);
    if !spec.reduce {
        if !bias {
            if let Some(r) = c.sole_reader(end) {
                if let Some(other) = c.binary_other(r, end, BinaryOp::Add) {
                    if is_row_vector(c, other, n) && c.g.node(r).op == Op::Binary(Binary(BinaryOp::Add)) {
                        inputs.push(other);
                        bias = true;
                        members.push(r);
                        end = out0(r);
                    }
                }
            }
        }
        (activation, residual) = fuse_tail(c, end, &mut members, &mut inputs, &mut notes);
    }
    let kernel = MatMulKernel { spec, bias, activation, residual };
    let fusion = Fusion { kind: kernel.name(), nodes: c.names(&members), note: notes.join("; ") };
    Some(Group { fusion, members, kernel: Kernel::MatMul(Arc::new(kernel)), inputs, output_shape: None })
}

/// An f32 value of `n` elements shaped `[n]`, `[1, n]`, `[1, 1, n]`, ...: one value per column.
fn is_row_vector(c: &Ctx, o: OutletId, n: usize) -> bool {
    let Some(s) = c.shape(o) else { return false };
    c.is_f32(o) && s.last() == Some(&n) && s.iter().rev().skip(1).all(|&d| d == 1)
}
