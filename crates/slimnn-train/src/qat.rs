//! Quantization-aware training: fake-quant nodes (straight-through estimator, LSQ learnable
//! scales) on the weights and input activations of every MatMul / Gemm / Conv with a parameter
//! weight, and the conversion of the trained model into the real int8 QDQ model that slimnn's
//! integer kernels and ONNX Runtime run.
//!
//! Weights: symmetric int8 per output channel (`[-128, 127]`, zero point 0), scale initialised
//! to `absmax / 127`. Activations: asymmetric u8 per tensor, range observed on calibration
//! batches; the zero point stays fixed, the scale is learned when `learn_scales` is set.

use crate::models::Model;
use crate::{bake_parameters, Parameters, Result};
use slimnn_ir::ops::{Binary, BinaryOp, DequantizeLinear, FakeQuant, OpDef, QuantizeLinear, Unary, UnaryOp};
use slimnn_ir::{Fact, Graph, IrError, IrResult, Op, OutletId};
use slimnn_tensor::{DType, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

const W_RANGE: (i32, i32) = (-128, 127);
const A_RANGE: (i32, i32) = (0, 255);

/// Where fake quantization goes and how it is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QatConfig {
    /// Train the scales (LSQ) along with the weights.
    pub learn_scales: bool,
}

/// A weight input of a quantizable node and the axis its output channels run along.
fn weight_axis(op: &Op, input: usize) -> Option<i64> {
    match (op, input) {
        (Op::MatMul(_), 1) => Some(-1),
        (Op::Gemm(g), 1) => Some(if g.trans_b { 0 } else { 1 }),
        (Op::Conv(_), 1) => Some(0),
        _ => None,
    }
}

/// The activations to quantize: input 0 of every MatMul / Gemm / Conv whose input 1 is one of
/// the model's parameters (attention's activation x activation products stay in float).
pub fn quantizable(model: &Model) -> Vec<(usize, OutletId)> {
    let g = &model.graph;
    g.nodes()
        .iter()
        .enumerate()
        .filter(|(_, n)| weight_axis(&n.op, 1).is_some())
        .filter(|(_, n)| n.inputs.len() > 1 && model.params.get(&g.node(n.inputs[1].node).name).is_some())
        .map(|(id, n)| (id, n.inputs[0]))
        .collect()
}

/// Inserts fake quantization into `model`. `ranges` holds the observed `(min, max)` of each
/// activation [`quantizable`] returns (keyed by the outlet in `model.graph`).
pub fn insert_fake_quant(model: &Model, ranges: &HashMap<OutletId, (f32, f32)>, config: QatConfig) -> Result<Model> {
    let targets = quantizable(model);
    let g = &model.graph;
    let mut out = Graph::default();
    out.metadata = g.metadata.clone();
    let mut params = Parameters::new();
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    // One fake-quant per quantized activation, shared by its consumers (Q, K and V read one x).
    let mut act_fq: HashMap<OutletId, OutletId> = HashMap::new();
    // A learned scale is `exp(g * u)` with `u` the parameter: always positive, and `d/du = g * s
    // * d/ds` applies LSQ's gradient scale `g = 1 / sqrt(N * qmax)` (N values share the scale),
    // which keeps a scale's steps in proportion to its size.
    let new_scale = |out: &mut Graph, params: &mut Parameters, name: String, t: Tensor, n: usize, qmax: i32| {
        if !config.learn_scales {
            return Ok::<OutletId, crate::TrainError>(out.add_const(&name, Arc::new(t))?);
        }
        let g = 1.0 / ((n.max(1) as f32) * qmax as f32).sqrt();
        let u: Vec<f32> = t.as_slice::<f32>()?.iter().map(|s| s.ln() / g).collect();
        let u = Tensor::from_vec(t.shape().to_vec(), u)?;
        let param = format!("{name}.log_param");
        let o = out.add_input(&param, Fact::known(DType::F32, u.shape()))?;
        params.push(&param, u)?;
        let gc = out.add_const(&format!("{name}.grad_scale"), Arc::new(Tensor::scalar(g)))?;
        let scaled = out.add_node(&format!("{name}/Mul"), Binary(BinaryOp::Mul), vec![o, gc])?[0];
        Ok(out.add_node(&format!("{name}/Exp"), Unary(UnaryOp::Exp), vec![scaled])?[0])
    };
    for (id, node) in g.nodes().iter().enumerate() {
        let mut inputs: Vec<OutletId> = node.inputs.iter().map(|o| map[o]).collect();
        if let Some(&(_, act)) = targets.iter().find(|(t, _)| *t == id) {
            let fq = match act_fq.get(&act) {
                Some(&fq) => fq,
                None => {
                    let (lo, hi) = ranges.get(&act).copied().ok_or_else(|| {
                        IrError::Graph(format!("no calibration range for the input of node '{}'", node.name))
                    })?;
                    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
                    let scale = ((hi - lo) / (A_RANGE.1 - A_RANGE.0) as f32).max(1e-8);
                    let zero = (-lo / scale).round().clamp(A_RANGE.0 as f32, A_RANGE.1 as f32);
                    let base = format!("{}.input_quant", node.name);
                    let features = g.fact(act).shape.last().and_then(|d| d.as_known()).unwrap_or(1);
                    let scale = Tensor::scalar(scale);
                    let s = new_scale(&mut out, &mut params, format!("{base}.scale"), scale, features, A_RANGE.1)?;
                    let z = out.add_const(&format!("{base}.zero_point"), Arc::new(Tensor::scalar(zero)))?;
                    let fq = FakeQuant { qmin: A_RANGE.0, qmax: A_RANGE.1, axis: None };
                    let fq = out.add_node(&format!("{base}/FakeQuant"), fq, vec![inputs[0], s, z])?[0];
                    act_fq.insert(act, fq);
                    fq
                }
            };
            inputs[0] = fq;
            let axis = weight_axis(&node.op, 1).expect("quantizable");
            let w_name = &g.node(node.inputs[1].node).name;
            let w = &model.params.get(w_name).expect("quantizable").value;
            let scale = channel_absmax(w, axis)?.into_iter().map(|m| (m / 127.0).max(1e-8)).collect::<Vec<f32>>();
            let c = scale.len();
            let base = format!("{w_name}.quant");
            let scale = Tensor::from_vec(vec![c], scale)?;
            let s = new_scale(&mut out, &mut params, format!("{base}.scale"), scale, w.len() / c, W_RANGE.1)?;
            let z = out.add_const(&format!("{base}.zero_point"), Arc::new(Tensor::zeros(DType::F32, vec![c])?))?;
            let fq = FakeQuant { qmin: W_RANGE.0, qmax: W_RANGE.1, axis: Some(axis) };
            inputs[1] = out.add_node(&format!("{base}/FakeQuant"), fq, vec![inputs[1], s, z])?[0];
        }
        let new = match &node.op {
            Op::Input(i) => {
                let o = out.add_input(&node.name, i.fact.clone())?;
                if let Some(p) = model.params.get(&node.name) {
                    params.push(&node.name, p.value.clone())?;
                }
                vec![o]
            }
            op => out.add_node(&node.name, op.clone(), inputs)?,
        };
        for (slot, o) in new.into_iter().enumerate() {
            map.insert(slimnn_ir::OutletId::new(id, slot), o);
        }
    }
    out.set_outputs(g.outputs().iter().map(|(n, o)| (n.clone(), map[o])).collect());
    let logits = map[&model.logits];
    Ok(Model { graph: out, params, data_inputs: model.data_inputs.clone(), logits })
}

/// Max |w| per channel along `axis` (negative counts from the end).
fn channel_absmax(w: &Tensor, axis: i64) -> IrResult<Vec<f32>> {
    let shape = w.shape();
    let axis = if axis < 0 { (shape.len() as i64 + axis) as usize } else { axis as usize };
    let (c, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
    let mut m = vec![0f32; c];
    for (i, v) in w.as_slice::<f32>()?.iter().enumerate() {
        let ch = (i / inner) % c;
        m[ch] = m[ch].max(v.abs());
    }
    Ok(m)
}

/// The int8 model: parameters frozen, each weight fake-quant replaced by its int8 constant and
/// a `DequantizeLinear`, each activation fake-quant by `QuantizeLinear` (u8) + `DequantizeLinear`
/// with the learned scale. Runs in slimnn's integer kernels and exports as ONNX QDQ.
pub fn to_int8(qat: &Model) -> Result<Graph> {
    let frozen = bake_parameters(&qat.graph, &qat.params)?;
    let mut out = Graph::default();
    out.metadata = frozen.metadata.clone();
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    for (id, node) in frozen.nodes().iter().enumerate() {
        let inputs: Vec<OutletId> = node.inputs.iter().map(|o| map[o]).collect();
        let new = match &node.op {
            Op::Input(i) => vec![out.add_input(&node.name, i.fact.clone())?],
            Op::FakeQuant(fq) => {
                let konst = |g: &Graph, o: OutletId| g.fact(o).konst.clone();
                let (Some(scale), Some(zero)) = (konst(&out, inputs[1]), konst(&out, inputs[2])) else {
                    let msg = format!("'{}': scale and zero point must be constants", node.name);
                    return Err(IrError::Graph(msg).into());
                };
                let zdt = if fq.qmin < 0 { DType::I8 } else { DType::U8 };
                let zero = zero.cast(zdt)?;
                let zq = out.add_const(&format!("{}.zero_point_q", node.name), Arc::new(zero.clone()))?;
                let axis = match fq.axis {
                    Some(a) if a < 0 => a + out.fact(inputs[0]).rank() as i64,
                    Some(a) => a,
                    None => 1,
                };
                let quantize = QuantizeLinear { axis };
                // A weight is stored quantized: int8 constant, then DequantizeLinear.
                let q = match konst(&out, inputs[0]) {
                    Some(w) => {
                        let q = quantize.eval(&[&w, &scale, &zero])?.remove(0);
                        out.add_const(&format!("{}.quantized", node.name), Arc::new(q))?
                    }
                    None => {
                        let qn = format!("{}/QuantizeLinear", node.name);
                        out.add_node(&qn, quantize, vec![inputs[0], inputs[1], zq])?[0]
                    }
                };
                let dq = DequantizeLinear { axis };
                out.add_node(&format!("{}/DequantizeLinear", node.name), dq, vec![q, inputs[1], zq])?
            }
            op => {
                // Values computed from constants only (the learned scales' exp) become constants.
                let o = out.add_node(&node.name, op.clone(), inputs)?;
                match (o.len(), out.fact(o[0]).konst.clone()) {
                    (1, Some(t)) => vec![out.add_const(&format!("{}.value", node.name), t)?],
                    _ => o,
                }
            }
        };
        for (slot, o) in new.into_iter().enumerate() {
            if let Some(name) = &node.output_names[slot] {
                out.set_outlet_name(o, name);
            }
            map.insert(OutletId::new(id, slot), o);
        }
    }
    out.set_outputs(frozen.outputs().iter().map(|(n, o)| (n.clone(), map[o])).collect());
    out.compact()?;
    Ok(out)
}
