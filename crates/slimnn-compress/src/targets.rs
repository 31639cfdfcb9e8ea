//! Which nodes quantization rewrites: `MatMul`s with a constant 2-d f32 weight (and, when
//! asked, matmuls of two activations) and `Conv`s with constant f32 weights, minus excluded
//! names. Weight `Gemm`s are first split into that form ([`split_gemms`]).

use crate::{CompressError, Result};
use slimnn_ir::ops::{Binary, BinaryOp, Const, ConvAttrs, Gemm, MatMul, UnaryOp};
use slimnn_ir::{Graph, NodeId, Op, OutletId, Patch};
use slimnn_tensor::{DType, Tensor};
use std::collections::HashSet;
use std::sync::Arc;

/// A matmul `x @ W` with a constant `[K, N]` weight.
#[derive(Debug, Clone)]
pub struct Target {
    pub node: NodeId,
    pub name: String,
    pub x: OutletId,
    pub w: Arc<Tensor>,
    pub k: usize,
    pub n: usize,
    /// The `Add` reading the output with a constant `[N]` bias: (node, input index of the bias).
    pub bias: Option<(NodeId, usize)>,
}

impl Target {
    pub fn weight(&self) -> Result<&[f32]> {
        Ok(self.w.as_slice::<f32>()?)
    }
}

/// Whether `name` matches `pattern`: `*` matches any run of characters; a pattern without `*`
/// matches as a substring.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return name.contains(pattern);
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(p) => rest = &rest[p + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
}

/// Every weight matmul of `g` not excluded by a pattern nor in `skip`.
pub fn find_targets(g: &Graph, exclude: &[String], skip: &HashSet<String>) -> Result<Vec<Target>> {
    let consumers = g.consumers();
    let mut out = Vec::new();
    for (id, n) in g.nodes().iter().enumerate() {
        if !matches!(n.op, Op::MatMul(_)) || n.inputs.len() != 2 {
            continue;
        }
        let Some(w) = g.fact(n.inputs[1]).konst.clone() else { continue };
        if w.dtype() != DType::F32 || w.rank() != 2 || g.fact(n.inputs[0]).dtype != DType::F32 {
            continue;
        }
        if g.fact(n.inputs[0]).rank() < 1 {
            continue;
        }
        if exclude.iter().any(|p| name_matches(p, &n.name)) || skip.contains(&n.name) {
            continue;
        }
        let (k, nn) = (w.shape()[0], w.shape()[1]);
        let out_outlet = OutletId::new(id, 0);
        let bias = match consumers.get(&out_outlet).map(Vec::as_slice) {
            Some([(add, _)]) => {
                let a = g.node(*add);
                if matches!(a.op, Op::Binary(Binary(BinaryOp::Add))) {
                    (0..2)
                        .find(|&i| {
                            a.inputs[i] != out_outlet
                                && g.fact(a.inputs[i])
                                    .konst
                                    .as_ref()
                                    .is_some_and(|b| b.shape() == [nn] && b.dtype() == DType::F32)
                        })
                        .map(|i| (*add, i))
                } else {
                    None
                }
            }
            _ => None,
        };
        out.push(Target { node: id, name: n.name.clone(), x: n.inputs[0], w, k, n: nn, bias });
    }
    Ok(out)
}

/// A convolution `Conv(x, W[, b])` with constant f32 weights `[M, C / group, k...]`.
#[derive(Debug, Clone)]
pub struct ConvTarget {
    pub node: NodeId,
    pub name: String,
    pub attrs: ConvAttrs,
    pub x: OutletId,
    pub w: Arc<Tensor>,
    /// `[M]`.
    pub bias: Option<Arc<Tensor>>,
    /// The value quantized after the conv: its output, or the output of the `Relu` / `Clip(0, _)`
    /// that alone reads it when that activation folds into the quantization range.
    pub out: OutletId,
    /// Whether `out` is the folded activation's output.
    pub folds_activation: bool,
    /// Whether `out` gets quantized: not when it is a model output (kept in float).
    pub quantize_output: bool,
}

impl ConvTarget {
    /// Output channels.
    pub fn channels(&self) -> usize {
        self.w.shape()[0]
    }
}

/// Whether node `id` is `Relu` or `Clip(·, 0, max)` with constant bounds, both of which an
/// asymmetric u8 quantization with zero point 0 and range top at most `max` performs exactly.
fn zero_floor_activation(g: &Graph, id: NodeId) -> bool {
    let n = g.node(id);
    match n.op {
        Op::Unary(slimnn_ir::ops::Unary(UnaryOp::Relu)) => true,
        Op::Clip(_) => {
            let bound = |i: usize| n.inputs.get(i).and_then(|&o| g.fact(o).konst.as_ref()).map(|t| t.to_f64_vec());
            matches!((bound(1).as_deref(), bound(2).as_deref()), (Some([lo]), Some([hi])) if *lo == 0.0 && *hi > 0.0)
        }
        _ => false,
    }
}

/// Every 2-d convolution of `g` with constant f32 weights (and bias) not excluded by a pattern
/// nor in `skip`. With `fold_activations`, a `Relu` / `Clip(0, max)` that alone reads a conv's
/// output is quantized instead of the conv output (what ONNX Runtime's quantizer does too).
pub fn find_conv_targets(
    g: &Graph,
    exclude: &[String],
    skip: &HashSet<String>,
    fold_activations: bool,
) -> Result<Vec<ConvTarget>> {
    let consumers = g.consumers();
    let outputs: Vec<OutletId> = g.outputs().iter().map(|(_, o)| *o).collect();
    let mut out = Vec::new();
    for (id, n) in g.nodes().iter().enumerate() {
        let Op::Conv(conv) = &n.op else { continue };
        let Some(w) = n.inputs.get(1).and_then(|&w| g.fact(w).konst.clone()) else { continue };
        if w.dtype() != DType::F32 || w.rank() != 4 || w.shape()[0] == 0 || g.fact(n.inputs[0]).dtype != DType::F32 {
            continue;
        }
        let bias = match n.inputs.get(2) {
            None => None,
            Some(&b) => match g.fact(b).konst.clone() {
                Some(b) if b.dtype() == DType::F32 && b.len() == w.shape()[0] => Some(b),
                _ => continue,
            },
        };
        if exclude.iter().any(|p| name_matches(p, &n.name)) || skip.contains(&n.name) {
            continue;
        }
        let y = OutletId::new(id, 0);
        let readers = consumers.get(&y).map(Vec::as_slice).unwrap_or_default();
        let (out_outlet, folds_activation) = match readers {
            // Not when either is a model output: those stay float, and float needs the activation.
            [(act, _)]
                if fold_activations
                    && !outputs.contains(&y)
                    && !outputs.contains(&OutletId::new(*act, 0))
                    && zero_floor_activation(g, *act) =>
            {
                (OutletId::new(*act, 0), true)
            }
            _ => (y, false),
        };
        out.push(ConvTarget {
            node: id,
            name: n.name.clone(),
            attrs: conv.attrs.clone(),
            x: n.inputs[0],
            w,
            bias,
            out: out_outlet,
            folds_activation,
            quantize_output: !outputs.contains(&out_outlet),
        });
    }
    Ok(out)
}

/// `Add`s of two f32 activations with a 4-d output (a CNN's residual connections), not
/// excluded: static quantization quantizes their inputs and output in a CNN, as ONNX
/// Runtime's quantizer does, so that chains of residual blocks stay integer (`QLinearAdd`).
pub fn feature_map_adds(g: &Graph, exclude: &[String], skip: &HashSet<String>) -> Vec<NodeId> {
    g.nodes()
        .iter()
        .enumerate()
        .filter(|(id, n)| {
            matches!(n.op, Op::Binary(Binary(BinaryOp::Add)))
                && n.inputs.len() == 2
                && n.inputs.iter().all(|&i| g.fact(i).konst.is_none() && g.fact(i).dtype == DType::F32)
                && g.fact(OutletId::new(*id, 0)).rank() == 4
                && !exclude.iter().any(|p| name_matches(p, &n.name))
                && !skip.contains(&n.name)
        })
        .map(|(id, _)| id)
        .collect()
}

/// `Gemm(x, W, c)` with `alpha = beta = 1`, `x` not transposed, a constant 2-d f32 `W` and a
/// constant per-column `c` (or none) becomes `MatMul(x, W or Wᵀ)` followed by `Add(c)`, the form
/// every scheme quantizes (classifier heads and older exporters write Gemm). The MatMul keeps
/// the Gemm's name, so `--exclude` patterns and reports name the same layer.
pub fn split_gemms(g: &Graph) -> Result<Graph> {
    let mut p = Patch::new();
    for (id, n) in g.nodes().iter().enumerate() {
        let Op::Gemm(Gemm { alpha, beta, trans_a: false, trans_b }) = n.op else { continue };
        let Some(w) = n.inputs.get(1).and_then(|&w| g.fact(w).konst.clone()) else { continue };
        let x = n.inputs[0];
        if alpha != 1.0 || w.dtype() != DType::F32 || w.rank() != 2 || g.fact(x).dtype != DType::F32 {
            continue;
        }
        let (k, cols) = if trans_b { (w.shape()[1], w.shape()[0]) } else { (w.shape()[0], w.shape()[1]) };
        let bias = match n.inputs.get(2) {
            None => None,
            Some(&c) => match g.fact(c).konst.as_ref() {
                Some(t)
                    if beta == 1.0 && t.dtype() == DType::F32 && t.len() == cols && t.shape().last() == Some(&cols) =>
                {
                    Some(Tensor::from_vec(vec![cols], t.as_slice::<f32>()?.to_vec())?)
                }
                _ => continue,
            },
        };
        let wkn = if trans_b {
            let v = w.as_slice::<f32>()?;
            let t: Vec<f32> = (0..k * cols).map(|i| v[(i % cols) * k + i / cols]).collect();
            Tensor::from_vec(vec![k, cols], t)?
        } else {
            (*w).clone()
        };
        let wc = p.add_node(&format!("{}/weight", n.name), Const(Arc::new(wkn)), vec![]);
        let mut y = p.add_node(&n.name, MatMul, vec![x.into(), Patch::wire(wc, 0)]);
        if let Some(b) = bias {
            let bc = p.add_node(&format!("{}/bias", n.name), Const(Arc::new(b)), vec![]);
            y = p.add_node(
                &format!("{}/bias_add", n.name),
                Binary(BinaryOp::Add),
                vec![Patch::wire(y, 0), Patch::wire(bc, 0)],
            );
        }
        p.shunt(OutletId::new(id, 0), Patch::wire(y, 0));
    }
    let mut out = g.clone();
    if !p.is_empty() {
        out.apply(p)?;
        out.compact()?;
    }
    Ok(out)
}

/// Matmuls of two non-constant f32 operands (attention scores and context).
pub fn activation_matmuls(g: &Graph, exclude: &[String], skip: &HashSet<String>) -> Vec<NodeId> {
    g.nodes()
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            matches!(n.op, Op::MatMul(_))
                && n.inputs.iter().all(|&i| g.fact(i).konst.is_none() && g.fact(i).dtype == DType::F32)
                && !exclude.iter().any(|p| name_matches(p, &n.name))
                && !skip.contains(&n.name)
        })
        .map(|(id, _)| id)
        .collect()
}

/// Errors unless some layer is left to quantize (`convs`: whether the scheme also takes convolutions).
pub fn require_some(targets: &[Target], convs: Option<&[ConvTarget]>, what: &str) -> Result<()> {
    if !targets.is_empty() || convs.is_some_and(|c| !c.is_empty()) {
        return Ok(());
    }
    let layers = if convs.is_some() {
        "MatMul with a constant f32 [K, N] weight and no Conv with constant f32 weights"
    } else {
        "MatMul with a constant f32 [K, N] weight"
    };
    Err(CompressError::Model(format!("{what}: the model has no {layers} left to quantize")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimnn_ir::Fact;

    #[test]
    fn gemms_split_into_matmul_and_bias() {
        // y = x Wᵀ + c with W [3, 2] (trans_b), x [2, 2].
        for trans_b in [false, true] {
            let mut g = Graph::default();
            let x = g.add_input("x", Fact::known(DType::F32, &[2, 2])).unwrap();
            let w: Vec<f32> =
                if trans_b { vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] } else { vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0] };
            let shape = if trans_b { vec![3, 2] } else { vec![2, 3] };
            let w = g.add_const("w", Tensor::from_vec(shape, w).unwrap()).unwrap();
            let c = g.add_const("c", Tensor::from_vec(vec![1, 3], vec![0.5f32, -1.0, 2.0]).unwrap()).unwrap();
            let gemm = Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b };
            let y = g.add_node("head/Gemm", gemm, vec![x, w, c]).unwrap()[0];
            g.add_output("y", y);
            let split = split_gemms(&g).unwrap();
            assert_eq!(split.op_histogram().get("Gemm"), None);
            let input = vec![("x".to_string(), Tensor::from_vec(vec![2, 2], vec![1.0f32, -1.0, 2.0, 0.5]).unwrap())];
            assert_eq!(g.eval(input.clone()).unwrap(), split.eval(input).unwrap(), "trans_b {trans_b}");
            let t = find_targets(&split, &[], &HashSet::new()).unwrap();
            assert_eq!(t.len(), 1);
            assert_eq!((t[0].name.as_str(), t[0].k, t[0].n, t[0].bias.is_some()), ("head/Gemm", 2, 3, true));
        }
    }

    #[test]
    fn patterns() {
        assert!(name_matches("attention", "/encoder/layer.0/attention/self/query/MatMul"));
        assert!(name_matches("*layer.0/*", "/encoder/layer.0/output/MatMul"));
        assert!(!name_matches("*layer.1/*", "/encoder/layer.0/output/MatMul"));
        assert!(name_matches("*MatMul", "a/MatMul"));
        assert!(!name_matches("a*", "ba"));
    }
}
