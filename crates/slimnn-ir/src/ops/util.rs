//! Small helpers shared by op implementations.

use crate::{Fact, IrError, IrResult};
use slimnn_tensor::{Dim, Tensor};

/// Checks the input count is within `min..=max`.
pub fn expect_inputs<T>(op: &'static str, inputs: &[T], min: usize, max: usize) -> IrResult<()> {
    if inputs.len() < min || inputs.len() > max {
        let want = if min == max { format!("{min}") } else { format!("{min} to {max}") };
        return Err(IrError::op(op, format!("expects {want} inputs, got {}", inputs.len())));
    }
    Ok(())
}

/// Resolves a possibly negative axis against `rank` (ONNX convention).
pub fn norm_axis(op: &'static str, axis: i64, rank: usize) -> IrResult<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) && !(r == 0 && a == 0) {
        return Err(IrError::op(op, format!("axis {axis} is out of range for rank {rank}")));
    }
    Ok(a as usize)
}

/// Like [`norm_axis`] but for an insertion point in `0..=rank`.
pub fn norm_axis_incl(op: &'static str, axis: i64, rank: usize) -> IrResult<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r + 1 } else { axis };
    if a < 0 || a > r {
        return Err(IrError::op(op, format!("axis {axis} is out of range for rank {rank}")));
    }
    Ok(a as usize)
}

/// Numpy broadcast of symbolic shapes.
pub fn broadcast_dims(op: &'static str, a: &[Dim], b: &[Dim]) -> IrResult<Vec<Dim>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n { a[i + a.len() - n].clone() } else { Dim::Known(1) };
            let db = if i + b.len() >= n { b[i + b.len() - n].clone() } else { Dim::Known(1) };
            da.broadcast(&db).ok_or_else(|| {
                IrError::op(op, format!("cannot broadcast shapes {} and {}", show_dims(a), show_dims(b)))
            })
        })
        .collect()
}

pub fn show_dims(d: &[Dim]) -> String {
    let parts: Vec<String> = d.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(","))
}

/// The constant value of an input fact, with a clear error when it is not constant.
pub fn konst<'a>(op: &'static str, what: &str, f: &'a Fact) -> IrResult<&'a Tensor> {
    f.konst.as_deref().ok_or_else(|| IrError::op(op, format!("{what} must be a constant")))
}

/// A 0-d or 1-d integer tensor as i64 values.
pub fn i64s(op: &'static str, what: &str, t: &Tensor) -> IrResult<Vec<i64>> {
    if !t.dtype().is_integer() {
        return Err(IrError::op(op, format!("{what} must be integers, got {}", t.dtype())));
    }
    Ok(t.to_i64_vec()?)
}

/// A vector of unknown dims of the given rank.
pub fn unknown_dims(rank: usize) -> Vec<Dim> {
    vec![Dim::Unknown; rank]
}

/// Index arithmetic for a row-major shape: flat offset of a multi-index.
pub fn offset(strides: &[usize], idx: &[usize]) -> usize {
    strides.iter().zip(idx).map(|(s, i)| s * i).sum()
}

/// Advances a multi-index over `shape` in row-major order; false when it wraps to the start.
pub fn next_index(idx: &mut [usize], shape: &[usize]) -> bool {
    for i in (0..shape.len()).rev() {
        idx[i] += 1;
        if idx[i] < shape[i] {
            return true;
        }
        idx[i] = 0;
    }
    false
}

/// Placeholder implementation used while an op family is being written.
#[allow(unused_macros)]
macro_rules! todo_op {
    ($t:ty, $name:literal) => {
        impl $crate::ops::OpDef for $t {
            fn name(&self) -> &'static str {
                $name
            }
            fn output_facts(&self, _inputs: &[&$crate::Fact]) -> $crate::IrResult<Vec<$crate::Fact>> {
                Err($crate::IrError::op($name, "not implemented yet"))
            }
            fn eval(&self, _inputs: &[&slimnn_tensor::Tensor]) -> $crate::IrResult<Vec<slimnn_tensor::Tensor>> {
                Err($crate::IrError::op($name, "not implemented yet"))
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use todo_op;
