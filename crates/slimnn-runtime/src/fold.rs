//! Folding an inference BatchNormalization into the convolution that feeds it.

use slimnn_ir::ops::{BatchNorm, Const, Conv};
use slimnn_ir::{Graph, IrResult, Op, OutletId, Pass, Patch};
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
