//! A MiniLM training step as one graph: the HF checkpoint with its f32 initializers lifted to
//! inputs (parameters), loss = Σ mean_pool(last_hidden_state) · r for a fixed random vector
//! r, and the backward pass from `slimnn_ir::autodiff::differentiate`. Outputs: `loss`, then
//! `grad:<parameter>` for every parameter. Shared by the `minilm_train_step` example and the
//! runtime's training tests.

use slimnn_ir::ops::{Binary, BinaryOp, Reduce, ReduceOp};
use slimnn_ir::{Graph, Op, OutletId};
use slimnn_tensor::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct StepGraph {
    pub graph: Graph,
    /// Parameter names and initial values, in the graph's input order after the token inputs.
    pub params: Vec<(String, Tensor)>,
}

/// Seeded values in [-1, 1).
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `graph` with every f32 constant of more than one value (weights, biases, norms, tables)
/// turned into an input of the same name; returns the parameters' values.
pub fn lift_parameters(graph: &Graph) -> Result<(Graph, Vec<(String, Tensor)>), BoxError> {
    let mut g = Graph::default();
    g.metadata = graph.metadata.clone();
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    let mut params = vec![];
    for (i, &id) in graph.inputs().iter().enumerate() {
        map.insert(OutletId::new(id, 0), g.add_input(graph.input_name(i), graph.input_fact(i).clone())?);
    }
    for (id, node) in graph.nodes().iter().enumerate() {
        if matches!(node.op, Op::Input(_)) {
            continue;
        }
        let outs = match &node.op {
            Op::Const(c) if c.0.dtype() == DType::F32 && c.0.len() > 1 => {
                params.push((node.name.clone(), (*c.0).clone()));
                vec![g.add_input(&node.name, slimnn_ir::Fact::known(DType::F32, c.0.shape()))?]
            }
            _ => {
                let ins = node.inputs.iter().map(|o| map[o]).collect();
                g.add_node(&node.name, node.op.clone(), ins)?
            }
        };
        for (slot, o) in outs.into_iter().enumerate() {
            map.insert(OutletId::new(id, slot), o);
        }
    }
    for (name, o) in graph.outputs() {
        g.add_output(name, map[o]);
    }
    Ok((g, params))
}

/// The step graph of the checkpoint in `dir` (`layers`: encoder layers kept, all if None).
pub fn minilm_step_graph(dir: &Path, layers: Option<&[usize]>) -> Result<StepGraph, BoxError> {
    let model = slimnn_formats::hf::load_bert_layers(dir, layers)?;
    let (mut g, params) = lift_parameters(&model)?;
    let pooled = g
        .nodes()
        .iter()
        .position(|n| n.name == "/pooling/Div")
        .map(|id| OutletId::new(id, 0))
        .ok_or("the BERT graph has no /pooling/Div (mean pooling) node")?;
    let hidden = g.fact(pooled).shape.last().and_then(|d| d.as_known()).ok_or("pooled width unknown")?;
    let r = g.add_const("loss/r", Tensor::from_vec(vec![hidden], values(hidden, 7))?)?;
    let prod = g.add_node("loss/mul", Binary(BinaryOp::Mul), vec![pooled, r])?[0];
    let sum = Reduce { op: ReduceOp::Sum, axes: Some(vec![0, 1]), keepdims: false, noop_with_empty_axes: false };
    let loss = g.add_node("loss/sum", sum, vec![prod])?[0];
    let wrt: Vec<OutletId> =
        g.inputs()[g.inputs().len() - params.len()..].iter().map(|&id| OutletId::new(id, 0)).collect();
    let grads = slimnn_ir::autodiff::differentiate(&mut g, loss, &wrt)?;
    let mut outputs = vec![("loss".to_string(), loss)];
    outputs.extend(params.iter().zip(grads).map(|((name, _), o)| (format!("grad:{name}"), o)));
    g.set_outputs(outputs);
    Ok(StepGraph { graph: g, params })
}

/// Token inputs (ids in the vocabulary, full attention mask, segment 0) then the parameters.
pub fn step_inputs(step: &StepGraph, batch: usize, seq: usize, vocab: i64) -> Result<Vec<(String, Tensor)>, BoxError> {
    let ids: Vec<i64> = (0..batch * seq).map(|i| (i as i64 * 7919 + 101) % vocab).collect();
    let mut inputs = vec![
        ("input_ids".to_string(), Tensor::from_vec(vec![batch, seq], ids)?),
        ("attention_mask".to_string(), Tensor::from_vec(vec![batch, seq], vec![1i64; batch * seq])?),
        ("token_type_ids".to_string(), Tensor::from_vec(vec![batch, seq], vec![0i64; batch * seq])?),
    ];
    inputs.extend(step.params.iter().cloned());
    Ok(inputs)
}
