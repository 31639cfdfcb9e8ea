//! Canonicalising passes that need nothing but the IR.

mod broadcasts;

use crate::ops::{Const, Op};
use crate::{Graph, IrResult, Pass, Patch};
pub use broadcasts::SinkBroadcasts;

/// Replaces every node whose outputs inference already knows as constants by `Const` nodes.
pub struct ConstantFolding;

impl Pass for ConstantFolding {
    fn name(&self) -> &str {
        "constant-folding"
    }
    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let mut p = Patch::new();
        for (id, n) in g.nodes().iter().enumerate() {
            if matches!(n.op, Op::Const(_) | Op::Input(_)) || n.outputs.iter().any(|f| f.konst.is_none()) {
                continue;
            }
            for (slot, f) in n.outputs.iter().enumerate() {
                let name = if n.outputs.len() == 1 { n.name.clone() } else { format!("{}:{slot}", n.name) };
                let c = p.add_node(&name, Const(f.konst.clone().expect("checked above")), vec![]);
                p.shunt(crate::OutletId::new(id, slot), Patch::wire(c, 0));
            }
        }
        Ok((!p.is_empty()).then_some(p))
    }
}

/// Removes `Identity` nodes (and so inference-mode Dropout).
pub struct IdentityElimination;

impl Pass for IdentityElimination {
    fn name(&self) -> &str {
        "identity-elimination"
    }
    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let mut p = Patch::new();
        for (id, n) in g.nodes().iter().enumerate() {
            if matches!(n.op, Op::Identity(_)) {
                p.shunt(crate::OutletId::new(id, 0), n.inputs[0]);
            }
        }
        Ok((!p.is_empty()).then_some(p))
    }
}

use crate::ops::{Binary, BinaryOp, LayerNorm, Reduce, ReduceOp, Unary, UnaryOp};
use crate::{NodeId, OutletId};
use slimnn_tensor::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// Read-only helpers for pattern matching on a graph.
struct Matcher<'a> {
    g: &'a Graph,
    consumers: HashMap<OutletId, Vec<(NodeId, usize)>>,
}

impl<'a> Matcher<'a> {
    fn new(g: &'a Graph) -> Matcher<'a> {
        Matcher { g, consumers: g.consumers() }
    }

    /// The value of a one-element constant.
    fn scalar(&self, o: OutletId) -> Option<f64> {
        let t = self.g.fact(o).konst.as_ref()?;
        (t.len() == 1).then(|| t.to_f64_vec()[0])
    }

    fn is_scalar(&self, o: OutletId, v: f64, rel: f64) -> bool {
        self.scalar(o).is_some_and(|x| (x - v).abs() <= rel * v.abs())
    }

    /// Readers of `o` that are `Binary(op)`, with the other operand.
    fn binary_readers(&self, o: OutletId, op: BinaryOp) -> Vec<(NodeId, OutletId)> {
        let mut out = vec![];
        for &(n, ix) in self.consumers.get(&o).map(Vec::as_slice).unwrap_or(&[]) {
            let node = self.g.node(n);
            if node.op == Op::Binary(Binary(op)) && node.inputs.len() == 2 {
                let commutative = matches!(op, BinaryOp::Add | BinaryOp::Mul);
                if ix == 0 || commutative {
                    out.push((n, node.inputs[1 - ix]));
                }
            }
        }
        out
    }

    /// The node producing `o` if it is `Binary(op)`: its two inputs.
    fn binary_of(&self, o: OutletId, op: BinaryOp) -> Option<(OutletId, OutletId)> {
        let n = self.g.node(o.node);
        (n.op == Op::Binary(Binary(op))).then(|| (n.inputs[0], n.inputs[1]))
    }

    fn unary_readers(&self, o: OutletId, op: UnaryOp) -> Vec<NodeId> {
        self.consumers
            .get(&o)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .filter(|(n, _)| self.g.node(*n).op == Op::Unary(Unary(op)))
            .map(|(n, _)| *n)
            .collect()
    }

    /// Readers of `o` that are a mean over only the last axis, keeping dims.
    fn last_axis_means(&self, o: OutletId) -> Vec<NodeId> {
        let rank = self.g.fact(o).rank() as i64;
        self.consumers
            .get(&o)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .filter(|(n, _)| match &self.g.node(*n).op {
                Op::Reduce(Reduce { op: ReduceOp::Mean, axes: Some(a), keepdims: true, .. }) => {
                    a.len() == 1 && (a[0] == -1 || a[0] == rank - 1)
                }
                _ => false,
            })
            .map(|(n, _)| *n)
            .collect()
    }
}

fn out0(n: NodeId) -> OutletId {
    OutletId::new(n, 0)
}

/// A constant usable as LayerNorm scale/bias for a last dim of `h`: shape `[h]` or `[1,..,1,h]`.
fn as_vector(g: &Graph, o: OutletId, h: usize) -> Option<Tensor> {
    let t = g.fact(o).konst.as_ref()?;
    let s = t.shape();
    (s.last() == Some(&h) && s[..s.len() - 1].iter().all(|&d| d == 1))
        .then(|| (**t).clone().into_shape(vec![h]).ok())?
}

/// Fuses the decomposed layer normalisation exporters emit —
/// `(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) [* gamma] [+ beta]` over the last axis,
/// with `Pow(d, 2)` or `d * d`, and `/ s` or `* Reciprocal(s)` — into one `LayerNorm`.
pub struct FuseLayerNorm;

impl Pass for FuseLayerNorm {
    fn name(&self) -> &str {
        "fuse-layer-norm"
    }
    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let m = Matcher::new(g);
        let mut p = Patch::new();
        for (id, node) in g.nodes().iter().enumerate() {
            let Op::Reduce(Reduce { op: ReduceOp::Mean, .. }) = node.op else { continue };
            let x = node.inputs[0];
            if !m.last_axis_means(x).contains(&id) {
                continue;
            }
            let Some(h) = g.fact(x).shape.last().and_then(|d| d.as_known()) else { continue };
            if !g.fact(x).dtype.is_float() {
                continue;
            }
            let Some(&(sub, _)) = m.binary_readers(x, BinaryOp::Sub).iter().find(|(_, other)| *other == out0(id))
            else {
                continue;
            };
            let d = out0(sub);
            // Squared deviation: Pow(d, 2) or Mul(d, d).
            let squares: Vec<OutletId> = m
                .binary_readers(d, BinaryOp::Pow)
                .into_iter()
                .filter(|(_, e)| m.is_scalar(*e, 2.0, 0.0))
                .chain(m.binary_readers(d, BinaryOp::Mul).into_iter().filter(|(_, e)| *e == d))
                .map(|(n, _)| out0(n))
                .collect();
            let Some((var, eps)) = squares.iter().find_map(|&sq| {
                let var = *m.last_axis_means(sq).first()?;
                let (add, eps) = *m.binary_readers(out0(var), BinaryOp::Add).first()?;
                Some((add, m.scalar(eps)?))
            }) else {
                continue;
            };
            let Some(&sqrt) = m.unary_readers(out0(var), UnaryOp::Sqrt).first() else { continue };
            let s = out0(sqrt);
            // d / s, or d * (1 / s).
            let normed =
                m.binary_readers(d, BinaryOp::Div).into_iter().find(|(_, o)| *o == s).map(|(n, _)| n).or_else(|| {
                    let r = *m.unary_readers(s, UnaryOp::Reciprocal).first()?;
                    m.binary_readers(d, BinaryOp::Mul).into_iter().find(|(_, o)| *o == out0(r)).map(|(n, _)| n)
                });
            let Some(normed) = normed else { continue };
            let mut end = out0(normed);
            let dtype = g.fact(x).dtype;
            let ones = Tensor::from_f64s(dtype, vec![h], &vec![1.0; h])?;
            let zeros = Tensor::from_f64s(dtype, vec![h], &vec![0.0; h])?;
            let (mut scale, mut bias) = (ones, zeros);
            if let Some((mul, gamma)) =
                m.binary_readers(end, BinaryOp::Mul).into_iter().find_map(|(n, o)| Some((n, as_vector(g, o, h)?)))
            {
                scale = gamma;
                end = out0(mul);
            }
            if let Some((add, beta)) =
                m.binary_readers(end, BinaryOp::Add).into_iter().find_map(|(n, o)| Some((n, as_vector(g, o, h)?)))
            {
                bias = beta;
                end = out0(add);
            }
            let base = &g.node(end.node).name;
            let sc = p.add_node(&format!("{base}.ln_scale"), Const(Arc::new(scale)), vec![]);
            let bi = p.add_node(&format!("{base}.ln_bias"), Const(Arc::new(bias)), vec![]);
            let ln = p.add_node(
                &format!("{base}.layer_norm"),
                LayerNorm::new(-1, eps as f32),
                vec![x.into(), Patch::wire(sc, 0), Patch::wire(bi, 0)],
            );
            p.shunt(end, Patch::wire(ln, 0));
            // One fusion per patch: matches may overlap, and facts change after each.
            return Ok(Some(p));
        }
        Ok(None)
    }
}

/// Fuses the erf form of GELU exporters emit — `x * 0.5 * (1 + erf(x / sqrt(2)))` in any
/// association and with `/ sqrt(2)` or `* (1 / sqrt(2))` — into `Gelu`.
pub struct FuseGelu;

impl Pass for FuseGelu {
    fn name(&self) -> &str {
        "fuse-gelu"
    }
    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let m = Matcher::new(g);
        for (id, node) in g.nodes().iter().enumerate() {
            if node.op != Op::Unary(Unary(UnaryOp::Erf)) {
                continue;
            }
            let u = node.inputs[0];
            let x = match (m.binary_of(u, BinaryOp::Div), m.binary_of(u, BinaryOp::Mul)) {
                (Some((x, c)), _) if m.is_scalar(c, std::f64::consts::SQRT_2, 1e-4) => x,
                (_, Some((a, b))) if m.is_scalar(b, std::f64::consts::FRAC_1_SQRT_2, 1e-4) => a,
                (_, Some((a, b))) if m.is_scalar(a, std::f64::consts::FRAC_1_SQRT_2, 1e-4) => b,
                _ => continue,
            };
            let Some(&(one_plus, _)) =
                m.binary_readers(out0(id), BinaryOp::Add).iter().find(|(_, c)| m.is_scalar(*c, 1.0, 0.0))
            else {
                continue;
            };
            let is_half_x = |o: OutletId| {
                m.binary_of(o, BinaryOp::Mul)
                    .is_some_and(|(a, b)| (a == x && m.is_scalar(b, 0.5, 0.0)) || (b == x && m.is_scalar(a, 0.5, 0.0)))
            };
            let mut end = None;
            for (mul, other) in m.binary_readers(out0(one_plus), BinaryOp::Mul) {
                if is_half_x(other) {
                    end = Some(out0(mul));
                } else if other == x {
                    end = m
                        .binary_readers(out0(mul), BinaryOp::Mul)
                        .into_iter()
                        .find(|(_, c)| m.is_scalar(*c, 0.5, 0.0))
                        .map(|(n, _)| out0(n));
                } else if m.is_scalar(other, 0.5, 0.0) {
                    end = m
                        .binary_readers(out0(mul), BinaryOp::Mul)
                        .into_iter()
                        .find(|(_, o)| *o == x)
                        .map(|(n, _)| out0(n));
                }
                if end.is_some() {
                    break;
                }
            }
            let Some(end) = end else { continue };
            let mut p = Patch::new();
            let gelu = p.add_node(
                &format!("{}.gelu", g.node(end.node).name),
                Unary(UnaryOp::Gelu { tanh: false }),
                vec![x.into()],
            );
            p.shunt(end, Patch::wire(gelu, 0));
            return Ok(Some(p));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fact, PassRunner};
    use slimnn_tensor::{DType, Dim};

    fn input(g: &mut Graph) -> OutletId {
        g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("b"), Dim::Known(4)])).unwrap()
    }

    fn bin(g: &mut Graph, op: BinaryOp, a: OutletId, b: OutletId) -> OutletId {
        let n = format!("n{}", g.nodes().len());
        g.add_node(&n, Binary(op), vec![a, b]).unwrap()[0]
    }

    fn scalar(g: &mut Graph, v: f32) -> OutletId {
        let n = format!("c{}", g.nodes().len());
        g.add_const(&n, Tensor::scalar(v)).unwrap()
    }

    fn sample() -> Tensor {
        Tensor::from_vec(vec![2, 4], vec![0.3f32, -1.2, 2.5, 0.0, 1.0, 1.5, -0.5, 4.0]).unwrap()
    }

    fn check_same(before: &Graph, after: &Graph) {
        let a = before.eval(vec![("x".into(), sample())]).unwrap();
        let b = after.eval(vec![("x".into(), sample())]).unwrap();
        assert!(a[0].max_abs_diff(&b[0]).unwrap() < 1e-6);
    }

    #[test]
    fn fuses_decomposed_layer_norm_in_both_spellings() {
        for (use_pow, use_recip) in [(true, false), (false, true)] {
            let mut g = Graph::default();
            let x = input(&mut g);
            let mean = |g: &mut Graph, v| {
                let r =
                    Reduce { op: ReduceOp::Mean, axes: Some(vec![-1]), keepdims: true, noop_with_empty_axes: false };
                let n = format!("mean{}", g.nodes().len());
                g.add_node(&n, r, vec![v]).unwrap()[0]
            };
            let mu = mean(&mut g, x);
            let d = bin(&mut g, BinaryOp::Sub, x, mu);
            let sq = if use_pow {
                let two = scalar(&mut g, 2.0);
                bin(&mut g, BinaryOp::Pow, d, two)
            } else {
                bin(&mut g, BinaryOp::Mul, d, d)
            };
            let var = mean(&mut g, sq);
            let eps = scalar(&mut g, 1e-5);
            let v = bin(&mut g, BinaryOp::Add, eps, var);
            let s = g.add_node("sqrt", Unary(UnaryOp::Sqrt), vec![v]).unwrap()[0];
            let n = if use_recip {
                let r = g.add_node("recip", Unary(UnaryOp::Reciprocal), vec![s]).unwrap()[0];
                bin(&mut g, BinaryOp::Mul, r, d)
            } else {
                bin(&mut g, BinaryOp::Div, d, s)
            };
            let gamma = g.add_const("gamma", Tensor::from_vec(vec![4], vec![1f32, 2.0, 0.5, -1.0]).unwrap()).unwrap();
            let beta = g.add_const("beta", Tensor::from_vec(vec![1, 4], vec![0.1f32, 0.2, 0.3, 0.4]).unwrap()).unwrap();
            let y = bin(&mut g, BinaryOp::Mul, n, gamma);
            let y = bin(&mut g, BinaryOp::Add, y, beta);
            g.add_output("y", y);
            let mut fused = g.clone();
            PassRunner::new().with(FuseLayerNorm).run(&mut fused).unwrap();
            assert_eq!(fused.op_histogram().into_iter().collect::<Vec<_>>(), vec![("LayerNormalization", 1)]);
            check_same(&g, &fused);
        }
    }

    #[test]
    fn fuses_erf_gelu_in_any_association() {
        for variant in 0..3 {
            let mut g = Graph::default();
            let x = input(&mut g);
            let c = scalar(&mut g, std::f32::consts::SQRT_2);
            let u = bin(&mut g, BinaryOp::Div, x, c);
            let e = g.add_node("erf", Unary(UnaryOp::Erf), vec![u]).unwrap()[0];
            let one = scalar(&mut g, 1.0);
            let a = bin(&mut g, BinaryOp::Add, one, e);
            let half = scalar(&mut g, 0.5);
            let y = match variant {
                0 => {
                    let m = bin(&mut g, BinaryOp::Mul, x, a);
                    bin(&mut g, BinaryOp::Mul, m, half)
                }
                1 => {
                    let hx = bin(&mut g, BinaryOp::Mul, half, x);
                    bin(&mut g, BinaryOp::Mul, a, hx)
                }
                _ => {
                    let m = bin(&mut g, BinaryOp::Mul, a, half);
                    bin(&mut g, BinaryOp::Mul, x, m)
                }
            };
            g.add_output("y", y);
            let mut fused = g.clone();
            PassRunner::new().with(FuseGelu).run(&mut fused).unwrap();
            assert_eq!(fused.op_histogram().into_iter().collect::<Vec<_>>(), vec![("Gelu", 1)], "variant {variant}");
            check_same(&g, &fused);
        }
    }

    #[test]
    fn near_misses_are_left_alone() {
        // x * 0.5 * (1 + erf(x / 2)): wrong constant, not GELU.
        let mut g = Graph::default();
        let x = input(&mut g);
        let c = scalar(&mut g, 2.0);
        let u = bin(&mut g, BinaryOp::Div, x, c);
        let e = g.add_node("erf", Unary(UnaryOp::Erf), vec![u]).unwrap()[0];
        let one = scalar(&mut g, 1.0);
        let a = bin(&mut g, BinaryOp::Add, e, one);
        let m = bin(&mut g, BinaryOp::Mul, x, a);
        let half = scalar(&mut g, 0.5);
        let y = bin(&mut g, BinaryOp::Mul, m, half);
        g.add_output("y", y);
        let before = g.op_histogram();
        PassRunner::new().with(FuseGelu).with(FuseLayerNorm).run(&mut g).unwrap();
        assert_eq!(g.op_histogram(), before);
    }
}
