//! Output agreement metrics, per-layer sensitivity and mixed precision.
//!
//! Sensitivity of a layer = the model's relative output error with only that layer quantized.
//! Mixed precision keeps the most sensitive layers in higher precision (float for int8
//! schemes, int8 weights for 4-bit) and quantizes the rest, taking the fewest kept layers for
//! which the whole model's error is within the budget (a binary search over the sensitivity
//! ranking, assuming error falls as layers are kept).

use crate::calib::BatchSource;
use crate::Result;
use serde::Serialize;
use slimnn_ir::Graph;
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Tensor};

/// Agreement of two models' outputs over a data set.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Agreement {
    /// Per output: name, mean / min cosine of rows (last axis), max abs diff, relative L2 error.
    pub outputs: Vec<OutputAgreement>,
    pub batches: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OutputAgreement {
    pub name: String,
    pub rows: usize,
    pub cosine_mean: f64,
    pub cosine_min: f64,
    pub max_abs: f64,
    /// `||candidate - reference|| / ||reference||` over the whole data set.
    pub relative_error: f64,
    /// Share of rows whose arg-max agrees (classifier logits).
    pub top1_agreement: f64,
}

#[derive(Debug, Default, Clone)]
struct Acc {
    rows: usize,
    cos_sum: f64,
    cos_min: f64,
    max_abs: f64,
    diff2: f64,
    ref2: f64,
    top1: usize,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 {
        1.0
    } else {
        dot / (na * nb).max(1e-30)
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
}

impl Acc {
    fn add(&mut self, r: &[f32], c: &[f32], width: usize) {
        if self.rows == 0 {
            self.cos_min = f64::INFINITY;
        }
        for (rr, cc) in r.chunks(width.max(1)).zip(c.chunks(width.max(1))) {
            let cs = cosine(rr, cc);
            self.cos_sum += cs;
            self.cos_min = self.cos_min.min(cs);
            self.top1 += (argmax(rr) == argmax(cc)) as usize;
            self.rows += 1;
        }
        for (&a, &b) in r.iter().zip(c) {
            let d = (a - b) as f64;
            self.max_abs = self.max_abs.max(d.abs());
            self.diff2 += d * d;
            self.ref2 += (a as f64).powi(2);
        }
    }
}

/// Outputs of `graph` on every batch (through the optimised runtime).
pub fn run_all(graph: &Graph, data: &dyn BatchSource, batches: usize, threads: usize) -> Result<Vec<Vec<Tensor>>> {
    run_all_with(graph, data, batches, RuntimeConfig::with_threads(threads.max(1)))
}

/// [`run_all`] under a given runtime configuration (e.g. bf16 products).
pub fn run_all_with(
    graph: &Graph,
    data: &dyn BatchSource,
    batches: usize,
    config: RuntimeConfig,
) -> Result<Vec<Vec<Tensor>>> {
    let rt = Runnable::new(graph.clone(), config)?;
    let mut state = rt.new_state();
    (0..batches.min(data.batches())).map(|b| Ok(rt.run(&mut state, data.batch(b)?)?)).collect()
}

/// Agreement of `candidate` outputs with `reference` outputs, output by output (f32 outputs only).
pub fn agreement(names: &[String], reference: &[Vec<Tensor>], candidate: &[Vec<Tensor>]) -> Result<Agreement> {
    let mut accs = vec![Acc::default(); names.len()];
    for (r, c) in reference.iter().zip(candidate) {
        for (i, (rt, ct)) in r.iter().zip(c).enumerate() {
            if rt.dtype() != DType::F32 || ct.dtype() != DType::F32 || rt.shape() != ct.shape() {
                continue;
            }
            let width = *rt.shape().last().unwrap_or(&1);
            accs[i].add(rt.as_slice::<f32>()?, ct.as_slice::<f32>()?, width);
        }
    }
    let outputs = names
        .iter()
        .zip(accs)
        .filter(|(_, a)| a.rows > 0)
        .map(|(n, a)| OutputAgreement {
            name: n.clone(),
            rows: a.rows,
            cosine_mean: a.cos_sum / a.rows as f64,
            cosine_min: a.cos_min,
            max_abs: a.max_abs,
            relative_error: (a.diff2 / a.ref2.max(1e-30)).sqrt(),
            top1_agreement: a.top1 as f64 / a.rows as f64,
        })
        .collect();
    Ok(Agreement { outputs, batches: reference.len() })
}

/// The single error figure mixed precision budgets: the mean relative L2 error over outputs.
pub fn output_error(graph_outputs: &[String], reference: &[Vec<Tensor>], candidate: &[Vec<Tensor>]) -> Result<f64> {
    let a = agreement(graph_outputs, reference, candidate)?;
    if a.outputs.is_empty() {
        return Ok(0.0);
    }
    Ok(a.outputs.iter().map(|o| o.relative_error).sum::<f64>() / a.outputs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_by_hand() {
        let t = |v: Vec<f32>| Tensor::from_vec(vec![2, 2], v).unwrap();
        let r = vec![vec![t(vec![1.0, 0.0, 0.0, 2.0])]];
        let c = vec![vec![t(vec![1.0, 0.0, 2.0, 0.0])]];
        let a = agreement(&["y".into()], &r, &c).unwrap();
        let o = &a.outputs[0];
        assert_eq!((o.rows, o.cosine_min, o.cosine_mean), (2, 0.0, 0.5));
        assert_eq!(o.max_abs, 2.0);
        assert_eq!(o.top1_agreement, 0.5);
        // ||diff|| = sqrt(8), ||ref|| = sqrt(5).
        assert!((o.relative_error - (8f64 / 5.0).sqrt()).abs() < 1e-12);
    }
}
