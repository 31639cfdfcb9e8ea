use crate::{Graph, IrError, IrResult, Patch};

/// A rewrite rule. `next_patch` looks at the graph and returns one patch to apply, or `None`
/// when it has nothing (more) to do; the runner applies patches until the pass is exhausted.
pub trait Pass {
    fn name(&self) -> &str;
    fn next_patch(&self, g: &Graph) -> IrResult<Option<Patch>>;
}

/// Runs passes in order, each to a fixpoint, checking graph consistency after each pass.
pub struct PassRunner {
    passes: Vec<Box<dyn Pass>>,
    /// Upper bound on patches one pass may apply (guards against rules that never settle).
    pub max_patches_per_pass: usize,
}

impl Default for PassRunner {
    fn default() -> Self {
        PassRunner { passes: vec![], max_patches_per_pass: 100_000 }
    }
}

/// Patches applied by each pass in one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub applied: Vec<(String, usize)>,
}

impl PassRunner {
    pub fn new() -> PassRunner {
        PassRunner::default()
    }

    pub fn with(mut self, pass: impl Pass + 'static) -> PassRunner {
        self.passes.push(Box::new(pass));
        self
    }

    pub fn run(&self, g: &mut Graph) -> IrResult<PassReport> {
        let mut report = PassReport::default();
        for pass in &self.passes {
            let mut count = 0;
            while let Some(patch) = pass.next_patch(g)? {
                if patch.is_empty() {
                    break;
                }
                g.apply(patch).map_err(|e| IrError::Pass { pass: pass.name().into(), msg: e.to_string() })?;
                count += 1;
                if count > self.max_patches_per_pass {
                    return Err(IrError::Pass { pass: pass.name().into(), msg: "does not reach a fixpoint".into() });
                }
            }
            g.check_consistency().map_err(|e| IrError::Pass {
                pass: pass.name().into(),
                msg: format!("left an inconsistent graph: {e}"),
            })?;
            report.applied.push((pass.name().to_string(), count));
        }
        Ok(report)
    }
}
