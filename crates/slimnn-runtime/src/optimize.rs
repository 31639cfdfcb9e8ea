//! Canonicalisation: the graph-level passes every model goes through before lowering.

use slimnn_ir::passes::{ConstantFolding, FuseGelu, FuseLayerNorm, IdentityElimination, SinkBroadcasts};
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

/// Patches applied per pass, one entry per pass name.
fn tally(applied: Vec<(String, usize)>) -> Vec<(String, usize)> {
    let mut passes: Vec<(String, usize)> = vec![];
    for (name, n) in applied {
        match passes.iter_mut().find(|(p, _)| *p == name) {
            Some((_, c)) => *c += n,
            None => passes.push((name, n)),
        }
    }
    passes
}

/// `g` specialised to concrete input shapes (its shape arithmetic folded to constants), then
/// the rewrites that need those constants; returns the patches applied per pass.
pub fn specialize(g: &Graph, shapes: &[Vec<usize>]) -> IrResult<(Graph, Vec<(String, usize)>)> {
    let mut g = g.specialized(shapes)?;
    let r = PassRunner::new().with(SinkBroadcasts).run(&mut g)?;
    Ok((g, tally(r.applied)))
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
    let passes = tally(r.applied);
    Ok((g.clone(), OptimizeReport { nodes_before, nodes_after: op_nodes(&g), passes }))
}
