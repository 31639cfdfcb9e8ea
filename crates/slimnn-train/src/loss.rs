//! Losses as graph builders: each adds nodes to a graph and returns a scalar (rank 0) f32
//! outlet, so autodiff differentiates them like any other part of the step graph. Batch
//! dimensions may be symbolic; every loss averages over the batch.

use crate::{Result, TrainError};
use slimnn_ir::ops::{Binary, BinaryOp, LogSoftmax, Reduce, ReduceOp, Softmax, Unary, UnaryOp};
use slimnn_ir::{Fact, Graph, IrError, IrResult, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};

/// Name of the graph input holding per-example class probabilities `[batch, classes]` for
/// cross-entropy, or the regression target for MSE / cosine.
pub const TARGET_INPUT: &str = "target";
/// Name of the graph input holding the teacher's logits for distillation.
pub const TEACHER_INPUT: &str = "teacher_logits";

/// A node name not used in `g` yet, from `base`.
fn fresh(g: &Graph, base: &str) -> String {
    let taken = |n: &str| g.nodes().iter().any(|node| node.name == n);
    if !taken(base) {
        return base.to_string();
    }
    (1..).map(|i| format!("{base}.{i}")).find(|n| !taken(n)).unwrap_or_else(|| base.to_string())
}

fn node(g: &mut Graph, name: &str, op: impl Into<slimnn_ir::Op>, inputs: Vec<OutletId>) -> IrResult<OutletId> {
    let name = fresh(g, name);
    Ok(g.add_node(&name, op, inputs)?[0])
}

/// A scalar constant of the dtype of `like` (losses work on f32 and f64 graphs).
fn scalar(g: &mut Graph, name: &str, v: f64, like: OutletId) -> IrResult<OutletId> {
    let dtype = g.fact(like).dtype;
    let name = fresh(g, name);
    g.add_const(&name, Tensor::from_f64s(dtype, vec![], &[v])?)
}

fn binary(g: &mut Graph, name: &str, op: BinaryOp, a: OutletId, b: OutletId) -> IrResult<OutletId> {
    node(g, name, Binary(op), vec![a, b])
}

fn reduce(g: &mut Graph, name: &str, op: ReduceOp, x: OutletId, axes: Option<Vec<i64>>) -> IrResult<OutletId> {
    node(g, name, Reduce { op, axes, keepdims: false, noop_with_empty_axes: false }, vec![x])
}

fn last_axis(g: &Graph, x: OutletId, what: &str) -> IrResult<i64> {
    let rank = g.fact(x).rank();
    if rank == 0 {
        return Err(IrError::Graph(format!("{what}: expected a [batch, ..., classes] tensor, got a scalar")));
    }
    Ok(rank as i64 - 1)
}

fn check_same_shape(g: &Graph, a: OutletId, b: OutletId, what: &str) -> IrResult<()> {
    let (fa, fb) = (g.fact(a), g.fact(b));
    if fa.rank() != fb.rank() {
        return Err(IrError::Graph(format!("{what}: operands are {fa} and {fb}")));
    }
    Ok(())
}

/// Mean over the batch of `-sum_c target[b, c] * log_softmax(logits)[b, c]`. `target` holds
/// probabilities (one-hot or label-smoothed, see [`class_targets`]) shaped like `logits`.
pub fn cross_entropy(g: &mut Graph, logits: OutletId, target: OutletId) -> IrResult<OutletId> {
    check_same_shape(g, logits, target, "cross-entropy")?;
    let axis = last_axis(g, logits, "cross-entropy")?;
    let logp = node(g, "loss.ce.log_softmax", LogSoftmax { axis, legacy_2d: false }, vec![logits])?;
    let weighted = binary(g, "loss.ce.weighted", BinaryOp::Mul, logp, target)?;
    let per_example = reduce(g, "loss.ce.per_example", ReduceOp::Sum, weighted, Some(vec![axis]))?;
    let mean = reduce(g, "loss.ce.mean", ReduceOp::Mean, per_example, None)?;
    node(g, "loss.ce", Unary(UnaryOp::Neg), vec![mean])
}

/// Hinton et al. (2015) distillation: `T^2 * mean_b KL(softmax(teacher / T) || softmax(student / T))`;
/// the `T^2` keeps the gradient's scale independent of the temperature.
pub fn kl_divergence(g: &mut Graph, student: OutletId, teacher: OutletId, temperature: f32) -> IrResult<OutletId> {
    check_same_shape(g, student, teacher, "KL divergence")?;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(IrError::Graph(format!("KL divergence: temperature {temperature} must be positive")));
    }
    let axis = last_axis(g, student, "KL divergence")?;
    let inv_t = scalar(g, "loss.kl.inv_t", 1.0 / temperature as f64, student)?;
    let s = binary(g, "loss.kl.student_scaled", BinaryOp::Mul, student, inv_t)?;
    let t = binary(g, "loss.kl.teacher_scaled", BinaryOp::Mul, teacher, inv_t)?;
    let log_q = node(g, "loss.kl.log_q", LogSoftmax { axis, legacy_2d: false }, vec![s])?;
    let log_p = node(g, "loss.kl.log_p", LogSoftmax { axis, legacy_2d: false }, vec![t])?;
    let p = node(g, "loss.kl.p", Softmax { axis, legacy_2d: false }, vec![t])?;
    let diff = binary(g, "loss.kl.log_ratio", BinaryOp::Sub, log_p, log_q)?;
    let terms = binary(g, "loss.kl.terms", BinaryOp::Mul, p, diff)?;
    let per_example = reduce(g, "loss.kl.per_example", ReduceOp::Sum, terms, Some(vec![axis]))?;
    let mean = reduce(g, "loss.kl.mean", ReduceOp::Mean, per_example, None)?;
    let t2 = scalar(g, "loss.kl.t_squared", (temperature as f64).powi(2), student)?;
    binary(g, "loss.kl", BinaryOp::Mul, mean, t2)
}

/// Mean squared error over every element.
pub fn mse(g: &mut Graph, prediction: OutletId, target: OutletId) -> IrResult<OutletId> {
    check_same_shape(g, prediction, target, "MSE")?;
    let d = binary(g, "loss.mse.diff", BinaryOp::Sub, prediction, target)?;
    let sq = binary(g, "loss.mse.square", BinaryOp::Mul, d, d)?;
    reduce(g, "loss.mse", ReduceOp::Mean, sq, None)
}

/// `1 - mean_b cos(a_b, b_b)`, the cosine taken along the last axis; `1e-12` in the
/// denominator keeps zero vectors finite.
pub fn cosine(g: &mut Graph, a: OutletId, b: OutletId) -> IrResult<OutletId> {
    check_same_shape(g, a, b, "cosine loss")?;
    let axis = last_axis(g, a, "cosine loss")?;
    let ab = binary(g, "loss.cos.ab", BinaryOp::Mul, a, b)?;
    let aa = binary(g, "loss.cos.aa", BinaryOp::Mul, a, a)?;
    let bb = binary(g, "loss.cos.bb", BinaryOp::Mul, b, b)?;
    let dot = reduce(g, "loss.cos.dot", ReduceOp::Sum, ab, Some(vec![axis]))?;
    let na = reduce(g, "loss.cos.norm_a2", ReduceOp::Sum, aa, Some(vec![axis]))?;
    let nb = reduce(g, "loss.cos.norm_b2", ReduceOp::Sum, bb, Some(vec![axis]))?;
    let nn = binary(g, "loss.cos.norms2", BinaryOp::Mul, na, nb)?;
    let norms = node(g, "loss.cos.norms", Unary(UnaryOp::Sqrt), vec![nn])?;
    let eps = scalar(g, "loss.cos.eps", 1e-12, a)?;
    let denom = binary(g, "loss.cos.denom", BinaryOp::Add, norms, eps)?;
    let cos = binary(g, "loss.cos.cos", BinaryOp::Div, dot, denom)?;
    let mean = reduce(g, "loss.cos.mean", ReduceOp::Mean, cos, None)?;
    let one = scalar(g, "loss.cos.one", 1.0, a)?;
    binary(g, "loss.cos", BinaryOp::Sub, one, mean)
}

/// Class probabilities `[labels.len(), classes]` for cross-entropy: one-hot, smoothed as in
/// Szegedy et al. (2016): `(1 - smoothing) * onehot + smoothing / classes`.
pub fn class_targets(labels: &[usize], classes: usize, smoothing: f32) -> Result<Tensor> {
    if !(0.0..1.0).contains(&smoothing) {
        return Err(TrainError::Invalid(format!("label smoothing {smoothing} must be in [0, 1)")));
    }
    let off = smoothing / classes as f32;
    let on = 1.0 - smoothing + off;
    let mut v = vec![off; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        if l >= classes {
            return Err(TrainError::Invalid(format!("label {l} of example {i} is not below {classes} classes")));
        }
        v[i * classes + l] = on;
    }
    Ok(Tensor::from_vec(vec![labels.len(), classes], v)?)
}

/// The loss of a recipe. Cross-entropy and distillation read class probabilities from the
/// input [`TARGET_INPUT`] (built from labels by the trainer); distillation also reads
/// [`TEACHER_INPUT`]; MSE and cosine compare the model output with [`TARGET_INPUT`], which the
/// data set provides.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LossConfig {
    CrossEntropy {
        #[serde(default)]
        label_smoothing: f32,
    },
    /// `alpha * CE(labels) + (1 - alpha) * KL_T(teacher || student)`.
    Distill {
        temperature: f32,
        alpha: f32,
        #[serde(default)]
        label_smoothing: f32,
    },
    Mse,
    Cosine,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig::CrossEntropy { label_smoothing: 0.0 }
    }
}

impl LossConfig {
    /// Whether the trainer builds [`TARGET_INPUT`] from labels (else the data set gives it).
    pub fn targets_from_labels(&self) -> bool {
        matches!(self, LossConfig::CrossEntropy { .. } | LossConfig::Distill { .. })
    }

    pub fn label_smoothing(&self) -> f32 {
        match self {
            LossConfig::CrossEntropy { label_smoothing } | LossConfig::Distill { label_smoothing, .. } => {
                *label_smoothing
            }
            _ => 0.0,
        }
    }

    /// Adds the loss on `output` (its inputs named as above, shaped like `output`) to `g`.
    pub fn build(&self, g: &mut Graph, output: OutletId) -> IrResult<OutletId> {
        let fact = Fact::new(g.fact(output).dtype, g.fact(output).shape.clone());
        let target = g.add_input(TARGET_INPUT, fact.clone())?;
        match *self {
            LossConfig::CrossEntropy { .. } => cross_entropy(g, output, target),
            LossConfig::Distill { temperature, alpha, .. } => {
                let teacher = g.add_input(TEACHER_INPUT, fact)?;
                let hard = cross_entropy(g, output, target)?;
                let soft = kl_divergence(g, output, teacher, temperature)?;
                let a = scalar(g, "loss.distill.alpha", alpha as f64, output)?;
                let b = scalar(g, "loss.distill.one_minus_alpha", 1.0 - alpha as f64, output)?;
                let hard = binary(g, "loss.distill.hard", BinaryOp::Mul, hard, a)?;
                let soft = binary(g, "loss.distill.soft", BinaryOp::Mul, soft, b)?;
                binary(g, "loss.distill", BinaryOp::Add, hard, soft)
            }
            LossConfig::Mse => mse(g, output, target),
            LossConfig::Cosine => cosine(g, output, target),
        }
    }

    /// Checks the numbers (messages name the recipe keys).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let smoothing = self.label_smoothing();
        if !(0.0..1.0).contains(&smoothing) {
            return Err(format!("loss.label_smoothing = {smoothing} must be in [0, 1)"));
        }
        if let LossConfig::Distill { temperature, alpha, .. } = *self {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(format!("loss.temperature = {temperature} must be positive"));
            }
            if !(0.0..=1.0).contains(&alpha) {
                return Err(format!("loss.alpha = {alpha} must be in [0, 1]"));
            }
        }
        Ok(())
    }
}

/// An f32 graph input shaped `[batch, n]`, for tests and builders.
pub fn batch_input(g: &mut Graph, name: &str, n: usize) -> IrResult<OutletId> {
    g.add_input(name, Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(n)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(build: impl Fn(&mut Graph, OutletId, OutletId) -> IrResult<OutletId>, a: &Tensor, b: &Tensor) -> f64 {
        let mut g = Graph::default();
        let x = batch_input(&mut g, "a", a.shape()[1]).unwrap();
        let y = batch_input(&mut g, "b", b.shape()[1]).unwrap();
        let l = build(&mut g, x, y).unwrap();
        assert_eq!(g.fact(l).rank(), 0);
        g.add_output("loss", l);
        let out = g.eval(vec![("a".into(), a.clone()), ("b".into(), b.clone())]).unwrap();
        out[0].to_f64_vec()[0]
    }

    fn t(rows: usize, v: Vec<f32>) -> Tensor {
        let cols = v.len() / rows;
        Tensor::from_vec(vec![rows, cols], v).unwrap()
    }

    fn log_softmax(row: &[f64]) -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        row.iter().map(|x| x - lse).collect()
    }

    #[test]
    fn cross_entropy_with_smoothing_matches_hand_computation() {
        let logits = t(2, vec![1.0, 2.0, 0.5, -1.0, 0.0, 3.0]);
        let target = class_targets(&[1, 2], 3, 0.1).unwrap();
        assert_eq!(target.as_slice::<f32>().unwrap()[..3], [0.1 / 3.0, 0.9 + 0.1 / 3.0, 0.1 / 3.0]);
        let got = run(cross_entropy, &logits, &target);
        let lv = logits.to_f64_vec();
        let tv = target.to_f64_vec();
        let mut want = 0.0;
        for r in 0..2 {
            let lp = log_softmax(&lv[r * 3..r * 3 + 3]);
            want -= (0..3).map(|c| tv[r * 3 + c] * lp[c]).sum::<f64>() / 2.0;
        }
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!(class_targets(&[3], 3, 0.0).is_err());
        assert!(class_targets(&[0], 3, 1.0).is_err());
    }

    #[test]
    fn kl_is_zero_for_equal_logits_and_scaled_by_t_squared() {
        let s = t(2, vec![1.0, 2.0, 0.5, -1.0, 0.0, 3.0]);
        assert!(run(|g, a, b| kl_divergence(g, a, b, 2.0), &s, &s).abs() < 1e-7);
        let teacher = t(2, vec![0.0, 1.0, 2.0, 2.0, 0.0, -1.0]);
        let temp = 2.0;
        let got = run(|g, a, b| kl_divergence(g, a, b, temp), &s, &teacher);
        let (sv, tv) = (s.to_f64_vec(), teacher.to_f64_vec());
        let mut want = 0.0;
        for r in 0..2 {
            let lq = log_softmax(&sv[r * 3..r * 3 + 3].iter().map(|x| x / temp as f64).collect::<Vec<_>>());
            let lp = log_softmax(&tv[r * 3..r * 3 + 3].iter().map(|x| x / temp as f64).collect::<Vec<_>>());
            want += (0..3).map(|c| lp[c].exp() * (lp[c] - lq[c])).sum::<f64>() / 2.0;
        }
        want *= (temp * temp) as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn mse_and_cosine() {
        let a = t(2, vec![1.0, 2.0, 3.0, 4.0]);
        let b = t(2, vec![1.5, 2.0, 1.0, 4.0]);
        assert!((run(mse, &a, &b) - (0.25 + 4.0) / 4.0).abs() < 1e-7);
        let c0 = (1.5 + 4.0) / (5f64.sqrt() * 6.25f64.sqrt());
        let c1 = (3.0 + 16.0) / (25f64.sqrt() * 17f64.sqrt());
        assert!((run(cosine, &a, &b) - (1.0 - (c0 + c1) / 2.0)).abs() < 1e-6);
        assert!(run(cosine, &a, &a).abs() < 1e-6);
    }

    #[test]
    fn loss_config_builds_its_inputs() {
        let mut g = Graph::default();
        let x = batch_input(&mut g, "x", 4).unwrap();
        let l = LossConfig::Distill { temperature: 2.0, alpha: 0.5, label_smoothing: 0.0 }.build(&mut g, x).unwrap();
        assert_eq!(g.fact(l).rank(), 0);
        let names: Vec<&str> = (0..g.inputs().len()).map(|i| g.input_name(i)).collect();
        assert_eq!(names, vec!["x", TARGET_INPUT, TEACHER_INPUT]);
    }
}
