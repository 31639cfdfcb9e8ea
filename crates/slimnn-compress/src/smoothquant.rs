//! SmoothQuant (Xiao et al., 2022): divides each input channel of a matmul's activation by
//! `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)` and multiplies row `j` of the weight by it, so
//! the product is unchanged while activation outliers move into the (per-channel quantized)
//! weights. Matmuls reading the same activation share one `s`; the division is a `Mul` by
//! `1/s` in front of them (a BERT's LayerNorm outputs also feed residual adds, so folding it
//! into the LayerNorm would change those).

use crate::calib::{StatKind, StatPoint, Statistics};
use crate::report::Report;
use crate::schemes::Selection;
use crate::targets::{require_some, Target};
use crate::{Algorithm, Result};
use slimnn_ir::ops::{Binary, BinaryOp, Const, MatMul};
use slimnn_ir::{Graph, OutletId, Patch};
use slimnn_tensor::Tensor;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct SmoothQuant {
    pub alpha: f32,
    pub selection: Selection,
}

/// Smoothing factors of one activation channel set (`act_max`, `w_max` per channel).
pub fn smoothing_factors(act_max: &[f32], w_max: &[f32], alpha: f32) -> Vec<f32> {
    act_max
        .iter()
        .zip(w_max)
        .map(|(&a, &w)| if a <= 0.0 || w <= 0.0 { 1.0 } else { (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5) })
        .collect()
}

impl Algorithm for SmoothQuant {
    fn name(&self) -> &'static str {
        "smoothquant"
    }

    fn statistic_points(&self, g: &Graph) -> Result<Vec<StatPoint>> {
        Ok(self.selection.targets_of(g)?.iter().map(|t| StatPoint { outlet: t.x, kind: StatKind::Channels }).collect())
    }

    fn apply(&self, g: &Graph, stats: &Statistics) -> Result<(Graph, Report)> {
        let targets = self.selection.targets_of(g)?;
        require_some(&targets, None, self.name())?;
        let mut groups: BTreeMap<OutletId, Vec<&Target>> = BTreeMap::new();
        for t in &targets {
            groups.entry(t.x).or_default().push(t);
        }
        let mut p = Patch::new();
        let mut report = Report::default();
        let mut largest = 1f32;
        for (x, ts) in &groups {
            let Some(ch) = stats.get(*x)?.channels.as_ref() else { continue };
            let k = ts[0].k;
            if ch.absmax.len() != k {
                continue;
            }
            let mut w_max = vec![0f32; k];
            for t in ts {
                for (j, row) in t.weight()?.chunks_exact(t.n).enumerate() {
                    w_max[j] = row.iter().fold(w_max[j], |m, v| m.max(v.abs()));
                }
            }
            let s = smoothing_factors(&ch.absmax, &w_max, self.alpha);
            largest = s.iter().fold(largest, |m, &v| m.max(v).max(1.0 / v));
            let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
            let base = format!("{}/smooth", ts[0].name);
            let c = p.add_node(&format!("{base}_scale"), Const(Arc::new(Tensor::from_vec(vec![k], inv)?)), vec![]);
            let m = p.add_node(&base, Binary(BinaryOp::Mul), vec![(*x).into(), Patch::wire(c, 0)]);
            for t in ts {
                let w: Vec<f32> = t.weight()?.iter().enumerate().map(|(i, &v)| v * s[i / t.n]).collect();
                let wc = p.add_node(
                    &format!("{}/weight_smoothed", t.name),
                    Const(Arc::new(Tensor::from_vec(vec![t.k, t.n], w)?)),
                    vec![],
                );
                let mm = p.add_node(&t.name, MatMul, vec![Patch::wire(m, 0), Patch::wire(wc, 0)]);
                p.shunt(OutletId::new(t.node, 0), Patch::wire(mm, 0));
            }
        }
        report.notes.push(format!(
            "smoothquant alpha {}: {} activations smoothed, largest factor {largest:.1}",
            self.alpha,
            groups.len()
        ));
        let mut out = g.clone();
        out.apply(p)?;
        Ok((out, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_by_hand() {
        // alpha 0.5: sqrt(16 / 4) = 2; zero channels keep 1.
        assert_eq!(smoothing_factors(&[16.0, 0.0], &[4.0, 1.0], 0.5), vec![2.0, 1.0]);
        // alpha 1: all of the activation range moves.
        assert_eq!(smoothing_factors(&[8.0], &[3.0], 1.0), vec![8.0]);
    }
}

#[cfg(test)]
mod graph_tests {
    use super::*;
    use crate::calib::calibrate;
    use slimnn_ir::Fact;
    use slimnn_tensor::{DType, Dim};

    #[test]
    fn smoothing_keeps_the_float_function() {
        // x [b, 3] with an outlier channel feeds two matmuls; smoothing must not change y.
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("b"), Dim::Known(3)])).unwrap();
        let w1 =
            g.add_const("w1", Tensor::from_vec(vec![3, 2], vec![0.5f32, -1.0, 0.25, 2.0, 1.0, 0.0]).unwrap()).unwrap();
        let w2 = g.add_const("w2", Tensor::from_vec(vec![3, 1], vec![0.1f32, 0.2, -0.3]).unwrap()).unwrap();
        let y1 = g.add_node("m1", MatMul, vec![x, w1]).unwrap()[0];
        let y2 = g.add_node("m2", MatMul, vec![x, w2]).unwrap()[0];
        g.add_output("y1", y1);
        g.add_output("y2", y2);
        let batch =
            vec![("x".to_string(), Tensor::from_vec(vec![2, 3], vec![1f32, 40.0, -0.5, -2.0, 10.0, 0.25]).unwrap())];
        let sq = SmoothQuant { alpha: 0.5, selection: Selection::default() };
        let points = sq.statistic_points(&g).unwrap();
        let stats = calibrate(&g, &points, &vec![batch.clone()], 1, &mut |_| {}).unwrap();
        assert_eq!(stats.get(x).unwrap().channels.as_ref().unwrap().absmax, vec![2.0, 40.0, 0.5]);
        let (s, _) = sq.apply(&g, &stats).unwrap();
        assert_eq!(s.op_histogram().get("Mul"), Some(&1), "one smoothing Mul shared by both matmuls");
        let (a, b) = (g.eval(batch.clone()).unwrap(), s.eval(batch).unwrap());
        for (u, v) in a.iter().zip(&b) {
            assert!(u.max_abs_diff(v).unwrap() < 1e-4, "{u:?} vs {v:?}");
        }
    }
}
