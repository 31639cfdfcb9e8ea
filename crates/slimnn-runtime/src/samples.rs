//! Batches run one sample (or a few: [`samples_per_run`]) at a time where that gives the same
//! result and pays off.
//!
//! Running the whole network on one sample before the next keeps that sample's activations in
//! cache from layer to layer (layer by layer, a batch of 8 EfficientNet images writes 38 MB per
//! expanded layer, and a batch of 32 MiniLM sentences 25 MB per FFN, more than this CPU's L3),
//! and with several threads whole samples go to different threads, with nothing to synchronise
//! between steps. The price is reading every weight once per sample, so a batch stays whole
//! when a sample does little work per weight byte (an MLP, a transformer on a few tokens).
//! Only graphs where splitting gives the same result are split: the graph specialised for the
//! batch and for one sample are compared node by node (see [`splittable`]).

use crate::{Result, RuntimeError};
use slimnn_ir::{Fact, Graph, Op, OutletId};
use slimnn_tensor::{DType, Tensor};

/// What a value is in the batch-`n` graph, judged against the same value in the one-sample graph.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// The same in both (weights, and shape arithmetic that does not involve the batch).
    Same,
    /// The `n` samples' values one after the other along axis 0: `[n k, ..]` against `[k, ..]`
    /// with the same other dims (`k` = 1 but for flattened rows).
    Batched,
    /// Known values that depend on the batch size otherwise (a reshape target `[n, s, h, d]`):
    /// fine as a shape operand, where the one-sample graph uses its own value.
    ShapeOf,
}

/// Whether `g` (specialised for inputs whose axis 0 is `n` > 1) computes each of its `n`
/// samples the way `one` (the same graph specialised for one sample) computes a sample alone,
/// so a batch may run as `n` runs of `one`'s plan. Checked node by node, conservatively: the
/// two graphs must have the same nodes; values known at plan time are compared directly;
/// computed values must carry the samples on axis 0 and come from ops that keep samples apart.
/// Inputs that are also `Batched` are what the caller splits.
pub(crate) fn splittable(g: &Graph, one: &Graph, n: usize) -> bool {
    if g.nodes().len() != one.nodes().len() {
        return false;
    }
    let mut kinds: Vec<Vec<Kind>> = Vec::with_capacity(g.nodes().len());
    for (node, node1) in g.nodes().iter().zip(one.nodes()) {
        // Inputs differ in their declared shapes only.
        let same_op = matches!((&node.op, &node1.op), (Op::Input(_), Op::Input(_))) || node.op == node1.op;
        if !same_op || node.inputs != node1.inputs || node.outputs.len() != node1.outputs.len() {
            return false;
        }
        let kind_of = |o: &OutletId| kinds[o.node][o.slot];
        let pairs = || node.outputs.iter().zip(&node1.outputs);
        // Values known at plan time: compare them.
        if pairs().all(|(f, f1)| f.konst.is_some() && f1.konst.is_some()) {
            let out = pairs().map(|(f, f1)| known_kind(f, f1, n)).collect();
            kinds.push(out);
            continue;
        }
        let batched = pairs().all(|(f, f1)| batched_pair(f, f1, n));
        // Computed from unchanged values alone (a QDQ model's weight dequantization).
        if !matches!(node.op, Op::Input(_)) && node.inputs.iter().all(|o| kind_of(o) == Kind::Same) {
            if !pairs().all(|(f, f1)| f.shape == f1.shape) {
                return false;
            }
            kinds.push(vec![Kind::Same; node.outputs.len()]);
            continue;
        }
        if !batched || !per_sample(g, one, node, &kind_of, n) {
            return false;
        }
        kinds.push(vec![Kind::Batched; node.outputs.len()]);
    }
    // Outputs are stacked from one-sample outputs whose axis 0 is the sample.
    let stacks = |o: &OutletId| {
        kinds[o.node][o.slot] == Kind::Batched && one.fact(*o).known_shape().is_some_and(|s| s.first() == Some(&1))
    };
    g.outputs().iter().all(|(_, o)| stacks(o)) && pays_off(one)
}

/// Multiply-adds per weight byte, per sample, below which a batch stays whole: one sample then
/// does too little work per weight to make up for reading every weight once per sample (a
/// batch of MLP inputs, or a transformer on a few tokens, is better as one GEMM).
const MIN_MACS_PER_WEIGHT_BYTE: f64 = 16.0;

/// Whether one sample's work per weight byte ([`MIN_MACS_PER_WEIGHT_BYTE`]) is high enough.
fn pays_off(one: &Graph) -> bool {
    macs_per_weight_byte(one) >= MIN_MACS_PER_WEIGHT_BYTE
}

/// One sample's multiply-adds per byte of weights (infinite without weights).
fn macs_per_weight_byte(one: &Graph) -> f64 {
    let (mut macs, mut bytes) = (0f64, 0f64);
    let elems = |o: OutletId| one.fact(o).known_shape().map_or(0.0, |s| s.iter().product::<usize>() as f64);
    let dims = |o: OutletId| one.fact(o).known_shape().unwrap_or_default();
    // Weights dequantized at load are stored in their quantized type.
    let weight_bytes = |o: OutletId| {
        let dt = match &one.node(o.node).op {
            Op::DequantizeLinear(_) => one.fact(one.node(o.node).inputs[0]).dtype,
            _ => one.fact(o).dtype,
        };
        elems(o) * dt.size_of() as f64
    };
    // Nodes computed from constants alone (nodes are in topological order).
    let mut fixed = Vec::with_capacity(one.nodes().len());
    for node in one.nodes() {
        let known = node.outputs.iter().all(|f| f.konst.is_some());
        let from_constants = !matches!(node.op, Op::Input(_)) && node.inputs.iter().all(|i: &OutletId| fixed[i.node]);
        fixed.push(known || from_constants);
    }
    for node in one.nodes() {
        let Some(out) = node.outputs.first().and_then(|f| f.known_shape()) else { continue };
        let out_elems = out.iter().product::<usize>() as f64;
        let weight = match &node.op {
            Op::Conv(_) | Op::ConvInteger(_) => node.inputs.get(1),
            Op::QLinearConv(_) => node.inputs.get(3),
            Op::Gemm(_) | Op::MatMul(_) | Op::DynamicRowQuantMatMul(_) => node.inputs.get(1),
            _ => None,
        };
        let Some(&w) = weight else { continue };
        let wdims = dims(w);
        let constant = fixed[w.node];
        match &node.op {
            // Each output value takes (weights per output channel) multiply-adds.
            Op::Conv(_) | Op::ConvInteger(_) | Op::QLinearConv(_) => {
                let per_out = wdims.iter().skip(1).product::<usize>() as f64;
                macs += out_elems * per_out;
                bytes += weight_bytes(w);
            }
            _ if constant && wdims.len() == 2 => {
                let gemm_k = if matches!(&node.op, Op::Gemm(g) if g.trans_b) { wdims[1] } else { wdims[0] };
                macs += out_elems * gemm_k as f64;
                bytes += weight_bytes(w);
            }
            // Activation by activation (attention): work without weights.
            _ => macs += out_elems * dims(node.inputs[0]).last().copied().unwrap_or(0) as f64,
        }
    }
    if bytes == 0.0 {
        f64::INFINITY
    } else {
        macs / bytes
    }
}

fn known_kind(f: &Fact, f1: &Fact, n: usize) -> Kind {
    let (Some(t), Some(t1)) = (&f.konst, &f1.konst) else { return Kind::ShapeOf };
    // Constants of the source graph are shared by both specialisations: no byte comparison.
    if std::sync::Arc::ptr_eq(t, t1) {
        return Kind::Same;
    }
    let (b, b1) = (t.to_le_bytes(), t1.to_le_bytes());
    if t.shape() == t1.shape() && b == b1 {
        return Kind::Same;
    }
    // The one-sample value repeated over the batch (an all-ones mask built from the shape).
    if batched_pair(f, f1, n) && !b1.is_empty() && b.len() == n * b1.len() && b.chunks(b1.len()).all(|c| c == b1) {
        return Kind::Batched;
    }
    Kind::ShapeOf
}

/// `[n k, d..]` in the batch graph against `[k, d..]` in the one-sample graph: with row-major
/// layout, the batch value is then the `n` one-sample values one after the other.
fn batched_pair(f: &Fact, f1: &Fact, n: usize) -> bool {
    match (f.known_shape(), f1.known_shape()) {
        (Some(s), Some(s1)) => !s1.is_empty() && s.len() == s1.len() && s[0] == n * s1[0] && s[1..] == s1[1..],
        _ => false,
    }
}

/// Whether `node` (batched outputs, at least one input not `Same`) computes each sample from
/// that sample alone, given its inputs' kinds.
fn per_sample(g: &Graph, one: &Graph, node: &slimnn_ir::Node, kind_of: &dyn Fn(&OutletId) -> Kind, n: usize) -> bool {
    let kind = |i: usize| node.inputs.get(i).map(kind_of);
    let shape = |i: usize| node.inputs.get(i).and_then(|o| g.fact(*o).known_shape());
    let same = |i: usize| kind(i) == Some(Kind::Same);
    let rank = node.outputs.first().map_or(0, |f| f.shape.len());
    let in_rank = shape(0).map_or(0, |s| s.len()) as i64;
    // An operand of an element-wise op: a sample's own, or the same for all (broadcast over axis 0).
    let operand = |i: usize| match kind(i) {
        Some(Kind::Batched) => true,
        Some(Kind::Same) => shape(i).is_some_and(|s| s.len() < rank || s.first() == Some(&1)),
        _ => false,
    };
    let not_batch_axis = |axis: i64, rank: i64| axis != 0 && axis != -rank;
    let per_tensor_scale = |axis: i64| {
        same(1) && shape(1).is_some_and(|s| s.iter().product::<usize>() == 1) || not_batch_axis(axis, rank as i64)
    };
    // Batch-dependent known values only where the one-sample graph's own value is right: shapes.
    let shape_operand =
        |i: usize| matches!((&node.op, i), (Op::Reshape(_), 1) | (Op::Expand(_), 1) | (Op::Gather(_), 1));
    if (0..node.inputs.len()).any(|i| kind(i) == Some(Kind::ShapeOf) && !shape_operand(i)) {
        return false;
    }
    match &node.op {
        Op::Input(_) | Op::Identity(_) | Op::Cast(_) | Op::Unary(_) => true,
        // Axis 0 kept: both graphs' outputs carry the samples there (checked by the caller).
        Op::Reshape(_) | Op::Squeeze(_) | Op::Unsqueeze(_) | Op::Expand(_) => kind(0) == Some(Kind::Batched),
        Op::Transpose(t) => t.perm.as_ref().is_some_and(|p| p.first() == Some(&0)),
        Op::BatchNorm(_) | Op::Pool(_) | Op::GlobalPool(_) => (1..node.inputs.len()).all(same),
        Op::Conv(_) | Op::QLinearConv(_) | Op::ConvInteger(_) => {
            kind(0) == Some(Kind::Batched) && (1..node.inputs.len()).all(same)
        }
        Op::Binary(_) | Op::Clip(_) | Op::Where(_) => (0..node.inputs.len()).all(operand),
        Op::LayerNorm(l) => not_batch_axis(l.axis, in_rank) && (1..node.inputs.len()).all(operand),
        Op::Reduce(r) => {
            let axes = match &r.axes {
                Some(a) => Some(a.clone()),
                None => node
                    .inputs
                    .get(1)
                    .and_then(|o| g.fact(*o).konst.as_ref())
                    .map(|t| t.to_f64_vec().into_iter().map(|v| v as i64).collect::<Vec<_>>()),
            };
            axes.is_some_and(|a| !a.is_empty() && a.iter().all(|&x| not_batch_axis(x, in_rank)))
        }
        Op::QuantizeLinear(q) => per_tensor_scale(q.axis) && (1..node.inputs.len()).all(same),
        Op::DequantizeLinear(q) => per_tensor_scale(q.axis) && (1..node.inputs.len()).all(same),
        Op::Flatten(f) => f.axis != 0,
        Op::Softmax(s) => not_batch_axis(s.axis, rank as i64),
        Op::Concat(c) => not_batch_axis(c.axis, rank as i64) && (0..node.inputs.len()).all(operand),
        // A table looked up with each sample's indices.
        // Fixed channels of each sample (outlier channels kept in float).
        Op::Gather(ga) if not_batch_axis(ga.axis, in_rank) => kind(0) == Some(Kind::Batched) && same(1),
        Op::Gather(ga) if ga.axis != 0 => false,
        Op::Gather(_) => match (kind(0), kind(1)) {
            (Some(Kind::Same), Some(Kind::Batched)) => true,
            // Rows of flattened samples picked by computed indices (PyTorch's export of
            // `mask[:, None, None, :]`): each sample's indices must point into its own rows.
            (Some(Kind::Batched), Some(Kind::ShapeOf)) => own_rows(g, one, node, n),
            _ => false,
        },
        Op::GatherBlockQuantized(_) => same(0) && kind(1) == Some(Kind::Batched) && (2..node.inputs.len()).all(same),
        // Activations times constant weights; activation by activation (attention) when both
        // carry the samples on axis 0 as a batch dim.
        Op::Gemm(gm) => !gm.trans_a && kind(0) == Some(Kind::Batched) && (1..node.inputs.len()).all(same),
        Op::MatMul(_) => match (kind(0), kind(1)) {
            (Some(Kind::Batched), Some(Kind::Same)) => shape(1).is_some_and(|s| s.len() <= 2),
            (Some(Kind::Batched), Some(Kind::Batched)) => {
                in_rank >= 3 && shape(1).is_some_and(|s| s.len() as i64 == in_rank)
            }
            _ => false,
        },
        Op::DynamicRowQuantMatMul(_) => kind(0) == Some(Kind::Batched) && (1..node.inputs.len()).all(same),
        _ => false,
    }
}

/// Whether the known indices of `Gather(data, indices)` (axis 0, data `Batched` with `k` rows
/// per sample) pick, for each sample `b`, the rows the one-sample indices pick, offset by `b k`.
fn own_rows(g: &Graph, one: &Graph, node: &slimnn_ir::Node, n: usize) -> bool {
    let (data, ids) = (node.inputs[0], node.inputs[1]);
    let (Some(t), Some(t1)) = (&g.fact(ids).konst, &one.fact(ids).konst) else { return false };
    let Some(k) = one.fact(data).known_shape().and_then(|s| s.first().copied()) else { return false };
    if !t.dtype().is_integer() || !batched_pair(g.fact(ids), one.fact(ids), n) {
        return false;
    }
    let (v, v1) = (t.to_f64_vec(), t1.to_f64_vec());
    let norm = |x: f64, rows: usize| if x < 0.0 { x + rows as f64 } else { x };
    v.len() == n * v1.len()
        && v.chunks(v1.len().max(1))
            .enumerate()
            .all(|(b, c)| c.iter().zip(&v1).all(|(&x, &x1)| norm(x, n * k) == norm(x1, k) + (b * k) as f64))
}

/// `t` (axis 0 of size `sizes.iter().sum()`) as consecutive runs of `sizes[i]` samples.
pub(crate) fn split(t: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let mut shape = t.shape().to_vec();
    let n: usize = sizes.iter().sum();
    if shape.first() != Some(&n) {
        return Err(shape_error(format!("input of shape {shape:?} does not hold {n} samples")));
    }
    let per = t.len() / n.max(1);
    let bytes = if t.dtype() == DType::F32 { Vec::new() } else { t.to_le_bytes() };
    let width = bytes.len() / n.max(1);
    let mut first = 0;
    let mut parts = Vec::with_capacity(sizes.len());
    for &size in sizes {
        shape[0] = size;
        let part = if t.dtype() == DType::F32 {
            Tensor::from_vec(shape.clone(), t.as_slice::<f32>()?[first * per..(first + size) * per].to_vec())?
        } else {
            Tensor::from_le_bytes(t.dtype(), shape.clone(), &bytes[first * width..(first + size) * width])?
        };
        parts.push(part);
        first += size;
    }
    Ok(parts)
}

/// One tensor from runs of samples (axis 0 of any size, the other dims equal), in order.
pub(crate) fn stack(parts: Vec<Tensor>) -> Result<Tensor> {
    let Some(first) = parts.first() else { return Err(shape_error("no samples to stack".into())) };
    let (dtype, mut shape) = (first.dtype(), first.shape().to_vec());
    let same_rest = |p: &Tensor| p.shape().get(1..) == shape.get(1..) && p.dtype() == dtype;
    if shape.is_empty() || !parts.iter().all(same_rest) {
        return Err(shape_error(format!("per-sample outputs differ from {shape:?}")));
    }
    shape[0] = parts.iter().map(|p| p.shape()[0]).sum();
    if dtype == DType::F32 {
        let mut v = Vec::with_capacity(parts.iter().map(Tensor::len).sum());
        for p in &parts {
            v.extend_from_slice(p.as_slice::<f32>()?);
        }
        return Ok(Tensor::from_vec(shape, v)?);
    }
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.to_le_bytes()).collect();
    Ok(Tensor::from_le_bytes(dtype, shape, &bytes)?)
}

/// f32-equivalent bytes of activations per run of samples: a transformer's samples run this many
/// at a time (GEMMs of several sentences read each weight once for all of them), a CNN's one
/// at a time (its activations alone exceed it).
pub(crate) const RUN_BYTES: usize = 4 << 20;

/// [`RUN_BYTES`] where f32 GEMMs run on AMX tiles: their kernel prefetches weights, so a run
/// needs fewer samples to hide them, and a smaller run's activations stay in L2. f32 MiniLM then
/// runs 2 at a time: batch 8 took 85.8-86.3 ms on one thread and 42.1-42.3 ms on two, against
/// 89.7-92.7 and 45.1-45.6 in runs of 5.
pub(crate) const RUN_BYTES_ON_TILES: usize = 2 << 20;

/// Above this many multiply-adds per weight byte a sample alone reads its weights cheaply
/// enough that larger runs only add activation traffic (int8 MiniLM, 135 per byte: batch 32 in
/// runs of 5 took 157 ms on one thread against 125 one by one; f32 MiniLM, 34 per byte, gains).
const MAX_MACS_PER_WEIGHT_BYTE_FOR_RUNS: f64 = 64.0;

/// Samples per run: one, unless a sample does little work per weight byte
/// ([`MAX_MACS_PER_WEIGHT_BYTE_FOR_RUNS`]); then as many as keep the largest activation of
/// `one` (the one-sample graph) within `run_bytes` ([`RUN_BYTES`] or [`RUN_BYTES_ON_TILES`]).
/// f32 MiniLM (786 KB at 128 tokens) on FMA units runs 5 at a time: per sentence, runs of 4
/// took 18.2-18.9 ms on one thread against 20.0 one by one (`--batch 4`, split off and on).
pub(crate) fn samples_per_run(one: &Graph, run_bytes: usize) -> usize {
    if macs_per_weight_byte(one) > MAX_MACS_PER_WEIGHT_BYTE_FOR_RUNS {
        return 1;
    }
    let largest = one
        .nodes()
        .iter()
        .flat_map(|n| &n.outputs)
        .filter(|f| f.konst.is_none())
        .filter_map(|f| f.known_shape())
        .map(|s| s.iter().product::<usize>() * 4)
        .max()
        .unwrap_or(0);
    (run_bytes / largest.max(1)).clamp(1, 64)
}

fn shape_error(msg: String) -> RuntimeError {
    RuntimeError::Ir(slimnn_ir::IrError::Graph(msg))
}

#[cfg(test)]
mod tests {
    use super::{split, stack};
    use slimnn_tensor::Tensor;

    #[test]
    fn runs_of_uneven_sizes_split_and_stack_back() {
        let f = Tensor::from_vec(vec![6, 2, 3], (0..36).map(|v| v as f32).collect::<Vec<_>>()).unwrap();
        let i = Tensor::from_vec(vec![6, 4], (0..24i64).collect::<Vec<_>>()).unwrap();
        for t in [f, i] {
            let parts = split(&t, &[2, 1, 3]).unwrap();
            let leading: Vec<usize> = parts.iter().map(|p| p.shape()[0]).collect();
            assert_eq!(leading, [2, 1, 3]);
            assert_eq!(parts[1].to_f64_vec(), t.to_f64_vec()[2 * t.len() / 6..3 * t.len() / 6]);
            assert_eq!(stack(parts).unwrap(), t);
            assert!(split(&t, &[2, 2]).is_err(), "4 samples of 6");
        }
        let a = Tensor::from_vec(vec![1, 2], vec![0f32; 2]).unwrap();
        let b = Tensor::from_vec(vec![1, 3], vec![0f32; 3]).unwrap();
        assert!(stack(vec![a, b]).is_err(), "different sample shapes");
    }
}
