//! Small helpers shared by op implementations.

use crate::{IrError, IrResult};
use slimnn_tensor::Dim;

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

/// A vector of unknown dims of the given rank.
pub fn unknown_dims(rank: usize) -> Vec<Dim> {
    vec![Dim::Unknown; rank]
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
