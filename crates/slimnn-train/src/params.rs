//! Parameters as graph inputs: lifting `Const` initializers into `Input` nodes and baking
//! trained values back into constants.

use crate::{Result, TrainError};
use slimnn_ir::ops::{Input, Op};
use slimnn_ir::{Fact, Graph, IrError, IrResult, OutletId};
use slimnn_tensor::{DType, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// One named f32 parameter. Frozen parameters (`trainable == false`) are fed to the graph but
/// get no gradient and no update.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    pub name: String,
    pub value: Tensor,
    pub trainable: bool,
}

/// The parameters of a model, in a fixed order (the order they were lifted in).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parameters {
    items: Vec<Parameter>,
}

impl Parameters {
    pub fn new() -> Parameters {
        Parameters::default()
    }

    /// Adds a trainable parameter; it must be f32 with a name not yet used.
    pub fn push(&mut self, name: &str, value: Tensor) -> Result<()> {
        if value.dtype() != DType::F32 {
            return Err(TrainError::Invalid(format!("parameter '{name}' is {}, only f32 is trained", value.dtype())));
        }
        if self.index_of(name).is_some() {
            return Err(TrainError::Invalid(format!("duplicate parameter name '{name}'")));
        }
        self.items.push(Parameter { name: name.to_string(), value, trainable: true });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Parameter> {
        self.items.iter()
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Parameter> {
        self.items.iter_mut()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.items.iter().position(|p| p.name == name)
    }

    pub fn get(&self, name: &str) -> Option<&Parameter> {
        self.items.iter().find(|p| p.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Parameter> {
        self.items.iter_mut().find(|p| p.name == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.items.iter().map(|p| p.name.clone()).collect()
    }

    pub fn trainable_names(&self) -> Vec<String> {
        self.items.iter().filter(|p| p.trainable).map(|p| p.name.clone()).collect()
    }

    /// Freezes every parameter whose name matches one of the glob `patterns` (`*` matches any
    /// run of characters); returns how many were frozen. A pattern that matches nothing is an
    /// error (a typo would otherwise silently train everything).
    pub fn freeze(&mut self, patterns: &[String]) -> Result<usize> {
        let mut frozen = 0;
        for pattern in patterns {
            let mut hit = false;
            for p in self.items.iter_mut().filter(|p| glob_match(pattern, &p.name)) {
                hit = true;
                if p.trainable {
                    p.trainable = false;
                    frozen += 1;
                }
            }
            if !hit {
                return Err(TrainError::Invalid(format!("freeze pattern '{pattern}' matches no parameter")));
            }
        }
        Ok(frozen)
    }

    /// Elements over all parameters, and over trainable ones.
    pub fn counts(&self) -> (usize, usize) {
        let all = self.items.iter().map(|p| p.value.len()).sum();
        let trainable = self.items.iter().filter(|p| p.trainable).map(|p| p.value.len()).sum();
        (all, trainable)
    }

    /// Every parameter as a named graph input (values cloned).
    pub fn as_inputs(&self) -> Vec<(String, Tensor)> {
        self.items.iter().map(|p| (p.name.clone(), p.value.clone())).collect()
    }
}

/// Glob match where `*` matches any (possibly empty) run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Copies `graph` node by node; `replace` may substitute a node with a new outlet (returning
/// `Some`), otherwise the node is re-added as it was. Inputs keep their signature order.
fn rebuild(graph: &Graph, mut replace: impl FnMut(&mut Graph, usize) -> IrResult<Option<OutletId>>) -> IrResult<Graph> {
    let mut g = Graph::default();
    g.metadata = graph.metadata.clone();
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    for (i, &id) in graph.inputs().iter().enumerate() {
        if let Some(o) = replace(&mut g, id)? {
            map.insert(OutletId::new(id, 0), o);
            continue;
        }
        let o = g.add_input(graph.input_name(i), graph.input_fact(i).clone())?;
        map.insert(OutletId::new(id, 0), o);
    }
    for (id, node) in graph.nodes().iter().enumerate() {
        if matches!(node.op, Op::Input(_)) {
            if !map.contains_key(&OutletId::new(id, 0)) {
                return Err(IrError::Graph(format!("Input node '{}' is not a graph input", node.name)));
            }
            continue;
        }
        let outs = match replace(&mut g, id)? {
            Some(o) => vec![o],
            None => {
                let inputs = node
                    .inputs
                    .iter()
                    .map(|o| {
                        map.get(o)
                            .copied()
                            .ok_or_else(|| IrError::Graph(format!("node '{}' reads a missing outlet", node.name)))
                    })
                    .collect::<IrResult<Vec<_>>>()?;
                g.add_node(&node.name, node.op.clone(), inputs)?
            }
        };
        for (slot, o) in outs.into_iter().enumerate() {
            if let Some(Some(name)) = node.output_names.get(slot) {
                g.set_outlet_name(o, name);
            }
            map.insert(OutletId::new(id, slot), o);
        }
    }
    for (name, o) in graph.outputs() {
        let o = map.get(o).copied().ok_or_else(|| IrError::Graph(format!("output '{name}' reads a missing outlet")))?;
        g.add_output(name, o);
    }
    Ok(g)
}

/// Turns the f32 `Const` nodes that `select(name, value)` picks into graph `Input` nodes of
/// the same name, shape and dtype, so the runtime neither folds nor packs them and one plan
/// serves every step. Returns the new graph (original inputs first, then the parameters in
/// node order) and the parameters' values, all trainable.
pub fn lift_parameters(graph: &Graph, select: impl Fn(&str, &Tensor) -> bool) -> Result<(Graph, Parameters)> {
    let mut params = Parameters::new();
    let mut error: Option<TrainError> = None;
    let g = rebuild(graph, |g, id| {
        let node = graph.node(id);
        let Op::Const(c) = &node.op else { return Ok(None) };
        if c.0.dtype() != DType::F32 || c.0.quant().is_some() || !select(&node.name, &c.0) {
            return Ok(None);
        }
        if let Err(e) = params.push(&node.name, (*c.0).clone()) {
            error.get_or_insert(e);
            return Ok(None);
        }
        g.add_input(&node.name, Fact::known(DType::F32, c.0.shape())).map(Some)
    })?;
    if let Some(e) = error {
        return Err(e);
    }
    Ok((g, params))
}

/// The inverse of [`lift_parameters`]: every input named like a parameter becomes a `Const`
/// holding the parameter's current value (for inference, export and quantization).
pub fn bake_parameters(graph: &Graph, params: &Parameters) -> Result<Graph> {
    let g = rebuild(graph, |g, id| {
        let node = graph.node(id);
        let Op::Input(Input { fact }) = &node.op else { return Ok(None) };
        let Some(p) = params.get(&node.name) else { return Ok(None) };
        if fact.known_shape().as_deref() != Some(p.value.shape()) || fact.dtype != p.value.dtype() {
            return Err(IrError::Input {
                name: node.name.clone(),
                msg: format!("graph declares {fact}, the parameter is {:?} {}", p.value.shape(), p.value.dtype()),
            });
        }
        g.add_const(&node.name, Arc::new(p.value.clone())).map(Some)
    })?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimnn_ir::ops::{Binary, BinaryOp, MatMul};
    use slimnn_tensor::Dim;

    fn tiny() -> Graph {
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(2)])).unwrap();
        let w = g.add_const("w", Tensor::from_vec(vec![2, 3], vec![1f32, 2., 3., 4., 5., 6.]).unwrap()).unwrap();
        let b = g.add_const("b", Tensor::from_vec(vec![3], vec![0.5f32, -0.5, 1.0]).unwrap()).unwrap();
        let y = g.add_node("mm", MatMul, vec![x, w]).unwrap()[0];
        let y = g.add_node("add", Binary(BinaryOp::Add), vec![y, b]).unwrap()[0];
        g.add_output("logits", y);
        g
    }

    #[test]
    fn lift_and_bake_round_trip() {
        let g = tiny();
        let x = Tensor::from_vec(vec![1, 2], vec![1f32, -1.]).unwrap();
        let want = g.eval(vec![("x".into(), x.clone())]).unwrap();
        let (lifted, params) = lift_parameters(&g, |name, _| name != "b").unwrap();
        assert_eq!(params.names(), vec!["w"]);
        let names: Vec<&str> = (0..lifted.inputs().len()).map(|i| lifted.input_name(i)).collect();
        assert_eq!(names, vec!["x", "w"]);
        lifted.check_consistency().unwrap();
        let mut inputs = vec![("x".to_string(), x.clone())];
        inputs.extend(params.as_inputs());
        assert_eq!(lifted.eval(inputs).unwrap(), want);
        let baked = bake_parameters(&lifted, &params).unwrap();
        assert_eq!(baked.inputs().len(), 1);
        assert_eq!(baked.eval(vec![("x".into(), x)]).unwrap(), want);
    }

    #[test]
    fn freeze_by_glob() {
        let (_, mut params) = lift_parameters(&tiny(), |_, _| true).unwrap();
        assert_eq!(params.counts(), (9, 9));
        assert_eq!(params.freeze(&["b*".into()]).unwrap(), 1);
        assert_eq!(params.trainable_names(), vec!["w"]);
        assert_eq!(params.counts(), (9, 6));
        assert!(params.freeze(&["nothing.*".into()]).unwrap_err().to_string().contains("nothing.*"));
        assert!(glob_match("encoder.*.attn.*", "encoder.3.attn.q.weight"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*c", "abd"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
    }
}
