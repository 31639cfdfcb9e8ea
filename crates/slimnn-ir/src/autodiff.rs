//! Reverse-mode automatic differentiation as an IR pass.
//!
//! [`differentiate`] appends to a graph the nodes that compute the gradient of a scalar loss
//! with respect to chosen outlets (usually parameter inputs). The backward graph is made of
//! ordinary IR nodes, so the reference evaluator and the runtime execute it like any other
//! graph. Only nodes on a path from a `wrt` outlet to the loss get backward nodes; every
//! backward node is named `grad/<forward node name>/<what>`.
//!
//! Shapes that the backward pass needs (for reshapes, expands, broadcast sums) come from the
//! forward facts when they are known and from `Shape` nodes of the forward values when they are
//! symbolic, so a graph with a symbolic batch dim differentiates once and runs at any batch
//! size; [`Graph::specialized`] folds those `Shape` nodes to constants.

use crate::ops::util::norm_axis;
use crate::ops::{
    Binary, BinaryOp, Cast, Concat, ConstantOfShape, ConvGradInput, ConvGradWeight, Expand, FakeQuantGrad, Flatten,
    Gather, GatherGrad, GlobalPool, LayerNormGrad, LogSoftmax, Op, OpDef, Pad, PadMode, PoolGrad, Reduce, ReduceOp,
    Reshape, Shape, Slice, Softmax, SoftmaxGrad, Split, Squeeze, Transpose, Unary, UnaryGrad, UnaryOp, Unsqueeze,
    Where,
};
use crate::{Fact, Graph, IrError, IrResult, Node, NodeId, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Adds to `graph` the nodes computing d loss / d wrt[i] by reverse-mode accumulation.
/// `loss` must be a scalar (rank 0 or one element) float outlet. Returns one outlet per `wrt`
/// (a zeros constant shaped like it when loss does not depend on it). Errors name the node and op
/// that has no backward.
pub fn differentiate(graph: &mut Graph, loss: OutletId, wrt: &[OutletId]) -> IrResult<Vec<OutletId>> {
    check_outlet(graph, loss, "loss")?;
    let loss_fact = graph.fact(loss).clone();
    if !loss_fact.dtype.is_float() {
        return Err(IrError::Graph(format!("autodiff: the loss must be a float value, got {loss_fact}")));
    }
    let loss_shape = loss_fact.known_shape().filter(|s| s.iter().product::<usize>() == 1).ok_or_else(|| {
        IrError::Graph(format!("autodiff: the loss must be a scalar (rank 0 or one element), got {loss_fact}"))
    })?;
    for &w in wrt {
        check_outlet(graph, w, "wrt")?;
        let f = graph.fact(w);
        if !f.dtype.is_float() {
            let name = &graph.node(w.node).name;
            return Err(IrError::Graph(format!("autodiff: cannot differentiate with respect to '{name}' of type {f}")));
        }
    }
    let active = active_outlets(graph, loss, wrt);
    let wanted: HashSet<OutletId> = wrt.iter().copied().collect();
    let mut ad = Emitter::new(graph);
    let mut pending: HashMap<OutletId, Vec<OutletId>> = HashMap::new();
    let mut found: HashMap<OutletId, OutletId> = HashMap::new();
    if active.contains(&loss) {
        let ones = Tensor::from_f64s(loss_fact.dtype, loss_shape.clone(), &vec![1.0; loss_shape.iter().product()])?;
        let seed = ad.konst("grad/loss/seed", ones)?;
        pending.insert(loss, vec![seed]);
    }
    for id in (0..=loss.node).rev() {
        let node = ad.g.node(id).clone();
        let mut dys: Vec<Option<OutletId>> = vec![None; node.outputs.len()];
        for (slot, dy) in dys.iter_mut().enumerate() {
            let o = OutletId::new(id, slot);
            if let Some(parts) = pending.remove(&o) {
                let g = ad.sum(&format!("grad/{}/sum", node.name), parts)?;
                if wanted.contains(&o) {
                    found.insert(o, g);
                }
                *dy = Some(g);
            }
        }
        let need: Vec<bool> = node.inputs.iter().map(|i| active.contains(i)).collect();
        if dys.iter().all(Option::is_none) || !need.contains(&true) {
            continue;
        }
        let grads = backward(&mut ad, id, &node, &dys, &need).map_err(|e| match e {
            e @ IrError::Node { .. } if is_no_backward(&e, &node) => e,
            e => e.at_node(&node.name, node.op.name()),
        })?;
        for ((&input, grad), &needed) in node.inputs.iter().zip(grads).zip(&need) {
            match (needed, grad) {
                (true, Some(g)) => pending.entry(input).or_default().push(g),
                (true, None) => {
                    return Err(no_backward(
                        &node,
                        &format!("gives no gradient for its input {}", input_index(&node, input)),
                    ))
                }
                _ => {}
            }
        }
    }
    wrt.iter()
        .map(|w| match found.get(w) {
            Some(&g) => Ok(g),
            None => {
                let name = format!("grad/{}/zeros", ad.g.node(w.node).name);
                ad.zeros_like(&name, *w)
            }
        })
        .collect()
}

/// Training-mode batch normalisation of `x` (`[N, C, spatial...]`) built from primitives: the
/// mean and (biased) variance over the batch and spatial axes, so its backward follows from the
/// primitive rules. `scale` and `bias` are `[C]`.
pub fn batch_norm_train(
    graph: &mut Graph,
    x: OutletId,
    scale: OutletId,
    bias: OutletId,
    eps: f32,
) -> IrResult<OutletId> {
    Ok(batch_norm_train_stats(graph, x, scale, bias, eps)?.y)
}

/// The outlets of a training-mode batch normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchNormTrain {
    /// The normalised, scaled and shifted output, shaped like `x`.
    pub y: OutletId,
    /// Batch mean per channel, `[C]` (for running statistics).
    pub mean: OutletId,
    /// Biased batch variance per channel, `[C]` (for running statistics).
    pub var: OutletId,
}

/// [`batch_norm_train`], also returning the batch statistics.
pub fn batch_norm_train_stats(
    graph: &mut Graph,
    x: OutletId,
    scale: OutletId,
    bias: OutletId,
    eps: f32,
) -> IrResult<BatchNormTrain> {
    check_outlet(graph, x, "batch_norm_train x")?;
    check_outlet(graph, scale, "batch_norm_train scale")?;
    check_outlet(graph, bias, "batch_norm_train bias")?;
    let fx = graph.fact(x).clone();
    if !fx.dtype.is_float() || fx.rank() < 2 {
        return Err(IrError::Graph(format!("batch_norm_train: x must be a float tensor [N, C, ...], got {fx}")));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(IrError::Graph(format!("batch_norm_train: epsilon must be finite and >= 0, got {eps}")));
    }
    let rank = fx.rank();
    let axes: Vec<i64> = std::iter::once(0).chain(2..rank as i64).collect();
    let base = format!("batch_norm_train/{}", graph.node(x.node).name);
    let mut e = Emitter::new(graph);
    let p = |what: &str| format!("{base}/{what}");
    let mean = e.reduce(&p("mean"), ReduceOp::Mean, x, &axes, true)?;
    let centred = e.binary(&p("centred"), BinaryOp::Sub, x, mean)?;
    let square = e.binary(&p("square"), BinaryOp::Mul, centred, centred)?;
    let var = e.reduce(&p("var"), ReduceOp::Mean, square, &axes, true)?;
    let eps = e.scalar(&p("eps"), fx.dtype, f64::from(eps))?;
    let var_eps = e.binary(&p("var_eps"), BinaryOp::Add, var, eps)?;
    let minus_half = e.scalar(&p("minus_half"), fx.dtype, -0.5)?;
    let inv_std = e.binary(&p("inv_std"), BinaryOp::Pow, var_eps, minus_half)?;
    let normed = e.binary(&p("normed"), BinaryOp::Mul, centred, inv_std)?;
    let scale_c = e.one(&p("scale_c"), Unsqueeze { axes: axes.clone() }, vec![scale])?;
    let bias_c = e.one(&p("bias_c"), Unsqueeze { axes: axes.clone() }, vec![bias])?;
    let scaled = e.binary(&p("scaled"), BinaryOp::Mul, normed, scale_c)?;
    let y = e.binary(&p("y"), BinaryOp::Add, scaled, bias_c)?;
    let mean = e.one(&p("batch_mean"), Squeeze { axes: Some(axes.clone()) }, vec![mean])?;
    let var = e.one(&p("batch_var"), Squeeze { axes: Some(axes) }, vec![var])?;
    Ok(BatchNormTrain { y, mean, var })
}

fn check_outlet(g: &Graph, o: OutletId, what: &str) -> IrResult<()> {
    if o.node >= g.nodes().len() || o.slot >= g.node(o.node).outputs.len() {
        return Err(IrError::Graph(format!("autodiff: {what} outlet {}:{} is not in the graph", o.node, o.slot)));
    }
    Ok(())
}

/// Ops whose outputs never carry a gradient, whatever their dtype.
fn stops_gradient(op: &Op) -> bool {
    matches!(op, Op::Shape(_) | Op::ArgReduce(_) | Op::Range(_) | Op::ConstantOfShape(_))
}

/// Outlets on a path from a `wrt` outlet to `loss`: float values that depend on a `wrt` and
/// that the loss depends on. Only these get gradients.
fn active_outlets(g: &Graph, loss: OutletId, wrt: &[OutletId]) -> HashSet<OutletId> {
    let wrt: HashSet<OutletId> = wrt.iter().copied().collect();
    let mut varies = HashSet::new();
    for (id, n) in g.nodes().iter().enumerate().take(loss.node + 1) {
        let from_inputs = !stops_gradient(&n.op) && n.inputs.iter().any(|i| varies.contains(i));
        for (slot, f) in n.outputs.iter().enumerate() {
            let o = OutletId::new(id, slot);
            if f.dtype.is_float() && (from_inputs || wrt.contains(&o)) {
                varies.insert(o);
            }
        }
    }
    let mut active = HashSet::new();
    if varies.contains(&loss) {
        active.insert(loss);
    }
    for id in (0..=loss.node).rev() {
        let n = g.node(id);
        if (0..n.outputs.len()).any(|s| active.contains(&OutletId::new(id, s))) {
            active.extend(n.inputs.iter().filter(|i| varies.contains(i)));
        }
    }
    active
}

fn input_index(node: &Node, input: OutletId) -> usize {
    node.inputs.iter().position(|&i| i == input).unwrap_or(0)
}

fn no_backward(node: &Node, msg: &str) -> IrError {
    let op = node.op.name();
    IrError::op(op, format!("no backward: {msg}")).at_node(&node.name, op)
}

fn is_no_backward(e: &IrError, node: &Node) -> bool {
    matches!(e, IrError::Node { node: n, .. } if *n == node.name)
}

// ---------------------------------------------------------------------------------------------
// Emitting nodes.

/// Appends nodes to a graph with unique names, caching `Shape` nodes of forward values.
struct Emitter<'g> {
    g: &'g mut Graph,
    names: HashSet<String>,
    shapes: HashMap<OutletId, OutletId>,
}

impl<'g> Emitter<'g> {
    fn new(g: &'g mut Graph) -> Emitter<'g> {
        let names = g.nodes().iter().map(|n| n.name.clone()).collect();
        Emitter { g, names, shapes: HashMap::new() }
    }

    fn unique(&mut self, name: &str) -> String {
        let mut n = name.to_string();
        let mut k = 1;
        while self.names.contains(&n) {
            n = format!("{name}.{k}");
            k += 1;
        }
        self.names.insert(n.clone());
        n
    }

    fn node(&mut self, name: &str, op: impl Into<Op>, inputs: Vec<OutletId>) -> IrResult<Vec<OutletId>> {
        let name = self.unique(name);
        self.g.add_node(&name, op, inputs)
    }

    fn one(&mut self, name: &str, op: impl Into<Op>, inputs: Vec<OutletId>) -> IrResult<OutletId> {
        Ok(self.node(name, op, inputs)?[0])
    }

    fn fact(&self, o: OutletId) -> Fact {
        self.g.fact(o).clone()
    }

    fn rank(&self, o: OutletId) -> usize {
        self.g.fact(o).rank()
    }

    fn konst(&mut self, name: &str, t: Tensor) -> IrResult<OutletId> {
        let name = self.unique(name);
        self.g.add_const(&name, t)
    }

    fn scalar(&mut self, name: &str, dt: DType, v: f64) -> IrResult<OutletId> {
        self.konst(name, Tensor::from_f64s(dt, vec![], &[v])?)
    }

    fn i64s(&mut self, name: &str, v: &[i64]) -> IrResult<OutletId> {
        self.konst(name, Tensor::from_vec(vec![v.len()], v.to_vec())?)
    }

    fn unary(&mut self, name: &str, op: UnaryOp, x: OutletId) -> IrResult<OutletId> {
        self.one(name, Unary(op), vec![x])
    }

    fn binary(&mut self, name: &str, op: BinaryOp, a: OutletId, b: OutletId) -> IrResult<OutletId> {
        self.one(name, Binary(op), vec![a, b])
    }

    /// `x * v` for a float scalar `v`, skipping the multiply when `v == 1`.
    fn scale(&mut self, name: &str, x: OutletId, v: f64) -> IrResult<OutletId> {
        if v == 1.0 {
            return Ok(x);
        }
        let dt = self.g.fact(x).dtype;
        let s = self.scalar(&format!("{name}/factor"), dt, v)?;
        self.binary(name, BinaryOp::Mul, x, s)
    }

    fn reduce(&mut self, name: &str, op: ReduceOp, x: OutletId, axes: &[i64], keepdims: bool) -> IrResult<OutletId> {
        let r = Reduce { op, axes: Some(axes.to_vec()), keepdims, noop_with_empty_axes: false };
        self.one(name, r, vec![x])
    }

    fn sum_axes(&mut self, name: &str, x: OutletId, axes: &[usize], keepdims: bool) -> IrResult<OutletId> {
        if axes.is_empty() {
            return Ok(x);
        }
        let axes: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
        self.reduce(name, ReduceOp::Sum, x, &axes, keepdims)
    }

    /// `Where(cond, v, 0)` or, with `flip`, `Where(cond, 0, v)`.
    fn mask(&mut self, name: &str, cond: OutletId, v: OutletId, flip: bool) -> IrResult<OutletId> {
        let dt = self.g.fact(v).dtype;
        let zero = self.scalar(&format!("{name}/zero"), dt, 0.0)?;
        let (a, b) = if flip { (zero, v) } else { (v, zero) };
        self.one(name, Where, vec![cond, a, b])
    }

    /// The shape of a forward value as a 1-d i64 tensor (a constant when the shape is known).
    fn shape_of(&mut self, x: OutletId) -> IrResult<OutletId> {
        if let Some(&s) = self.shapes.get(&x) {
            return Ok(s);
        }
        let name = format!("grad/{}/shape", self.g.node(x.node).name);
        let s = self.one(&name, Shape { start: 0, end: None }, vec![x])?;
        self.shapes.insert(x, s);
        Ok(s)
    }

    /// Dims `start..end` of `x`'s shape as a 1-d i64 tensor.
    fn dims_of(&mut self, name: &str, x: OutletId, start: usize, end: usize) -> IrResult<OutletId> {
        self.one(name, Shape { start: start as i64, end: Some(end as i64) }, vec![x])
    }

    /// `v` reshaped to the shape of `like`: a constant spec when at most one dim is not known
    /// (it becomes the spec's -1, so a symbolic dim survives in the facts), else `Shape(like)`.
    fn reshape_like(&mut self, name: &str, v: OutletId, like: OutletId) -> IrResult<OutletId> {
        let target = self.g.fact(like).shape.clone();
        if self.g.fact(v).shape == target && !target.contains(&Dim::Unknown) {
            return Ok(v);
        }
        let unknown = target.iter().filter(|d| d.as_known().is_none()).count();
        let has_zero = target.contains(&Dim::Known(0));
        let spec = if unknown <= 1 && !has_zero {
            let s: Vec<i64> = target.iter().map(|d| d.as_known().map_or(-1, |n| n as i64)).collect();
            self.i64s(&format!("{name}/shape"), &s)?
        } else {
            self.shape_of(like)?
        };
        self.one(name, Reshape { allowzero: true }, vec![v, spec])
    }

    /// `v` broadcast to the shape of `like`.
    fn expand_like(&mut self, name: &str, v: OutletId, like: OutletId) -> IrResult<OutletId> {
        let s = self.shape_of(like)?;
        self.one(name, Expand, vec![v, s])
    }

    fn transpose_last2(&mut self, name: &str, x: OutletId) -> IrResult<OutletId> {
        let r = self.rank(x);
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.one(name, Transpose { perm: Some(perm) }, vec![x])
    }

    /// Zeros shaped like `x` (folded to a constant when small and of known shape).
    fn zeros_like(&mut self, name: &str, x: OutletId) -> IrResult<OutletId> {
        let dt = self.g.fact(x).dtype;
        let s = self.shape_of(x)?;
        let value = Arc::new(Tensor::from_f64s(dt, vec![1], &[0.0])?);
        self.one(name, ConstantOfShape { value }, vec![s])
    }

    /// Sum of gradient contributions.
    fn sum(&mut self, name: &str, parts: Vec<OutletId>) -> IrResult<OutletId> {
        let mut it = parts.into_iter();
        let mut acc = it.next().ok_or_else(|| IrError::Graph("autodiff: empty gradient sum".into()))?;
        for p in it {
            acc = self.binary(name, BinaryOp::Add, acc, p)?;
        }
        Ok(acc)
    }

    /// Number of elements over `axes` of `x` as a scalar of `x`'s dtype (a constant when known).
    fn count(&mut self, name: &str, x: OutletId, axes: &[usize]) -> IrResult<OutletId> {
        let f = self.fact(x);
        if let Some(n) = axes.iter().map(|&a| f.shape[a].as_known()).product::<Option<usize>>() {
            return self.scalar(name, f.dtype, n as f64);
        }
        let s = self.shape_of(x)?;
        let idx: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
        let idx = self.i64s(&format!("{name}/axes"), &idx)?;
        let dims = self.one(&format!("{name}/dims"), Gather { axis: 0 }, vec![s, idx])?;
        let n = self.reduce(&format!("{name}/prod"), ReduceOp::Prod, dims, &[0], false)?;
        self.one(name, Cast { to: f.dtype }, vec![n])
    }

    /// Undoes a numpy broadcast: sums `dy` (shaped like the forward output `out`) down to the
    /// shape of the forward input `input`.
    /// `others` are the shapes of the other operands of the broadcast: where all of them have
    /// size 1 (or no such axis), the input's dim is the output's even when it is not known.
    fn unbroadcast(
        &mut self,
        name: &str,
        dy: OutletId,
        out: &[Dim],
        input: OutletId,
        others: &[Vec<Dim>],
    ) -> IrResult<OutletId> {
        let ins = self.g.fact(input).shape.clone();
        let Some(lead) = out.len().checked_sub(ins.len()) else {
            return Err(IrError::Graph(format!(
                "autodiff: {name}: input shape {} is longer than the output's {}",
                crate::ops::util::show_dims(&ins),
                crate::ops::util::show_dims(out)
            )));
        };
        let mut axes: Vec<usize> = (0..lead).collect();
        let mut unsure = Vec::new();
        for (k, d) in ins.iter().enumerate() {
            let o = &out[lead + k];
            match (d, o) {
                (Dim::Known(1), Dim::Known(1)) => {}
                (Dim::Known(1), _) => axes.push(lead + k),
                (Dim::Known(_), _) | (_, Dim::Known(1)) => {}
                (Dim::Sym(a), Dim::Sym(b)) if a == b => {}
                _ => {
                    let axis = lead + k;
                    let alone = others.iter().all(|o| match (axis + o.len()).checked_sub(out.len()) {
                        Some(j) => o[j] == Dim::Known(1),
                        None => true,
                    });
                    // Otherwise only known at run time whether this axis was broadcast.
                    if !alone {
                        unsure.push(k);
                    }
                }
            }
        }
        let mut g = self.sum_axes(&format!("{name}/sum"), dy, &axes, true)?;
        if !unsure.is_empty() {
            g = self.sum_unsure(&format!("{name}/sum_dyn"), g, input, lead, &unsure)?;
        }
        if lead > 0 {
            let lead_axes: Vec<i64> = (0..lead as i64).collect();
            g = self.one(&format!("{name}/squeeze"), Squeeze { axes: Some(lead_axes) }, vec![g])?;
        }
        Ok(g)
    }

    /// Sums `g` over the axes `lead + k` (for `k` in `unsure`) where `input` has size 1 at run
    /// time and passes the others through: each such axis of size `o` is split into
    /// `[i, o / i]` with `i` the input's dim, and the second part summed away.
    fn sum_unsure(
        &mut self,
        name: &str,
        g: OutletId,
        input: OutletId,
        lead: usize,
        unsure: &[usize],
    ) -> IrResult<OutletId> {
        let rank = self.rank(g);
        let mut parts = Vec::new();
        let mut summed = Vec::new();
        for j in 0..rank {
            let dj = self.dims_of(&format!("{name}/dim{j}"), g, j, j + 1)?;
            match j.checked_sub(lead).filter(|k| unsure.contains(k)) {
                Some(k) => {
                    let ik = self.dims_of(&format!("{name}/in{k}"), input, k, k + 1)?;
                    let rest = self.binary(&format!("{name}/rest{j}"), BinaryOp::Div, dj, ik)?;
                    parts.push(ik);
                    summed.push(parts.len());
                    parts.push(rest);
                }
                None => parts.push(dj),
            }
        }
        let spec = self.one(&format!("{name}/spec"), Concat { axis: 0 }, parts)?;
        let split = self.one(&format!("{name}/split"), Reshape { allowzero: true }, vec![g, spec])?;
        self.sum_axes(name, split, &summed, false)
    }
}

// ---------------------------------------------------------------------------------------------
// Backward rules.

/// Gradients of `node`'s inputs from its outputs' gradients `dys` (`None`: no gradient flows
/// into that output). Returns one entry per input; only inputs with `need` set must be given.
fn backward(
    e: &mut Emitter,
    id: NodeId,
    node: &Node,
    dys: &[Option<OutletId>],
    need: &[bool],
) -> IrResult<Vec<Option<OutletId>>> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let ins = &node.inputs;
    let n_in = ins.len();
    let mut out: Vec<Option<OutletId>> = vec![None; n_in];
    // Split and the training ops look at every output's gradient themselves.
    if let Op::Split(s) = &node.op {
        split_backward(e, id, node, s.axis, dys, &mut out)?;
        return Ok(out);
    }
    if !matches!(node.op, Op::Binary(_) | Op::Unary(_) | Op::Cast(_) | Op::Identity(_)) && dys.len() > 1 {
        return backward_training_ops(e, id, node, dys, need);
    }
    let Some(dy) = dys[0] else { return Ok(out) };
    let y = OutletId::new(id, 0);
    let fy = node.outputs[0].clone();
    match &node.op {
        Op::Identity(_) => out[0] = Some(dy),
        Op::Cast(_) => {
            let to = e.g.fact(ins[0]).dtype;
            out[0] = Some(e.one(&p("cast"), Cast { to }, vec![dy])?);
        }
        Op::Binary(b) => binary_backward(e, node, b.0, dy, y, &fy, need, &mut out)?,
        Op::Where(_) => {
            for (k, flip) in [(1, false), (2, true)] {
                if need[k] {
                    let m = e.mask(&p(&format!("select{k}")), ins[0], dy, flip)?;
                    let others = [e.fact(ins[0]).shape, e.fact(ins[3 - k]).shape];
                    out[k] = Some(e.unbroadcast(&p(&format!("d{k}")), m, &fy.shape, ins[k], &others)?);
                }
            }
        }
        Op::Clip(_) => clip_backward(e, node, dy, need, &mut out)?,
        Op::MatMul(_) => matmul_backward(e, node, dy, &fy, need, &mut out)?,
        Op::Gemm(gm) => {
            let (a, b) = (ins[0], ins[1]);
            let g = e.scale(&p("alpha_dy"), dy, f64::from(gm.alpha))?;
            if need[0] {
                // d op(A) = G op(B)^T; dA is its transpose when trans_a.
                let da = if gm.trans_a {
                    let opb = if gm.trans_b { e.transpose_last2(&p("bT"), b)? } else { b };
                    let gt = e.transpose_last2(&p("dyT"), g)?;
                    e.one(&p("da"), crate::ops::MatMul, vec![opb, gt])?
                } else {
                    let opbt = if gm.trans_b { b } else { e.transpose_last2(&p("bT"), b)? };
                    e.one(&p("da"), crate::ops::MatMul, vec![g, opbt])?
                };
                out[0] = Some(da);
            }
            if need[1] {
                let db = if gm.trans_b {
                    let opa = if gm.trans_a { e.transpose_last2(&p("aT"), a)? } else { a };
                    let gt = e.transpose_last2(&p("dyT"), g)?;
                    e.one(&p("db"), crate::ops::MatMul, vec![gt, opa])?
                } else {
                    let opat = if gm.trans_a { a } else { e.transpose_last2(&p("aT"), a)? };
                    e.one(&p("db"), crate::ops::MatMul, vec![opat, g])?
                };
                out[1] = Some(db);
            }
            if n_in > 2 && need[2] {
                let g = e.scale(&p("beta_dy"), dy, f64::from(gm.beta))?;
                // C broadcasts against the product, shaped like the output.
                out[2] = Some(e.unbroadcast(&p("dc"), g, &fy.shape, ins[2], std::slice::from_ref(&fy.shape))?);
            }
        }
        Op::BatchNorm(bn) => batchnorm_backward(e, node, bn.epsilon, dy, need, &mut out)?,
        Op::Reduce(r) => reduce_backward(e, node, r, dy, y, need, &mut out)?,
        Op::GlobalPool(gp) => global_pool_backward(e, node, gp, dy, y, &mut out)?,
        Op::Reshape(_) | Op::Flatten(_) => out[0] = Some(e.reshape_like(&p("reshape"), dy, ins[0])?),
        Op::Squeeze(s) => {
            let g = match (&s.axes, n_in) {
                (Some(axes), 1) => {
                    let r = e.rank(ins[0]);
                    let mut axes = axes.iter().map(|&a| norm_axis("Squeeze", a, r)).collect::<IrResult<Vec<_>>>()?;
                    axes.sort_unstable();
                    let axes = axes.into_iter().map(|a| a as i64).collect();
                    e.one(&p("unsqueeze"), Unsqueeze { axes }, vec![dy])?
                }
                _ => e.reshape_like(&p("reshape"), dy, ins[0])?,
            };
            out[0] = Some(g);
        }
        Op::Unsqueeze(u) if n_in == 1 => {
            let r = fy.rank();
            let axes =
                u.axes.iter().map(|&a| norm_axis("Unsqueeze", a, r).map(|a| a as i64)).collect::<IrResult<_>>()?;
            out[0] = Some(e.one(&p("squeeze"), Squeeze { axes: Some(axes) }, vec![dy])?);
        }
        Op::Unsqueeze(_) => out[0] = Some(e.reshape_like(&p("reshape"), dy, ins[0])?),
        Op::Transpose(t) => {
            let perm = t.perm.as_ref().map(|perm| {
                let mut inv = vec![0; perm.len()];
                for (i, &a) in perm.iter().enumerate() {
                    inv[a] = i;
                }
                inv
            });
            out[0] = Some(e.one(&p("transpose"), Transpose { perm }, vec![dy])?);
        }
        Op::Expand(_) => {
            let target = vec![Dim::Unknown; fy.rank()];
            out[0] = Some(e.unbroadcast(&p("sum"), dy, &fy.shape, ins[0], &[target])?);
        }
        Op::Concat(c) => concat_backward(e, node, c.axis, dy, need, &mut out)?,
        Op::Slice(_) => out[0] = Some(slice_backward(e, node, dy)?),
        Op::Pad(pd) => pad_backward(e, node, pd, dy, need, &mut out)?,
        Op::Tile(_) => out[0] = Some(tile_backward(e, node, dy)?),
        _ => return backward_training_ops(e, id, node, dys, need),
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn binary_backward(
    e: &mut Emitter,
    node: &Node,
    op: BinaryOp,
    dy: OutletId,
    y: OutletId,
    fy: &Fact,
    need: &[bool],
    out: &mut [Option<OutletId>],
) -> IrResult<()> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let (a, b) = (node.inputs[0], node.inputs[1]);
    let out_shape = &fy.shape;
    // Per input: the gradient at the output's shape, then summed down to the input's shape.
    let mut full: [Option<OutletId>; 2] = [None, None];
    match op {
        BinaryOp::Add => {
            full = [Some(dy), Some(dy)];
        }
        BinaryOp::Sub => {
            full[0] = Some(dy);
            if need[1] {
                // Negate after the sum: fewer elements.
                let s = e.unbroadcast(&p("db_sum"), dy, out_shape, b, &[e.fact(a).shape])?;
                out[1] = Some(e.unary(&p("db"), UnaryOp::Neg, s)?);
            }
        }
        BinaryOp::Mul => {
            if need[0] {
                full[0] = Some(e.binary(&p("dy_b"), BinaryOp::Mul, dy, b)?);
            }
            if need[1] {
                full[1] = Some(e.binary(&p("dy_a"), BinaryOp::Mul, dy, a)?);
            }
        }
        BinaryOp::Div => {
            let dy_b = e.binary(&p("dy_over_b"), BinaryOp::Div, dy, b)?;
            full[0] = Some(dy_b);
            if need[1] {
                // d(a/b)/db = -a/b^2 = -y/b.
                let t = e.binary(&p("dy_y_over_b"), BinaryOp::Mul, dy_b, y)?;
                full[1] = Some(e.unary(&p("neg"), UnaryOp::Neg, t)?);
            }
        }
        BinaryOp::Pow => {
            let fa = e.fact(a);
            let bf =
                if e.g.fact(b).dtype == fa.dtype { b } else { e.one(&p("b_cast"), Cast { to: fa.dtype }, vec![b])? };
            if need[0] {
                // b * a^(b-1)
                let one = e.scalar(&p("one"), fa.dtype, 1.0)?;
                let bm1 = e.binary(&p("b_minus_1"), BinaryOp::Sub, bf, one)?;
                let pw = e.binary(&p("a_pow_bm1"), BinaryOp::Pow, a, bm1)?;
                let d = e.binary(&p("dpow"), BinaryOp::Mul, pw, bf)?;
                full[0] = Some(e.binary(&p("dy_da"), BinaryOp::Mul, dy, d)?);
            }
            if need[1] {
                // y * ln(a)
                let ln = e.unary(&p("ln_a"), UnaryOp::Log, a)?;
                let d = e.binary(&p("y_ln_a"), BinaryOp::Mul, y, ln)?;
                full[1] = Some(e.binary(&p("dy_db"), BinaryOp::Mul, dy, d)?);
            }
        }
        BinaryOp::Max | BinaryOp::Min => {
            // Ties send the gradient to `a`.
            let cmp = if op == BinaryOp::Max { BinaryOp::GreaterOrEqual } else { BinaryOp::LessOrEqual };
            let take_a = e.binary(&p("take_a"), cmp, a, b)?;
            if need[0] {
                full[0] = Some(e.mask(&p("da_full"), take_a, dy, false)?);
            }
            if need[1] {
                full[1] = Some(e.mask(&p("db_full"), take_a, dy, true)?);
            }
        }
        BinaryOp::PRelu => {
            // y = x for x >= 0, slope * x below.
            let zero = e.scalar(&p("zero"), fy.dtype, 0.0)?;
            let neg = e.binary(&p("negative"), BinaryOp::Less, a, zero)?;
            if need[0] {
                let sdy = e.binary(&p("slope_dy"), BinaryOp::Mul, dy, b)?;
                out[0] = Some(e.one(&p("dx"), Where, vec![neg, sdy, dy])?);
            }
            if need[1] {
                let xdy = e.binary(&p("x_dy"), BinaryOp::Mul, dy, a)?;
                full[1] = Some(e.mask(&p("dslope_full"), neg, xdy, false)?);
            }
        }
        _ => return Err(no_backward(node, "the op is not differentiable")),
    }
    for (k, f) in full.into_iter().enumerate() {
        if let (true, Some(f), None) = (need[k], f, out[k]) {
            let other = e.fact(node.inputs[1 - k]).shape;
            out[k] =
                Some(e.unbroadcast(&p(if k == 0 { "da" } else { "db" }), f, out_shape, node.inputs[k], &[other])?);
        }
    }
    Ok(())
}

fn clip_backward(
    e: &mut Emitter,
    node: &Node,
    dy: OutletId,
    need: &[bool],
    out: &mut [Option<OutletId>],
) -> IrResult<()> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let (x, lo, hi) = (node.inputs[0], node.inputs[1], node.inputs[2]);
    if need[0] {
        // Clip is min(max(x, lo), hi): x passes through where lo <= x <= hi.
        let ge = e.binary(&p("above_min"), BinaryOp::GreaterOrEqual, x, lo)?;
        let le = e.binary(&p("below_max"), BinaryOp::LessOrEqual, x, hi)?;
        let inside = e.binary(&p("inside"), BinaryOp::And, ge, le)?;
        let g = e.mask(&p("dx_full"), inside, dy, false)?;
        let shape = e.fact(g).shape;
        let others = [e.fact(lo).shape, e.fact(hi).shape];
        out[0] = Some(e.unbroadcast(&p("dx"), g, &shape, x, &others)?);
    }
    if need[1] {
        let below = e.binary(&p("below_min"), BinaryOp::Less, x, lo)?;
        let ordered = e.binary(&p("min_le_max"), BinaryOp::LessOrEqual, lo, hi)?;
        let m = e.binary(&p("min_taken"), BinaryOp::And, below, ordered)?;
        let g = e.mask(&p("dmin_full"), m, dy, false)?;
        let s = e.reduce(&p("dmin_sum"), ReduceOp::Sum, g, &[], false)?;
        out[1] = Some(e.reshape_like(&p("dmin"), s, lo)?);
    }
    if need[2] {
        let raised = e.binary(&p("raised"), BinaryOp::Max, x, lo)?;
        let m = e.binary(&p("max_taken"), BinaryOp::Greater, raised, hi)?;
        let g = e.mask(&p("dmax_full"), m, dy, false)?;
        let s = e.reduce(&p("dmax_sum"), ReduceOp::Sum, g, &[], false)?;
        out[2] = Some(e.reshape_like(&p("dmax"), s, hi)?);
    }
    Ok(())
}

fn matmul_backward(
    e: &mut Emitter,
    node: &Node,
    dy: OutletId,
    fy: &Fact,
    need: &[bool],
    out: &mut [Option<OutletId>],
) -> IrResult<()> {
    use crate::ops::MatMul;
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let (a, b) = (node.inputs[0], node.inputs[1]);
    let (fa, fb) = (e.fact(a), e.fact(b));
    // A linear layer on batched activations: dB = A^T dY with the batch folded into one GEMM.
    let (k, n) = (fa.shape[fa.rank() - 1].as_known(), fb.shape[fb.rank() - 1].as_known());
    let flat_db = fa.rank() >= 3 && fb.rank() == 2;
    if let (true, true, Some(k), Some(n)) = (need[1], flat_db, k, n) {
        let ks = e.i64s(&p("rows_k"), &[-1, k as i64])?;
        let ns = e.i64s(&p("rows_n"), &[-1, n as i64])?;
        let a2 = e.one(&p("a_rows"), Reshape { allowzero: false }, vec![a, ks])?;
        let g2 = e.one(&p("dy_rows"), Reshape { allowzero: false }, vec![dy, ns])?;
        let at = e.transpose_last2(&p("aT"), a2)?;
        out[1] = Some(e.one(&p("db"), MatMul, vec![at, g2])?);
        if need[0] {
            let bt = e.transpose_last2(&p("bT"), b)?;
            out[0] = Some(e.one(&p("da"), MatMul, vec![dy, bt])?);
        }
        return Ok(());
    }
    // 1-d operands are promoted to matrices, as MatMul does, and the gradients squeezed back.
    let a2 = if fa.rank() == 1 { e.one(&p("a_row"), Unsqueeze { axes: vec![0] }, vec![a])? } else { a };
    let b2 = if fb.rank() == 1 { e.one(&p("b_col"), Unsqueeze { axes: vec![1] }, vec![b])? } else { b };
    let mut g = dy;
    if fa.rank() == 1 {
        let at = e.rank(g) - usize::from(fb.rank() >= 2);
        g = e.one(&p("dy_row"), Unsqueeze { axes: vec![at as i64] }, vec![g])?;
    }
    if fb.rank() == 1 {
        let at = e.rank(g);
        g = e.one(&p("dy_col"), Unsqueeze { axes: vec![at as i64] }, vec![g])?;
    }
    let batch_rank = fy.rank() - usize::from(fa.rank() >= 2) - usize::from(fb.rank() >= 2);
    let batch = &fy.shape[..batch_rank];
    let (fa2, fb2) = (e.fact(a2), e.fact(b2));
    // Each operand's batch dims broadcast against the other's; the matrix dims never do.
    let batch_of = |f: &Fact| -> Vec<Dim> {
        let mut d = f.shape[..f.rank() - 2].to_vec();
        d.extend([Dim::Known(1), Dim::Known(1)]);
        d
    };
    let (other_of_a, other_of_b) = (batch_of(&fb2), batch_of(&fa2));
    if need[0] {
        let bt = e.transpose_last2(&p("bT"), b2)?;
        let da = e.one(&p("da_full"), MatMul, vec![g, bt])?;
        let mut shape = batch.to_vec();
        shape.extend_from_slice(&fa2.shape[fa2.rank() - 2..]);
        let mut da = e.unbroadcast(&p("da"), da, &shape, a2, std::slice::from_ref(&other_of_a))?;
        if fa.rank() == 1 {
            da = e.one(&p("da_vec"), Squeeze { axes: Some(vec![0]) }, vec![da])?;
        }
        out[0] = Some(da);
    }
    if need[1] {
        let at = e.transpose_last2(&p("aT"), a2)?;
        let db = e.one(&p("db_full"), MatMul, vec![at, g])?;
        let mut shape = batch.to_vec();
        shape.extend_from_slice(&fb2.shape[fb2.rank() - 2..]);
        let mut db = e.unbroadcast(&p("db"), db, &shape, b2, std::slice::from_ref(&other_of_b))?;
        if fb.rank() == 1 {
            db = e.one(&p("db_vec"), Squeeze { axes: Some(vec![1]) }, vec![db])?;
        }
        out[1] = Some(db);
    }
    Ok(())
}

fn batchnorm_backward(
    e: &mut Emitter,
    node: &Node,
    eps: f32,
    dy: OutletId,
    need: &[bool],
    out: &mut [Option<OutletId>],
) -> IrResult<()> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let [x, scale, _bias, mean, var] = node.inputs[..] else {
        return Err(no_backward(node, "expects 5 inputs"));
    };
    let fx = e.fact(x);
    let rank = fx.rank();
    let dt = fx.dtype;
    // Per-channel vectors broadcast against x as [C, 1, ...] (a 1-d x is [N] with one channel).
    let to_c = |e: &mut Emitter, what: &str, v: OutletId| -> IrResult<OutletId> {
        if rank <= 2 {
            return Ok(v);
        }
        let axes = (1..rank as i64 - 1).collect();
        e.one(&p(what), Unsqueeze { axes }, vec![v])
    };
    // Sums over every axis but the channel one, to [C].
    let stat_axes: Vec<usize> = if rank == 1 { vec![0] } else { std::iter::once(0).chain(2..rank).collect() };
    let keep = rank == 1;
    let eps = e.scalar(&p("eps"), dt, f64::from(eps))?;
    let var_eps = e.binary(&p("var_eps"), BinaryOp::Add, var, eps)?;
    let std = e.unary(&p("std"), UnaryOp::Sqrt, var_eps)?;
    let inv = e.unary(&p("inv_std"), UnaryOp::Reciprocal, std)?;
    let scale_inv = e.binary(&p("scale_inv"), BinaryOp::Mul, scale, inv)?;
    if need[0] {
        let f = to_c(e, "scale_inv_c", scale_inv)?;
        out[0] = Some(e.binary(&p("dx"), BinaryOp::Mul, dy, f)?);
    }
    let dbias = if need[2] || need[3] { Some(e.sum_axes(&p("dbias"), dy, &stat_axes, keep)?) } else { None };
    if need[2] {
        out[2] = dbias;
    }
    if let (true, Some(db)) = (need[3], dbias) {
        let t = e.binary(&p("dmean_pos"), BinaryOp::Mul, db, scale_inv)?;
        out[3] = Some(e.unary(&p("dmean"), UnaryOp::Neg, t)?);
    }
    if need[1] || need[4] {
        // s = sum(dy * (x - mean)) per channel.
        let mean_c = to_c(e, "mean_c", mean)?;
        let centred = e.binary(&p("centred"), BinaryOp::Sub, x, mean_c)?;
        let prod = e.binary(&p("dy_centred"), BinaryOp::Mul, dy, centred)?;
        let s = e.sum_axes(&p("dy_centred_sum"), prod, &stat_axes, keep)?;
        if need[1] {
            out[1] = Some(e.binary(&p("dscale"), BinaryOp::Mul, s, inv)?);
        }
        if need[4] {
            // d/dvar of (x - mean) * scale * (var + eps)^-1/2 = -1/2 (x - mean) * scale * inv^3.
            let inv2 = e.binary(&p("inv_std2"), BinaryOp::Mul, inv, inv)?;
            let inv3 = e.binary(&p("inv_std3"), BinaryOp::Mul, inv2, scale_inv)?;
            let t = e.binary(&p("dvar_pos"), BinaryOp::Mul, s, inv3)?;
            out[4] = Some(e.scale(&p("dvar"), t, -0.5)?);
        }
    }
    Ok(())
}

/// The reduced axes of a `Reduce` node (`None`: it passes its input through).
fn reduce_axes(node: &Node, r: &Reduce, e: &Emitter) -> IrResult<Option<Vec<usize>>> {
    let x = node.inputs[0];
    let rank = e.rank(x);
    let axes: Vec<i64> = match node.inputs.get(1) {
        None => r.axes.clone().unwrap_or_default(),
        Some(&a) => match &e.g.fact(a).konst {
            Some(t) => t.to_i64_vec()?,
            None => return Err(no_backward(node, "the reduced axes must be known when differentiating")),
        },
    };
    if axes.is_empty() {
        return Ok(if r.noop_with_empty_axes { None } else { Some((0..rank).collect()) });
    }
    let mut v = axes.iter().map(|&a| norm_axis(node.op.name(), a, rank)).collect::<IrResult<Vec<_>>>()?;
    v.sort_unstable();
    Ok(Some(v))
}

fn reduce_backward(
    e: &mut Emitter,
    node: &Node,
    r: &Reduce,
    dy: OutletId,
    y: OutletId,
    need: &[bool],
    out: &mut [Option<OutletId>],
) -> IrResult<()> {
    if !need[0] {
        return Ok(());
    }
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let x = node.inputs[0];
    let Some(axes) = reduce_axes(node, r, e)? else {
        out[0] = Some(dy);
        return Ok(());
    };
    // dy and y with the reduced axes kept as 1, so they broadcast against x.
    let keep = |e: &mut Emitter, what: &str, v: OutletId| -> IrResult<OutletId> {
        if r.keepdims || axes.is_empty() {
            return Ok(v);
        }
        let ax = axes.iter().map(|&a| a as i64).collect();
        e.one(&p(what), Unsqueeze { axes: ax }, vec![v])
    };
    let g = keep(e, "dy_keep", dy)?;
    let dx = match r.op {
        ReduceOp::Sum => e.expand_like(&p("dx"), g, x)?,
        ReduceOp::Mean => {
            let n = e.count(&p("count"), x, &axes)?;
            let g = e.binary(&p("dy_mean"), BinaryOp::Div, g, n)?;
            e.expand_like(&p("dx"), g, x)?
        }
        ReduceOp::SumSquare => {
            let g2 = e.scale(&p("dy2"), g, 2.0)?;
            e.binary(&p("dx"), BinaryOp::Mul, x, g2)?
        }
        ReduceOp::L1 => {
            let s = e.unary(&p("sign"), UnaryOp::Sign, x)?;
            e.binary(&p("dx"), BinaryOp::Mul, s, g)?
        }
        ReduceOp::L2 => {
            let yk = keep(e, "y_keep", y)?;
            let q = e.binary(&p("dy_over_y"), BinaryOp::Div, g, yk)?;
            e.binary(&p("dx"), BinaryOp::Mul, x, q)?
        }
        ReduceOp::LogSum => {
            let yk = keep(e, "y_keep", y)?;
            let s = e.unary(&p("sum"), UnaryOp::Exp, yk)?;
            let q = e.binary(&p("dy_over_sum"), BinaryOp::Div, g, s)?;
            e.expand_like(&p("dx"), q, x)?
        }
        ReduceOp::LogSumExp => {
            let yk = keep(e, "y_keep", y)?;
            let d = e.binary(&p("x_minus_y"), BinaryOp::Sub, x, yk)?;
            let sm = e.unary(&p("softmax"), UnaryOp::Exp, d)?;
            e.binary(&p("dx"), BinaryOp::Mul, sm, g)?
        }
        ReduceOp::Prod => {
            // y / x: undefined where x is 0.
            let yk = keep(e, "y_keep", y)?;
            let q = e.binary(&p("y_over_x"), BinaryOp::Div, yk, x)?;
            e.binary(&p("dx"), BinaryOp::Mul, q, g)?
        }
        ReduceOp::Max | ReduceOp::Min => {
            let yk = keep(e, "y_keep", y)?;
            extreme_backward(e, node, x, yk, g, &axes)?
        }
    };
    out[0] = Some(dx);
    Ok(())
}

/// Gradient of a max/min over `axes`: `dy` goes to the elements equal to the extreme, split
/// evenly between ties.
fn extreme_backward(
    e: &mut Emitter,
    node: &Node,
    x: OutletId,
    y_keep: OutletId,
    dy_keep: OutletId,
    axes: &[usize],
) -> IrResult<OutletId> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let dt = e.g.fact(x).dtype;
    let hit = e.binary(&p("is_extreme"), BinaryOp::Equal, x, y_keep)?;
    let hit = e.one(&p("is_extreme_f"), Cast { to: dt }, vec![hit])?;
    let ties = e.sum_axes(&p("ties"), hit, axes, true)?;
    let share = e.binary(&p("share"), BinaryOp::Div, dy_keep, ties)?;
    e.binary(&p("dx"), BinaryOp::Mul, hit, share)
}

fn global_pool_backward(
    e: &mut Emitter,
    node: &Node,
    gp: &GlobalPool,
    dy: OutletId,
    y: OutletId,
    out: &mut [Option<OutletId>],
) -> IrResult<()> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let x = node.inputs[0];
    let axes: Vec<usize> = (2..e.rank(x)).collect();
    out[0] = Some(if gp.max {
        extreme_backward(e, node, x, y, dy, &axes)?
    } else {
        let n = e.count(&p("count"), x, &axes)?;
        let g = e.binary(&p("dy_mean"), BinaryOp::Div, dy, n)?;
        e.expand_like(&p("dx"), g, x)?
    });
    Ok(())
}

fn concat_backward(
    e: &mut Emitter,
    node: &Node,
    axis: i64,
    dy: OutletId,
    need: &[bool],
    out: &mut [Option<OutletId>],
) -> IrResult<()> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let n = node.inputs.len();
    if n == 1 {
        out[0] = Some(dy);
        return Ok(());
    }
    let rank = e.rank(node.inputs[0]);
    let axis = norm_axis("Concat", axis, rank)?;
    let sizes: Option<Vec<usize>> = node.inputs.iter().map(|&i| e.g.fact(i).shape[axis].as_known()).collect();
    let parts = match sizes {
        Some(s) => e.node(&p("split"), Split { axis: axis as i64, split: Some(s), num_outputs: n }, vec![dy])?,
        None => {
            let dims = node
                .inputs
                .iter()
                .enumerate()
                .map(|(k, &i)| e.dims_of(&p(&format!("len{k}")), i, axis, axis + 1))
                .collect::<IrResult<Vec<_>>>()?;
            let sizes = e.one(&p("sizes"), Concat { axis: 0 }, dims)?;
            e.node(&p("split"), Split { axis: axis as i64, split: None, num_outputs: n }, vec![dy, sizes])?
        }
    };
    for (k, part) in parts.into_iter().enumerate() {
        if need[k] {
            out[k] = Some(part);
        }
    }
    Ok(())
}

fn split_backward(
    e: &mut Emitter,
    id: NodeId,
    node: &Node,
    axis: i64,
    dys: &[Option<OutletId>],
    out: &mut [Option<OutletId>],
) -> IrResult<()> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let parts = dys
        .iter()
        .enumerate()
        .map(|(j, d)| match d {
            Some(d) => Ok(*d),
            None => e.zeros_like(&p(&format!("zeros{j}")), OutletId::new(id, j)),
        })
        .collect::<IrResult<Vec<_>>>()?;
    out[0] = Some(if parts.len() == 1 { parts[0] } else { e.one(&p("concat"), Concat { axis }, parts)? });
    Ok(())
}

/// First index and element count of `start..end` by `step` on an axis of size `d` (ONNX rules,
/// as Slice's eval applies them).
fn slice_range(d: usize, start: i64, end: i64, step: i64) -> (i64, i64) {
    let (first, count) = crate::ops::slice_range(d, start, end, step);
    (first as i64, count as i64)
}

fn const_ints(e: &Emitter, node: &Node, k: usize, what: &str) -> IrResult<Option<Vec<i64>>> {
    match node.inputs.get(k) {
        None => Ok(None),
        Some(&i) => match &e.g.fact(i).konst {
            Some(t) => Ok(Some(t.to_i64_vec()?)),
            None => Err(no_backward(node, &format!("{what} must be constants when differentiating"))),
        },
    }
}

/// Slice's gradient: dy padded with zeros back to the input's shape, one sliced axis at a time.
fn slice_backward(e: &mut Emitter, node: &Node, dy: OutletId) -> IrResult<OutletId> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let x = node.inputs[0];
    let fx = e.fact(x);
    let rank = fx.rank();
    let starts = const_ints(e, node, 1, "starts")?.unwrap_or_default();
    let ends = const_ints(e, node, 2, "ends")?.unwrap_or_default();
    let axes = const_ints(e, node, 3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = const_ints(e, node, 4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(no_backward(node, "starts, ends, axes and steps differ in length"));
    }
    // An empty slice anywhere: nothing flows back.
    for j in 0..starts.len() {
        let axis = norm_axis("Slice", axes[j], rank)?;
        if let Some(d) = fx.shape[axis].as_known() {
            if slice_range(d, starts[j], ends[j], steps[j]).1 == 0 {
                return e.zeros_like(&p("zeros"), x);
            }
        }
    }
    let dt = fx.dtype;
    let mut g = dy;
    for j in 0..starts.len() {
        let axis = norm_axis("Slice", axes[j], rank)?;
        let (start, end, step) = (starts[j], ends[j], steps[j]);
        let tag = |what: &str| p(&format!("axis{axis}/{what}"));
        let zero = e.scalar(&tag("zero"), dt, 0.0)?;
        let axis_in = e.i64s(&tag("axes"), &[axis as i64])?;
        match fx.shape[axis].as_known() {
            Some(d) => {
                let (first, count) = slice_range(d, start, end, step);
                if step == 1 && first == 0 && count == d as i64 {
                    continue;
                }
                let (first, stride) = if step > 0 {
                    (first, step)
                } else {
                    // Reverse so the kept elements come in ascending order.
                    let s = e.i64s(&tag("rev_start"), &[-1])?;
                    let en = e.i64s(&tag("rev_end"), &[i64::MIN])?;
                    let st = e.i64s(&tag("rev_step"), &[-1])?;
                    g = e.one(&tag("reverse"), Slice, vec![g, s, en, axis_in, st])?;
                    (first + (count - 1) * step, -step)
                };
                let mut len = count;
                if stride > 1 {
                    // Interleave stride - 1 zeros after each element: [.., c, ..] -> [.., c * stride, ..].
                    g = e.one(&tag("unsqueeze"), Unsqueeze { axes: vec![axis as i64 + 1] }, vec![g])?;
                    let pads = e.i64s(&tag("gap_pads"), &[0, stride - 1])?;
                    let after = e.i64s(&tag("gap_axis"), &[axis as i64 + 1])?;
                    g = e.one(&tag("gaps"), Pad { mode: PadMode::Constant }, vec![g, pads, zero, after])?;
                    let before = e.dims_of(&tag("dims_before"), g, 0, axis)?;
                    let merged = e.i64s(&tag("merged"), &[-1])?;
                    let rest = e.dims_of(&tag("dims_after"), g, axis + 2, rank + 1)?;
                    let spec = e.one(&tag("spec"), Concat { axis: 0 }, vec![before, merged, rest])?;
                    g = e.one(&tag("merge"), Reshape { allowzero: true }, vec![g, spec])?;
                    len = count * stride;
                }
                // A negative end pad crops the trailing gap.
                let pads = e.i64s(&tag("pads"), &[first, d as i64 - first - len])?;
                g = e.one(&tag("pad"), Pad { mode: PadMode::Constant }, vec![g, pads, zero, axis_in])?;
            }
            None if step == 1 => {
                if start == 0 && end >= i32::MAX as i64 {
                    continue;
                }
                // Pads from the run-time dim: begin = clamp(start), end = d - max(clamp(end), begin).
                let d = e.dims_of(&tag("dim"), x, axis, axis + 1)?;
                let zero_i = e.i64s(&tag("zero_i"), &[0])?;
                let clamp = |e: &mut Emitter, what: &str, v: i64| -> IrResult<OutletId> {
                    let c = e.i64s(&tag(what), &[v])?;
                    if v >= 0 {
                        e.binary(&tag(&format!("{what}_min")), BinaryOp::Min, c, d)
                    } else {
                        let s = e.binary(&tag(&format!("{what}_from_end")), BinaryOp::Add, d, c)?;
                        e.binary(&tag(&format!("{what}_max")), BinaryOp::Max, s, zero_i)
                    }
                };
                let b = clamp(e, "start", start)?;
                let en = clamp(e, "end", end)?;
                let en = e.binary(&tag("end_ge_start"), BinaryOp::Max, en, b)?;
                let tail = e.binary(&tag("tail"), BinaryOp::Sub, d, en)?;
                let pads = e.one(&tag("pads"), Concat { axis: 0 }, vec![b, tail])?;
                g = e.one(&tag("pad"), Pad { mode: PadMode::Constant }, vec![g, pads, zero, axis_in])?;
            }
            None => {
                return Err(no_backward(
                    node,
                    &format!("a step of {step} on axis {axis} of unknown size; specialize the input shapes first"),
                ))
            }
        }
    }
    Ok(g)
}

fn pad_backward(
    e: &mut Emitter,
    node: &Node,
    pd: &Pad,
    dy: OutletId,
    need: &[bool],
    out: &mut [Option<OutletId>],
) -> IrResult<()> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    if pd.mode != PadMode::Constant {
        return Err(no_backward(node, &format!("{:?} mode padding", pd.mode)));
    }
    let x = node.inputs[0];
    // Negative pads crop: the gradient is dy with the padding cut off again.
    let neg = e.unary(&p("neg_pads"), UnaryOp::Neg, node.inputs[1])?;
    let zero = e.scalar(&p("zero"), e.g.fact(x).dtype, 0.0)?;
    let mut ins = vec![dy, neg, zero];
    ins.extend(node.inputs.get(3).copied());
    let dx = e.one(&p("crop"), Pad { mode: PadMode::Constant }, ins)?;
    if need[0] {
        out[0] = Some(dx);
    }
    if need.get(2).copied().unwrap_or(false) {
        // The fill value's gradient: everything outside the cropped region.
        let all = e.reduce(&p("dy_sum"), ReduceOp::Sum, dy, &[], false)?;
        let inner = e.reduce(&p("dx_sum"), ReduceOp::Sum, dx, &[], false)?;
        let d = e.binary(&p("dvalue_sum"), BinaryOp::Sub, all, inner)?;
        out[2] = Some(e.reshape_like(&p("dvalue"), d, node.inputs[2])?);
    }
    Ok(())
}

/// Tile's gradient: dy viewed as `[r0, d0, r1, d1, ...]` (repeat count before each dim) and
/// summed over the repeat axes.
fn tile_backward(e: &mut Emitter, node: &Node, dy: OutletId) -> IrResult<OutletId> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let x = node.inputs[0];
    let reps = const_ints(e, node, 1, "repeats")?.unwrap_or_default();
    let mut parts = Vec::new();
    let mut summed = Vec::new();
    let mut pos = 0;
    for (k, &r) in reps.iter().enumerate() {
        if r != 1 {
            parts.push(e.i64s(&p(&format!("reps{k}")), &[r])?);
            summed.push(pos);
            pos += 1;
        }
        parts.push(e.dims_of(&p(&format!("dim{k}")), x, k, k + 1)?);
        pos += 1;
    }
    if summed.is_empty() {
        return Ok(dy);
    }
    let spec = e.one(&p("spec"), Concat { axis: 0 }, parts)?;
    let v = e.one(&p("split_reps"), Reshape { allowzero: true }, vec![dy, spec])?;
    let s = e.sum_axes(&p("sum"), v, &summed, false)?;
    e.reshape_like(&p("dx"), s, x)
}

/// Rules for the ops whose backward is one of the gradient ops of `ops::grad`.
fn backward_training_ops(
    e: &mut Emitter,
    id: NodeId,
    node: &Node,
    dys: &[Option<OutletId>],
    need: &[bool],
) -> IrResult<Vec<Option<OutletId>>> {
    let p = |what: &str| format!("grad/{}/{what}", node.name);
    let ins = &node.inputs;
    let mut out: Vec<Option<OutletId>> = vec![None; ins.len()];
    if dys.len() > 1 && dys[1..].iter().any(Option::is_some) {
        return Err(no_backward(node, "only its first output can carry a gradient"));
    }
    let Some(dy) = dys[0] else { return Ok(out) };
    let y = OutletId::new(id, 0);
    match &node.op {
        Op::Unary(u) => {
            use UnaryOp::*;
            if matches!(u.0, Floor | Ceil | Round | Sign | Not) {
                return Err(no_backward(node, "the function is piecewise constant"));
            }
            out[0] = Some(e.one(&p("dx"), UnaryGrad(u.0), vec![ins[0], dy])?);
        }
        Op::Softmax(Softmax { axis, legacy_2d }) | Op::LogSoftmax(LogSoftmax { axis, legacy_2d }) => {
            let log = matches!(node.op, Op::LogSoftmax(_));
            out[0] = Some(if *legacy_2d {
                // Opset < 13: softmax over the flattened dims axis.., so the gradient is too.
                let a = norm_axis(node.op.name(), *axis, node.outputs[0].rank())? as i64;
                let y2 = e.one(&p("y_2d"), Flatten { axis: a }, vec![y])?;
                let dy2 = e.one(&p("dy_2d"), Flatten { axis: a }, vec![dy])?;
                let dx2 = e.one(&p("dx_2d"), SoftmaxGrad { axis: 1, log }, vec![y2, dy2])?;
                e.reshape_like(&p("dx"), dx2, ins[0])?
            } else {
                e.one(&p("dx"), SoftmaxGrad { axis: *axis, log }, vec![y, dy])?
            });
        }
        Op::LayerNorm(ln) => {
            let g =
                e.node(&p("grad"), LayerNormGrad { axis: ln.axis, epsilon: ln.epsilon }, vec![ins[0], ins[1], dy])?;
            out[0] = Some(g[0]);
            out[1] = Some(g[1]);
            if let (Some(&bias), Some(true)) = (ins.get(2), need.get(2)) {
                out[2] = Some(e.reshape_like(&p("dbias"), g[2], bias)?);
            }
        }
        Op::Conv(c) => {
            let (x, w) = (ins[0], ins[1]);
            if need[0] {
                out[0] = Some(e.one(&p("dx"), ConvGradInput(c.attrs.clone()), vec![dy, w, x])?);
            }
            if need[1] {
                out[1] = Some(e.one(&p("dw"), ConvGradWeight(c.attrs.clone()), vec![x, dy, w])?);
            }
            if need.get(2).copied().unwrap_or(false) {
                let axes: Vec<usize> = std::iter::once(0).chain(2..e.rank(dy)).collect();
                out[2] = Some(e.sum_axes(&p("db"), dy, &axes, false)?);
            }
        }
        Op::Pool(pl) => out[0] = Some(e.one(&p("dx"), PoolGrad(pl.clone()), vec![ins[0], dy])?),
        Op::Gather(gt) => {
            out[0] = Some(e.one(&p("ddata"), GatherGrad { axis: gt.axis }, vec![ins[0], ins[1], dy])?);
        }
        Op::FakeQuant(fq) => {
            if need[2] {
                return Err(no_backward(node, "the zero point gets no gradient; make it a constant"));
            }
            let op = FakeQuantGrad { qmin: fq.qmin, qmax: fq.qmax, axis: fq.axis };
            let g = e.node(&p("grad"), op, vec![ins[0], ins[1], ins[2], dy])?;
            out[0] = Some(g[0]);
            out[1] = Some(g[1]);
        }
        _ => return Err(no_backward(node, "no backward rule for this op")),
    }
    Ok(out)
}
