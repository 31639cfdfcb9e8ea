//! Canonicalisation: the graph-level passes every model goes through before lowering.

use slimnn_ir::passes::{ConstantFolding, FuseGelu, FuseLayerNorm, IdentityElimination};
use slimnn_ir::{Graph, IrResult, PassRunner};

/// What canonicalisation did: node counts and patches applied per pass.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OptimizeReport {
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub passes: Vec<(String, usize)>,
}

fn op_nodes(g: &Graph) -> usize {
    g.op_histogram().values().sum()
}

/// Runs the canonicalising passes to a fixpoint.
pub fn optimize(mut g: Graph) -> IrResult<(Graph, OptimizeReport)> {
    let nodes_before = op_nodes(&g);
    let runner = PassRunner::new()
        .with(IdentityElimination)
        // Before constant folding turns the quantized weights into f32 ones.
        .with(crate::qdq::FuseQdqConv)
        .with(ConstantFolding)
        .with(crate::fold::FoldWeightCasts)
        .with(crate::fold::FoldConvWeightDequantize)
        .with(FuseLayerNorm)
        .with(FuseGelu)
        .with(crate::fold::FoldConvBatchNorm)
        .with(ConstantFolding);
    let r = runner.run(&mut g)?;
    let mut passes: Vec<(String, usize)> = vec![];
    for (name, n) in r.applied {
        match passes.iter_mut().find(|(p, _)| *p == name) {
            Some((_, c)) => *c += n,
            None => passes.push((name, n)),
        }
    }
    Ok((g.clone(), OptimizeReport { nodes_before, nodes_after: op_nodes(&g), passes }))
}
