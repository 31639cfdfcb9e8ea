//! The reference evaluator: runs a graph node by node with each op's `eval`.

use crate::ops::{Op, OpDef};
use crate::{Graph, IrError, IrResult, OutletId};
use slimnn_tensor::{Dim, Tensor};
use std::collections::HashMap;

impl Graph {
    /// Checks named run-time inputs against the signature (names, dtypes, ranks, known dims,
    /// and each symbolic dim bound to one value) and returns them in signature order.
    pub fn bind_inputs(&self, inputs: Vec<(String, Tensor)>) -> IrResult<Vec<Tensor>> {
        let mut by_name: HashMap<String, Tensor> = HashMap::new();
        for (name, t) in inputs {
            if !self.inputs.iter().any(|&i| self.nodes[i].name == name) {
                let known: Vec<&str> = self.inputs.iter().map(|&i| self.nodes[i].name.as_str()).collect();
                return Err(IrError::Input {
                    name,
                    msg: format!("is not an input of this model (inputs: {})", known.join(", ")),
                });
            }
            if by_name.insert(name.clone(), t).is_some() {
                return Err(IrError::Input { name, msg: "given twice".into() });
            }
        }
        let mut syms: HashMap<String, (usize, String)> = HashMap::new();
        let mut bound = Vec::with_capacity(self.inputs.len());
        for &id in &self.inputs {
            let name = &self.nodes[id].name;
            let fact = &self.nodes[id].outputs[0];
            let t =
                by_name.remove(name).ok_or_else(|| IrError::Input { name: name.clone(), msg: "is missing".into() })?;
            let bad = |msg: String| IrError::Input { name: name.clone(), msg };
            if t.dtype() != fact.dtype {
                return Err(bad(format!("expected dtype {}, got {}", fact.dtype, t.dtype())));
            }
            if t.rank() != fact.rank() {
                return Err(bad(format!(
                    "expected rank {} (shape {}), got shape {:?}",
                    fact.rank(),
                    crate::ops::util::show_dims(&fact.shape),
                    t.shape()
                )));
            }
            for (axis, (d, &n)) in fact.shape.iter().zip(t.shape()).enumerate() {
                match d {
                    Dim::Known(k) if *k != n => {
                        return Err(bad(format!("dim {axis} must be {k}, got {n} (shape {:?})", t.shape())))
                    }
                    Dim::Sym(s) => match syms.get(s.as_ref()) {
                        Some((v, other)) if *v != n => {
                            return Err(bad(format!("dim {axis} ('{s}') is {n} but input '{other}' set it to {v}")))
                        }
                        Some(_) => {}
                        None => {
                            syms.insert(s.to_string(), (n, name.clone()));
                        }
                    },
                    _ => {}
                }
            }
            bound.push(t);
        }
        Ok(bound)
    }

    /// Runs the graph on named inputs and returns the outputs in signature order.
    pub fn eval(&self, inputs: Vec<(String, Tensor)>) -> IrResult<Vec<Tensor>> {
        self.eval_observed(inputs, |_, _| {})
    }

    /// Like [`Graph::eval`], calling `observe` on every value as it is computed (for
    /// calibration, debugging and differential tests).
    pub fn eval_observed(
        &self,
        inputs: Vec<(String, Tensor)>,
        mut observe: impl FnMut(OutletId, &Tensor),
    ) -> IrResult<Vec<Tensor>> {
        let bound = self.bind_inputs(inputs)?;
        let mut remaining: HashMap<OutletId, usize> = HashMap::new();
        for n in &self.nodes {
            for &i in &n.inputs {
                *remaining.entry(i).or_default() += 1;
            }
        }
        for (_, o) in &self.outputs {
            *remaining.entry(*o).or_default() += 1;
        }
        let mut values: HashMap<OutletId, Tensor> = HashMap::new();
        let mut bound = bound.into_iter();
        for (id, node) in self.nodes.iter().enumerate() {
            let outs = match &node.op {
                Op::Input(_) => vec![bound.next().expect("one bound tensor per input")],
                op => {
                    let args: Vec<&Tensor> = node
                        .inputs
                        .iter()
                        .map(|o| {
                            values.get(o).ok_or_else(|| {
                                IrError::Graph(format!("value {}:{} was freed or never computed", o.node, o.slot))
                            })
                        })
                        .collect::<IrResult<_>>()?;
                    let outs = op.eval(&args).map_err(|e| e.at_node(&node.name, op.name()))?;
                    if outs.len() != node.outputs.len() {
                        return Err(IrError::Graph(format!(
                            "node '{}' produced {} outputs, expected {}",
                            node.name,
                            outs.len(),
                            node.outputs.len()
                        )));
                    }
                    outs
                }
            };
            for &i in &node.inputs {
                let r = remaining.get_mut(&i).expect("counted above");
                *r -= 1;
                if *r == 0 {
                    values.remove(&i);
                }
            }
            for (slot, t) in outs.into_iter().enumerate() {
                let o = OutletId::new(id, slot);
                observe(o, &t);
                if remaining.get(&o).copied().unwrap_or(0) > 0 {
                    values.insert(o, t);
                }
            }
        }
        // Outputs may repeat an outlet, so clone rather than move.
        self.outputs
            .iter()
            .map(|(name, o)| {
                values.get(o).cloned().ok_or_else(|| IrError::Graph(format!("output '{name}' was not computed")))
            })
            .collect()
    }
}
