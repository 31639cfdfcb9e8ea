use crate::graph::Node;
use crate::{Graph, IrError, IrResult, Op, OutletId};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// A wire in a patch: an outlet of the graph being patched, or an output of a node the
/// patch adds (`node` indexes the patch's own nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Graph(OutletId),
    New { node: usize, slot: usize },
}

impl From<OutletId> for Wire {
    fn from(o: OutletId) -> Wire {
        Wire::Graph(o)
    }
}

#[derive(Debug, Clone)]
struct PatchNode {
    name: String,
    op: Op,
    inputs: Vec<Wire>,
}

/// A graph edit applied all at once: new nodes, and shunts that make every reader of an old
/// outlet (graph outputs included) read a new wire instead. Nodes no output depends on are
/// removed when the patch is applied.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    nodes: Vec<PatchNode>,
    shunts: Vec<(OutletId, Wire)>,
}

impl Patch {
    pub fn new() -> Patch {
        Patch::default()
    }

    /// Adds a node; returns its index, to build wires with [`Patch::wire`].
    pub fn add_node(&mut self, name: &str, op: impl Into<Op>, inputs: Vec<Wire>) -> usize {
        self.nodes.push(PatchNode { name: name.to_string(), op: op.into(), inputs });
        self.nodes.len() - 1
    }

    /// Output `slot` of patch node `node`.
    pub fn wire(node: usize, slot: usize) -> Wire {
        Wire::New { node, slot }
    }

    /// Makes every reader of `old` read `new` (the patch's own nodes excepted).
    pub fn shunt(&mut self, old: OutletId, new: impl Into<Wire>) {
        self.shunts.push((old, new.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.shunts.is_empty()
    }
}

impl Graph {
    /// Applies a patch. On error the graph is left unchanged.
    pub fn apply(&mut self, patch: Patch) -> IrResult<()> {
        let mut g = self.clone();
        let base = g.nodes.len();
        let resolve = |w: Wire, added: usize| -> IrResult<OutletId> {
            match w {
                Wire::Graph(o) => Ok(o),
                Wire::New { node, slot } if node < added => Ok(OutletId::new(base + node, slot)),
                Wire::New { node, .. } => Err(IrError::Graph(format!("patch node {node} is used before it is added"))),
            }
        };
        for (k, n) in patch.nodes.into_iter().enumerate() {
            let inputs = n.inputs.iter().map(|&w| resolve(w, k)).collect::<IrResult<Vec<_>>>()?;
            g.add_node(&n.name, n.op, inputs)?;
        }
        let added = g.nodes.len() - base;
        let mut map: HashMap<OutletId, OutletId> = HashMap::new();
        for (old, new) in &patch.shunts {
            let new = resolve(*new, added)?;
            if g.fact(*old).dtype != g.fact(new).dtype || g.fact(*old).rank() != g.fact(new).rank() {
                return Err(IrError::Graph(format!(
                    "shunt replaces {} with {}: types differ",
                    g.fact(*old),
                    g.fact(new)
                )));
            }
            if g.nodes[new.node].output_names[new.slot].is_none() {
                g.nodes[new.node].output_names[new.slot] = g.nodes[old.node].output_names[old.slot].clone();
            }
            map.insert(*old, new);
        }
        let follow = |mut o: OutletId| {
            let mut hops = 0;
            while let Some(&n) = map.get(&o) {
                o = n;
                hops += 1;
                if hops > map.len() {
                    break;
                }
            }
            o
        };
        for n in g.nodes[..base].iter_mut() {
            for i in n.inputs.iter_mut() {
                *i = follow(*i);
            }
        }
        for (_, o) in g.outputs.iter_mut() {
            *o = follow(*o);
        }
        g.compact()?;
        *self = g;
        Ok(())
    }

    /// Removes nodes no output depends on (inputs stay), restores topological order (stable:
    /// ties keep arena order) and re-infers every fact.
    pub fn compact(&mut self) -> IrResult<()> {
        let n = self.nodes.len();
        let mut live = vec![false; n];
        let mut stack: Vec<usize> = self.outputs.iter().map(|(_, o)| o.node).collect();
        stack.extend(self.inputs.iter().copied());
        while let Some(id) = stack.pop() {
            if id >= n {
                return Err(IrError::Graph(format!("wire to missing node {id}")));
            }
            if !std::mem::replace(&mut live[id], true) {
                stack.extend(self.nodes[id].inputs.iter().map(|o| o.node));
            }
        }
        let mut indegree = vec![0usize; n];
        let mut readers: Vec<Vec<usize>> = vec![vec![]; n];
        for id in (0..n).filter(|&i| live[i]) {
            for i in &self.nodes[id].inputs {
                indegree[id] += 1;
                readers[i.node].push(id);
            }
        }
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..n).filter(|&i| live[i] && indegree[i] == 0).map(Reverse).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(Reverse(id)) = ready.pop() {
            order.push(id);
            for &r in &readers[id] {
                indegree[r] -= 1;
                if indegree[r] == 0 {
                    ready.push(Reverse(r));
                }
            }
        }
        if order.len() != live.iter().filter(|&&l| l).count() {
            return Err(IrError::Graph("the graph has a cycle".into()));
        }
        let mut new_id = vec![usize::MAX; n];
        for (k, &id) in order.iter().enumerate() {
            new_id[id] = k;
        }
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes).into_iter().map(Some).collect();
        let remap = |o: OutletId| OutletId::new(new_id[o.node], o.slot);
        for &id in &order {
            let mut node = old[id].take().expect("each node is placed once");
            node.inputs = node.inputs.iter().map(|&o| remap(o)).collect();
            node.outputs = self.infer(&node.name, &node.op, &node.inputs)?;
            self.nodes.push(node);
        }
        self.inputs = self.inputs.iter().map(|&i| new_id[i]).collect();
        for (_, o) in self.outputs.iter_mut() {
            *o = remap(*o);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::{Binary, BinaryOp, Identity, Unary, UnaryOp};
    use crate::{Fact, Graph, Patch};
    use slimnn_tensor::{DType, Tensor};

    #[test]
    fn shunt_replaces_readers_and_outputs_and_drops_dead_nodes() {
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[2])).unwrap();
        let id = g.add_node("id", Identity, vec![x]).unwrap()[0];
        let neg = g.add_node("neg", Unary(UnaryOp::Neg), vec![id]).unwrap()[0];
        g.add_output("y", neg);
        let mut p = Patch::new();
        p.shunt(id, x);
        g.apply(p).unwrap();
        assert_eq!(g.nodes().len(), 2);
        g.check_consistency().unwrap();

        // A new node appended by a patch that an earlier node now reads is moved before it.
        let mut p = Patch::new();
        let two = p.add_node("two", crate::ops::Const(Tensor::scalar(2f32).into()), vec![]);
        let mul = p.add_node("mul", Binary(BinaryOp::Mul), vec![x.into(), Patch::wire(two, 0)]);
        p.shunt(x, Patch::wire(mul, 0));
        // the patch's own node reads x, so x itself is kept
        g.apply(p).unwrap();
        g.check_consistency().unwrap();
        let names: Vec<&str> = g.nodes().iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, vec!["x", "two", "mul", "neg"]);
    }

    #[test]
    fn bad_patch_leaves_graph_unchanged() {
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[2])).unwrap();
        g.add_output("y", x);
        let before = g.clone();
        let mut p = Patch::new();
        let c = p.add_node("c", crate::ops::Const(Tensor::scalar(1i64).into()), vec![]);
        p.shunt(x, Patch::wire(c, 0));
        assert!(g.apply(p).is_err());
        assert_eq!(g, before);
    }
}
