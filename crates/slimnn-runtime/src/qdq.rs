//! QDQ convolutions read as the integer operator they stand for.
//!
//! ONNX Runtime's static quantizer writes a quantized convolution as
//! `QuantizeLinear(Conv(DequantizeLinear(x_q), DequantizeLinear(W_q), DequantizeLinear(b_i32)))`
//! with the bias quantized at scale `x_scale * w_scale`. That is `QLinearConv(x_q, W_q, b_i32)`,
//! which is also how ONNX Runtime itself runs it; rewriting it so lets the convolution run on
//! the integer kernels instead of dequantizing, convolving in f32 and quantizing again.
//! Results can differ from the literal float graph by one quantization step where the float
//! sum rounds differently; they agree with ONNX Runtime's own execution.

use slimnn_ir::ops::{Const, Conv, DequantizeLinear, QLinearConv, QuantizeLinear};
use slimnn_ir::{Graph, IrResult, NodeId, Op, OutletId, Pass, Patch, Wire};
use slimnn_tensor::{DType, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

type Consumers = HashMap<OutletId, Vec<(NodeId, usize)>>;

/// `Q(Conv(DQ(x), DQ(W const)[, DQ(b const)]))` → `QLinearConv`, see the module docs.
pub struct FuseQdqConv;

/// A `DequantizeLinear`'s `(quantized, scale, zero point?)` inputs, when `o` is one's output.
fn dequantized(g: &Graph, o: OutletId) -> Option<(OutletId, OutletId, Option<OutletId>)> {
    let node = g.node(o.node);
    let Op::DequantizeLinear(DequantizeLinear { .. }) = node.op else { return None };
    (o.slot == 0).then(|| (node.inputs[0], node.inputs[1], node.inputs.get(2).copied()))
}

fn konst(g: &Graph, o: OutletId) -> Option<&Tensor> {
    g.fact(o).konst.as_deref()
}

/// A per-tensor constant (one value).
fn scalar_const(g: &Graph, o: Option<OutletId>) -> bool {
    o.is_none_or(|o| konst(g, o).is_some_and(|t| t.len() == 1))
}

impl FuseQdqConv {
    /// The rewrite of quantize node `q`, if it matches.
    fn patch(g: &Graph, q: NodeId, consumers: &Consumers, outputs: &[OutletId]) -> Option<Patch> {
        let qn = g.node(q);
        let Op::QuantizeLinear(QuantizeLinear { .. }) = qn.op else { return None };
        let (y, sy, zy) = (qn.inputs[0], qn.inputs[1], qn.inputs.get(2).copied()?);
        let conv = g.node(y.node);
        let Op::Conv(Conv { attrs }) = &conv.op else { return None };
        if y.slot != 0 || outputs.contains(&y) || consumers.get(&y).map_or(0, Vec::len) != 1 {
            return None;
        }
        // Output: per-tensor scale and an 8-bit zero point.
        let y_dt = konst(g, zy)?.dtype();
        if !matches!(y_dt, DType::U8 | DType::I8) || !scalar_const(g, Some(sy)) || !scalar_const(g, Some(zy)) {
            return None;
        }
        // Input: a per-tensor dequantized 8-bit activation.
        let (xq, sx, zx) = dequantized(g, conv.inputs[0])?;
        let x_dt = g.fact(xq).dtype;
        if !matches!(x_dt, DType::U8 | DType::I8) || !scalar_const(g, Some(sx)) || !scalar_const(g, zx) {
            return None;
        }
        let sx_v = konst(g, sx)?.to_f64_vec()[0] as f32;
        // Weights: constant 8-bit, per tensor or per output channel (axis 0).
        let (wq, ws, wz) = dequantized(g, conv.inputs[1])?;
        let w = konst(g, wq)?;
        let m = *w.shape().first()?;
        let ws_v = konst(g, ws)?.to_f64_vec();
        let dq_axis = match g.node(conv.inputs[1].node).op {
            Op::DequantizeLinear(DequantizeLinear { axis }) => axis,
            _ => return None,
        };
        if !matches!(w.dtype(), DType::U8 | DType::I8) || w.rank() != 4 || !(ws_v.len() == 1 || ws_v.len() == m) {
            return None;
        }
        if ws_v.len() == m && m > 1 && dq_axis != 0 {
            return None;
        }
        if wz.is_some_and(|z| konst(g, z).is_none_or(|t| t.len() != ws_v.len())) {
            return None;
        }
        // Bias: i32 at scale x_scale * w_scale (the quantizer's, bit for bit), zero point 0.
        let bias = match conv.inputs.get(2) {
            None => None,
            Some(&b) => {
                let (bq, bs, bz) = dequantized(g, b)?;
                let (bt, bs) = (konst(g, bq)?, konst(g, bs)?.to_f64_vec());
                let at = |v: &[f64], c: usize| v[if v.len() == 1 { 0 } else { c }];
                let scales_match = (0..m).all(|c| at(&bs, c) as f32 == sx_v * at(&ws_v, c) as f32);
                let zero = bz.is_none_or(|z| konst(g, z).is_some_and(|t| t.to_f64_vec().iter().all(|&v| v == 0.0)));
                if bt.dtype() != DType::I32 || bt.len() != m || !(bs.len() == 1 || bs.len() == m) || !scales_match {
                    return None;
                }
                zero.then_some(bq)?;
                Some(bq)
            }
        };
        let mut p = Patch::new();
        let mut zero_of = |o: Option<OutletId>, dt: DType, name: &str| -> Option<Wire> {
            Some(match o {
                Some(o) => o.into(),
                None => {
                    let t = match dt {
                        DType::U8 => Tensor::scalar(0u8),
                        _ => Tensor::scalar(0i8),
                    };
                    Patch::wire(p.add_node(name, Const(Arc::new(t)), vec![]), 0)
                }
            })
        };
        let zx = zero_of(zx, x_dt, &format!("{}.x_zero", conv.name))?;
        let wz = zero_of(wz, w.dtype(), &format!("{}.w_zero", conv.name))?;
        let mut inputs = vec![xq.into(), sx.into(), zx, wq.into(), ws.into(), wz, sy.into(), zy.into()];
        inputs.extend(bias.map(Wire::from));
        let qc = p.add_node(&conv.name, QLinearConv { attrs: attrs.clone() }, inputs);
        p.shunt(OutletId::new(q, 0), Patch::wire(qc, 0));
        Some(p)
    }
}

impl Pass for FuseQdqConv {
    fn name(&self) -> &str {
        "fuse-qdq-conv"
    }

    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let consumers = g.consumers();
        let outputs: Vec<OutletId> = g.outputs().iter().map(|(_, o)| *o).collect();
        Ok((0..g.nodes().len()).find_map(|q| Self::patch(g, q, &consumers, &outputs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimnn_ir::ops::ConvAttrs;
    use slimnn_ir::{Fact, PassRunner};

    /// `Q(Conv(DQ(x_u8), DQ(W_i8 per channel), DQ(b_i32)))`, 3x3 pad 1, 4 -> 3 channels;
    /// `bias_scale` scales the bias's DequantizeLinear, `extra_reader` also outputs the conv.
    fn graph(bias_scale: Option<Vec<f32>>, extra_reader: bool) -> Graph {
        let mut g = Graph::default();
        let (sx, ws) = (0.05f32, [0.01f32, 0.02, 0.004]);
        let xq = g.add_input("xq", Fact::known(DType::U8, &[1, 4, 5, 5])).unwrap();
        let sx_o = g.add_const("sx", Tensor::scalar(sx)).unwrap();
        let zx = g.add_const("zx", Tensor::scalar(7u8)).unwrap();
        let x = g.add_node("x_dq", DequantizeLinear { axis: 1 }, vec![xq, sx_o, zx]).unwrap()[0];
        let wv: Vec<i8> = (0..3 * 4 * 9).map(|i| ((i * 37) % 255) as i8).collect();
        let wq = g.add_const("wq", Tensor::from_vec(vec![3, 4, 3, 3], wv).unwrap()).unwrap();
        let ws_o = g.add_const("ws", Tensor::from_vec(vec![3], ws.to_vec()).unwrap()).unwrap();
        let w = g.add_node("w_dq", DequantizeLinear { axis: 0 }, vec![wq, ws_o]).unwrap()[0];
        let bs = bias_scale.unwrap_or_else(|| ws.iter().map(|s| sx * s).collect());
        let bq = g.add_const("bq", Tensor::from_vec(vec![3], vec![300i32, -2000, 40]).unwrap()).unwrap();
        let bs_o = g.add_const("bs", Tensor::from_vec(vec![3], bs).unwrap()).unwrap();
        let b = g.add_node("b_dq", DequantizeLinear { axis: 0 }, vec![bq, bs_o]).unwrap()[0];
        let attrs = ConvAttrs { pads: vec![1, 1, 1, 1], ..ConvAttrs::default() };
        let y = g.add_node("conv", Conv { attrs }, vec![x, w, b]).unwrap()[0];
        let sy = g.add_const("sy", Tensor::scalar(0.1f32)).unwrap();
        let zy = g.add_const("zy", Tensor::scalar(128u8)).unwrap();
        let q = g.add_node("y_q", QuantizeLinear { axis: 1 }, vec![y, sy, zy]).unwrap()[0];
        g.add_output("y", q);
        if extra_reader {
            g.add_output("conv_out", y);
        }
        g
    }

    fn run(g: &Graph) -> Vec<u8> {
        let x: Vec<u8> = (0..100).map(|i| ((i * 53) % 256) as u8).collect();
        let out = g.eval(vec![("xq".into(), Tensor::from_vec(vec![1, 4, 5, 5], x).unwrap())]).unwrap();
        out[0].as_slice::<u8>().unwrap().to_vec()
    }

    #[test]
    fn qdq_conv_becomes_qlinear_conv() {
        let mut g = graph(None, false);
        let before = run(&g);
        let r = PassRunner::new().with(FuseQdqConv).run(&mut g).unwrap();
        assert_eq!(r.applied, vec![("fuse-qdq-conv".to_string(), 1)]);
        let h = g.op_histogram();
        assert_eq!((h.get("QLinearConv"), h.get("Conv"), h.get("QuantizeLinear")), (Some(&1), None, None), "{h:?}");
        // The float graph rounds its f32 sum once more: at most one step apart.
        let after = run(&g);
        assert!(before.iter().zip(&after).all(|(a, b)| a.abs_diff(*b) <= 1), "{before:?}\n{after:?}");
        assert!(before.iter().zip(&after).filter(|(a, b)| a != b).count() <= 2, "{before:?}\n{after:?}");
    }

    #[test]
    fn other_forms_stay_float() {
        // A bias not at x_scale * w_scale, and a conv output read elsewhere.
        for g in [graph(Some(vec![0.001, 0.001, 0.001]), false), graph(None, true)] {
            let mut g = g;
            let r = PassRunner::new().with(FuseQdqConv).run(&mut g).unwrap();
            assert_eq!(r.applied, vec![("fuse-qdq-conv".to_string(), 0)]);
            assert_eq!(g.op_histogram().get("Conv"), Some(&1));
        }
    }
}
