//! Moves broadcasts (`Expand`, and ops that only broadcast) toward a graph's outputs, so that
//! values stay at their own size as long as possible. The motivating case is BERT's padding
//! mask as recent PyTorch exports write it: a `[batch, 1, 1, seq]` key mask combined with an
//! all-true `[1, 1, seq, 1]` query term, expanded to `[batch, 1, seq, seq]` and turned into an
//! additive float mask, all before the attention adds it. After these rewrites the Where runs
//! on `batch * seq` values, and the attention reads one mask row per sequence.

use crate::ops::{Binary, BinaryOp, Const, Expand, Op, Where};
use crate::{Graph, IrResult, NodeId, OutletId, Pass, Patch, Wire};
use slimnn_tensor::{broadcast_shapes, DType, Tensor};
use std::sync::Arc;

/// Rewrites, each keeping the value of every graph output:
/// - `And(true, y)` and `Or(false, y)`, the constant side filled with one value → `y`,
///   expanded to the output's shape if it is smaller;
/// - `Expand(Expand(x, _), _)` → one `Expand(x, shape)`; `Expand(x, _)` to `x`'s own shape → `x`;
/// - `Where(Expand(c, _), a, b)` with one-element `a` and `b` → `Expand(Where(c, a, b), shape)`;
/// - an elementwise binary op reading `Expand(m, _)` where the op's own broadcasting of `m`
///   against its other operand gives the same shape → the op reading `m`.
pub struct SinkBroadcasts;

impl Pass for SinkBroadcasts {
    fn name(&self) -> &str {
        "sink-broadcasts"
    }

    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        for id in 0..g.nodes().len() {
            if let Some(p) = rewrite(g, id)? {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }
}

fn shape(g: &Graph, o: OutletId) -> Option<Vec<usize>> {
    g.fact(o).known_shape()
}

fn is_const(g: &Graph, o: OutletId) -> bool {
    g.fact(o).konst.is_some()
}

/// The bool constant behind `o` when every element is `v`.
fn all_bool(g: &Graph, o: OutletId, v: bool) -> bool {
    g.fact(o)
        .konst
        .as_ref()
        .is_some_and(|t| t.dtype() == DType::Bool && t.as_slice::<bool>().is_ok_and(|s| s.iter().all(|&b| b == v)))
}

/// The input of `o`'s producer when it is an `Expand`.
fn expanded(g: &Graph, o: OutletId) -> Option<OutletId> {
    let n = g.node(o.node);
    matches!(n.op, Op::Expand(_)).then(|| n.inputs[0])
}

/// Adds `Expand(x, to)` to `p`; returns its output.
fn add_expand(p: &mut Patch, name: &str, x: Wire, to: &[usize]) -> IrResult<Wire> {
    let dims: Vec<i64> = to.iter().map(|&d| d as i64).collect();
    let s = p.add_node(&format!("{name}.shape"), Const(Arc::new(Tensor::from_vec(vec![dims.len()], dims)?)), vec![]);
    Ok(Patch::wire(p.add_node(&format!("{name}.expand"), Expand, vec![x, Patch::wire(s, 0)]), 0))
}

/// A patch making the readers of node `id`'s output read `x` broadcast to that output's
/// shape `to`: `x` itself when it already has that shape.
fn broadcast_to(g: &Graph, id: NodeId, x: OutletId, to: &[usize]) -> IrResult<Option<Patch>> {
    let mut p = Patch::new();
    let w =
        if shape(g, x).as_deref() == Some(to) { x.into() } else { add_expand(&mut p, &g.node(id).name, x.into(), to)? };
    p.shunt(OutletId::new(id, 0), w);
    Ok(Some(p))
}

fn rewrite(g: &Graph, id: NodeId) -> IrResult<Option<Patch>> {
    let node = g.node(id);
    let out = OutletId::new(id, 0);
    let Some(out_shape) = shape(g, out) else { return Ok(None) };
    if is_const(g, out) {
        return Ok(None);
    }
    match &node.op {
        Op::Expand(_) => {
            let x = node.inputs[0];
            let inner = expanded(g, x).unwrap_or(x);
            if inner != x || shape(g, x) == Some(out_shape.clone()) {
                return broadcast_to(g, id, inner, &out_shape);
            }
        }
        Op::Where(_) => {
            let (c, a, b) = (node.inputs[0], node.inputs[1], node.inputs[2]);
            let one = |o| shape(g, o).is_some_and(|s| s.iter().product::<usize>() == 1);
            if let (Some(c0), true, true) = (expanded(g, c), one(a), one(b)) {
                let mut p = Patch::new();
                let w = p.add_node(&format!("{}.narrow", node.name), Where, vec![c0.into(), a.into(), b.into()]);
                let e = add_expand(&mut p, &node.name, Patch::wire(w, 0), &out_shape)?;
                p.shunt(out, e);
                return Ok(Some(p));
            }
        }
        Op::Binary(Binary(op)) if node.inputs.len() == 2 && *op != BinaryOp::PRelu => {
            if matches!(op, BinaryOp::And | BinaryOp::Or) {
                let neutral = *op == BinaryOp::And;
                for side in 0..2 {
                    let (k, y) = (node.inputs[side], node.inputs[1 - side]);
                    if all_bool(g, k, neutral) && !is_const(g, y) {
                        return broadcast_to(g, id, y, &out_shape);
                    }
                }
            }
            for side in 0..2 {
                let Some(m) = expanded(g, node.inputs[side]) else { continue };
                let (Some(ms), Some(os)) = (shape(g, m), shape(g, node.inputs[1 - side])) else { continue };
                if broadcast_shapes(&ms, &os).is_ok_and(|s| s == out_shape) {
                    let mut inputs: Vec<Wire> = node.inputs.iter().map(|&o| o.into()).collect();
                    inputs[side] = m.into();
                    let mut p = Patch::new();
                    let n = p.add_node(&node.name, node.op.clone(), inputs);
                    p.shunt(out, Patch::wire(n, 0));
                    return Ok(Some(p));
                }
            }
        }
        _ => {}
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fact, PassRunner};

    /// BERT's padding mask as PyTorch 2.x exports it, added to attention scores.
    fn bert_mask_graph() -> Graph {
        let mut g = Graph::default();
        let keys = g.add_input("keys", Fact::known(DType::Bool, &[2, 1, 1, 5])).unwrap();
        let scores = g.add_input("scores", Fact::known(DType::F32, &[2, 3, 5, 5])).unwrap();
        let all_q = g.add_const("all_q", Tensor::from_vec(vec![1, 1, 5, 1], vec![true; 5]).unwrap()).unwrap();
        let both = g.add_node("and", Binary(BinaryOp::And), vec![all_q, keys]).unwrap()[0];
        let to = g.add_const("to", Tensor::from_vec(vec![4], vec![2i64, 1, 5, 5]).unwrap()).unwrap();
        let wide = g.add_node("expand", Expand, vec![both, to]).unwrap()[0];
        let zero = g.add_const("zero", Tensor::scalar(0f32)).unwrap();
        let low = g.add_const("low", Tensor::scalar(f32::MIN)).unwrap();
        let additive = g.add_node("where", Where, vec![wide, zero, low]).unwrap()[0];
        let y = g.add_node("add", Binary(BinaryOp::Add), vec![scores, additive]).unwrap()[0];
        g.add_output("y", y);
        g
    }

    fn inputs() -> Vec<(String, Tensor)> {
        let keys =
            Tensor::from_vec(vec![2, 1, 1, 5], vec![true, true, true, false, false, true, true, true, true, false]);
        let scores = Tensor::from_vec(vec![2, 3, 5, 5], (0..150).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>());
        vec![("keys".into(), keys.unwrap()), ("scores".into(), scores.unwrap())]
    }

    #[test]
    fn bert_padding_mask_stays_one_row_per_sequence() {
        let g = bert_mask_graph();
        let mut sunk = g.clone();
        let report = PassRunner::new().with(SinkBroadcasts).run(&mut sunk).unwrap();
        assert!(!report.applied.is_empty());
        let hist: Vec<_> = sunk.op_histogram().into_iter().collect();
        assert_eq!(hist, vec![("Add", 1), ("Where", 1)], "{sunk:?}");
        // The add reads the narrow mask and broadcasts it itself.
        let add = sunk.nodes().iter().find(|n| matches!(n.op, Op::Binary(_))).unwrap();
        assert_eq!(shape(&sunk, add.inputs[1]), Some(vec![2, 1, 1, 5]));
        let (a, b) = (g.eval(inputs()).unwrap(), sunk.eval(inputs()).unwrap());
        assert_eq!(a[0].max_abs_diff(&b[0]).unwrap(), 0.0);
    }

    #[test]
    fn leaves_broadcasts_that_change_the_result() {
        // And with a constant that is not all true, and an Expand the add does not imply.
        let mut g = Graph::default();
        let keys = g.add_input("keys", Fact::known(DType::Bool, &[1, 4])).unwrap();
        let x = g.add_input("x", Fact::known(DType::F32, &[1, 4])).unwrap();
        let mixed = g.add_const("mixed", Tensor::from_vec(vec![3, 1], vec![true, false, true]).unwrap()).unwrap();
        let both = g.add_node("and", Binary(BinaryOp::And), vec![mixed, keys]).unwrap()[0];
        let to = g.add_const("to", Tensor::from_vec(vec![2], vec![3i64, 4]).unwrap()).unwrap();
        let wide = g.add_node("expand", Expand, vec![x, to]).unwrap()[0];
        let one = g.add_const("one", Tensor::scalar(1f32)).unwrap();
        let y = g.add_node("add", Binary(BinaryOp::Add), vec![wide, one]).unwrap()[0];
        g.add_output("m", both);
        g.add_output("y", y);
        let before = g.op_histogram();
        PassRunner::new().with(SinkBroadcasts).run(&mut g).unwrap();
        assert_eq!(g.op_histogram(), before);
    }
}
