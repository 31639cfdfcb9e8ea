//! Reductions.

use super::util::{expect_inputs, next_index, norm_axis};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{strides_of, DType, Dim, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    SumSquare,
    LogSum,
    LogSumExp,
}

/// A reduction over `axes` (all axes when `None`, unless `noop_with_empty_axes`, in which case
/// the input passes through).
///
/// Inputs: `data[, axes]`. Axes known when the graph is built are the `axes` attribute (the
/// importer reads them from the constant input of newer opsets). Axes computed at run time come
/// as a second input instead, a 1-d i64 tensor read like the attribute (an empty one means "not
/// given"); `axes` must then be `None`. With such an input the output rank is known when
/// `keepdims` is set or the axes' count is known, and the reduced dims are unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reduce {
    pub op: ReduceOp,
    pub axes: Option<Vec<i64>>,
    pub keepdims: bool,
    pub noop_with_empty_axes: bool,
}

/// `ArgMax` (`max == true`) or `ArgMin` along one axis; output is i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgReduce {
    pub max: bool,
    pub axis: i64,
    pub keepdims: bool,
    pub select_last_index: bool,
}

impl ReduceOp {
    fn onnx_name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "ReduceSum",
            ReduceOp::Mean => "ReduceMean",
            ReduceOp::Max => "ReduceMax",
            ReduceOp::Min => "ReduceMin",
            ReduceOp::Prod => "ReduceProd",
            ReduceOp::L1 => "ReduceL1",
            ReduceOp::L2 => "ReduceL2",
            ReduceOp::SumSquare => "ReduceSumSquare",
            ReduceOp::LogSum => "ReduceLogSum",
            ReduceOp::LogSumExp => "ReduceLogSumExp",
        }
    }
}

/// NaN-propagating maximum / minimum.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn nan_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

/// Lowest and highest value of an integer (or bool) dtype, the identities of Max and Min.
fn int_range(dt: DType) -> (i64, i64) {
    match dt {
        DType::I8 => (i8::MIN.into(), i8::MAX.into()),
        DType::U8 => (u8::MIN.into(), u8::MAX.into()),
        DType::I16 => (i16::MIN.into(), i16::MAX.into()),
        DType::I32 => (i32::MIN.into(), i32::MAX.into()),
        DType::Bool => (0, 1),
        _ => (i64::MIN, i64::MAX),
    }
}

/// Folds every element of `x` (shape `shape`) into the output slot it reduces to:
/// `acc[o] = f(acc[o], x, o)`, where the output keeps reduced axes as size 1. Walks the input
/// in order, a contiguous run of the last axis at a time.
fn fold_into<A: Copy, X: Copy>(
    x: &[X],
    shape: &[usize],
    mask: &[bool],
    init: A,
    mut f: impl FnMut(A, X, usize) -> A,
) -> Vec<A> {
    let kshape: Vec<usize> = shape.iter().zip(mask).map(|(&d, &m)| if m { 1 } else { d }).collect();
    let ostr: Vec<usize> = strides_of(&kshape).into_iter().zip(mask).map(|(s, &m)| if m { 0 } else { s }).collect();
    let mut acc = vec![init; kshape.iter().product()];
    let Some((&len, outer)) = shape.split_last() else {
        if let (Some(a), Some(&v)) = (acc.first_mut(), x.first()) {
            *a = f(*a, v, 0);
        }
        return acc;
    };
    if x.is_empty() {
        return acc;
    }
    let last_reduced = mask[mask.len() - 1];
    let mut idx = vec![0; outer.len()];
    for run in x.chunks(len) {
        let off: usize = idx.iter().zip(&ostr).map(|(i, s)| i * s).sum();
        if last_reduced {
            let a = &mut acc[off];
            for &v in run {
                *a = f(*a, v, off);
            }
        } else {
            for (j, (a, &v)) in acc[off..off + len].iter_mut().zip(run).enumerate() {
                *a = f(*a, v, off + j);
            }
        }
        next_index(&mut idx, outer);
    }
    acc
}

/// Float reductions, in f64. Over an empty set: Sum/L1/L2/SumSquare 0, Prod 1, Max -inf,
/// Min +inf, Mean NaN, LogSum and LogSumExp -inf.
fn reduce_f64(op: ReduceOp, x: &[f64], shape: &[usize], mask: &[bool], count: usize) -> Vec<f64> {
    let sum = |g: fn(f64) -> f64| fold_into(x, shape, mask, 0.0, |a, v, _| a + g(v));
    match op {
        ReduceOp::Sum => sum(|v| v),
        ReduceOp::Mean => sum(|v| v).into_iter().map(|s| s / count as f64).collect(),
        ReduceOp::Max => fold_into(x, shape, mask, f64::NEG_INFINITY, |a, v, _| nan_max(a, v)),
        ReduceOp::Min => fold_into(x, shape, mask, f64::INFINITY, |a, v, _| nan_min(a, v)),
        ReduceOp::Prod => fold_into(x, shape, mask, 1.0, |a, v, _| a * v),
        ReduceOp::L1 => sum(f64::abs),
        ReduceOp::L2 => sum(|v| v * v).into_iter().map(f64::sqrt).collect(),
        ReduceOp::SumSquare => sum(|v| v * v),
        ReduceOp::LogSum => sum(|v| v).into_iter().map(f64::ln).collect(),
        ReduceOp::LogSumExp => {
            // m + ln(sum(exp(x - m))) with m the maximum, so exp never overflows.
            let m = fold_into(x, shape, mask, f64::NEG_INFINITY, |a, v, _| nan_max(a, v));
            let s = fold_into(x, shape, mask, 0.0, |a, v, o| a + (v - m[o]).exp());
            m.iter().zip(s).map(|(&m, s)| if m.is_infinite() { m } else { m + s.ln() }).collect()
        }
    }
}

/// Integer (and bool) reductions for the ops that stay exact in integers, wrapping like the
/// element type; `None` for the ops that need floats.
fn reduce_i64(op: ReduceOp, dt: DType, x: &[i64], shape: &[usize], mask: &[bool], count: usize) -> Option<Vec<i64>> {
    let (lo, hi) = int_range(dt);
    let sum = |g: fn(i64) -> i64| fold_into(x, shape, mask, 0i64, |a, v, _| a.wrapping_add(g(v)));
    Some(match op {
        ReduceOp::Sum => sum(|v| v),
        // Integer division truncates; an empty mean is 0 rather than a division by zero.
        ReduceOp::Mean => sum(|v| v).into_iter().map(|s| s.checked_div(count as i64).unwrap_or(0)).collect(),
        ReduceOp::Max => fold_into(x, shape, mask, lo, |a, v, _| a.max(v)),
        ReduceOp::Min => fold_into(x, shape, mask, hi, |a, v, _| a.min(v)),
        ReduceOp::Prod => fold_into(x, shape, mask, 1i64, |a, v, _| a.wrapping_mul(v)),
        ReduceOp::L1 => sum(i64::wrapping_abs),
        ReduceOp::SumSquare => sum(|v| v.wrapping_mul(v)),
        ReduceOp::L2 | ReduceOp::LogSum | ReduceOp::LogSumExp => return None,
    })
}

impl Reduce {
    fn check_dtype(&self, dt: DType) -> IrResult<()> {
        let ok = match dt {
            DType::Bool => matches!(self.op, ReduceOp::Max | ReduceOp::Min),
            d => d.is_float() || d.is_integer(),
        };
        if !ok {
            op_bail!(self.op.onnx_name(), "not defined for {dt} inputs");
        }
        Ok(())
    }

    /// Which axes reduce; `None` when the op passes its input through.
    fn mask(&self, rank: usize) -> IrResult<Option<Vec<bool>>> {
        self.mask_of(self.axes.as_deref().unwrap_or(&[]), rank)
    }

    /// [`Reduce::mask`] for axes given as a value.
    fn mask_of(&self, axes: &[i64], rank: usize) -> IrResult<Option<Vec<bool>>> {
        let name = self.op.onnx_name();
        if axes.is_empty() {
            return Ok(if self.noop_with_empty_axes { None } else { Some(vec![true; rank]) });
        }
        if rank == 0 {
            op_bail!(name, "axes {axes:?} given for a scalar input");
        }
        let mut mask = vec![false; rank];
        for &a in axes {
            let i = norm_axis(name, a, rank)?;
            if mask[i] {
                op_bail!(name, "axis {a} is repeated in {axes:?}");
            }
            mask[i] = true;
        }
        Ok(Some(mask))
    }

    /// Checks an axes input: 1-d i64, and no `axes` attribute beside it.
    fn check_axes_input(&self, dtype: DType, rank: usize) -> IrResult<()> {
        let name = self.op.onnx_name();
        if self.axes.is_some() {
            op_bail!(name, "axes are given both as an attribute and as an input");
        }
        if dtype != DType::I64 || rank != 1 {
            op_bail!(name, "the axes input must be a 1-d i64 tensor, got {dtype} of rank {rank}");
        }
        Ok(())
    }

    fn out_dims<D: Clone>(&self, shape: &[D], mask: &[bool], one: D) -> Vec<D> {
        shape
            .iter()
            .zip(mask)
            .filter_map(|(d, &m)| match (m, self.keepdims) {
                (false, _) => Some(d.clone()),
                (true, true) => Some(one.clone()),
                (true, false) => None,
            })
            .collect()
    }
}

impl OpDef for Reduce {
    fn name(&self) -> &'static str {
        self.op.onnx_name()
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let name = self.name();
        expect_inputs(name, inputs, 1, 2)?;
        let x = inputs[0];
        self.check_dtype(x.dtype)?;
        let Some(axes) = inputs.get(1) else {
            let shape = match self.mask(x.rank())? {
                None => x.shape.clone(),
                Some(mask) => self.out_dims(&x.shape, &mask, Dim::Known(1)),
            };
            return Ok(vec![Fact::new(x.dtype, shape)]);
        };
        self.check_axes_input(axes.dtype, axes.rank())?;
        if let Some(t) = &axes.konst {
            let shape = match self.mask_of(&t.to_i64_vec()?, x.rank())? {
                None => x.shape.clone(),
                Some(mask) => self.out_dims(&x.shape, &mask, Dim::Known(1)),
            };
            return Ok(vec![Fact::new(x.dtype, shape)]);
        }
        // Axes known at run time only: a dim stays when it is 1 either way.
        let unknown_or_one = |d: &Dim| if *d == Dim::Known(1) { d.clone() } else { Dim::Unknown };
        let shape = match axes.shape[0].as_known() {
            Some(0) if self.noop_with_empty_axes => x.shape.clone(),
            Some(0) => self.out_dims(&x.shape, &vec![true; x.rank()], Dim::Known(1)),
            _ if self.keepdims => x.shape.iter().map(unknown_or_one).collect(),
            Some(n) if n <= x.rank() => vec![Dim::Unknown; x.rank() - n],
            Some(n) => op_bail!(name, "{n} axes given for a rank-{} input", x.rank()),
            None => op_bail!(name, "the axes input has an unknown length, so the output rank is unknown"),
        };
        Ok(vec![Fact::new(x.dtype, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs(self.name(), inputs, 1, 2)?;
        let x = inputs[0];
        let dt = x.dtype();
        self.check_dtype(dt)?;
        let shape = x.shape();
        let mask = match inputs.get(1) {
            None => self.mask(shape.len())?,
            Some(a) => {
                self.check_axes_input(a.dtype(), a.rank())?;
                self.mask_of(&a.to_i64_vec()?, shape.len())?
            }
        };
        let Some(mask) = mask else {
            return Ok(vec![x.clone()]);
        };
        let count: usize = shape.iter().zip(&mask).filter(|(_, &m)| m).map(|(&d, _)| d).product();
        let out_shape = self.out_dims(shape, &mask, 1);
        if !dt.is_float() {
            let v = x.to_i64_vec()?;
            if let Some(r) = reduce_i64(self.op, dt, &v, shape, &mask, count) {
                return Ok(vec![Tensor::from_i64s(dt, out_shape, &r)?]);
            }
        }
        let r = reduce_f64(self.op, &x.to_f64_vec(), shape, &mask, count);
        Ok(vec![Tensor::from_f64s(dt, out_shape, &r)?])
    }
}

// ---------------------------------------------------------------------------------------------
// ArgMax / ArgMin

/// Index of the extreme along the middle dim of `v` viewed as `[outer, n, inner]` (n >= 1).
/// NaN counts as the extreme, as numpy has it; ties go to the first index, or the last with
/// `last`.
fn arg_extreme<K: PartialOrd + Copy>(
    v: &[K],
    (n, inner): (usize, usize),
    max: bool,
    last: bool,
    is_nan: fn(K) -> bool,
) -> Vec<i64> {
    let mut out = Vec::with_capacity(v.len() / n.max(1));
    if inner == 0 {
        return out;
    }
    for block in v.chunks(n * inner) {
        let mut best: Vec<K> = block[..inner].to_vec();
        let mut at = vec![0i64; inner];
        for (r, row) in block.chunks(inner).enumerate().skip(1) {
            for ((b, i), &x) in best.iter_mut().zip(at.iter_mut()).zip(row) {
                let better = if is_nan(*b) {
                    last && is_nan(x)
                } else if is_nan(x) {
                    true
                } else if x == *b {
                    last
                } else {
                    (x > *b) == max
                };
                if better {
                    *b = x;
                    *i = r as i64;
                }
            }
        }
        out.extend(at);
    }
    out
}

impl OpDef for ArgReduce {
    fn name(&self) -> &'static str {
        if self.max {
            "ArgMax"
        } else {
            "ArgMin"
        }
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let name = self.name();
        expect_inputs(name, inputs, 1, 1)?;
        let x = inputs[0];
        if !(x.dtype.is_float() || x.dtype.is_integer()) {
            op_bail!(name, "not defined for {} inputs", x.dtype);
        }
        if x.rank() == 0 {
            op_bail!(name, "needs an input of rank >= 1");
        }
        let axis = norm_axis(name, self.axis, x.rank())?;
        let mut shape = x.shape.clone();
        if self.keepdims {
            shape[axis] = Dim::Known(1);
        } else {
            shape.remove(axis);
        }
        Ok(vec![Fact::new(DType::I64, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let name = self.name();
        expect_inputs(name, inputs, 1, 1)?;
        let x = inputs[0];
        let dt = x.dtype();
        if !(dt.is_float() || dt.is_integer()) {
            op_bail!(name, "not defined for {dt} inputs");
        }
        let shape = x.shape();
        if shape.is_empty() {
            op_bail!(name, "needs an input of rank >= 1");
        }
        let axis = norm_axis(name, self.axis, shape.len())?;
        let (n, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
        let mut out_shape = shape.to_vec();
        if self.keepdims {
            out_shape[axis] = 1;
        } else {
            out_shape.remove(axis);
        }
        if n == 0 {
            if out_shape.iter().product::<usize>() > 0 {
                op_bail!(name, "axis {axis} of shape {shape:?} is empty");
            }
            return Ok(vec![Tensor::from_vec(out_shape, Vec::<i64>::new())?]);
        }
        let (last, dims) = (self.select_last_index, (n, inner));
        let idx = if dt.is_float() {
            arg_extreme(&x.to_f64_vec(), dims, self.max, last, f64::is_nan)
        } else {
            arg_extreme(&x.to_i64_vec()?, dims, self.max, last, |_| false)
        };
        Ok(vec![Tensor::from_vec(out_shape, idx)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::Elem;

    fn t<T: Elem>(shape: &[usize], v: Vec<T>) -> Tensor {
        T::tensor(shape.to_vec(), v).unwrap()
    }

    fn red(op: ReduceOp, axes: Option<Vec<i64>>, keepdims: bool) -> Reduce {
        Reduce { op, axes, keepdims, noop_with_empty_axes: false }
    }

    fn run(op: impl OpDef, x: &Tensor) -> Tensor {
        op.eval(&[x]).unwrap().remove(0)
    }

    fn m23() -> Tensor {
        t(&[2, 3], vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0])
    }

    #[test]
    fn names_follow_onnx() {
        assert_eq!(red(ReduceOp::Mean, None, true).name(), "ReduceMean");
        assert_eq!(red(ReduceOp::SumSquare, None, true).name(), "ReduceSumSquare");
        assert_eq!(red(ReduceOp::LogSumExp, None, true).name(), "ReduceLogSumExp");
        let arg = ArgReduce { max: true, axis: 0, keepdims: true, select_last_index: false };
        assert_eq!(arg.name(), "ArgMax");
        assert_eq!(ArgReduce { max: false, ..arg }.name(), "ArgMin");
    }

    #[test]
    fn reduce_axes_and_keepdims() {
        let y = run(red(ReduceOp::Sum, Some(vec![1]), true), &m23());
        assert_eq!((y.shape(), y.to_f64_vec()), (&[2, 1][..], vec![6.0, 15.0]));
        let y = run(red(ReduceOp::Sum, Some(vec![0]), false), &m23());
        assert_eq!((y.shape(), y.to_f64_vec()), (&[3][..], vec![5.0, 7.0, 9.0]));
        let y = run(red(ReduceOp::Mean, None, true), &m23());
        assert_eq!((y.shape(), y.to_f64_vec()), (&[1, 1][..], vec![3.5]));
        let y = run(red(ReduceOp::Max, Some(vec![-1]), false), &m23());
        assert_eq!(y.to_f64_vec(), [3.0, 6.0]);
        let y = run(red(ReduceOp::Min, Some(vec![-1]), false), &m23());
        assert_eq!(y.to_f64_vec(), [1.0, 4.0]);
        let y = run(red(ReduceOp::Prod, Some(vec![0]), false), &m23());
        assert_eq!(y.to_f64_vec(), [4.0, 10.0, 18.0]);
        assert_eq!(y.dtype(), DType::F32);

        // Middle axis, and two axes around a kept one.
        let x = t(&[2, 3, 2], (0..12).map(|v| v as f64).collect());
        let y = run(red(ReduceOp::Sum, Some(vec![1]), false), &x);
        assert_eq!((y.shape(), y.to_f64_vec()), (&[2, 2][..], vec![6.0, 9.0, 24.0, 27.0]));
        let y = run(red(ReduceOp::Sum, Some(vec![2, 0]), true), &x);
        assert_eq!((y.shape(), y.to_f64_vec()), (&[1, 3, 1][..], vec![14.0, 22.0, 30.0]));
    }

    #[test]
    fn reduce_norms_and_logs() {
        let all = |op, v: Vec<f64>| run(red(op, None, false), &t(&[v.len()], v)).to_f64_vec()[0];
        assert_eq!(all(ReduceOp::L1, vec![-1.0, 2.0, -3.0]), 6.0);
        assert_eq!(all(ReduceOp::L2, vec![3.0, -4.0]), 5.0);
        assert_eq!(all(ReduceOp::SumSquare, vec![1.0, 2.0, 3.0]), 14.0);
        assert_eq!(all(ReduceOp::LogSum, vec![1.0, 2.0, 3.0]), 6f64.ln());
        assert!((all(ReduceOp::LogSumExp, vec![1.0, 2.0, 3.0]) - 3.4076059644443806).abs() < 1e-15);
        assert_eq!(all(ReduceOp::LogSumExp, vec![1000.0, 1000.0]), 1000.0 + std::f64::consts::LN_2);
        assert_eq!(all(ReduceOp::LogSumExp, vec![f64::NEG_INFINITY; 2]), f64::NEG_INFINITY);
        assert!(all(ReduceOp::Max, vec![1.0, f64::NAN, 3.0]).is_nan());
    }

    #[test]
    fn reduce_empty_axis_identities() {
        let x = t(&[2, 0], Vec::<f32>::new());
        let over = |op| run(red(op, Some(vec![1]), false), &x).to_f64_vec();
        assert_eq!(over(ReduceOp::Sum), [0.0, 0.0]);
        assert_eq!(over(ReduceOp::Prod), [1.0, 1.0]);
        assert_eq!(over(ReduceOp::Max), [f64::NEG_INFINITY; 2]);
        assert_eq!(over(ReduceOp::Min), [f64::INFINITY; 2]);
        assert!(over(ReduceOp::Mean).iter().all(|v| v.is_nan()));
        assert_eq!(over(ReduceOp::LogSumExp), [f64::NEG_INFINITY; 2]);
        let xi = t(&[2, 0], Vec::<i8>::new());
        let y = run(red(ReduceOp::Max, Some(vec![1]), false), &xi);
        assert_eq!(y.as_slice::<i8>().unwrap(), &[-128, -128]);
        let xu = t(&[0], Vec::<u8>::new());
        let y = run(red(ReduceOp::Min, None, false), &xu);
        assert_eq!((y.shape(), y.as_slice::<u8>().unwrap()), (&[][..], &[255][..]));
        let y = run(red(ReduceOp::Mean, None, false), &xu);
        assert_eq!(y.as_slice::<u8>().unwrap(), &[0]);
        // Nothing to reduce into: an empty output.
        let y = run(red(ReduceOp::Sum, Some(vec![0]), true), &t(&[3, 0], Vec::<f64>::new()));
        assert_eq!(y.shape(), &[1, 0]);
    }

    #[test]
    fn reduce_empty_axes_semantics() {
        let noop = Reduce { op: ReduceOp::Sum, axes: None, keepdims: false, noop_with_empty_axes: true };
        assert_eq!(run(noop.clone(), &m23()), m23());
        let noop_empty = Reduce { axes: Some(vec![]), ..noop.clone() };
        assert_eq!(run(noop_empty.clone(), &m23()), m23());
        let f = Fact::new(DType::F32, vec![Dim::sym("b"), Dim::Known(3)]);
        assert_eq!(noop_empty.output_facts(&[&f]).unwrap(), vec![f.clone()]);
        let all = red(ReduceOp::Sum, Some(vec![]), false);
        let y = run(all, &m23());
        assert_eq!((y.shape(), y.to_f64_vec()), (&[][..], vec![21.0]));
        // A scalar reduces to itself.
        let y = run(red(ReduceOp::Sum, None, true), &t(&[], vec![5i64]));
        assert_eq!((y.shape(), y.to_f64_vec()), (&[][..], vec![5.0]));
    }

    #[test]
    fn reduce_integers_and_bools() {
        let x = t(&[2], vec![i32::MAX, 1]);
        assert_eq!(run(red(ReduceOp::Sum, None, false), &x).as_slice::<i32>().unwrap(), &[i32::MIN]);
        let x = t(&[2], vec![1i64, 2]);
        assert_eq!(run(red(ReduceOp::Mean, None, false), &x).as_slice::<i64>().unwrap(), &[1]);
        let x = t(&[2], vec![3i32, -4]);
        assert_eq!(run(red(ReduceOp::L2, None, false), &x).as_slice::<i32>().unwrap(), &[5]);
        assert_eq!(run(red(ReduceOp::L1, None, false), &x).as_slice::<i32>().unwrap(), &[7]);
        assert_eq!(run(red(ReduceOp::Prod, None, false), &x).as_slice::<i32>().unwrap(), &[-12]);
        let b = t(&[2, 2], vec![true, false, false, false]);
        let y = run(red(ReduceOp::Max, Some(vec![1]), false), &b);
        assert_eq!(y.as_slice::<bool>().unwrap(), &[true, false]);
        let y = run(red(ReduceOp::Min, Some(vec![1]), false), &b);
        assert_eq!(y.as_slice::<bool>().unwrap(), &[false, false]);
        assert!(red(ReduceOp::Sum, None, false).eval(&[&b]).is_err());
    }

    #[test]
    fn reduce_facts_and_errors() {
        let f = Fact::new(DType::F32, vec![Dim::sym("b"), Dim::sym("s"), Dim::Known(384)]);
        let out = |r: Reduce| r.output_facts(&[&f]).map(|v| v[0].shape.clone());
        assert_eq!(
            out(red(ReduceOp::Mean, Some(vec![-1]), true)).unwrap(),
            vec![Dim::sym("b"), Dim::sym("s"), Dim::Known(1)]
        );
        assert_eq!(out(red(ReduceOp::Mean, Some(vec![1]), false)).unwrap(), vec![Dim::sym("b"), Dim::Known(384)]);
        assert_eq!(out(red(ReduceOp::Mean, None, false)).unwrap(), vec![]);
        assert!(out(red(ReduceOp::Mean, Some(vec![3]), false)).is_err());
        assert!(out(red(ReduceOp::Mean, Some(vec![-4]), false)).is_err());
        let e = out(red(ReduceOp::Mean, Some(vec![1, -2]), false)).unwrap_err();
        assert!(e.to_string().contains("repeated"), "{e}");
        assert!(red(ReduceOp::Sum, Some(vec![0]), false).output_facts(&[&Fact::known(DType::F32, &[])]).is_err());
        assert!(red(ReduceOp::Sum, None, false).output_facts(&[&Fact::known(DType::Bool, &[2])]).is_err());
        assert!(red(ReduceOp::Sum, None, false).output_facts(&[&f, &f]).is_err());
        assert!(red(ReduceOp::Sum, Some(vec![2]), false).eval(&[&m23()]).is_err());
    }

    #[test]
    fn reduce_axes_input() {
        let axes = |v: &[i64]| Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap();
        let sum = |keepdims| red(ReduceOp::Sum, None, keepdims);
        let y = sum(false).eval(&[&m23(), &axes(&[-1])]).unwrap().remove(0);
        assert_eq!((y.shape(), y.to_f64_vec()), (&[2][..], vec![6.0, 15.0]));
        let y = sum(true).eval(&[&m23(), &axes(&[0])]).unwrap().remove(0);
        assert_eq!((y.shape(), y.to_f64_vec()), (&[1, 3][..], vec![5.0, 7.0, 9.0]));
        // Empty axes: everything, or nothing with noop_with_empty_axes.
        let y = sum(false).eval(&[&m23(), &axes(&[])]).unwrap().remove(0);
        assert_eq!(y.to_f64_vec(), [21.0]);
        let noop = Reduce { noop_with_empty_axes: true, ..sum(false) };
        assert_eq!(noop.eval(&[&m23(), &axes(&[])]).unwrap()[0], m23());

        // Facts: constant axes act as the attribute; run-time axes keep the rank when it is known.
        let x = Fact::new(DType::F32, vec![Dim::sym("b"), Dim::Known(1), Dim::Known(4)]);
        let konst = Fact::from_tensor(std::sync::Arc::new(axes(&[2])));
        assert_eq!(sum(false).output_facts(&[&x, &konst]).unwrap()[0].shape, vec![Dim::sym("b"), Dim::Known(1)]);
        let two = Fact::known(DType::I64, &[2]);
        assert_eq!(
            sum(true).output_facts(&[&x, &two]).unwrap()[0].shape,
            vec![Dim::Unknown, Dim::Known(1), Dim::Unknown]
        );
        assert_eq!(sum(false).output_facts(&[&x, &two]).unwrap()[0].shape, vec![Dim::Unknown]);
        let none = Fact::known(DType::I64, &[0]);
        assert_eq!(noop.output_facts(&[&x, &none]).unwrap()[0].shape, x.shape);
        assert_eq!(sum(false).output_facts(&[&x, &none]).unwrap()[0].shape, vec![]);
        let unknown = Fact::new(DType::I64, vec![Dim::Unknown]);
        assert_eq!(sum(true).output_facts(&[&x, &unknown]).unwrap()[0].rank(), 3);
        assert!(sum(false).output_facts(&[&x, &unknown]).unwrap_err().to_string().contains("rank"));
        assert!(sum(false).output_facts(&[&x, &Fact::known(DType::I64, &[4])]).is_err());
        // Wrong dtype or rank, axes twice, bad values at run time.
        assert!(sum(false).output_facts(&[&x, &Fact::known(DType::I32, &[1])]).is_err());
        assert!(sum(false).output_facts(&[&x, &Fact::known(DType::I64, &[1, 1])]).is_err());
        let both = red(ReduceOp::Sum, Some(vec![0]), false);
        assert!(both.output_facts(&[&x, &two]).unwrap_err().to_string().contains("both"));
        assert!(sum(false).eval(&[&m23(), &axes(&[2])]).is_err());
        assert!(sum(false).eval(&[&m23(), &axes(&[0, 0])]).is_err());
    }

    #[test]
    fn arg_max_min() {
        let x = t(&[2, 3], vec![1f32, 3.0, 3.0, 5.0, 0.0, 5.0]);
        let arg = |max, axis, keepdims, last| ArgReduce { max, axis, keepdims, select_last_index: last };
        let y = run(arg(true, 1, false, false), &x);
        assert_eq!((y.shape(), y.as_slice::<i64>().unwrap()), (&[2][..], &[1, 0][..]));
        assert_eq!(run(arg(true, 1, false, true), &x).as_slice::<i64>().unwrap(), &[2, 2]);
        assert_eq!(run(arg(false, -1, false, false), &x).as_slice::<i64>().unwrap(), &[0, 1]);
        let y = run(arg(true, 0, true, false), &x);
        assert_eq!((y.shape(), y.as_slice::<i64>().unwrap()), (&[1, 3][..], &[1, 0, 1][..]));
        let y = run(arg(false, 0, true, false), &t(&[2, 2], vec![7i32, -1, 7, -2]));
        assert_eq!(y.as_slice::<i64>().unwrap(), &[0, 1]);
        // NaN wins, as numpy has it.
        let n = t(&[3], vec![1f64, f64::NAN, 3.0]);
        assert_eq!(run(arg(true, 0, false, false), &n).as_slice::<i64>().unwrap(), &[1]);
        assert_eq!(run(arg(false, 0, false, false), &n).as_slice::<i64>().unwrap(), &[1]);

        let e = arg(true, 1, false, false).eval(&[&t(&[2, 0], Vec::<f32>::new())]).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let y = run(arg(true, 1, false, false), &t(&[0, 2], Vec::<f32>::new()));
        assert_eq!(y.shape(), &[0]);
        assert!(arg(true, 2, false, false).eval(&[&x]).is_err());
        assert!(arg(true, 0, false, false).eval(&[&t(&[], vec![1f32])]).is_err());
        assert!(arg(true, 0, false, false).eval(&[&t(&[1], vec![true])]).is_err());

        let f = Fact::new(DType::F16, vec![Dim::sym("b"), Dim::Known(10)]);
        let out = arg(true, -1, true, false).output_facts(&[&f]).unwrap();
        assert_eq!(out, vec![Fact::new(DType::I64, vec![Dim::sym("b"), Dim::Known(1)])]);
        let out = arg(true, 0, false, false).output_facts(&[&f]).unwrap();
        assert_eq!(out[0].shape, vec![Dim::Known(10)]);
        assert!(arg(true, 2, false, false).output_facts(&[&f]).is_err());
    }
}
