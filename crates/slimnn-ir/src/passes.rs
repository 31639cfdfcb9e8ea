//! Canonicalising passes that need nothing but the IR.

use crate::ops::{Const, Op};
use crate::{Graph, IrResult, Pass, Patch};

/// Replaces every node whose outputs inference already knows as constants by `Const` nodes.
pub struct ConstantFolding;

impl Pass for ConstantFolding {
    fn name(&self) -> &str {
        "constant-folding"
    }
    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let mut p = Patch::new();
        for (id, n) in g.nodes().iter().enumerate() {
            if matches!(n.op, Op::Const(_) | Op::Input(_)) || n.outputs.iter().any(|f| f.konst.is_none()) {
                continue;
            }
            for (slot, f) in n.outputs.iter().enumerate() {
                let name = if n.outputs.len() == 1 { n.name.clone() } else { format!("{}:{slot}", n.name) };
                let c = p.add_node(&name, Const(f.konst.clone().expect("checked above")), vec![]);
                p.shunt(crate::OutletId::new(id, slot), Patch::wire(c, 0));
            }
        }
        Ok((!p.is_empty()).then_some(p))
    }
}

/// Removes `Identity` nodes (and so inference-mode Dropout).
pub struct IdentityElimination;

impl Pass for IdentityElimination {
    fn name(&self) -> &str {
        "identity-elimination"
    }
    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>> {
        let mut p = Patch::new();
        for (id, n) in g.nodes().iter().enumerate() {
            if matches!(n.op, Op::Identity(_)) {
                p.shunt(crate::OutletId::new(id, 0), n.inputs[0]);
            }
        }
        Ok((!p.is_empty()).then_some(p))
    }
}
