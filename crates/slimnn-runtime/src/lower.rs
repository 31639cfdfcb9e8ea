//! Lowering a shape-specialised graph to a [`Plan`]: fusion groups found by meaning, each
//! emitted as one kernel step; every other node runs on the reference evaluator.

use crate::conv::{ConvKernel, ConvTrainKernel, ConvTrainOp};
use crate::plan::{AttnProducts, Broadcast, FastBinary, Fusion, Kernel, Plan, Slot, Step, StridedBroadcast};
use crate::Result;
use slimnn_ir::ops::{
    Binary, BinaryOp, Clip, Conv, ConvGradInput, ConvGradWeight, GatherGrad, Gemm, GlobalPool, LayerNorm,
    LayerNormGrad, MatMul, PoolGrad, Reduce, ReduceOp, Reshape, Softmax, SoftmaxGrad, Transpose, Unary, UnaryGrad,
    UnaryOp,
};
use slimnn_ir::{Graph, NodeId, Op, OutletId};
use slimnn_kernels::grad::{FastUnary, GradActivation};
use slimnn_kernels::{Activation, PackedB};
use slimnn_tensor::{DType, Tensor};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Weights packed once per runnable, keyed by the addresses of their constant tensors (kept
/// alive alongside so the addresses stay unique) and the packing; f32 weights packed as bf16
/// when `bf16`, else as bf16 parts for AMX tiles when `f32_tiles` and the GEMM has enough rows.
#[derive(Default)]
pub(crate) struct PackCache {
    f32s: Mutex<HashMap<PackKey, PackedWeight>>,
    quant: quant::QPackCache,
    bf16: bool,
    f32_tiles: bool,
}

/// The weights' addresses, whether they are transposed, whether packed for AMX tiles.
type PackKey = (Vec<usize>, bool, bool);

/// Whether an f32 GEMM of `rows` rows runs on AMX tiles ([`slimnn_kernels::gemm::bf16x6`]).
/// The parts take 6 bytes per weight against 4, so below ~96 rows streaming them costs more
/// than the tiles save (one thread, weights from L3: 64 x 384 x 1536 at 179 GFLOP/s against 193
/// on FMA units, 96 rows at 226 against 192). The tile kernel computes 32 rows at a time:
/// counts that would waste more than a fifth of that stay on the FMA kernel too.
fn tiles_pay(rows: usize) -> bool {
    rows >= 96 && rows.next_multiple_of(32) * 4 <= rows * 5
}

/// `[w0 | w1 | ...]` row-major with its `(k, n)`: 2-d weights with the same rows, side by side.
fn side_by_side<T: slimnn_tensor::IntoData + Copy>(ws: &[Arc<Tensor>]) -> Result<(Vec<T>, usize, usize)> {
    let k = ws[0].shape()[0];
    let n: usize = ws.iter().map(|w| w.shape()[1]).sum();
    let mut data = Vec::with_capacity(k * n);
    for row in 0..k {
        for w in ws {
            let c = w.shape()[1];
            data.extend_from_slice(&w.as_slice::<T>()?[row * c..(row + 1) * c]);
        }
    }
    Ok((data, k, n))
}

#[path = "quant.rs"]
pub(crate) mod quant;

#[path = "matmul.rs"]
pub(crate) mod matmul;

/// A packed weight and the constants it came from.
type PackedWeight = (Vec<Arc<Tensor>>, Arc<PackedB>);

impl PackCache {
    /// `f32_tiles`: f32 GEMMs with enough rows run on AMX-BF16 tiles with f32 accuracy
    /// ([`crate::f32_tiles_available`]); bf16 products take precedence.
    pub(crate) fn new(bf16: bool, f32_tiles: bool) -> Self {
        PackCache { bf16, f32_tiles: f32_tiles && !bf16, ..Default::default() }
    }

    /// Whether f32 GEMMs with enough rows run on AMX tiles.
    pub(crate) fn f32_tiles(&self) -> bool {
        self.f32_tiles
    }

    /// `w` packed for a GEMM of `rows` rows (None: unknown).
    fn get(&self, w: &Arc<Tensor>, transposed: bool, rows: Option<usize>) -> Result<Arc<PackedB>> {
        self.get_concat(std::slice::from_ref(w), transposed, rows)
    }

    /// `[w0 | w1 | ...]`: 2-d weights with the same rows, side by side (`transposed`: the
    /// weights are `[n, k]`, stacked by rows), for a GEMM of `rows` rows.
    fn get_concat(&self, ws: &[Arc<Tensor>], transposed: bool, rows: Option<usize>) -> Result<Arc<PackedB>> {
        let tiles = self.f32_tiles && rows.is_some_and(tiles_pay);
        let key = (ws.iter().map(|w| Arc::as_ptr(w) as usize).collect(), transposed, tiles);
        let mut map = self.f32s.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = map.get(&key) {
            return Ok(p.clone());
        }
        let mut packed = PackedB::empty(slimnn_kernels::cpu::tier())?;
        let joined;
        let (data, k, n, ld, transposed) = match ws {
            [w] if transposed => (w.as_slice::<f32>()?, w.shape()[1], w.shape()[0], w.shape()[1], true),
            [w] => (w.as_slice::<f32>()?, w.shape()[0], w.shape()[1], w.shape()[1], false),
            _ => {
                let (k, n);
                (joined, k, n) = side_by_side::<f32>(ws)?;
                (&joined[..], k, n, n, false)
            }
        };
        match (transposed, self.bf16, tiles) {
            (false, true, _) => packed.pack_bf16(data, k, n, ld)?,
            (true, true, _) => packed.pack_transposed_bf16(data, k, n, ld)?,
            (false, false, true) => packed.pack_bf16x6(data, k, n, ld)?,
            (true, false, true) => packed.pack_transposed_bf16x6(data, k, n, ld)?,
            (false, false, false) => packed.pack(data, k, n, ld)?,
            (true, false, false) => packed.pack_transposed(data, k, n, ld)?,
        }
        let p = Arc::new(packed);
        map.insert(key, (ws.to_vec(), p.clone()));
        Ok(p)
    }
}

struct Group {
    members: Vec<NodeId>,
    kernel: Kernel,
    inputs: Vec<OutletId>,
    fusion: Fusion,
    /// The output's shape when it is not its outlet's (a fused QKV projection).
    output_shape: Option<Vec<usize>>,
}

struct Ctx<'a> {
    g: &'a Graph,
    readers: HashMap<OutletId, Vec<(NodeId, usize)>>,
    outputs: HashSet<OutletId>,
    taken: HashSet<NodeId>,
    /// Products in bf16 (`Precision::Bf16` on a host with AVX-512 BF16).
    bf16: bool,
    /// Attention's products in int8 where the host's kernels take the head size
    /// (`RuntimeConfig::int8_attention`).
    int8_attention: bool,
}

fn out0(n: NodeId) -> OutletId {
    OutletId::new(n, 0)
}

impl Ctx<'_> {
    fn op(&self, o: OutletId) -> &Op {
        &self.g.node(o.node).op
    }
    fn shape(&self, o: OutletId) -> Option<Vec<usize>> {
        self.g.fact(o).known_shape()
    }
    fn is_f32(&self, o: OutletId) -> bool {
        self.g.fact(o).dtype == DType::F32
    }
    fn konst(&self, o: OutletId) -> Option<&Arc<Tensor>> {
        self.g.fact(o).konst.as_ref()
    }
    /// The only reader of `o`, if `o` is read once, is not a graph output, and the reader is
    /// not already part of a fusion.
    fn sole_reader(&self, o: OutletId) -> Option<NodeId> {
        match self.readers.get(&o).map(Vec::as_slice) {
            Some([(n, _)]) if !self.outputs.contains(&o) && !self.taken.contains(n) => Some(*n),
            _ => None,
        }
    }
    fn scalar(&self, o: OutletId) -> Option<f32> {
        let t = self.konst(o)?;
        (t.len() == 1 && t.dtype().is_float()).then(|| t.to_f64_vec()[0] as f32)
    }
    /// `(other operand)` when node `n` is `Binary(op)` reading `o`.
    fn binary_other(&self, n: NodeId, o: OutletId, op: BinaryOp) -> Option<OutletId> {
        let node = self.g.node(n);
        if node.op != Op::Binary(Binary(op)) {
            return None;
        }
        match (node.inputs[0] == o, node.inputs[1] == o) {
            (true, false) => Some(node.inputs[1]),
            (false, true) if matches!(op, BinaryOp::Add | BinaryOp::Mul) => Some(node.inputs[0]),
            _ => None,
        }
    }
    fn names(&self, ids: &[NodeId]) -> Vec<String> {
        ids.iter().map(|&i| self.g.node(i).name.clone()).collect()
    }
}

/// `act(x · W + bias) + residual` starting at a MatMul (or Gemm) with a constant 2-d weight.
fn match_gemm(c: &Ctx, id: NodeId, packs: &PackCache) -> Result<Option<Group>> {
    let node = c.g.node(id);
    // Rows of the product: every dimension of A but the last.
    let rows = |a: OutletId| c.shape(a).map(|s| s[..s.len().saturating_sub(1)].iter().product::<usize>());
    let (a, packed, mut bias): (OutletId, Arc<PackedB>, Option<Arc<[f32]>>) = match &node.op {
        Op::MatMul(MatMul) => {
            let (a, w) = (node.inputs[0], node.inputs[1]);
            let Some(wt) = c.konst(w) else { return Ok(None) };
            if !c.is_f32(a) || wt.dtype() != DType::F32 || wt.rank() != 2 || c.g.fact(a).rank() < 1 {
                return Ok(None);
            }
            (a, packs.get(wt, false, rows(a))?, None)
        }
        Op::Gemm(Gemm { alpha, beta, trans_a: false, trans_b }) if *alpha == 1.0 => {
            let (a, w) = (node.inputs[0], node.inputs[1]);
            let Some(wt) = c.konst(w) else { return Ok(None) };
            if !c.is_f32(a) || wt.dtype() != DType::F32 {
                return Ok(None);
            }
            let n = if *trans_b { wt.shape()[0] } else { wt.shape()[1] };
            let bias = match node.inputs.get(2) {
                None => None,
                Some(&b) => match c.konst(b) {
                    Some(t)
                        if *beta == 1.0 && t.len() == n && t.dtype() == DType::F32 && t.shape().last() == Some(&n) =>
                    {
                        Some(Arc::from(t.as_slice::<f32>()?))
                    }
                    _ => return Ok(None),
                },
            };
            (a, packs.get(wt, *trans_b, rows(a))?, bias)
        }
        _ => return Ok(None),
    };
    let n = packed.n();
    let mut members = vec![id];
    let mut end = out0(id);
    let mut notes = vec![];
    if bias.is_none() {
        if let Some(r) = c.sole_reader(end) {
            if let Some(b) = c.binary_other(r, end, BinaryOp::Add) {
                if let Some(t) = c.konst(b).filter(|t| t.len() == n && t.dtype() == DType::F32) {
                    bias = Some(Arc::from(t.as_slice::<f32>()?));
                    members.push(r);
                    end = out0(r);
                }
            }
        }
    }
    let mut inputs = vec![a];
    let (activation, residual) = fuse_tail(c, end, &mut members, &mut inputs, &mut notes);
    let kernel = Kernel::Gemm { packed, bias, activation, residual };
    let kind = kernel.name();
    let note = if notes.is_empty() { String::new() } else { notes.join("; ") };
    let fusion = Fusion { kind, nodes: c.names(&members), note };
    Ok(Some(Group { fusion, members, kernel, inputs, output_shape: None }))
}

/// Activation then residual Add after `end`, each taken when it is the sole reader; extends
/// `members` and `inputs` (the residual operand) and returns what was fused.
fn fuse_tail(
    c: &Ctx,
    mut end: OutletId,
    members: &mut Vec<NodeId>,
    inputs: &mut Vec<OutletId>,
    notes: &mut Vec<String>,
) -> (Activation, bool) {
    let mut activation = Activation::None;
    if let Some(r) = c.sole_reader(end) {
        let act = match &c.g.node(r).op {
            Op::Unary(Unary(UnaryOp::Relu)) => Some(Activation::Relu),
            Op::Unary(Unary(UnaryOp::Gelu { tanh: false })) => Some(Activation::GeluErf),
            Op::Unary(Unary(UnaryOp::Gelu { tanh: true })) => Some(Activation::GeluTanh),
            Op::Clip(Clip) => {
                let ins = &c.g.node(r).inputs;
                match (c.scalar(ins[1]), c.scalar(ins[2])) {
                    (Some(lo), Some(hi)) if lo <= hi => Some(Activation::Clip { min: lo, max: hi }),
                    _ => {
                        notes.push("clip bounds are not constant".to_string());
                        None
                    }
                }
            }
            _ => None,
        };
        if let Some(act) = act {
            activation = act;
            members.push(r);
            end = out0(r);
        }
    }
    let mut residual = false;
    if let Some(r) = c.sole_reader(end) {
        if let Some(other) = c.binary_other(r, end, BinaryOp::Add) {
            if c.is_f32(other) && c.shape(other).is_some() && c.shape(other) == c.shape(end) && c.konst(other).is_none()
            {
                residual = true;
                inputs.push(other);
                members.push(r);
            }
        }
    }
    (activation, residual)
}

/// `act(Conv(x, W, b)) + residual` for f32 NCHW 2-d convolutions with constant weights.
fn match_conv(c: &Ctx, id: NodeId) -> Result<Option<Group>> {
    let Some(mut kernel) = prepare_conv(c, id)? else { return Ok(None) };
    let mut members = vec![id];
    let mut inputs = vec![c.g.node(id).inputs[0]];
    let mut notes = vec![];
    let (activation, residual) = fuse_tail(c, out0(id), &mut members, &mut inputs, &mut notes);
    kernel.activation = activation;
    kernel.residual = residual;
    let end = out0(*members.last().expect("the conv is a member"));
    if let Some((dw, dw_members)) = match_fused_depthwise(c, end, &kernel)? {
        kernel.then = Some(Arc::new(dw));
        members.extend(dw_members);
    }
    let kernel = Kernel::Conv(Arc::new(kernel));
    let fusion = Fusion { kind: kernel.name(), nodes: c.names(&members), note: notes.join("; ") };
    Ok(Some(Group { fusion, members, kernel, inputs, output_shape: None }))
}

/// The kernel of Conv node `id` when it is an f32 NCHW 2-d convolution with constant weights
/// (and bias) that `ConvKernel` runs.
fn prepare_conv(c: &Ctx, id: NodeId) -> Result<Option<ConvKernel>> {
    let node = c.g.node(id);
    let Op::Conv(Conv { attrs }) = &node.op else { return Ok(None) };
    let (x, y) = (node.inputs[0], out0(id));
    let Some(wt) = node.inputs.get(1).and_then(|&w| c.konst(w)) else { return Ok(None) };
    let bias = match node.inputs.get(2) {
        None => None,
        Some(&b) => match c.konst(b) {
            Some(t) if t.dtype() == DType::F32 => Some(t.as_slice::<f32>()?),
            _ => return Ok(None),
        },
    };
    let (Some(xs), Some(ys)) = (c.shape(x), c.shape(y)) else { return Ok(None) };
    if !c.is_f32(x) || !c.is_f32(y) || wt.dtype() != DType::F32 {
        return Ok(None);
    }
    Ok(ConvKernel::prepare(attrs, &xs, wt.shape(), wt.as_slice::<f32>()?, bias, &ys))
}

/// A depthwise convolution (and its activation) that is the sole reader of pointwise
/// convolution `pw`'s output `end`, when the two can run fused and the output is large enough
/// for it to pay (`ConvKernel::fuses_with`, `ConvKernel::fusing_pays`).
fn match_fused_depthwise(c: &Ctx, end: OutletId, pw: &ConvKernel) -> Result<Option<(ConvKernel, Vec<NodeId>)>> {
    let Some(r) = c.sole_reader(end) else { return Ok(None) };
    if c.g.node(r).inputs.first() != Some(&end) {
        return Ok(None);
    }
    let Some(mut dw) = prepare_conv(c, r)? else { return Ok(None) };
    let (mut members, mut inputs, mut notes) = (vec![r], vec![], vec![]);
    let (activation, residual) = fuse_tail(c, out0(r), &mut members, &mut inputs, &mut notes);
    dw.activation = activation;
    dw.residual = residual;
    Ok((pw.fuses_with(&dw) && pw.fusing_pays()).then_some((dw, members)))
}

/// Multi-head attention from its exported pattern, anchored at the Softmax:
/// `Reshape(Transpose(Softmax(Q·Kᵀ * scale + mask) · V))` with Q, K, V split into heads by
/// Reshape + Transpose of `[batch, seq, heads * head_dim]` projections.
fn match_attention(c: &Ctx, sm: NodeId) -> Option<Group> {
    let node = c.g.node(sm);
    let Op::Softmax(Softmax { axis, .. }) = node.op else { return None };
    let x = node.inputs[0];
    let [b, h, sq, sk] = <[usize; 4]>::try_from(c.shape(x)?).ok()?;
    if !(axis == -1 || axis == 3) || !c.is_f32(x) {
        return None;
    }
    let mut members = vec![sm];
    // Optional additive mask.
    let (mut y, mut mask) = (x, None);
    if let Op::Binary(Binary(BinaryOp::Add)) = c.op(x) {
        let ins = c.g.node(x.node).inputs.clone();
        let scores_side = ins.iter().position(|&i| leads_to_matmul(c, i))?;
        let m = ins[1 - scores_side];
        let ms = c.shape(m)?;
        if ms.len() > 4 || !c.is_f32(m) {
            return None;
        }
        let mut m4 = [1usize; 4];
        m4[4 - ms.len()..].copy_from_slice(&ms);
        if m4[3] != sk || m4.iter().zip([b, h, sq, sk]).any(|(&d, t)| d != 1 && d != t) {
            return None;
        }
        c.sole_reader(x).filter(|&r| r == sm)?;
        members.push(x.node);
        mask = Some((m, m4));
        y = ins[scores_side];
    }
    // Optional scale.
    let mut scale = 1.0f32;
    match c.op(y) {
        Op::Binary(Binary(BinaryOp::Div)) | Op::Binary(Binary(BinaryOp::Mul)) => {
            let ins = &c.g.node(y.node).inputs;
            let is_div = matches!(c.op(y), Op::Binary(Binary(BinaryOp::Div)));
            let (s, k) = if let Some(k) = c.scalar(ins[1]) {
                (ins[0], k)
            } else if !is_div {
                (ins[1], c.scalar(ins[0])?)
            } else {
                return None;
            };
            scale = if is_div { 1.0 / k } else { k };
            c.sole_reader(y)?;
            members.push(y.node);
            y = s;
        }
        _ => {}
    }
    if c.g.node(y.node).op != Op::MatMul(MatMul) {
        return None;
    }
    c.sole_reader(y)?;
    members.push(y.node);
    let (q4, k4t) = (c.g.node(y.node).inputs[0], c.g.node(y.node).inputs[1]);
    let (qp, qm) = split_heads(c, q4, &[0, 2, 1, 3], h)?;
    let (kp, km) = split_heads(c, k4t, &[0, 2, 3, 1], h).or_else(|| {
        // Transpose(K4, [0,1,3,2]) of K4 = Transpose(Reshape(kp), [0,2,1,3]).
        let t = k4t;
        if c.op(t) != &Op::Transpose(Transpose { perm: Some(vec![0, 1, 3, 2]) }) {
            return None;
        }
        c.sole_reader(t)?;
        let (kp, mut km) = split_heads(c, c.g.node(t.node).inputs[0], &[0, 2, 1, 3], h)?;
        km.push(t.node);
        Some((kp, km))
    })?;
    let probs = out0(sm);
    let pv = c.sole_reader(probs)?;
    if c.g.node(pv).op != Op::MatMul(MatMul) || c.g.node(pv).inputs[0] != probs {
        return None;
    }
    let (vp, vm) = split_heads(c, c.g.node(pv).inputs[1], &[0, 2, 1, 3], h)?;
    let t = c.sole_reader(out0(pv))?;
    if c.g.node(t).op != Op::Transpose(Transpose { perm: Some(vec![0, 2, 1, 3]) }) {
        return None;
    }
    let r = c.sole_reader(out0(t))?;
    if !matches!(c.g.node(r).op, Op::Reshape(Reshape { .. })) {
        return None;
    }
    let d = c.shape(qp)?[2] / h;
    if c.shape(out0(r))? != vec![b, sq, h * d]
        || c.shape(kp)? != vec![b, sk, h * d]
        || c.shape(vp)? != vec![b, sk, h * d]
    {
        return None;
    }
    members.extend(qm);
    members.extend(km);
    members.extend(vm);
    members.extend([pv, t, r]);
    let mut inputs = vec![qp, kp, vp];
    let mask_shape = mask.map(|(m, m4)| {
        inputs.push(m);
        m4
    });
    let products = if c.int8_attention && slimnn_kernels::attention::int8_native(d) {
        AttnProducts::Int8
    } else if c.bf16 {
        AttnProducts::Bf16
    } else {
        AttnProducts::F32
    };
    let kernel = Kernel::Attention { heads: h, head_dim: d, scale, mask_shape, fused_qkv: false, products };
    let note = format!("{h} heads of {d}, scale {scale}, mask {mask_shape:?}");
    let fusion = Fusion { kind: "attention".into(), nodes: c.names(&members), note };
    Some(Group { fusion, members, kernel, inputs, output_shape: None })
}

/// The Q, K and V projections of an attention group as one GEMM when they are `x · W (+ b)`
/// of the same `x` with constant weights: one pass over `x` and a third of the GEMM calls
/// (threads split one wide GEMM better than three narrow ones). Returns the projection group
/// and rewrites the attention group to read Q, K and V from its output.
fn match_qkv(c: &Ctx, att: &mut Group, packs: &PackCache) -> Result<Option<Group>> {
    let Kernel::Attention { fused_qkv: false, .. } = att.kernel else { return Ok(None) };
    let is_projection = |o: OutletId| matches!(c.op(o), Op::MatMul(MatMul) | Op::DynamicRowQuantMatMul(_));
    let mut x = None;
    let (mut weights, mut biases, mut members, mut row_scales) = (vec![], vec![], vec![], vec![]);
    let mut quantized = None;
    for &p in &att.inputs[..3] {
        // Nothing but the attention may read a projection that stops existing on its own.
        if c.sole_reader(p).is_none() {
            return Ok(None);
        }
        // `p` is either the projection or a bias Add right after it.
        let (mm, bias) = if is_projection(p) {
            (p.node, None)
        } else if let Op::Binary(Binary(BinaryOp::Add)) = c.op(p) {
            let ins = &c.g.node(p.node).inputs;
            let Some(side) = ins.iter().position(|&i| is_projection(i)) else { return Ok(None) };
            let Some(b) = c.konst(ins[1 - side]) else { return Ok(None) };
            if c.sole_reader(ins[side]) != Some(p.node) || b.dtype() != DType::F32 || b.rank() != 1 {
                return Ok(None);
            }
            members.push(p.node);
            (ins[side].node, Some(b.as_slice::<f32>()?))
        } else {
            return Ok(None);
        };
        // All three f32 MatMuls, or all three per-token int8 projections.
        let (input, w) = match quant::row_quant_weight(c, mm) {
            Some((input, w, scales)) if quantized != Some(false) => {
                quantized = Some(true);
                row_scales.extend(scales);
                (input, w)
            }
            None if quantized != Some(true) && c.op(out0(mm)) == &Op::MatMul(MatMul) => {
                quantized = Some(false);
                let ins = &c.g.node(mm).inputs;
                match c.konst(ins[1]) {
                    Some(w) if w.dtype() == DType::F32 && w.rank() == 2 => (ins[0], w.clone()),
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        if !c.is_f32(input) || x.is_some_and(|x| x != input) {
            return Ok(None);
        }
        if bias.is_some_and(|b| b.len() != w.shape()[1])
            || weights.first().is_some_and(|f: &Arc<Tensor>| f.shape() != w.shape())
        {
            return Ok(None);
        }
        x = Some(input);
        members.push(mm);
        biases.push(bias.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0; w.shape()[1]]));
        weights.push(w);
    }
    let (Some(x), Some(xs)) = (x, x.and_then(|x| c.shape(x))) else { return Ok(None) };
    let n = weights[0].shape()[1];
    if xs.len() != 3 || xs.last() != Some(&weights[0].shape()[0]) {
        return Ok(None);
    }
    let bias: Arc<[f32]> = biases.concat().into();
    let kernel = if quantized == Some(true) {
        quant::row_quant_concat(&weights, row_scales, bias, &packs.quant)?
    } else {
        let packed = packs.get_concat(&weights, false, Some(xs[0] * xs[1]))?;
        Kernel::Gemm { packed, bias: Some(bias), activation: Activation::None, residual: false }
    };
    let out = out0(*members.iter().max().expect("three projections"));
    let Kernel::Attention { fused_qkv, .. } = &mut att.kernel else { unreachable!("checked above") };
    *fused_qkv = true;
    att.inputs.splice(..3, [out]);
    att.fusion.note.push_str("; Q, K, V from one fused projection");
    let kind = if quantized == Some(true) { "int8 per-token gemm+bias (fused QKV)" } else { "gemm+bias (fused QKV)" };
    let fusion = Fusion { kind: kind.into(), nodes: c.names(&members), note: String::new() };
    Ok(Some(Group { fusion, members, kernel, inputs: vec![x], output_shape: Some(vec![xs[0], xs[1], 3 * n]) }))
}

fn leads_to_matmul(c: &Ctx, o: OutletId) -> bool {
    match c.op(o) {
        Op::MatMul(_) => true,
        Op::Binary(Binary(BinaryOp::Div | BinaryOp::Mul)) => {
            c.g.node(o.node).inputs.iter().any(|&i| matches!(c.op(i), Op::MatMul(_)))
        }
        _ => false,
    }
}

/// `Transpose(Reshape(p, [b, s, heads, d]), perm)` → `(p, [reshape, transpose])` when `p` is
/// `[b, s, heads * d]`.
fn split_heads(c: &Ctx, o: OutletId, perm: &[usize], heads: usize) -> Option<(OutletId, Vec<NodeId>)> {
    if c.op(o) != &Op::Transpose(Transpose { perm: Some(perm.to_vec()) }) {
        return None;
    }
    c.sole_reader(o)?;
    let r = c.g.node(o.node).inputs[0];
    if !matches!(c.op(r), Op::Reshape(_)) {
        return None;
    }
    c.sole_reader(r)?;
    let p = c.g.node(r.node).inputs[0];
    let ps = c.shape(p)?;
    let rs = c.shape(r)?;
    if ps.len() != 3 || rs.len() != 4 || rs[0] != ps[0] || rs[1] != ps[1] || rs[2] != heads || rs[2] * rs[3] != ps[2] {
        return None;
    }
    Some((p, vec![r.node, o.node]))
}

/// A single node on a fast kernel when its shapes and dtypes allow.
fn single_kernel(c: &Ctx, id: NodeId) -> Result<Option<Kernel>> {
    let node = c.g.node(id);
    if let Some(k) = crate::blockq::lower(c.g, id) {
        return Ok(Some(Kernel::BlockQ(k)));
    }
    let ins = &node.inputs;
    let all_f32 = ins.iter().all(|&i| c.is_f32(i)) && c.is_f32(out0(id));
    Ok(match &node.op {
        Op::LayerNorm(LayerNorm { axis, epsilon, num_outputs: 1 }) if all_f32 => {
            let Some(shape) = c.shape(ins[0]) else { return Ok(None) };
            let n = *shape.last().unwrap_or(&0);
            let last = *axis == -1 || *axis == shape.len() as i64 - 1;
            let scale = c.konst(ins[1]).filter(|t| t.len() == n);
            let bias = match ins.get(2) {
                Some(&b) => {
                    c.konst(b).filter(|t| t.len() == n).map(|t| t.as_slice::<f32>().map(Arc::from)).transpose()?
                }
                None => Some(Arc::from(vec![0f32; n])),
            };
            // Parameters passed as inputs: scale and bias read at run time.
            let runtime_params = ins[1..].iter().all(|&p| c.shape(p).is_some_and(|s| s.iter().product::<usize>() == n));
            match (last, scale, bias) {
                (true, Some(s), Some(b)) => {
                    Some(Kernel::LayerNorm { scale: Arc::from(s.as_slice::<f32>()?), bias: b, epsilon: *epsilon })
                }
                (true, _, _) if runtime_params => Some(Kernel::LayerNormDyn { epsilon: *epsilon }),
                _ => None,
            }
        }
        Op::Softmax(Softmax { axis, .. }) if all_f32 => {
            let rank = c.g.fact(ins[0]).rank() as i64;
            (*axis == -1 || *axis == rank - 1).then_some(Kernel::Softmax)
        }
        Op::Unary(Unary(u)) if all_f32 => match u {
            UnaryOp::Relu => Some(Kernel::Activation(Activation::Relu)),
            UnaryOp::Gelu { tanh: false } => Some(Kernel::Activation(Activation::GeluErf)),
            UnaryOp::Gelu { tanh: true } => Some(Kernel::Activation(Activation::GeluTanh)),
            UnaryOp::Erf => Some(Kernel::Unary(FastUnary::Erf)),
            UnaryOp::Exp => Some(Kernel::Unary(FastUnary::Exp)),
            UnaryOp::Tanh => Some(Kernel::Unary(FastUnary::Tanh)),
            UnaryOp::Sigmoid => Some(Kernel::Unary(FastUnary::Sigmoid)),
            _ => None,
        },
        Op::Binary(Binary(op)) if all_f32 => {
            let fast = match op {
                BinaryOp::Add => FastBinary::Add,
                BinaryOp::Sub => FastBinary::Sub,
                BinaryOp::Mul => FastBinary::Mul,
                BinaryOp::Div => FastBinary::Div,
                _ => return Ok(None),
            };
            let (Some(a), Some(b), Some(o)) = (c.shape(ins[0]), c.shape(ins[1]), c.shape(out0(id))) else {
                return Ok(None);
            };
            if a != o {
                return Ok(strided_broadcast(&a, &b, &o).map(|bc| Kernel::BinaryStrided(fast, Arc::new(bc))));
            }
            let bl: usize = b.iter().product();
            // `b` without its leading 1s, against `a`'s trailing dims.
            let lead = b.iter().take_while(|&&d| d == 1).count();
            let core = &b[lead..];
            let bc = if b == a {
                Broadcast::Same
            } else if bl == 1 {
                Broadcast::Scalar
            } else if b.len() <= a.len() && a.ends_with(core) {
                Broadcast::Repeat
            } else if b.len() == a.len() && b.last() == Some(&1) && b[..b.len() - 1] == a[..a.len() - 1] {
                Broadcast::PerRow(*a.last().unwrap_or(&1))
            } else {
                return Ok(strided_broadcast(&a, &b, &o).map(|bc| Kernel::BinaryStrided(fast, Arc::new(bc))));
            };
            Some(Kernel::Binary(fast, bc))
        }
        // Values under a new shape; a sum over size-1 axes (autodiff's un-broadcast of an
        // operand that was not broadcast) is one too.
        Op::Reshape(_) | Op::Squeeze(_) | Op::Unsqueeze(_) | Op::Flatten(_) | Op::Identity(_)
            if c.shape(out0(id)).is_some() =>
        {
            Some(Kernel::View)
        }
        Op::Reduce(Reduce { op: ReduceOp::Sum | ReduceOp::Mean | ReduceOp::Max | ReduceOp::Min, .. })
            if all_f32
                && c.shape(ins[0])
                    .zip(c.shape(out0(id)))
                    .is_some_and(|(a, o)| a.iter().product::<usize>() == o.iter().product::<usize>()) =>
        {
            Some(Kernel::View)
        }
        Op::Transpose(Transpose { perm }) if all_f32 => {
            let (Some(xs), Some(os)) = (c.shape(ins[0]), c.shape(out0(id))) else { return Ok(None) };
            let r = xs.len();
            let perm: Vec<usize> = perm.clone().unwrap_or_else(|| (0..r).rev().collect());
            if perm.len() != r || r == 0 || os.contains(&0) {
                return Ok(None);
            }
            let xstrides = slimnn_tensor::strides_of(&xs);
            // Output dim d reads input dim perm[d]; merge output dims that stay adjacent.
            let (mut dims, mut strides): (Vec<usize>, Vec<usize>) = (vec![], vec![]);
            for d in (0..r).filter(|&d| os[d] != 1) {
                let st = xstrides[perm[d]];
                match dims.len().checked_sub(1) {
                    Some(l) if strides[l] == os[d] * st => {
                        dims[l] *= os[d];
                        strides[l] = st;
                    }
                    _ => {
                        dims.push(os[d]);
                        strides.push(st);
                    }
                }
            }
            if dims.is_empty() {
                (dims, strides) = (vec![1], vec![1]);
            }
            let b_strides = vec![0; dims.len()];
            Some(Kernel::Transpose(Arc::new(StridedBroadcast { dims, a_strides: strides, b_strides })))
        }
        Op::Reduce(Reduce { op: ReduceOp::Sum, axes: Some(axes), noop_with_empty_axes: false, .. })
            if all_f32 && ins.len() == 1 && !axes.is_empty() =>
        {
            let Some(shape) = c.shape(ins[0]) else { return Ok(None) };
            let rank = shape.len() as i64;
            let mut ax: Vec<usize> = axes.iter().map(|&a| if a < 0 { a + rank } else { a } as usize).collect();
            ax.sort_unstable();
            ax.dedup();
            // One run of adjacent axes: a middle-axis sum.
            let contiguous = ax.windows(2).all(|w| w[1] == w[0] + 1) && ax.last().is_some_and(|&l| l < shape.len());
            if !contiguous {
                return Ok(None);
            }
            let len = ax.iter().map(|&a| shape[a]).product();
            let inner = shape[ax[ax.len() - 1] + 1..].iter().product();
            Some(Kernel::ReduceSum { len, inner })
        }
        Op::Conv(Conv { attrs }) if all_f32 => {
            let (Some(xs), Some(ws), Some(ys)) = (c.shape(ins[0]), c.shape(ins[1]), c.shape(out0(id))) else {
                return Ok(None);
            };
            conv_train(attrs, &xs, &ws, &ys, ConvTrainOp::Forward { bias: ins.len() == 3 })
        }
        Op::ConvGradInput(ConvGradInput(attrs)) if all_f32 && c.shape(ins[2]) == c.shape(out0(id)) => {
            let (Some(dys), Some(ws), Some(xs)) = (c.shape(ins[0]), c.shape(ins[1]), c.shape(ins[2])) else {
                return Ok(None);
            };
            conv_train(attrs, &xs, &ws, &dys, ConvTrainOp::GradInput)
        }
        Op::ConvGradWeight(ConvGradWeight(attrs)) if all_f32 && c.shape(ins[2]) == c.shape(out0(id)) => {
            let (Some(xs), Some(dys), Some(ws)) = (c.shape(ins[0]), c.shape(ins[1]), c.shape(ins[2])) else {
                return Ok(None);
            };
            conv_train(attrs, &xs, &ws, &dys, ConvTrainOp::GradWeight)
        }
        Op::Pool(pool) if all_f32 => {
            let (Some(xs), Some(ys)) = (c.shape(ins[0]), c.shape(out0(id))) else { return Ok(None) };
            crate::pool::PoolKernel::prepare(pool, &xs, &ys, false).map(|k| Kernel::Pool(Arc::new(k)))
        }
        Op::PoolGrad(PoolGrad(pool)) if all_f32 && c.shape(ins[0]) == c.shape(out0(id)) => {
            let (Some(xs), Some(ys)) = (c.shape(ins[0]), c.shape(ins[1])) else { return Ok(None) };
            crate::pool::PoolKernel::prepare(pool, &xs, &ys, true).map(|k| Kernel::Pool(Arc::new(k)))
        }
        Op::GlobalPool(GlobalPool { max: false }) if all_f32 && c.g.fact(ins[0]).rank() >= 3 => {
            c.shape(ins[0]).map(|_| Kernel::GlobalAveragePool { channels_last: false })
        }
        Op::Gather(slimnn_ir::ops::Gather { axis: 0 }) => {
            let table = c.konst(ins[0]).filter(|t| t.dtype() == DType::F32 && t.rank() == 2);
            let i64_indices = c.g.fact(ins[1]).dtype == DType::I64;
            match table {
                Some(t) if i64_indices => Some(Kernel::Embedding { table: t.clone() }),
                None if i64_indices && c.is_f32(ins[0]) && c.shape(ins[0]).is_some_and(|s| s.len() == 2) => {
                    Some(Kernel::EmbeddingDyn)
                }
                _ => None,
            }
        }
        Op::UnaryGrad(UnaryGrad(u)) if all_f32 && c.shape(ins[0]) == c.shape(ins[1]) => match u {
            UnaryOp::Relu => Some(Kernel::ActivationGrad(GradActivation::Relu)),
            UnaryOp::Gelu { tanh: false } => Some(Kernel::ActivationGrad(GradActivation::GeluErf)),
            UnaryOp::Gelu { tanh: true } => Some(Kernel::ActivationGrad(GradActivation::GeluTanh)),
            UnaryOp::Tanh => Some(Kernel::ActivationGrad(GradActivation::Tanh)),
            UnaryOp::Sigmoid => Some(Kernel::ActivationGrad(GradActivation::Sigmoid)),
            UnaryOp::Erf => Some(Kernel::ActivationGrad(GradActivation::Erf)),
            _ => None,
        },
        Op::SoftmaxGrad(SoftmaxGrad { axis, log }) if all_f32 && c.shape(ins[0]) == c.shape(ins[1]) => {
            let rank = c.g.fact(ins[0]).rank() as i64;
            (*axis == -1 || *axis == rank - 1).then_some(Kernel::SoftmaxGrad { log: *log })
        }
        Op::LayerNormGrad(LayerNormGrad { axis, epsilon }) if all_f32 && c.shape(ins[0]) == c.shape(ins[2]) => {
            let Some(shape) = c.shape(ins[0]) else { return Ok(None) };
            let rank = shape.len() as i64;
            let ax = if *axis < 0 { axis + rank } else { *axis };
            if !(0..rank).contains(&ax) {
                return Ok(None);
            }
            let n: usize = shape[ax as usize..].iter().product();
            let scale_n = c.shape(ins[1]).map(|s| s.iter().product::<usize>());
            (scale_n == Some(n) && n > 0).then_some(Kernel::LayerNormGrad { n, epsilon: *epsilon })
        }
        Op::GatherGrad(GatherGrad { axis: 0 })
            if c.is_f32(ins[2]) && c.is_f32(out0(id)) && c.g.fact(ins[1]).dtype == DType::I64 =>
        {
            let Some(shape) = c.shape(ins[0]) else { return Ok(None) };
            (!shape.is_empty()).then(|| Kernel::GatherGrad { inner: shape[1..].iter().product() })
        }
        _ => None,
    })
}

/// A `group == 1` 2-d convolution (or gradient) of a training graph on im2col + GEMM.
fn conv_train(
    attrs: &slimnn_ir::ops::ConvAttrs,
    x: &[usize],
    w: &[usize],
    y: &[usize],
    op: ConvTrainOp,
) -> Option<Kernel> {
    let (geom, _, group) = crate::conv::ConvGeom::resolve(attrs, x, w, y)?;
    (group == 1 && x[0] == y[0]).then(|| Kernel::ConvTrain(Arc::new(ConvTrainKernel { geom, op })))
}

/// `a` and `b` broadcast to `out` (numpy rules) as element strides per output dim, adjacent
/// dims merged where both operands step through them alike; `None` when they do not broadcast
/// to `out` or nothing is left to merge (no output).
fn strided_broadcast(a: &[usize], b: &[usize], out: &[usize]) -> Option<StridedBroadcast> {
    let r = out.len();
    if a.len() > r || b.len() > r || out.contains(&0) || r == 0 {
        return None;
    }
    let strides = |s: &[usize]| -> Option<Vec<usize>> {
        let mut st = vec![0; r];
        let mut acc = 1;
        for i in (0..s.len()).rev() {
            let o = r - s.len() + i;
            if s[i] != 1 && s[i] != out[o] {
                return None;
            }
            st[o] = if s[i] == 1 { 0 } else { acc };
            acc *= s[i];
        }
        Some(st)
    };
    let (sa, sb) = (strides(a)?, strides(b)?);
    let (mut dims, mut a_strides, mut b_strides) = (vec![], vec![], vec![]);
    for i in (0..r).filter(|&i| out[i] != 1) {
        // Dim i continues the previous one when each operand steps through the pair as one
        // run: contiguous (previous stride = dim x stride) or broadcast in both (0 = d x 0).
        match dims.len().checked_sub(1) {
            Some(l) if a_strides[l] == out[i] * sa[i] && b_strides[l] == out[i] * sb[i] => {
                dims[l] *= out[i];
                (a_strides[l], b_strides[l]) = (sa[i], sb[i]);
            }
            _ => {
                dims.push(out[i]);
                a_strides.push(sa[i]);
                b_strides.push(sb[i]);
            }
        }
    }
    if dims.is_empty() {
        (dims, a_strides, b_strides) = (vec![1], vec![1], vec![1]);
    }
    Some(StridedBroadcast { dims, a_strides, b_strides })
}

pub(crate) fn lower(g: &Graph, packs: &PackCache, int8_attention: bool) -> Result<Plan> {
    let mut c = Ctx {
        g,
        readers: g.consumers(),
        outputs: g.outputs().iter().map(|(_, o)| *o).collect(),
        taken: HashSet::new(),
        bf16: packs.bf16,
        int8_attention,
    };
    // Fusion groups, keyed by the node whose output they produce (their last member in
    // topological order, so every input is ready when the step runs).
    let mut groups: HashMap<NodeId, Group> = HashMap::new();
    let claim = |c: &mut Ctx, grp: Group, groups: &mut HashMap<NodeId, Group>| {
        let last = *grp.members.iter().max().expect("a group has members");
        c.taken.extend(grp.members.iter().copied());
        groups.insert(last, grp);
    };
    for id in 0..g.nodes().len() {
        if !c.taken.contains(&id) {
            if let Some(mut grp) = match_attention(&c, id) {
                if let Some(qkv) = match_qkv(&c, &mut grp, packs)? {
                    claim(&mut c, qkv, &mut groups);
                }
                claim(&mut c, grp, &mut groups);
            }
        }
    }
    // Quantized groups first: one may take a float MatMul that comes earlier in the graph (the
    // float product of its outlier channels).
    for id in 0..g.nodes().len() {
        if !c.taken.contains(&id) {
            if let Some(grp) = quant::match_group(&c, id, &packs.quant)? {
                claim(&mut c, grp, &mut groups);
            }
        }
    }
    for id in 0..g.nodes().len() {
        if !c.taken.contains(&id) {
            if let Some(grp) = match_gemm(&c, id, packs)? {
                claim(&mut c, grp, &mut groups);
            } else if let Some(grp) = match_conv(&c, id)? {
                claim(&mut c, grp, &mut groups);
            } else if let Some(grp) = matmul::match_matmul(&c, id) {
                claim(&mut c, grp, &mut groups);
            }
        }
    }

    let mut slot_of: HashMap<OutletId, Slot> = HashMap::new();
    let mut next = 0;
    let mut slot = |o: OutletId, slot_of: &mut HashMap<OutletId, Slot>| -> Slot {
        *slot_of.entry(o).or_insert_with(|| {
            next += 1;
            next - 1
        })
    };
    let mut plan = Plan {
        steps: vec![],
        slots: 0,
        inputs: vec![],
        outputs: vec![],
        consts: vec![],
        fusions: vec![],
        rewrites: vec![],
    };
    for &i in g.inputs() {
        plan.inputs.push(slot(out0(i), &mut slot_of));
    }
    for (id, node) in g.nodes().iter().enumerate() {
        if matches!(node.op, Op::Input(_)) {
            continue;
        }
        // Constants, and values the specialised shapes made constant (shape arithmetic).
        if node.outputs.iter().all(|f| f.konst.is_some()) && !c.taken.contains(&id) {
            for (s, f) in node.outputs.iter().enumerate() {
                let sl = slot(OutletId::new(id, s), &mut slot_of);
                plan.consts.push((sl, f.konst.clone().expect("checked above")));
            }
            continue;
        }
        if let Some(grp) = groups.remove(&id) {
            let inputs = grp.inputs.iter().map(|&o| slot(o, &mut slot_of)).collect();
            let output = slot(out0(id), &mut slot_of);
            plan.fusions.push(grp.fusion);
            plan.steps.push(Step {
                name: node.name.clone(),
                kernel: grp.kernel,
                inputs,
                outputs: vec![output],
                output_shapes: vec![grp
                    .output_shape
                    .unwrap_or_else(|| g.fact(out0(id)).known_shape().unwrap_or_default())],
                frees: vec![],
            });
            continue;
        }
        if c.taken.contains(&id) {
            continue;
        }
        let kernel = match quant::single_kernel(&c, id).map_or_else(|| single_kernel(&c, id), |k| Ok(Some(k)))? {
            Some(k) => k,
            None => Kernel::Ref(node.op.clone()),
        };
        let inputs = node.inputs.iter().map(|&o| slot(o, &mut slot_of)).collect();
        let outputs = (0..node.outputs.len()).map(|s| slot(OutletId::new(id, s), &mut slot_of)).collect();
        let output_shapes = node.outputs.iter().map(|f| f.known_shape().unwrap_or_default()).collect();
        plan.steps.push(Step { name: node.name.clone(), kernel, inputs, outputs, output_shapes, frees: vec![] });
    }
    for (_, o) in g.outputs() {
        plan.outputs.push(slot(*o, &mut slot_of));
    }
    plan.slots = next;
    crate::conv::channels_last(&mut plan)?;
    // Free each owned value after its last reader; graph outputs and constants are never freed.
    let keep: HashSet<Slot> = plan.outputs.iter().chain(plan.consts.iter().map(|(s, _)| s)).copied().collect();
    let mut last: HashMap<Slot, usize> = HashMap::new();
    for (i, s) in plan.steps.iter().enumerate() {
        for &x in s.inputs.iter().chain(&s.outputs) {
            last.insert(x, i);
        }
    }
    for (x, i) in last {
        if !keep.contains(&x) {
            plan.steps[i].frees.push(x);
        }
    }
    Ok(plan)
}
