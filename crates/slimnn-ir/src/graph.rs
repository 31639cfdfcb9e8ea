use crate::ops::{Const, Input, Op, OpDef};
use crate::{Fact, IrError, IrResult};
use slimnn_tensor::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Index of a node in its graph's arena.
pub type NodeId = usize;

/// One output of one node: the wire type of the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutletId {
    pub node: NodeId,
    pub slot: usize,
}

impl OutletId {
    pub fn new(node: NodeId, slot: usize) -> OutletId {
        OutletId { node, slot }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<OutletId>,
    /// One fact per output slot.
    pub outputs: Vec<Fact>,
    /// Value names of the outputs as an importer saw them (kept so exports read naturally).
    pub output_names: Vec<Option<String>>,
}

/// Constants larger than this are not produced by inference-time folding (they would bloat
/// facts); passes may still fold them explicitly.
const FOLD_LIMIT: usize = 1 << 16;

/// A typed dataflow graph. Nodes are stored in topological order: a node only reads
/// outlets of nodes with smaller ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Graph {
    pub(crate) nodes: Vec<Node>,
    pub(crate) inputs: Vec<NodeId>,
    pub(crate) outputs: Vec<(String, OutletId)>,
    /// Free-form metadata carried through import and export (producer, compression reports).
    pub metadata: BTreeMap<String, String>,
}

impl Graph {
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// Input nodes, in signature order.
    pub fn inputs(&self) -> &[NodeId] {
        &self.inputs
    }

    /// Named outputs, in signature order.
    pub fn outputs(&self) -> &[(String, OutletId)] {
        &self.outputs
    }

    pub fn fact(&self, o: OutletId) -> &Fact {
        &self.nodes[o.node].outputs[o.slot]
    }

    pub fn input_fact(&self, i: usize) -> &Fact {
        &self.nodes[self.inputs[i]].outputs[0]
    }

    pub fn input_name(&self, i: usize) -> &str {
        &self.nodes[self.inputs[i]].name
    }

    /// Adds a graph input.
    pub fn add_input(&mut self, name: &str, fact: Fact) -> IrResult<OutletId> {
        if self.inputs.iter().any(|&i| self.nodes[i].name == name) {
            return Err(IrError::Graph(format!("duplicate input name '{name}'")));
        }
        let id = self.add_node(name, Input { fact }, vec![])?;
        self.inputs.push(id[0].node);
        Ok(id[0])
    }

    pub fn add_const(&mut self, name: &str, t: impl Into<Arc<Tensor>>) -> IrResult<OutletId> {
        Ok(self.add_node(name, Const(t.into()), vec![])?[0])
    }

    /// Adds a node after inferring (and so validating) its output facts. When every input is a
    /// small constant, the outputs are evaluated now and carried as constant facts.
    pub fn add_node(&mut self, name: &str, op: impl Into<Op>, inputs: Vec<OutletId>) -> IrResult<Vec<OutletId>> {
        let op = op.into();
        for i in &inputs {
            if i.node >= self.nodes.len() || i.slot >= self.nodes[i.node].outputs.len() {
                return Err(IrError::Graph(format!("node '{name}' reads a missing outlet {}:{}", i.node, i.slot)));
            }
        }
        let outputs = self.infer(name, &op, &inputs)?;
        let id = self.nodes.len();
        let n = outputs.len();
        self.nodes.push(Node { name: name.to_string(), op, inputs, outputs, output_names: vec![None; n] });
        Ok((0..n).map(|s| OutletId::new(id, s)).collect())
    }

    /// Infers the output facts `op` would have on `inputs`, folding small constants.
    pub(crate) fn infer(&self, name: &str, op: &Op, inputs: &[OutletId]) -> IrResult<Vec<Fact>> {
        let facts: Vec<&Fact> = inputs.iter().map(|&o| self.fact(o)).collect();
        let mut outputs = op.output_facts(&facts).map_err(|e| e.at_node(name, op.name()))?;
        let foldable = !matches!(op, Op::Input(_) | Op::Const(_))
            && !facts.is_empty()
            && facts.iter().all(|f| f.konst.as_ref().is_some_and(|t| t.len() <= FOLD_LIMIT))
            && outputs.iter().all(|f| f.known_shape().is_some_and(|s| s.iter().product::<usize>() <= FOLD_LIMIT));
        if foldable {
            let tensors: Vec<&Tensor> = facts.iter().map(|f| f.konst.as_deref().expect("checked")).collect();
            let values = op.eval(&tensors).map_err(|e| e.at_node(name, op.name()))?;
            for (f, v) in outputs.iter_mut().zip(values) {
                *f = Fact::from_tensor(Arc::new(v));
            }
        }
        Ok(outputs)
    }

    pub fn add_output(&mut self, name: &str, outlet: OutletId) {
        self.outputs.push((name.to_string(), outlet));
    }

    /// Replaces the graph outputs (nodes no output depends on stay until [`Graph::compact`]).
    pub fn set_outputs(&mut self, outputs: Vec<(String, OutletId)>) {
        self.outputs = outputs;
    }

    /// Sets the value name of an outlet (used by importers and exporters).
    pub fn set_outlet_name(&mut self, o: OutletId, name: &str) {
        self.nodes[o.node].output_names[o.slot] = Some(name.to_string());
    }

    /// For every outlet, the (node, input index) pairs that read it.
    pub fn consumers(&self) -> HashMap<OutletId, Vec<(NodeId, usize)>> {
        let mut m: HashMap<OutletId, Vec<(NodeId, usize)>> = HashMap::new();
        for (id, n) in self.nodes.iter().enumerate() {
            for (ix, &i) in n.inputs.iter().enumerate() {
                m.entry(i).or_default().push((id, ix));
            }
        }
        m
    }

    /// Number of weights: elements of every constant with a float or block dtype.
    pub fn parameter_count(&self) -> usize {
        self.nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Const(c) if !c.0.dtype().is_integer() && c.0.dtype() != slimnn_tensor::DType::Bool => {
                    Some(c.0.len())
                }
                _ => None,
            })
            .sum()
    }

    /// Op name histogram (sorted by name).
    pub fn op_histogram(&self) -> BTreeMap<&'static str, usize> {
        let mut h = BTreeMap::new();
        for n in &self.nodes {
            if !matches!(n.op, Op::Input(_) | Op::Const(_)) {
                *h.entry(n.op.name()).or_insert(0) += 1;
            }
        }
        h
    }

    /// Checks the graph's invariants: topological order, valid wires, outputs present, and
    /// every node's facts equal to what inference gives now.
    pub fn check_consistency(&self) -> IrResult<()> {
        for (id, n) in self.nodes.iter().enumerate() {
            for i in &n.inputs {
                if i.node >= id || i.slot >= self.nodes[i.node].outputs.len() {
                    return Err(IrError::Graph(format!(
                        "node '{}' reads outlet {}:{} which is not an earlier node's output",
                        n.name, i.node, i.slot
                    )));
                }
            }
            if n.output_names.len() != n.outputs.len() {
                return Err(IrError::Graph(format!("node '{}' has mismatched output names", n.name)));
            }
            let facts = self.infer(&n.name, &n.op, &n.inputs)?;
            for (slot, (now, had)) in facts.iter().zip(&n.outputs).enumerate() {
                if now.dtype != had.dtype || now.shape != had.shape {
                    return Err(IrError::Graph(format!(
                        "node '{}' output {slot} is recorded as {had} but infers as {now}",
                        n.name
                    )));
                }
            }
        }
        for (name, o) in &self.outputs {
            if o.node >= self.nodes.len() || o.slot >= self.nodes[o.node].outputs.len() {
                return Err(IrError::Graph(format!("output '{name}' reads a missing outlet")));
            }
        }
        for &i in &self.inputs {
            if !matches!(self.nodes.get(i).map(|n| &n.op), Some(Op::Input(_))) {
                return Err(IrError::Graph(format!("graph input {i} is not an Input node")));
            }
        }
        Ok(())
    }
}

impl Graph {
    /// A copy with every input's symbolic and unknown dims replaced by the concrete `shapes`
    /// (one per input, in signature order), facts re-inferred and small constants folded. Shape
    /// computations then become constants, which lets a runtime plan for one input shape.
    pub fn specialized(&self, shapes: &[Vec<usize>]) -> IrResult<Graph> {
        if shapes.len() != self.inputs.len() {
            return Err(IrError::Graph(format!(
                "{} input shapes given for {} inputs",
                shapes.len(),
                self.inputs.len()
            )));
        }
        let mut g = self.clone();
        for (&id, shape) in self.inputs.iter().zip(shapes) {
            let node = &mut g.nodes[id];
            let Op::Input(input) = &mut node.op else {
                return Err(IrError::Graph(format!("graph input {id} is not an Input node")));
            };
            if input.fact.rank() != shape.len() {
                return Err(IrError::Input {
                    name: node.name.clone(),
                    msg: format!("expected rank {}, got shape {shape:?}", input.fact.rank()),
                });
            }
            for (axis, (d, &n)) in input.fact.shape.iter().zip(shape).enumerate() {
                if let slimnn_tensor::Dim::Known(k) = d {
                    if *k != n {
                        return Err(IrError::Input {
                            name: node.name.clone(),
                            msg: format!("dim {axis} must be {k}, got {n}"),
                        });
                    }
                }
            }
            input.fact = Fact::known(input.fact.dtype, shape);
        }
        g.compact()?;
        Ok(g)
    }
}
