//! Load-time folds of constants: an inference BatchNormalization into the convolution that
//! feeds it, half-precision weights widened to f32 once instead of on every run, and the
//! dequantized weights of QDQ convolutions.

use slimnn_ir::ops::{BatchNorm, Cast, Const, Conv};
use slimnn_ir::{Graph, IrResult, Op, OpDef, OutletId, Pass, Patch};
use slimnn_tensor::{DType, Tensor};
use std::sync::Arc;

/// `BatchNormalization(Conv(x, w, b))` → `Conv(x, w', b')` with, per output channel `c`,
/// `s = gamma / sqrt(var + eps)`, `w'[c] = w[c] * s`, `b' = (b - mean) * s + beta`, when the
/// weights, bias and statistics are f32 constants and the BN is the conv's only reader.
pub struct FoldConvBatchNorm;

/// Per-channel values of an f32 constant of `n` elements.
fn channel_values(g: &Graph, o: OutletId, n: usize) -> Option<Vec<f64>> {
    let t = g.fact(o).konst.as_ref()?;
    (t.dtype() == DType::F32 && t.len() == n).then(|| t.to_f64_vec())
}

impl Pass for FoldConvBatchNorm {
    fn name(&self) -> &str {
        "fold-conv-batchnorm"
    }

    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let consumers = g.consumers();
        let outputs: Vec<OutletId> = g.outputs().iter().map(|(_, o)| *o).collect();
        for (id, node) in g.nodes().iter().enumerate() {
            let Op::BatchNorm(BatchNorm { epsilon }) = node.op else { continue };
            let Some(&y) = node.inputs.first() else { continue };
            let conv = g.node(y.node);
            let Op::Conv(Conv { attrs }) = &conv.op else { continue };
            if y.slot != 0 || outputs.contains(&y) || consumers.get(&y).map_or(0, Vec::len) != 1 {
                continue;
            }
            let Some(w) = conv.inputs.get(1).and_then(|&w| g.fact(w).konst.clone()) else { continue };
            if w.dtype() != DType::F32 || w.rank() < 1 || w.shape()[0] == 0 || node.inputs.len() != 5 {
                continue;
            }
            let c = w.shape()[0];
            let bias = match conv.inputs.get(2) {
                Some(&b) => channel_values(g, b, c),
                None => Some(vec![0.0; c]),
            };
            let stats: Option<Vec<Vec<f64>>> = node.inputs[1..].iter().map(|&o| channel_values(g, o, c)).collect();
            let (Some(bias), Some(stats)) = (bias, stats) else { continue };
            let (gamma, beta, mean, var) = (&stats[0], &stats[1], &stats[2], &stats[3]);
            let scale: Vec<f64> = (0..c).map(|i| gamma[i] / (var[i] + epsilon as f64).sqrt()).collect();
            if scale.iter().any(|s| !s.is_finite()) {
                continue;
            }
            let per = w.len() / c;
            let wv = w.as_slice::<f32>()?;
            let new_w: Vec<f32> = wv.iter().enumerate().map(|(i, &v)| (v as f64 * scale[i / per]) as f32).collect();
            let new_b: Vec<f32> = (0..c).map(|i| ((bias[i] - mean[i]) * scale[i] + beta[i]) as f32).collect();
            let mut p = Patch::new();
            let base = &node.name;
            let wn = p.add_node(
                &format!("{base}.folded_w"),
                Const(Arc::new(Tensor::from_vec(w.shape().to_vec(), new_w)?)),
                vec![],
            );
            let bn =
                p.add_node(&format!("{base}.folded_b"), Const(Arc::new(Tensor::from_vec(vec![c], new_b)?)), vec![]);
            let cv = p.add_node(
                &conv.name,
                Conv { attrs: attrs.clone() },
                vec![conv.inputs[0].into(), Patch::wire(wn, 0), Patch::wire(bn, 0)],
            );
            p.shunt(OutletId::new(id, 0), Patch::wire(cv, 0));
            return Ok(Some(p));
        }
        Ok(None)
    }
}

/// `Cast(w, to=f32)` of a constant bf16 / fp16 weight (`slimnn quantize --mode bf16|fp16`,
/// or an fp16 export) → the f32 constant, whatever its size: inference-time folding stops at
/// 64K elements, which would leave every weight cast per run and every product on run-time
/// operands. The widening is exact; the f32 copy is what the GEMMs pack (as bf16 again under
/// `Precision::Bf16`).
pub struct FoldWeightCasts;

impl Pass for FoldWeightCasts {
    fn name(&self) -> &str {
        "fold-weight-casts"
    }

    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let mut p = Patch::new();
        for (id, node) in g.nodes().iter().enumerate() {
            let Op::Cast(Cast { to: DType::F32 }) = node.op else { continue };
            let Some(w) = node.inputs.first().and_then(|&o| g.fact(o).konst.as_ref()) else { continue };
            if !matches!(w.dtype(), DType::BF16 | DType::F16) || g.fact(OutletId::new(id, 0)).konst.is_some() {
                continue;
            }
            let wide = w.cast(DType::F32)?;
            let c = p.add_node(&node.name, Const(Arc::new(wide)), vec![]);
            p.shunt(OutletId::new(id, 0), Patch::wire(c, 0));
        }
        Ok((!p.is_empty()).then_some(p))
    }
}

/// `DequantizeLinear(w_q, scale, zero)` of constants read only as the weight or bias of `Conv`
/// or `Gemm` (a QDQ export's convolutions and classifier) → the f32 constant, whatever its
/// size. Without it every weight was dequantized per run on the reference evaluator and every
/// convolution ran on run-time weights. QDQ `MatMul` weights stay as they are: the integer
/// GEMM path matches them.
pub struct FoldConvWeightDequantize;

impl Pass for FoldConvWeightDequantize {
    fn name(&self) -> &str {
        "fold-conv-weight-dequantize"
    }

    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let consumers = g.consumers();
        let outputs: Vec<OutletId> = g.outputs().iter().map(|(_, o)| *o).collect();
        let mut p = Patch::new();
        for (id, node) in g.nodes().iter().enumerate() {
            let Op::DequantizeLinear(dq) = &node.op else { continue };
            let y = OutletId::new(id, 0);
            if g.fact(y).konst.is_some() || outputs.contains(&y) {
                continue;
            }
            let consts: Option<Vec<&Tensor>> = node.inputs.iter().map(|&o| g.fact(o).konst.as_deref()).collect();
            let Some(consts) = consts else { continue };
            let readers = consumers.get(&y).map_or(&[][..], Vec::as_slice);
            let conv_param = |&(reader, slot): &(slimnn_ir::NodeId, usize)| {
                matches!(g.node(reader).op, Op::Conv(_) | Op::Gemm(_)) && (slot == 1 || slot == 2)
            };
            if readers.is_empty() || !readers.iter().all(conv_param) {
                continue;
            }
            let mut out = dq.eval(&consts)?;
            let c = p.add_node(&node.name, Const(Arc::new(out.remove(0))), vec![]);
            p.shunt(y, Patch::wire(c, 0));
        }
        Ok((!p.is_empty()).then_some(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimnn_ir::ops::ConvAttrs;
    use slimnn_ir::{Fact, PassRunner};

    fn t(shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    /// `BN(Conv(x))` over 2 channels of a 1x1 conv on a 1x1x2x1 input; `extra_reader` also
    /// makes the conv output a graph output.
    fn graph(with_bias: bool, extra_reader: bool) -> Graph {
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[1, 1, 2, 1])).unwrap();
        let w = g.add_const("w", t(&[2, 1, 1, 1], vec![2.0, -1.0])).unwrap();
        let mut ins = vec![x, w];
        if with_bias {
            ins.push(g.add_const("b", t(&[2], vec![1.0, 3.0])).unwrap());
        }
        let y = g.add_node("conv", Conv { attrs: ConvAttrs::default() }, ins).unwrap()[0];
        let stats: Vec<OutletId> =
            [("gamma", [2.0, 1.0]), ("beta", [0.5, 0.0]), ("mean", [1.0, 2.0]), ("var", [3.0, 0.0])]
                .into_iter()
                .map(|(n, v)| g.add_const(n, t(&[2], v.to_vec())).unwrap())
                .collect();
        let bn = g.add_node("bn", BatchNorm { epsilon: 1.0 }, [vec![y], stats].concat()).unwrap()[0];
        g.add_output("out", bn);
        if extra_reader {
            g.add_output("conv_out", y);
        }
        g
    }

    fn run(g: &Graph) -> Vec<Tensor> {
        g.eval(vec![("x".into(), t(&[1, 1, 2, 1], vec![1.0, 4.0]))]).unwrap()
    }

    #[test]
    fn folds_batchnorm_into_conv() {
        for with_bias in [false, true] {
            let mut g = graph(with_bias, false);
            let before = run(&g);
            let r = PassRunner::new().with(FoldConvBatchNorm).run(&mut g).unwrap();
            assert_eq!(r.applied, vec![("fold-conv-batchnorm".to_string(), 1)]);
            assert_eq!(g.op_histogram().get("BatchNormalization"), None);
            assert_eq!(g.op_histogram().get("Conv"), Some(&1));
            let after = run(&g);
            // Channel 0: s = 2 / sqrt(3 + 1) = 1, y = (2x + b0 - 1) * 1 + 0.5;
            // channel 1: s = 1 / sqrt(0 + 1) = 1, y = (-x + b1 - 2).
            let b = if with_bias { [1.0, 3.0] } else { [0.0, 0.0] };
            let want = [2.0 + b[0] - 0.5, 8.0 + b[0] - 0.5, -1.0 + b[1] - 2.0, -4.0 + b[1] - 2.0];
            assert_eq!(after[0].as_slice::<f32>().unwrap(), want);
            assert_eq!(before[0], after[0]);
        }
    }

    #[test]
    fn keeps_batchnorm_when_the_conv_output_is_read_elsewhere() {
        let mut g = graph(true, true);
        let r = PassRunner::new().with(FoldConvBatchNorm).run(&mut g).unwrap();
        assert!(r.applied.iter().all(|(_, n)| *n == 0), "{:?}", r.applied);
        assert_eq!(g.op_histogram().get("BatchNormalization"), Some(&1));
    }

    /// Input channels of the QDQ test conv: its weight passes inference-time folding's limit
    /// (2^16 values), as real weights do.
    const C_IN: usize = (1 << 15) + 1;

    /// `Conv(x, DQ(w_i8, per-channel scale), DQ(b_i32))` (1x1, 2 output channels, `C_IN`
    /// inputs); `matmul_reader` also reads the dequantized weight through a MatMul (the
    /// integer GEMM path's pattern).
    fn qdq_conv(matmul_reader: bool) -> Graph {
        use slimnn_ir::ops::{DequantizeLinear, MatMul};
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[1, C_IN, 1, 1])).unwrap();
        let wv: Vec<i8> = (0..2 * C_IN).map(|i| (i % 255) as i8).collect();
        let wq = g.add_const("wq", Tensor::from_vec(vec![2, C_IN, 1, 1], wv).unwrap()).unwrap();
        let ws = g.add_const("ws", t(&[2], vec![0.02, 0.5])).unwrap();
        let w = g.add_node("w_dq", DequantizeLinear { axis: 0 }, vec![wq, ws]).unwrap()[0];
        let bq = g.add_const("bq", Tensor::from_vec(vec![2], vec![30i32, -4]).unwrap()).unwrap();
        let bs = g.add_const("bs", Tensor::scalar(0.25f32)).unwrap();
        let b = g.add_node("b_dq", DequantizeLinear { axis: 1 }, vec![bq, bs]).unwrap()[0];
        let y = g.add_node("conv", Conv { attrs: ConvAttrs::default() }, vec![x, w, b]).unwrap()[0];
        g.add_output("out", y);
        if matmul_reader {
            let m = g.add_node("mm", MatMul, vec![x, w]).unwrap()[0];
            g.add_output("mm_out", m);
        }
        g
    }

    #[test]
    fn folds_dequantized_conv_weights_only() {
        let mut g = qdq_conv(false);
        let x: Vec<f32> = (0..C_IN).map(|i| ((i % 7) as f32 - 3.0) * 0.125).collect();
        let run = |g: &Graph| g.eval(vec![("x".into(), t(&[1, C_IN, 1, 1], x.clone()))]).unwrap();
        let before = run(&g);
        let r = PassRunner::new().with(FoldConvWeightDequantize).run(&mut g).unwrap();
        // The weight only: the bias is small enough for inference-time folding.
        assert_eq!(r.applied, vec![("fold-conv-weight-dequantize".to_string(), 1)]);
        assert_eq!(g.op_histogram().get("DequantizeLinear"), Some(&1));
        assert!(g.fact(g.outputs()[0].1).konst.is_none());
        assert_eq!(before, run(&g));

        // A weight the integer GEMM path may match stays a DequantizeLinear.
        let mut g = qdq_conv(true);
        PassRunner::new().with(FoldConvWeightDequantize).run(&mut g).unwrap();
        assert_eq!(g.op_histogram().get("DequantizeLinear"), Some(&2));
    }
}
