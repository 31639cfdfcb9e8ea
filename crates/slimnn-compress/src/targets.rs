//! Which nodes quantization rewrites: `MatMul`s with a constant 2-d f32 weight (and, when
//! asked, matmuls of two activations), minus excluded names.

use crate::{CompressError, Result};
use slimnn_ir::ops::{Binary, BinaryOp};
use slimnn_ir::{Graph, NodeId, Op, OutletId};
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

/// Errors unless some layer is left to quantize.
pub fn require_some(targets: &[Target], what: &str) -> Result<()> {
    if targets.is_empty() {
        return Err(CompressError::Model(format!(
            "{what}: the model has no MatMul with a constant f32 [K, N] weight left to quantize"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn patterns() {
        assert!(name_matches("attention", "/encoder/layer.0/attention/self/query/MatMul"));
        assert!(name_matches("*layer.0/*", "/encoder/layer.0/output/MatMul"));
        assert!(!name_matches("*layer.1/*", "/encoder/layer.0/output/MatMul"));
        assert!(name_matches("*MatMul", "a/MatMul"));
        assert!(!name_matches("a*", "ba"));
    }
}
