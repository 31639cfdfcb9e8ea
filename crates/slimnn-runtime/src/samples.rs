//! Batches of a CNN run one sample at a time.
//!
//! The convolutions run image by image anyway; running the whole network on one image before
//! the next keeps that image's activations in cache from layer to layer (layer by layer, a
//! batch of 8 EfficientNet images writes 38 MB per expanded layer, more than this CPU's L3),
//! and with several threads whole images go to different threads, with nothing to
//! synchronise between steps. Only graphs where that gives the same result are split: every
//! computed value carries the batch on axis 0 and every node computes a sample from that
//! sample alone (checked op by op, conservatively).

use crate::{Result, RuntimeError};
use slimnn_ir::{Graph, Op};
use slimnn_tensor::{DType, Tensor};

/// Whether `g`, specialised for inputs whose axis 0 is `n` (> 1), is a network with
/// convolutions that computes each of the `n` samples independently.
pub(crate) fn splittable(g: &Graph, n: usize) -> bool {
    let mut convs = false;
    // Nodes computed from constants alone (a QDQ model's weight dequantization): the same for
    // every sample, whatever their shapes.
    let mut fixed = vec![false; g.nodes().len()];
    for (id, node) in g.nodes().iter().enumerate() {
        let is_fixed = |o: &slimnn_ir::OutletId| g.fact(*o).konst.is_some() || fixed[o.node];
        if !matches!(node.op, Op::Input(_)) && node.inputs.iter().all(is_fixed) {
            fixed[id] = true;
            continue;
        }
        // Values computed at run time carry the batch on axis 0.
        let batched = |f: &slimnn_ir::Fact| f.known_shape().is_some_and(|s| s.first() == Some(&n));
        if !node.outputs.iter().all(batched) {
            return false;
        }
        let input = |i: usize| node.inputs.get(i).map(|o| (is_fixed(o), g.fact(*o).known_shape()));
        let constant = |i: usize| input(i).is_some_and(|(c, _)| c);
        let rank = node.outputs.first().map_or(0, |f| f.shape.len());
        // A constant operand of an element-wise op must broadcast over the batch.
        let broadcasts = |i: usize| match input(i) {
            Some((true, Some(s))) => s.len() < rank || s.first() == Some(&1),
            Some((true, None)) => false,
            _ => true,
        };
        let scale_ok = |axis: i64| {
            input(1).is_some_and(|(c, s)| c && s.is_some_and(|s| s.iter().product::<usize>() == 1))
                || (axis != 0 && axis != -(rank as i64))
        };
        let axis_not_batch = |axis: i64| axis != 0 && axis != -(rank as i64);
        let ok = match &node.op {
            Op::Input(_) | Op::Identity(_) | Op::Cast(_) | Op::Unary(_) => true,
            Op::Reshape(_) | Op::Squeeze(_) | Op::Unsqueeze(_) => true, // axis 0 kept (checked above)
            Op::BatchNorm(_) | Op::Pool(_) | Op::GlobalPool(_) => true,
            Op::Conv(_) | Op::QLinearConv(_) | Op::ConvInteger(_) => {
                convs = true;
                !constant(0)
            }
            Op::Binary(_) | Op::Clip(_) => (0..node.inputs.len()).all(broadcasts),
            Op::QuantizeLinear(q) => scale_ok(q.axis),
            Op::DequantizeLinear(q) => scale_ok(q.axis),
            Op::Flatten(f) => f.axis != 0,
            Op::Softmax(s) => axis_not_batch(s.axis),
            Op::Concat(c) => axis_not_batch(c.axis),
            // Activations times constant weights.
            Op::Gemm(gm) => !gm.trans_a && !constant(0) && (1..node.inputs.len()).all(constant),
            Op::MatMul(_) => !constant(0) && input(1).is_some_and(|(c, s)| c && s.is_some_and(|s| s.len() <= 2)),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    convs
}

/// `t` (axis 0 of size `n`) as `n` tensors of one sample each.
pub(crate) fn split(t: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let mut shape = t.shape().to_vec();
    if shape.first() != Some(&n) {
        return Err(shape_error(format!("input of shape {shape:?} does not hold {n} samples")));
    }
    shape[0] = 1;
    let per = t.len() / n;
    if t.dtype() == DType::F32 {
        let v = t.as_slice::<f32>()?;
        return v.chunks(per.max(1)).take(n).map(|c| Ok(Tensor::from_vec(shape.clone(), c.to_vec())?)).collect();
    }
    let bytes = t.to_le_bytes();
    let width = bytes.len() / n;
    (0..n).map(|i| Ok(Tensor::from_le_bytes(t.dtype(), shape.clone(), &bytes[i * width..(i + 1) * width])?)).collect()
}

/// One tensor from per-sample tensors (each with axis 0 of size 1), samples in order.
pub(crate) fn stack(parts: Vec<Tensor>) -> Result<Tensor> {
    let Some(first) = parts.first() else { return Err(shape_error("no samples to stack".into())) };
    let (dtype, mut shape) = (first.dtype(), first.shape().to_vec());
    if shape.first() != Some(&1) || parts.iter().any(|p| p.shape() != first.shape() || p.dtype() != dtype) {
        return Err(shape_error(format!("per-sample outputs differ from {shape:?}")));
    }
    shape[0] = parts.len();
    if dtype == DType::F32 {
        let mut v = Vec::with_capacity(first.len() * parts.len());
        for p in &parts {
            v.extend_from_slice(p.as_slice::<f32>()?);
        }
        return Ok(Tensor::from_vec(shape, v)?);
    }
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.to_le_bytes()).collect();
    Ok(Tensor::from_le_bytes(dtype, shape, &bytes)?)
}

fn shape_error(msg: String) -> RuntimeError {
    RuntimeError::Ir(slimnn_ir::IrError::Graph(msg))
}
