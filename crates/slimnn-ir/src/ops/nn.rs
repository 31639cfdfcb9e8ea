//! Normalisations and softmax.

use super::elementwise::Broadcast;
use super::util::{expect_inputs, norm_axis, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{checked_numel, DType, Dim, Tensor};

/// Softmax along `axis`. `legacy_2d` is the opset < 13 meaning: the input is viewed as 2-d
/// `[prod(shape[..axis]), prod(shape[axis..])]` and softmax runs over the second dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Softmax {
    pub axis: i64,
    pub legacy_2d: bool,
}

/// Log of [`Softmax`], same axis conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSoftmax {
    pub axis: i64,
    pub legacy_2d: bool,
}

/// ONNX `LayerNormalization`: normalises over dims `axis..`; inputs `x, scale[, bias]`.
/// Produces the first `num_outputs` (1 to 3) of `Y, Mean, InvStdDev`. Mean and InvStdDev are
/// f32 (ONNX's default `stash_type`), shaped like `x` with dims `axis..` set to 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNorm {
    pub axis: i64,
    pub epsilon: f32,
    pub num_outputs: usize,
}

impl LayerNorm {
    /// The common form: Y only.
    pub fn new(axis: i64, epsilon: f32) -> LayerNorm {
        LayerNorm { axis, epsilon, num_outputs: 1 }
    }
}

/// Inference-mode `BatchNormalization(x, scale, bias, mean, var)` over channel dim 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNorm {
    pub epsilon: f32,
}

fn check_float(op: &'static str, what: &str, dt: DType) -> IrResult<()> {
    if !dt.is_float() {
        op_bail!(op, "{what} must be a float tensor, got {dt}");
    }
    Ok(())
}

fn check_epsilon(op: &'static str, eps: f32) -> IrResult<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        op_bail!(op, "epsilon must be finite and >= 0, got {eps}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Softmax, LogSoftmax

/// The axis softmax starts at: `[-r, r-1]` per-axis (rank >= 1), `[-r, r]` in the legacy
/// 2-d form (axis `r` makes every row a single element).
fn softmax_axis(op: &'static str, axis: i64, legacy: bool, rank: usize) -> IrResult<usize> {
    if !legacy {
        if rank == 0 {
            op_bail!(op, "needs an input of rank >= 1");
        }
        return norm_axis(op, axis, rank);
    }
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a > r {
        op_bail!(op, "axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}

/// NaN-propagating maximum.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Softmax (or log-softmax) in place over the middle dim of `v` viewed as `[outer, n, inner]`.
/// Subtracting the maximum keeps exp from overflowing; sums are in f64.
fn softmax_in_place(v: &mut [f64], n: usize, inner: usize, log: bool) {
    if n == 0 || inner == 0 {
        return;
    }
    for block in v.chunks_mut(n * inner) {
        if inner == 1 {
            let m = block.iter().fold(f64::NEG_INFINITY, |m, &x| nan_max(m, x));
            if log {
                let lse = block.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
                block.iter_mut().for_each(|x| *x = *x - m - lse);
            } else {
                let mut s = 0.0;
                for x in block.iter_mut() {
                    *x = (*x - m).exp();
                    s += *x;
                }
                block.iter_mut().for_each(|x| *x /= s);
            }
            continue;
        }
        // Axis not last: walk rows of `inner` contiguous values, one running max / sum per column.
        let mut m = vec![f64::NEG_INFINITY; inner];
        for row in block.chunks(inner) {
            m.iter_mut().zip(row).for_each(|(m, &x)| *m = nan_max(*m, x));
        }
        let mut s = vec![0.0; inner];
        for row in block.chunks_mut(inner) {
            for ((x, s), &m) in row.iter_mut().zip(s.iter_mut()).zip(&m) {
                let e = (*x - m).exp();
                *s += e;
                if !log {
                    *x = e;
                }
            }
        }
        for row in block.chunks_mut(inner) {
            for ((x, s), m) in row.iter_mut().zip(&s).zip(&m) {
                *x = if log { *x - m - s.ln() } else { *x / s };
            }
        }
    }
}

fn softmax_facts(op: &'static str, axis: i64, legacy: bool, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
    expect_inputs(op, inputs, 1, 1)?;
    let x = inputs[0];
    check_float(op, "input", x.dtype)?;
    softmax_axis(op, axis, legacy, x.rank())?;
    Ok(vec![x.without_value()])
}

fn softmax_eval(op: &'static str, axis: i64, legacy: bool, log: bool, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
    expect_inputs(op, inputs, 1, 1)?;
    let x = inputs[0];
    check_float(op, "input", x.dtype())?;
    let shape = x.shape();
    let a = softmax_axis(op, axis, legacy, shape.len())?;
    let (n, inner) =
        if legacy { (shape[a..].iter().product(), 1) } else { (shape[a], shape[a + 1..].iter().product()) };
    let mut v = x.to_f64_vec();
    softmax_in_place(&mut v, n, inner, log);
    Ok(vec![Tensor::from_f64s(x.dtype(), shape.to_vec(), &v)?])
}

impl OpDef for Softmax {
    fn name(&self) -> &'static str {
        "Softmax"
    }
    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        softmax_facts("Softmax", self.axis, self.legacy_2d, inputs)
    }
    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        softmax_eval("Softmax", self.axis, self.legacy_2d, false, inputs)
    }
}

impl OpDef for LogSoftmax {
    fn name(&self) -> &'static str {
        "LogSoftmax"
    }
    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        softmax_facts("LogSoftmax", self.axis, self.legacy_2d, inputs)
    }
    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        softmax_eval("LogSoftmax", self.axis, self.legacy_2d, true, inputs)
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNormalization

const LN: &str = "LayerNormalization";

/// Checks that `p` broadcasts to `x` without growing it (numpy rules, as ONNX's Mul/Add).
fn check_broadcasts_to(op: &'static str, what: &str, p: &[Dim], x: &[Dim]) -> IrResult<()> {
    let fits = p.len() <= x.len()
        && p.iter().zip(&x[x.len() - p.len()..]).all(|(p, x)| match (p, x) {
            (Dim::Known(1), _) => true,
            (Dim::Known(a), Dim::Known(b)) => a == b,
            _ => true,
        });
    if !fits {
        op_bail!(op, "{what} of shape {} does not broadcast to input shape {}", show_dims(p), show_dims(x));
    }
    Ok(())
}

/// `v` (shape `from`) broadcast to exactly `to`.
fn expand(op: &'static str, v: &[f64], from: &[usize], to: &[usize]) -> IrResult<Vec<f64>> {
    let plan = Broadcast::new(op, &[from, to])?;
    if plan.shape != to {
        op_bail!(op, "shape {from:?} does not broadcast to {to:?}");
    }
    let s = plan.inner_stride(0);
    let mut out = Vec::with_capacity(to.iter().product());
    plan.for_each_run(|o, len| out.extend((0..len).map(|j| v[o[0] + j * s])));
    Ok(out)
}

/// Scale or bias expanded to the normalised dims (length `n`) when it does not vary across
/// rows, else to the whole input.
fn expand_param(p: &Tensor, shape: &[usize], axis: usize) -> IrResult<Vec<f64>> {
    let lead_ones = p.shape().iter().take_while(|&&d| d == 1).count();
    let core = &p.shape()[lead_ones..];
    let v = p.to_f64_vec();
    if core.len() <= shape.len() - axis {
        expand(LN, &v, core, &shape[axis..])
    } else {
        expand(LN, &v, p.shape(), shape)
    }
}

impl OpDef for LayerNorm {
    fn name(&self) -> &'static str {
        LN
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs(LN, inputs, 2, 3)?;
        check_epsilon(LN, self.epsilon)?;
        let x = inputs[0];
        check_float(LN, "input", x.dtype)?;
        if x.rank() == 0 {
            op_bail!(LN, "needs an input of rank >= 1");
        }
        let axis = norm_axis(LN, self.axis, x.rank())?;
        self.check_outputs()?;
        for (f, what) in inputs[1..].iter().zip(["scale", "bias"]) {
            if f.dtype != x.dtype {
                op_bail!(LN, "{what} dtype {} differs from input dtype {}", f.dtype, x.dtype);
            }
            check_broadcasts_to(LN, what, &f.shape, &x.shape)?;
        }
        let mut stats = x.shape[..axis].to_vec();
        stats.resize(x.rank(), Dim::Known(1));
        let mut out = vec![x.without_value()];
        out.extend((1..self.num_outputs).map(|_| Fact::new(DType::F32, stats.clone())));
        Ok(out)
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs(LN, inputs, 2, 3)?;
        check_epsilon(LN, self.epsilon)?;
        let x = inputs[0];
        check_float(LN, "input", x.dtype())?;
        let shape = x.shape();
        if shape.is_empty() {
            op_bail!(LN, "needs an input of rank >= 1");
        }
        let axis = norm_axis(LN, self.axis, shape.len())?;
        self.check_outputs()?;
        for (t, what) in inputs[1..].iter().zip(["scale", "bias"]) {
            if t.dtype() != x.dtype() {
                op_bail!(LN, "{what} dtype {} differs from input dtype {}", t.dtype(), x.dtype());
            }
        }
        let n: usize = shape[axis..].iter().product();
        let scale = expand_param(inputs[1], shape, axis)?;
        let bias = inputs.get(2).map(|b| expand_param(b, shape, axis)).transpose()?;
        let mut v = x.to_f64_vec();
        let rows: usize = shape[..axis].iter().product();
        let (mut means, mut invs) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        if n > 0 {
            let eps = f64::from(self.epsilon);
            for (r, row) in v.chunks_mut(n).enumerate() {
                let mean = row.iter().sum::<f64>() / n as f64;
                let var = row.iter().map(|&x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
                let inv = 1.0 / (var + eps).sqrt();
                let at = |p: &[f64], j: usize| if p.len() == n { p[j] } else { p[r * n + j] };
                for (j, x) in row.iter_mut().enumerate() {
                    *x = (*x - mean) * inv * at(&scale, j) + bias.as_deref().map_or(0.0, |b| at(b, j));
                }
                means.push(mean);
                invs.push(inv);
            }
        }
        let mut out = vec![Tensor::from_f64s(x.dtype(), shape.to_vec(), &v)?];
        let mut stats_shape = shape[..axis].to_vec();
        stats_shape.resize(shape.len(), 1);
        if n == 0 && self.num_outputs > 1 {
            // Empty rows: the mean of nothing is NaN, as numpy has it.
            checked_numel(&stats_shape, DType::F32)?;
            means.resize(rows, f64::NAN);
            invs.resize(rows, f64::NAN);
        }
        for s in [means, invs].iter().take(self.num_outputs - 1) {
            out.push(Tensor::from_f64s(DType::F32, stats_shape.clone(), s)?);
        }
        Ok(out)
    }
}

impl LayerNorm {
    fn check_outputs(&self) -> IrResult<()> {
        if !(1..=3).contains(&self.num_outputs) {
            op_bail!(LN, "num_outputs must be 1 to 3 (Y, Mean, InvStdDev), got {}", self.num_outputs);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// BatchNormalization

const BN: &str = "BatchNormalization";
const BN_STATS: [&str; 4] = ["scale", "bias", "mean", "var"];

impl OpDef for BatchNorm {
    fn name(&self) -> &'static str {
        BN
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs(BN, inputs, 5, 5)?;
        check_epsilon(BN, self.epsilon)?;
        let x = inputs[0];
        check_float(BN, "input", x.dtype)?;
        // A 1-d input is [N] with a single channel.
        let c = match x.rank() {
            0 => op_bail!(BN, "needs an input of rank >= 1"),
            1 => Dim::Known(1),
            _ => x.shape[1].clone(),
        };
        for (f, what) in inputs[1..].iter().zip(BN_STATS) {
            check_float(BN, what, f.dtype)?;
            if f.rank() != 1 {
                op_bail!(BN, "{what} must be 1-d, got shape {}", show_dims(&f.shape));
            }
            if let (Dim::Known(a), Dim::Known(b)) = (&f.shape[0], &c) {
                if a != b {
                    op_bail!(BN, "{what} has {a} values for {b} channels");
                }
            }
        }
        Ok(vec![x.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs(BN, inputs, 5, 5)?;
        check_epsilon(BN, self.epsilon)?;
        let x = inputs[0];
        check_float(BN, "input", x.dtype())?;
        let shape = x.shape();
        let (c, spatial): (usize, usize) = match shape.len() {
            0 => op_bail!(BN, "needs an input of rank >= 1"),
            1 => (1, 1),
            _ => (shape[1], shape[2..].iter().product()),
        };
        let mut stats = Vec::with_capacity(4);
        for (t, what) in inputs[1..].iter().zip(BN_STATS) {
            check_float(BN, what, t.dtype())?;
            if t.shape() != [c] {
                op_bail!(BN, "{what} must have shape [{c}], got {:?}", t.shape());
            }
            stats.push(t.to_f64_vec());
        }
        let (scale, bias, mean, var) = (&stats[0], &stats[1], &stats[2], &stats[3]);
        let eps = f64::from(self.epsilon);
        let std: Vec<f64> = var.iter().map(|&v| (v + eps).sqrt()).collect();
        let mut v = x.to_f64_vec();
        if spatial > 0 {
            for (i, plane) in v.chunks_mut(spatial).enumerate() {
                let ch = i % c;
                for x in plane {
                    *x = (*x - mean[ch]) / std[ch] * scale[ch] + bias[ch];
                }
            }
        }
        Ok(vec![Tensor::from_f64s(x.dtype(), shape.to_vec(), &v)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::Elem;

    fn t<T: Elem>(shape: &[usize], v: Vec<T>) -> Tensor {
        T::tensor(shape.to_vec(), v).unwrap()
    }

    fn run(op: impl OpDef, inputs: &[&Tensor]) -> Vec<f64> {
        op.eval(inputs).unwrap().remove(0).to_f64_vec()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(g == w || (g - w).abs() <= tol, "got {got:?}, want {want:?}");
        }
    }

    const SM: Softmax = Softmax { axis: -1, legacy_2d: false };
    const LSM: LogSoftmax = LogSoftmax { axis: -1, legacy_2d: false };

    #[test]
    fn softmax_last_axis() {
        let x = t(&[1, 3], vec![1f64, 2.0, 3.0]);
        assert_close(&run(SM, &[&x]), &[0.09003057317038046, 0.24472847105479764, 0.6652409557748218], 1e-16);
        assert_close(&run(LSM, &[&x]), &[-2.40760596444438, -1.4076059644443804, -0.40760596444438046], 1e-15);
        // Large and infinite inputs stay finite where the answer is.
        let x = t(&[2, 2], vec![1000f32, 1000.0, 0.0, f32::NEG_INFINITY]);
        assert_close(&run(SM, &[&x]), &[0.5, 0.5, 1.0, 0.0], 0.0);
        assert_close(
            &run(LSM, &[&x]),
            &[-std::f64::consts::LN_2, -std::f64::consts::LN_2, 0.0, f64::NEG_INFINITY],
            1e-7,
        );
    }

    #[test]
    fn softmax_inner_axis_and_legacy() {
        let x = t(&[1, 2, 2], vec![1f64, 2.0, 3.0, 4.0]);
        let (p, q) = (0.11920292202211755, 0.8807970779778823);
        assert_close(&run(Softmax { axis: 1, legacy_2d: false }, &[&x]), &[p, p, q, q], 1e-16);
        assert_close(&run(Softmax { axis: -2, legacy_2d: false }, &[&x]), &[p, p, q, q], 1e-16);
        let lp = LogSoftmax { axis: 1, legacy_2d: false };
        assert_close(&run(lp, &[&x]), &[p.ln(), p.ln(), q.ln(), q.ln()], 1e-15);
        // Legacy: [1, 2*2] rows, softmax over all four values.
        let all = [0.03205860328008499, 0.08714431874203257, 0.23688281808991013, 0.6439142598879724];
        assert_close(&run(Softmax { axis: 1, legacy_2d: true }, &[&x]), &all, 1e-16);
        let logs: Vec<f64> = all.iter().map(|v| v.ln()).collect();
        assert_close(&run(LogSoftmax { axis: -2, legacy_2d: true }, &[&x]), &logs, 1e-15);
        // Legacy axis == rank makes one-element rows.
        assert_close(&run(Softmax { axis: 3, legacy_2d: true }, &[&x]), &[1.0; 4], 0.0);
        assert!(Softmax { axis: 3, legacy_2d: false }.eval(&[&x]).is_err());
        assert!(Softmax { axis: 4, legacy_2d: true }.eval(&[&x]).is_err());
    }

    #[test]
    fn softmax_facts_and_errors() {
        let f = Fact::new(DType::F16, vec![Dim::sym("b"), Dim::Known(4)]);
        assert_eq!(SM.output_facts(&[&f]).unwrap(), vec![f.clone()]);
        assert_eq!(SM.name(), "Softmax");
        assert_eq!(LSM.name(), "LogSoftmax");
        assert!(SM.output_facts(&[&Fact::known(DType::I32, &[4])]).is_err());
        assert!(SM.output_facts(&[&Fact::known(DType::F32, &[])]).is_err());
        let two = Fact::known(DType::F32, &[2]);
        assert!(LSM.output_facts(&[&two, &two]).is_err());
        assert!(Softmax { axis: 2, legacy_2d: false }.output_facts(&[&f]).is_err());
        let y = SM.eval(&[&t(&[0, 3], Vec::<f32>::new())]).unwrap();
        assert_eq!(y[0].shape(), &[0, 3]);
    }

    #[test]
    fn layer_norm_values() {
        let ln = LayerNorm::new(-1, 0.0);
        let x = t(&[1, 4], vec![1f32, 2.0, 3.0, 4.0]);
        let n = [-1.3416407864998738, -0.4472135954999579, 0.4472135954999579, 1.3416407864998738];
        let ones = t(&[4], vec![1f32; 4]);
        assert_close(&run(ln, &[&x, &ones]), &n, 1e-7);
        let scale = t(&[4], vec![1f32, 2.0, 1.0, 2.0]);
        let bias = t(&[4], vec![0f32, 0.0, 1.0, 1.0]);
        let want = [-1.3416407864998738, -0.8944271909999159, 1.4472135954999579, 3.6832815729997477];
        assert_close(&run(ln, &[&x, &scale, &bias]), &want, 1e-6);
        // Epsilon joins the variance: [1, 3] has var 1, so (x - 2) / sqrt(2).
        let x = t(&[2], vec![1f64, 3.0]);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert_close(&run(LayerNorm::new(0, 1.0), &[&x, &t(&[1], vec![1f64])]), &[-h, h], 1e-15);
    }

    #[test]
    fn layer_norm_mean_and_inv_std_dev() {
        // Rows [1, 2, 3, 4] (mean 2.5, var 1.25) and [2, 2, 2, 2] (var 0); epsilon 1 makes the
        // inverse standard deviations 1 / sqrt(2.25) = 2/3 and 1.
        let x = t(&[2, 4], vec![1f32, 2.0, 3.0, 4.0, 2.0, 2.0, 2.0, 2.0]);
        let ones = t(&[4], vec![1f32; 4]);
        let ln = LayerNorm { axis: -1, epsilon: 1.0, num_outputs: 3 };
        let out = ln.eval(&[&x, &ones]).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!((out[1].dtype(), out[1].shape()), (DType::F32, &[2usize, 1][..]));
        assert_close(&out[1].to_f64_vec(), &[2.5, 2.0], 0.0);
        assert_close(&out[2].to_f64_vec(), &[2.0 / 3.0, 1.0], 1e-7);
        assert_close(&out[0].to_f64_vec()[..4], &[-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0], 1e-6);
        // Two outputs: Y and Mean; f64 input still gives f32 statistics.
        let x = t(&[1, 2, 2], vec![1f64, 3.0, 5.0, 7.0]);
        let ln = LayerNorm { axis: 1, epsilon: 0.0, num_outputs: 2 };
        let out = ln.eval(&[&x, &t(&[2, 2], vec![1f64; 4])]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!((out[1].dtype(), out[1].shape()), (DType::F32, &[1usize, 1, 1][..]));
        assert_eq!(out[1].to_f64_vec(), [4.0]);
        // Empty rows have NaN statistics.
        let e = LayerNorm { axis: -1, epsilon: 0.0, num_outputs: 3 }
            .eval(&[&t(&[2, 0], Vec::<f32>::new()), &t(&[0], Vec::<f32>::new())])
            .unwrap();
        assert!(e[1].to_f64_vec().iter().all(|v| v.is_nan()) && e[1].shape() == [2, 1]);
    }

    #[test]
    fn layer_norm_output_facts() {
        let x = Fact::new(DType::F16, vec![Dim::sym("b"), Dim::sym("s"), Dim::Known(8)]);
        let s = Fact::known(DType::F16, &[8]);
        let f = LayerNorm { axis: -1, epsilon: 1e-5, num_outputs: 3 }.output_facts(&[&x, &s]).unwrap();
        let stats = Fact::new(DType::F32, vec![Dim::sym("b"), Dim::sym("s"), Dim::Known(1)]);
        assert_eq!(f, vec![x.clone(), stats.clone(), stats]);
        let f = LayerNorm { axis: 1, epsilon: 1e-5, num_outputs: 2 }.output_facts(&[&x, &s]).unwrap();
        assert_eq!(f[1], Fact::new(DType::F32, vec![Dim::sym("b"), Dim::Known(1), Dim::Known(1)]));
        for bad in [0, 4] {
            let ln = LayerNorm { axis: -1, epsilon: 1e-5, num_outputs: bad };
            assert!(ln.output_facts(&[&x, &s]).unwrap_err().to_string().contains("num_outputs"));
            let xt = t(&[1, 2], vec![1f32, 2.0]);
            assert!(ln.eval(&[&xt, &t(&[2], vec![1f32; 2])]).is_err());
        }
    }

    #[test]
    fn layer_norm_axes_and_param_shapes() {
        // axis 1 of [2, 2, 2] normalises each batch item's four values.
        let x = t(&[2, 2, 2], vec![1f64, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]);
        let n = [-1.3416407864998738, -0.4472135954999579, 0.4472135954999579, 1.3416407864998738];
        let y = run(LayerNorm::new(1, 0.0), &[&x, &t(&[2, 2], vec![1f64; 4])]);
        assert_close(&y, &[n, n].concat(), 1e-12);
        // A scale that varies across rows ([2, 1, 2] against [2, 2, 2], axis -1).
        let s = t(&[2, 1, 2], vec![1f64, 1.0, 2.0, 2.0]);
        let y = run(LayerNorm::new(-1, 0.0), &[&x, &s]);
        assert_close(&y, &[-1.0, 1.0, -1.0, 1.0, -2.0, 2.0, -2.0, 2.0], 1e-12);
        // Leading ones in the scale are fine.
        let s = t(&[1, 1, 2], vec![1f64, 3.0]);
        let y = run(LayerNorm::new(-1, 0.0), &[&x, &s]);
        assert_close(&y, &[-1.0, 3.0, -1.0, 3.0, -1.0, 3.0, -1.0, 3.0], 1e-12);
        // A [2, 1] scale over normalised dims [2, 2] (checked against onnxruntime).
        let x = t(&[2, 2, 2], (0..8).map(|v| v as f64).collect());
        let s = t(&[2, 1], vec![1f64, 2.0]);
        let y = run(LayerNorm::new(1, 0.0), &[&x, &s]);
        let (a, b) = (1.3416407864998738, 0.4472135954999579);
        assert_close(&y, &[-a, -b, 2.0 * b, 2.0 * a, -a, -b, 2.0 * b, 2.0 * a], 1e-12);
        let bad = t(&[3], vec![1f64; 3]);
        assert!(LayerNorm::new(-1, 0.0).eval(&[&x, &bad]).is_err());
    }

    #[test]
    fn layer_norm_facts_and_errors() {
        let ln = LayerNorm::new(-1, 1e-12);
        assert_eq!(ln.name(), "LayerNormalization");
        let x = Fact::new(DType::F32, vec![Dim::sym("b"), Dim::sym("s"), Dim::Known(384)]);
        let s = Fact::known(DType::F32, &[384]);
        assert_eq!(ln.output_facts(&[&x, &s, &s]).unwrap(), vec![x.clone()]);
        assert!(ln.output_facts(&[&x]).is_err());
        assert!(ln.output_facts(&[&x, &Fact::known(DType::F32, &[383])]).is_err());
        assert!(ln.output_facts(&[&x, &Fact::known(DType::F64, &[384])]).is_err());
        assert!(ln.output_facts(&[&x, &Fact::known(DType::F32, &[1, 1, 1, 384])]).is_err());
        assert!(LayerNorm::new(3, 0.0).output_facts(&[&x, &s]).is_err());
        assert!(LayerNorm::new(-1, -1.0).output_facts(&[&x, &s]).is_err());
        assert!(LayerNorm::new(-1, f32::NAN).output_facts(&[&x, &s]).is_err());
        let xi = Fact::known(DType::I32, &[2, 4]);
        assert!(ln.output_facts(&[&xi, &Fact::known(DType::I32, &[4])]).is_err());
        let e = ln.eval(&[&t(&[], vec![1f32]), &t(&[], vec![1f32])]).unwrap_err();
        assert!(e.to_string().contains("rank"), "{e}");
    }

    #[test]
    fn batch_norm_values() {
        let bn = BatchNorm { epsilon: 0.0 };
        let stats = [
            t(&[2], vec![1f32, 2.0]), // scale
            t(&[2], vec![0f32, 1.0]), // bias
            t(&[2], vec![1f32, 3.0]), // mean
            t(&[2], vec![4f32, 1.0]), // var
        ];
        let with = |x: &Tensor| run(bn, &[x, &stats[0], &stats[1], &stats[2], &stats[3]]);
        let x = t(&[1, 2, 2], vec![1f32, 2.0, 3.0, 4.0]);
        assert_eq!(with(&x), [0.0, 0.5, 1.0, 3.0]);
        let x = t(&[2, 2], vec![3f32, 4.0, 5.0, 6.0]);
        assert_eq!(with(&x), [1.0, 3.0, 2.0, 7.0]);
        // Rank 1: a single channel.
        let one = t(&[1], vec![2f64]);
        let y = run(BatchNorm { epsilon: 3.0 }, &[&t(&[2], vec![1f64, 3.0]), &one, &one, &one, &t(&[1], vec![1f64])]);
        assert_eq!(y, [1.0, 3.0]); // (x - 2) / sqrt(1 + 3) * 2 + 2
    }

    #[test]
    fn batch_norm_facts_and_errors() {
        let bn = BatchNorm { epsilon: 1e-5 };
        assert_eq!(bn.name(), "BatchNormalization");
        let x = Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(3), Dim::Unknown, Dim::Unknown]);
        let c = Fact::known(DType::F32, &[3]);
        assert_eq!(bn.output_facts(&[&x, &c, &c, &c, &c]).unwrap(), vec![x.clone()]);
        let c4 = Fact::known(DType::F32, &[4]);
        assert!(bn.output_facts(&[&x, &c, &c, &c4, &c]).is_err());
        assert!(bn.output_facts(&[&x, &c, &c, &c]).is_err());
        assert!(bn.output_facts(&[&x, &c, &c, &c, &Fact::known(DType::I64, &[3])]).is_err());
        assert!(bn.output_facts(&[&x, &c, &c, &c, &Fact::known(DType::F32, &[3, 1])]).is_err());
        assert!(BatchNorm { epsilon: -1.0 }.output_facts(&[&x, &c, &c, &c, &c]).is_err());
        let xt = t(&[1, 3, 1], vec![0f32; 3]);
        let s2 = t(&[2], vec![1f32; 2]);
        let e = bn.eval(&[&xt, &s2, &s2, &s2, &s2]).unwrap_err();
        assert!(e.to_string().contains("shape [3]"), "{e}");
        let s = t(&[], vec![1f32]);
        assert!(bn.eval(&[&s, &s, &s, &s, &s]).is_err());
    }
}
